"""``optimise_saved_model``: freeze any SavedModel, apply Graph Transform Tool transforms, convert
it back with every signature intact and check it still answers like the original.

Example:

    optimise_saved_model export/1 optimised/1 \\
        --transforms 'remove_nodes(op=Identity) fold_constants(ignore_errors=true) quantize_weights' \\
        --sample-inputs rows.npz

The comparison calls every kept signature of both models on the same inputs: the arrays of
--sample-inputs, or else 64 seeded rows generated from each input's dtype and shape (unknown
dimensions: 64 for the first, 1 for the others; floats ~ N(0, 1), integers in [0, 10), random
bools, strings "0".."9"). Each output is judged by what it means. Its kind comes from the op
that produces it (through Identity, Reshape, Squeeze, ExpandDims, StridedSlice, ...) and its
dtype, or from --output-kind NAME=KIND:

  class        Softmax, or a float output an ArgMax reads   argmax agreement        >= 0.99
  label        integer, bool or string                      agreement               >= 0.99
  multi_label  Sigmoid (each element a label at 0.5)        flips / orig. positives <= 0.02
                                                            flips / all elements    <= 0.005
  regression   anything else                                RMS |diff| / range      <= 0.01
                                                            max |diff| / range      <= 0.05

(range: the original output's max - min on the batch). On generated inputs, which are off the
model's data, the report says so and only gross breakage fails: agreement >= 0.5, flips <= 0.5
of the positives and 0.125 of all, RMS |diff| <= 0.1 and max |diff| <= 0.5 of the range.
Each output's line gives its kind, figures, verdict and max |difference|. --min-agreement X
replaces the class and label agreement tolerance. A signature call that does not return within
--compare-timeout seconds stops the run with an error naming it. Each model is called on at
most --chunk-bytes of input rows at a time (default 16 MiB), so real images fit in memory;
before the outputs of both models are held, their size is estimated against the memory
available, and a comparison that would not fit stops with one line saying to use fewer rows.

The gate is on by default. When an output misses its tolerance, the tensors and layers of the
lossy transforms (round_weights, quantize_weights, quantize_nodes, quantize_matmuls,
quantize_convs) that hurt most go back, first to per-channel ranges, then to float, one log
line each, until every output passes. They are ranked by their measured error in one pass on
--calibration-inputs where given (else on the comparison's inputs) and judged on the
comparison's inputs; the number of model runs is bounded (about 3 log2 N + 3 for N units, see
serving_optimiser.saved_model.guard). A list that already passes is written as it always was.
The report gives the tensors sent back and the share of weight bytes kept float. When nothing
left makes it pass, the run fails naming the outputs and the units (exit 3, OUT_DIR not
created). --no-compare skips the comparison and the gate, and says so on stderr.

OUT_DIR gets TF Serving's warm-up records (assets.extra/tf_serving_warmup_requests, batch 1
per signature by default, from --sample-inputs where given), replayed by the model server at
load. When the transforms emit int8 ops that only oneDNN implements (quantize_matmuls,
quantize_convs) and oneDNN is off in this process (TF_ENABLE_ONEDNN_OPTS=0, or unset on a CPU
without AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX), the tool says so and writes nothing: set
TF_ENABLE_ONEDNN_OPTS=1. Such a model checks its kernels in its init op, so it fails at load,
naming the fix, wherever they are missing.

Progress goes to stderr, the per-output comparison to stdout. Exit codes: 0 done; 1 error
(one or two lines on stderr, OUT_DIR not created); 2 bad usage; 3 the gate could not make an
output pass its verdict (one line naming the outputs, figures and units, OUT_DIR not created);
130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
from pathlib import Path

from .. import runner
from ..chunks import DEFAULT_CHUNK_BYTES
from .common import ToolArgumentParser

PROG = "optimise_saved_model"
EXIT_DISAGREES = 3


def build_parser() -> argparse.ArgumentParser:
    parser = ToolArgumentParser(
        prog=PROG,
        description="Freeze a SavedModel, transform it with the Graph Transform Tool and convert it back, "
        "keeping every signature; then compare it with the original.",
        docstring=__doc__,
    )
    parser.add_argument("in_dir", metavar="IN_DIR",
                        help="the SavedModel directory to optimise, or a Keras .keras / .h5 file (exported first "
                        "with a serving_default signature named after the model's inputs)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where to write the optimised SavedModel (must not exist)")
    chosen = parser.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--transforms", help="transforms in the old tool's syntax, applied in order")
    chosen.add_argument("--auto", action="store_true",
                        help="try every candidate list (lossless, 8-bit weights per tensor and per channel, and with "
                        "--calibration-inputs calibrated int8 and the small-batch int8 list) through the gate, time "
                        "each against the original at --serving-batch-size rows (default 1) on this machine, and "
                        "write the best by --objective; needs --sample-inputs")
    parser.add_argument("--objective", choices=("size", "latency"), default="size",
                        help="with --auto: size (the smallest passing candidate not slower than the original) or "
                        "latency (the fastest passing candidate not bigger); a candidate must win by 5 %% or the "
                        "original is written, through the lossless list (default: size)")
    parser.add_argument(
        "--signature", action="append", metavar="KEY",
        help="signature key to keep (repeatable, or comma-separated; default: all)",
    )
    parser.add_argument(
        "--tag", action="append", metavar="TAG", help="MetaGraphDef tag (repeatable; default: serve)"
    )
    parser.add_argument("--sample-inputs", metavar="FILE.npz",
                        help="inputs to compare on: arrays named <input> or <signature>/<input> "
                        "(default: 64 seeded rows generated from each signature's dtypes and shapes)")
    parser.add_argument("--calibration-inputs", metavar="FILE.npz",
                        help="rows to calibrate quantize_matmuls and quantize_convs on, named like --sample-inputs: "
                        "each such step without ranges_file is calibrated on the graph as it is at that step, and "
                        "layers whose int8 error is over its max_layer_error stay float (also the comparison's "
                        "inputs when --sample-inputs is not given)")
    parser.add_argument("--serving-batch-size", type=_positive_int, metavar="N",
                        help="with --calibration-inputs: time the optimised model against the original at N rows "
                        "on this machine and, while it is not faster, send int8 layers back to float, the slowest "
                        "in int8 (each timed alone) first (int8 pays on large batches; at batch 1 it can cost "
                        "more than it saves)")
    parser.add_argument("--min-agreement", type=float, metavar="X",
                        help="the class and label agreement tolerance (0..1) the gate holds the outputs to "
                        "(default: 0.99 on sample inputs, 0.5 on generated ones)")
    parser.add_argument("--output-kind", action="append", type=_output_kind, metavar="NAME=KIND",
                        help="judge output NAME (or SIGNATURE/NAME) as KIND: class, label, multi_label or "
                        "regression, instead of the kind inferred from the graph (repeatable)")
    parser.add_argument("--allow-ops", action="append", metavar="A,B",
                        help="ops to accept although the safety scan refuses them (e.g. PrintV2)")
    parser.add_argument("--no-dequantize-once", dest="dequantize_once", action="store_false",
                        help="keep Dequantize ops on the call path instead of caching their float values at load")
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="skip the comparison, and so the gate on the lossy transforms")
    parser.add_argument("--compare-timeout", type=_positive_float, default=300.0, metavar="SECONDS",
                        help="stop with an error when a signature call takes longer (default: 300)")
    parser.add_argument("--chunk-bytes", type=_positive_int, default=DEFAULT_CHUNK_BYTES, metavar="BYTES",
                        help="call a model on at most this many bytes of input rows at a time in the comparison, "
                        "the gate and calibration, so large inputs fit in memory; fewer rows than that are one "
                        f"call (default: {DEFAULT_CHUNK_BYTES} = {DEFAULT_CHUNK_BYTES // 2**20} MiB)")
    parser.add_argument("--warmup-batch-sizes", type=_batch_sizes, default=[1], metavar="N,M",
                        help="batch sizes of the TF Serving warm-up records written to "
                        "assets.extra/tf_serving_warmup_requests for each signature (default: 1; 0: none)")
    parser.add_argument(
        "--frozen-dir", metavar="DIR", help="also write the frozen model (frozen_graph.pb, signatures.json)"
    )
    parser.add_argument("--report", metavar="FILE.json", help="also write the report as JSON")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _output_kind(text: str) -> tuple[str, str]:
    from ..saved_model.output_kinds import parse_output_kinds

    try:
        ((name, kind),) = parse_output_kinds([text]).items()
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name, kind


def _batch_sizes(text: str) -> list[int]:
    if text.strip() == "0":
        return []
    try:
        sizes = [int(item) for item in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas (or 0), got {text!r}")
    return sizes


def _split(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [item.strip() for value in values for item in value.split(",")]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


_METRIC_WORDS = {
    "class_agreement": "class agreement",
    "label_agreement": "label agreement",
    "flips_of_positives": "flips of positives",
    "flips_of_all": "of all",
    "rms_diff_of_range": "RMS |diff| of range",
    "max_diff_of_range": "max",
}


def _figures(result: dict) -> str:
    """``class agreement 98.44% (>= 99.00%)``: each check's figure and bound, as percentages."""
    return ", ".join(
        f"{_METRIC_WORDS.get(c['metric'], c['metric'])} {_percent(c['value'])} ({c['op']} {_percent(c['tolerance'])})"
        for c in result["checks"]
    )


