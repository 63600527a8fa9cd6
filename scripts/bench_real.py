"""Benchmark: the CLI's lists on the published models (src/published_models), beside the authors'
own converted files and our peers, all timed in this process.

    python scripts/bench_real.py [--models fer_emotion,mtcnn_rnet,...] [--rounds 5] [--doc docs/real_models.md]
        [--candidates lossless,weights_tensor,weights_channel,int8,auto] [--peers litert_fp32,...]

Per model, each candidate: lossless, 8-bit weights per tensor and per channel, calibrated int8
(quantize_convs and quantize_matmuls) and --auto, through optimise_saved_model / auto_optimise in
this process; the authors' .tflite / .onnx where they ship them; our LiteRT (fp32, int8_full), ONNX
Runtime (fp32) and OpenVINO (int8) peers where they convert (from the frozen model where the
SavedModel fails, as the pipeline's peers do). Figures: size against the SavedModel, each output's
verdict by its kind (metric and value, judged on the second half of the sample rows; the first
half calibrates), and latency against the SavedModel at batch 1 and 64 (median of per-round
ratios, interleaved rounds in a seeded random order; serving_optimiser.timing). Rows are cycled to
fill a batch of 64 where a model has fewer. One table per model on stdout; with --doc, the
tables and the CPU line replace the "Results: make bench-real" section of that markdown file.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serving_optimiser.runtime import quiet_tensorflow

LOSSLESS = "remove_nodes(op=Identity) fold_constants(ignore_errors=true) fold_batch_norms fold_old_batch_norms " \
           "strip_unused_nodes sort_by_execution_order"
WEIGHTS = "fold_constants(ignore_errors=true) fold_batch_norms fold_old_batch_norms quantize_weights " \
          "strip_unused_nodes"
WEIGHTS_PER_CHANNEL = WEIGHTS.replace("quantize_weights", "quantize_weights(per_channel=true)")
INT8 = "fold_constants(ignore_errors=true) fold_batch_norms fold_old_batch_norms quantize_convs quantize_matmuls " \
       "strip_unused_nodes"
LISTS = {"lossless": LOSSLESS, "weights_tensor": WEIGHTS, "weights_channel": WEIGHTS_PER_CHANNEL, "int8": INT8}
CANDIDATES = (*LISTS, "auto")
# Our peers: name -> (format, quantisation).
OUR_PEERS = {"litert_fp32": ("litert", "none"), "litert_int8": ("litert", "int8_full"),
             "onnx_fp32": ("onnx", "none"), "openvino_int8": ("openvino", "int8")}
BATCH_SIZES = (1, 64)
THREADS = 2  # the peers' runtime threads, as the pipeline's peers.threads
SECTION = "## Results: make bench-real"


def progress(message: str) -> None:
    print(f"bench_real: {message}", file=sys.stderr, flush=True)


@dataclass
class Row:
    """One candidate of one model: what it is, its size against the SavedModel, each output's
    verdict, its latency ratios to the SavedModel, and a note (why it is missing, what it did)."""

    name: str
    source: str  # "ours (CLI)", "authors", "our peer"
    size_ratio: float | None = None
    outputs: dict[str, dict] = field(default_factory=dict)  # output -> {kind, metric, value, verdict}
    ratios: dict[int, float] = field(default_factory=dict)  # batch size -> time / the SavedModel's
    note: str = ""


@dataclass
class ModelResult:
    name: str
    description: str
    rows: list[Row] = field(default_factory=list)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _verdicts(outputs: Mapping[str, Mapping]) -> str:
    """``face_prob class_agreement 1.000 pass; box rms_diff_of_range 0.004 pass``."""
    return "; ".join(f"{name} {o['metric']} {_fmt(o['value'], 4)} {o['verdict']}"
                     for name, o in sorted(outputs.items()))


def model_table(result: ModelResult) -> str:
    """One markdown table of a model's rows (the table bench_real prints and writes)."""
    header = ["candidate", "from", "size ×", "outputs: metric value verdict", *(f"batch {b} ×" for b in BATCH_SIZES),
              "note"]
    lines = [f"### {result.name}", "", result.description, "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result.rows:
        cells = [row.name, row.source, _fmt(row.size_ratio), _verdicts(row.outputs) or "–",
                 *(_fmt(row.ratios.get(b), 2) for b in BATCH_SIZES), row.note.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _judged(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
            kinds: Mapping[str, str]) -> dict[str, dict]:
    from serving_optimiser.saved_model.output_kinds import DEFAULT_TOLERANCES, judge

    result = {}
    for name, kind in kinds.items():
        if name not in candidate:
            continue
        judgement = judge(kind, np.asarray(reference[name]), np.asarray(candidate[name], np.float32).reshape(
            np.shape(reference[name])), DEFAULT_TOLERANCES).to_json()
        result[name] = {key: judgement[key] for key in ("kind", "metric", "value", "verdict")}
    return result


def _from_report(comparison: Mapping[str, Mapping]) -> dict[str, dict]:
    return {name: {key: o[key] for key in ("kind", "metric", "value", "verdict")} for name, o in comparison.items()}


def _cycled(inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """``rows`` rows, the sample rows repeated where there are fewer."""
    return {name: np.take(np.asarray(values), np.arange(rows) % len(values), axis=0)
            for name, values in inputs.items()}


def _authors_call(model, peer: str) -> Callable[[dict], object]:
    """The authors' file as a call on inputs by signature input name (a fixed batch of one row: row
    by row, as published_models.peers runs it), the session or interpreter loaded once."""
    if peer == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = THREADS
        session = onnxruntime.InferenceSession(str(model.peers["onnx"]), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]

        def run_onnx(inputs: dict) -> dict:
            feeds = {i.name: np.asarray(inputs[model.peer_inputs[i.name]]) for i in session.get_inputs()}
            return {model.peer_outputs[n]: v for n, v in zip(names, session.run(names, feeds))}

        return run_onnx
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(model.peers["tflite"]), num_threads=THREADS)
    details = {d["name"]: d for d in interpreter.get_input_details()}
    fixed = {int(d["shape_signature"][0]) for d in details.values()} != {-1}
    shapes: dict = {}

    def run_tflite(inputs: dict) -> dict:
        rows = len(next(iter(inputs.values())))
        step = 1 if fixed else rows
        if not fixed and shapes.get("rows") != rows:
            for name, detail in details.items():
                interpreter.resize_tensor_input(detail["index"], inputs[model.peer_inputs[name]].shape)
            interpreter.allocate_tensors()
            shapes["rows"] = rows
        elif fixed and "rows" not in shapes:
            interpreter.allocate_tensors()
            shapes["rows"] = 1
        parts: dict[str, list] = {}
        for start in range(0, rows, step):
            for name, detail in details.items():
                interpreter.set_tensor(detail["index"], np.asarray(inputs[model.peer_inputs[name]][start:start + step]))
            interpreter.invoke()
            for detail in interpreter.get_output_details():
                parts.setdefault(model.peer_outputs[detail["name"]], []).append(
                    interpreter.get_tensor(detail["index"]).copy())
        return {name: np.concatenate(values) for name, values in parts.items()}

    return run_tflite


def bench_model(name: str, work: Path, rounds: int, candidates=CANDIDATES, peers=tuple(OUR_PEERS),
                authors: bool = True) -> ModelResult:
    """Every candidate of published model ``name``, converted under ``work`` and timed together."""
    from published_models import load
    from serving_optimiser.errors import first_line
    from serving_optimiser.graph_transforms.transforms._int8 import int8_kernels_available
    from serving_optimiser.peers.convert import SOURCE_FILE, convert_peer
    from serving_optimiser.peers.params import PeerSpec
    from serving_optimiser.peers.predictor import TFPredictor, load_predictor
    from serving_optimiser.saved_model import compare_saved_models, optimise_saved_model
    from serving_optimiser.saved_model._files import directory_size
    from serving_optimiser.saved_model.auto import auto_optimise
    from serving_optimiser.saved_model.freeze import freeze_saved_model
    from serving_optimiser.timing import TimedModel, local_timer, measure_side_by_side

    model = load(name)
    sig = model.signature
    half = model.rows // 2
    decide = {sig: {k: np.array(v[:half]) for k, v in model.inputs.items()}}
    judge_rows = {k: np.array(v[half:]) for k, v in model.inputs.items()}
    judge = {sig: judge_rows}
    kinds = {output: spec.kind for output, spec in model.outputs.items()}
    original_size = directory_size(model.saved_model)
    result = ModelResult(name, f"{model.parameters:,} parameters; inputs: {model.input_description}; "
                               f"{model.rows // 2} rows calibrate, {model.rows - half} judge.")
    calls: dict[str, Callable] = {"saved_model": TFPredictor.load(model.saved_model, signature=sig)}
    result.rows.append(Row("saved_model", "published (export)", 1.0, note="the yardstick"))
    reference = calls["saved_model"](judge_rows)

    for candidate in candidates:
        row = Row(candidate, "ours (CLI)")
        result.rows.append(row)
        out = work / candidate
        start = time.perf_counter()
        try:
            if candidate == "int8" and not int8_kernels_available():
                row.note = "skipped: its int8 ops need oneDNN (TF_ENABLE_ONEDNN_OPTS=1)"
                continue
            if candidate == "auto":
                report = auto_optimise(model.saved_model, out, sample_inputs=judge, calibration_inputs=decide,
                                       signature_keys=[sig], output_kinds=kinds)
                row.outputs = _from_report(compare_saved_models(model.saved_model, out, judge, [sig],
                                                                output_kind_overrides=kinds)[sig])
                row.note = f"picked {report['winner']}"
            else:
                report = optimise_saved_model(model.saved_model, out, LISTS[candidate], signature_keys=[sig],
                                              sample_inputs=judge, output_kinds=kinds,
                                              calibration_inputs=decide if candidate == "int8" else None)
                row.outputs = _from_report(report["comparison"][sig])
                sent = report.get("gate", {}).get("sent_back", [])
                row.note = f"gate sent back {len(sent)} unit(s)" if sent else ""
        except Exception as error:  # noqa: BLE001 - one line per candidate that fails; the bench goes on
            row.note = f"{type(error).__name__}: {first_line(error)}"[:300]
            progress(f"{name}: {candidate}: {row.note}")
            continue
        row.size_ratio = directory_size(out) / original_size
        calls[candidate] = TFPredictor.load(out, signature=sig)
        progress(f"{name}: {candidate} in {time.perf_counter() - start:.1f} s")

    for peer in sorted(model.peers) if authors else ():
        row = Row(f"authors_{peer}", "authors")
        result.rows.append(row)
        try:
            call = _authors_call(model, peer)
            row.outputs = _judged(reference, call(judge_rows), kinds)
        except Exception as error:  # noqa: BLE001 - the authors' file may not run here: one line
            row.note = f"{type(error).__name__}: {first_line(error)}"[:300]
            continue
        row.size_ratio = model.peers[peer].stat().st_size / original_size
        if peer == "tflite" and model.peers[peer].stat().st_size < original_size / 3:
            row.note = "the authors' quantised file"
        calls[row.name] = call

    frozen = work / "frozen"
    if peers:
        freeze_saved_model(model.saved_model, [sig]).save(frozen)
    for peer in peers:
        row = Row(peer, "our peer")
        result.rows.append(row)
        format_name, quantization = OUR_PEERS[peer]
        spec = PeerSpec(peer, format_name, quantization, calibration_rows=half if quantization != "none" else None,
                        opset=17 if format_name == "onnx" else None,
                        minimum_dim=16 if format_name == "openvino" else None)
        try:
            path = convert_peer(spec, model.saved_model, work / "peers", decide[sig], signature=sig, frozen=frozen)
            predictor = load_predictor(path, threads=THREADS, signature=sig)
            row.outputs = _judged(reference, predictor(judge_rows), kinds)
        except Exception as error:  # noqa: BLE001 - a peer that cannot convert this model: one line
            row.note = f"cannot convert: {first_line(error)}"[:300]
            progress(f"{name}: {peer}: {row.note}")
            continue
        files = [p for p in path.parent.iterdir() if p.is_file() and p.name != SOURCE_FILE]
        row.size_ratio = sum(p.stat().st_size for p in files) / original_size
        if (path.parent / SOURCE_FILE).is_file():
            row.note = "converted from the frozen model (the SavedModel failed)"
        calls[peer] = predictor

    batches = {size: _cycled(judge_rows, size) for size in BATCH_SIZES}
    timed = [TimedModel(key, local_timer(call, batches), 0.0) for key, call in calls.items()]
    progress(f"{name}: timing {len(timed)} models at batch {', '.join(map(str, BATCH_SIZES))}, {rounds} rounds")
    figures = measure_side_by_side(timed, BATCH_SIZES, rounds, lambda size: max(2, 64 // size // 2), seed=0)
    for row in result.rows:
        if row.name in figures:
            row.ratios = {size: figures[row.name]["batches"][str(size)]["ratio"] for size in BATCH_SIZES}
    return result


def write_section(doc: Path, text: str) -> None:
    """Replace the doc's "Results: make bench-real" section (up to the next "## " heading) with
    ``text``, or append it."""
    content = doc.read_text()
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = f"{SECTION}\n\n{text.rstrip()}\n\n"
    content = pattern.sub(lambda _: section, content) if pattern.search(content) else \
        content.rstrip() + "\n\n" + section
    doc.write_text(content.rstrip() + "\n")


def main(argv: list[str]) -> int:
    from published_models import MODEL_NAMES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--doc", help="write the tables into this markdown file's results section")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated (empty: none)")
    parser.add_argument("--peers", default=",".join(OUR_PEERS), help="our peers, comma-separated (empty: none)")
    args = parser.parse_args(argv)
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODEL_NAMES)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    candidates = [c for c in args.candidates.split(",") if c]
    peers = [p for p in args.peers.split(",") if p]
    wrong = [c for c in candidates if c not in CANDIDATES] + [p for p in peers if p not in OUR_PEERS]
    if wrong:
        parser.error(f"unknown candidate or peer {wrong[0]!r}; known: {', '.join([*CANDIDATES, *OUR_PEERS])}")
    quiet_tensorflow()
    from serving_optimiser.pipeline.machine import describe_machine, machine_line

    cpu = machine_line(describe_machine())
    print(f"CPU: {cpu}")
    tables = []
    start = time.perf_counter()
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"bench-real-{name}-") as work:
            table = model_table(bench_model(name, Path(work), args.rounds, candidates, peers))
        print(table, flush=True)
        tables.append(table)
    minutes = (time.perf_counter() - start) / 60
    if args.doc:
        intro = (f"CPU: {cpu}. {minutes:.0f} minutes for the run ({args.rounds} timing rounds), with `nice -n 10` "
                 "on a machine shared with other work: ratios are medians of per-round ratios, so load hits both "
                 "sides, but treat differences under ~10 % as noise. Size × and batch × are against the published "
                 "SavedModel (the yardstick row); outputs are judged by their kind on the held-out rows "
                 "(verdict under the default tolerances, docs/saved_model.md). \"–\": not measured (see the note).")
        write_section(Path(args.doc), intro + "\n\n" + "\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