def format_report(report: dict) -> str:
    """The report as the lines the tool prints on stdout."""
    lines = []
    for key, outputs in sorted(report.get("comparison", {}).items()):
        generated = any(r.get("inputs") == "generated" for r in outputs.values())
        lines.append(f"signature '{key}'" + (" (generated inputs: only the gross-breakage tolerances apply)"
                                             if generated else ""))
        width = max(len(name) for name in outputs)
        for name, result in sorted(outputs.items()):
            diff = "-" if result["max_abs_diff"] is None else f"{result['max_abs_diff']:.3g}"
            if result["equal"]:
                same = "identical"
            elif result.get("within_rounding"):
                same = f"identical within float rounding (max |diff| {diff})"
            else:
                same = "differs"
            if "verdict" in result:
                lines.append(f"  {name:<{width}}  {result['verdict']:<4}  {result['kind']:<11}  {_figures(result)}  "
                             f"max |diff| {diff}  {same}")
            else:
                lines.append(
                    f"  {name:<{width}}  class agreement {_percent(result['class_agreement']):>8}  "
                    f"max |diff| {diff:>9}  {same}"
                )
    sizes = report.get("size_bytes")
    if sizes:
        ratio = report["size_ratio"]
        lines.append(
            f"size: {sizes['input'] / 1024:.1f} KB -> {sizes['output'] / 1024:.1f} KB"
            + (f" ({ratio:.3f}x)" if ratio is not None else "")
        )
    nodes = report.get("nodes")
    if nodes:
        lines.append(
            f"nodes: {nodes['frozen']} frozen -> {nodes['optimised']} optimised; "
            f"{report.get('dequantized_once', 0)} weight(s) dequantized once at load"
        )
    if report.get("onednn_only_ops"):
        ops = ", ".join(f"{op} x{count}" for op, count in sorted(report["onednn_only_ops"].items()))
        lines.append(f"int8 ops that need oneDNN: {ops}; serve with TF_ENABLE_ONEDNN_OPTS=1 where oneDNN is off by "
                     "default (the model's init op checks, so it fails at load there, not at a request)")
    if report.get("warmup_batch_sizes"):
        sizes = ",".join(str(b) for b in report["warmup_batch_sizes"])
        lines.append(f"warm-up records: assets.extra/tf_serving_warmup_requests, batch size(s) {sizes} per signature")
    timings = report.get("timings")
    if timings:
        lines.append("time: " + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in timings.items()))
    for step in report.get("calibration", []):
        errors = step["layer_errors"]
        worst = max(errors.values()) if errors else None
        lines.append(
            f"calibrated step {step['step']} {step['transform']} on {step['rows']} rows: "
            f"{len(errors)} layer(s) measured"
            + (f" (largest int8 output error {worst:.4f})" if worst is not None else "")
            + f", {len(step['float_by_guard'])} kept float over max_layer_error={step['max_layer_error']:g}, "
            + (f"{len(step['float_by_speed'])} back to float for speed at batch {step['timed_batch_size']}, "
               if step.get("timed_batch_size") else "")
            + f"{len(step['float_by_agreement'])} back to float for the agreement"
        )
    serving = report.get("serving_batch")
    if serving:
        tries = " -> ".join(f"{ratio:.2f} x" for ratio in serving["time_ratios"])
        lines.append(f"at batch {serving['batch_size']}: the optimised model's time over the original's: {tries}")
    gate = report.get("gate")
    if gate:
        weights = gate["weights"]
        share = weights["kept_float_share"]
        runs = gate["model_runs"]
        lines.append(
            f"gate: {len(gate['sent_back'])} tensor(s) or layer(s) sent back "
            f"(decided on {gate['decided_on']}, judged on {gate['judged_on']}; {runs['judged']} judged run(s), "
            f"at most {runs['max_judged']}, and {runs['ranking']} ranking run(s)); weights kept float: "
            + ("-" if share is None else f"{100 * share:.1f}% of {weights['float_bytes_before'] / 1024:.1f} KB")
        )
        for unit in gate["sent_back"]:
            where = "float" if unit["to"] == "float" else "per-channel ranges"
            lines.append(f"  back to {where}: {'+'.join(unit['transforms'])} {unit['kind']} '{unit['name']}' "
                         f"({unit['measured']} {unit['error']:.4f})")
    if "min_class_agreement" in report:
        lines.append(f"lowest class agreement: {_percent(report['min_class_agreement'])}")
    if "verdict" in report:
        failing = report["failing_outputs"]
        lines.append("verdict: pass (every output within its tolerance)" if not failing else
                     f"verdict: fail ({len(failing)} output(s) outside their tolerance)")
    return "\n".join(lines)


def _write_report(path: str, report: dict) -> None:
    from ..atomic import atomic_file

    with atomic_file(path) as stream:
        json.dump(report, stream, indent=2, sort_keys=True)
        stream.write("\n")


@contextlib.contextmanager
def _no_propagation(logger: logging.Logger):
    """Keep progress lines to our handler: TensorFlow may configure the root logger meanwhile."""
    previous = logger.propagate
    logger.propagate = False
    try:
        yield
    finally:
        logger.propagate = previous


def _check_before_tensorflow(args: argparse.Namespace) -> None:
    """Reject a wrong input directory or transform list before TensorFlow is imported (~5 s)."""
    from ..graph_transforms.catalogue import check_transforms
    from ..graph_transforms.errors import TransformError
    from ..graph_transforms.parser import parse_transforms
    from ..saved_model.errors import SavedModelError
    from ..saved_model.keras_file import KERAS2_SUFFIXES, KERAS3_SUFFIXES
    from ..saved_model.reader import saved_model_file

    if args.auto and args.sample_inputs is None:
        raise SavedModelError("--auto judges every candidate on your data: it needs --sample-inputs")
    if not args.auto and args.serving_batch_size is not None and args.calibration_inputs is None:
        raise SavedModelError("--serving-batch-size times the calibrated layers: it needs --calibration-inputs")
    in_path = Path(args.in_dir)
    if in_path.suffix.lower() in KERAS3_SUFFIXES + KERAS2_SUFFIXES:
        if not in_path.is_file():
            raise SavedModelError(f"{in_path}: no such Keras file")
    else:
        saved_model_file(args.in_dir)
    if args.auto:
        return
    try:
        check_transforms(parse_transforms(args.transforms))
    except TransformError as error:
        raise SavedModelError(f"transforms: {error}") from None


@contextlib.contextmanager
def _saved_model_of(in_path: str):
    """``(SavedModel directory, what was imported or None)``: IN_DIR itself, or a Keras file
    exported to a temporary SavedModel for the run (removed afterwards)."""
    from ..saved_model.keras_file import export_keras_file, is_keras_file

    if not is_keras_file(in_path):
        yield in_path, None
        return
    with tempfile.TemporaryDirectory(prefix="optimise_saved_model-keras-") as scratch:
        imported = export_keras_file(in_path, Path(scratch) / "saved_model")
        logging.getLogger("serving_optimiser").info(
            "%s: %s file exported with signature '%s' (%s -> %s)", in_path, imported["source_format"],
            imported["signature"], ", ".join(imported["inputs"]), ", ".join(imported["outputs"]))
        yield str(Path(scratch) / "saved_model"), imported


def _auto(args: argparse.Namespace, in_dir: str) -> dict:
    """--auto: every candidate through the gate, the best written (saved_model.auto)."""
    from ..saved_model.auto import auto_optimise, candidates_table

    report = auto_optimise(
        in_dir, args.out_dir, sample_inputs=args.sample_inputs, calibration_inputs=args.calibration_inputs,
        objective=args.objective, serving_batch_size=args.serving_batch_size or 1, overwrite=args.overwrite,
        signature_keys=_split(args.signature), tags=_split(args.tag) or ["serve"],
        allow_ops=_split(args.allow_ops) or (), output_kinds=dict(args.output_kind or []),
        compare_timeout_s=args.compare_timeout, warmup_batch_sizes=args.warmup_batch_sizes,
        dequantize_once=args.dequantize_once, min_agreement=args.min_agreement, chunk_bytes=args.chunk_bytes,
    )
    print(candidates_table(report))
    if args.report:
        _write_report(args.report, report)
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    exit_code = 0

    def body() -> None:
        nonlocal exit_code
        _check_before_tensorflow(args)
        from ..saved_model import AgreementError, optimise_saved_model

        package_logger = logging.getLogger("serving_optimiser")
        with _no_propagation(package_logger), _saved_model_of(args.in_dir) as (in_dir, imported):
            if args.auto:
                report = _auto(args, in_dir)
                if imported:
                    report["imported"] = imported
                return
            try:
                report = optimise_saved_model(
                    in_dir,
                    args.out_dir,
                    args.transforms,
                    signature_keys=_split(args.signature),
                    tags=_split(args.tag) or ["serve"],
                    allow_ops=_split(args.allow_ops) or (),
                    sample_inputs=args.sample_inputs,
                    compare=args.compare,
                    min_agreement=args.min_agreement,
                    dequantize_once=args.dequantize_once,
                    frozen_dir=args.frozen_dir,
                    overwrite=args.overwrite,
                    warmup_batch_sizes=args.warmup_batch_sizes,
                    compare_timeout_s=args.compare_timeout,
                    calibration_inputs=args.calibration_inputs,
                    serving_batch_size=args.serving_batch_size,
                    output_kinds=dict(args.output_kind or []),
                    chunk_bytes=args.chunk_bytes,
                )
            except AgreementError as error:
                print(format_report(error.report))
                if args.report:
                    _write_report(args.report, {**error.report, "error": str(error)})
                print(f"{PROG}: error: {error}", file=sys.stderr)
                exit_code = EXIT_DISAGREES
                return
            if imported:
                report["imported"] = imported
        print(format_report(report))
        if args.report:
            _write_report(args.report, report)

    code = runner.run(PROG, body)
    return code or exit_code


if __name__ == "__main__":
    sys.exit(main())
