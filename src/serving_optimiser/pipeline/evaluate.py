"""Evaluation of one model against the exported one: sizes, graph counts, accuracy and fidelity.

Everything here is deterministic: the stages that call it run with pinned kernels and threads
(:mod:`serving_optimiser.runtime`), so the figures are the same on any x86-64 machine. Timings
live apart, in :mod:`serving_optimiser.pipeline.latency`.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .entries import REFERENCE, ModelEntry
from .model import ModelSpec, Samples, rows_around
from .params import EvaluateParams

__all__ = ["REFERENCE", "EvaluateParams", "Evaluation", "evaluate_stage"]

log = logging.getLogger(__name__)

# A peer's directory holds this file instead of an artefact when its converter cannot convert
# the model (the convert_peer stage's one line, which evaluate, latency and report pass on).
UNSUPPORTED_FILE = "unsupported.txt"


# ---------------------------------------------------------------------------------------------
# Sizes and graph counts (no TensorFlow runtime needed)
# ---------------------------------------------------------------------------------------------


def gzip_size(path: Path) -> int:
    """Bytes of a file or directory as a gzip-compressed tar with fixed metadata (reproducible)."""
    buffer = io.BytesIO()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as compressed:
        with tarfile.open(fileobj=compressed, mode="w") as archive:
            for file in files:
                info = tarfile.TarInfo(file.name if file == path else str(file.relative_to(path)))
                info.size = file.stat().st_size
                with file.open("rb") as stream:
                    archive.addfile(info, stream)
    return len(buffer.getvalue())


def model_size(path: Path) -> dict[str, int]:
    """Bytes on disk of a model (a SavedModel directory or a single-file artefact) and gzipped."""
    if path.is_dir():
        total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    elif path.is_file():
        total = path.stat().st_size
    else:
        raise UserError(f"{path}: model not found (run the stage that builds it first)")
    return {"size_bytes": total, "size_gzip_bytes": gzip_size(path)}


def saved_model_counts(directory: Path) -> dict[str, int]:
    """Node counts of the serving graph a SavedModel holds (its ``serve`` MetaGraph)."""
    from .describe import describe_graph, saved_model_graph_def

    graph_def = saved_model_graph_def(str(directory))
    described = describe_graph(graph_def)
    return {
        "graph_nodes": described["total_nodes"],
        "graph_const_nodes": described["const_count"],
        "graph_identity_nodes": described["identity_count"],
        "graph_variable_nodes": described["variable_count"],
        "graph_dequantize_nodes": described["dequantize_count"],
        "graph_function_nodes": sum(len(f.node_def) for f in graph_def.library.function),
    }


def signature_dump(directory: Path) -> str:
    """What ``saved_model_cli show --all --dir DIR`` prints: every signature's inputs and outputs."""
    from tensorflow.python.tools import saved_model_cli

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        saved_model_cli._show_all(str(directory))
    # Drop the trailing spaces some lines carry, and print the op set sorted (Python prints a set
    # in hash order, which changes from process to process), so the committed text is stable.
    lines = []
    for line in buffer.getvalue().splitlines():
        head, brace, ops = line.partition("contains the following ops: {")
        if brace and ops.endswith("}"):
            line = head + brace + ", ".join(sorted(op.strip() for op in ops[:-1].split(","))) + "}"
        lines.append(line.rstrip())
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Running a model (a SavedModel, or a LiteRT / ONNX peer) through one predictor interface
# ---------------------------------------------------------------------------------------------


def load_model(name: str, path: Path, spec: ModelSpec, threads: int):
    """A predictor for ``path`` (see :mod:`serving_optimiser.peers.predictor`), named ``name`` in
    its errors."""
    from ..peers.predictor import load_predictor

    if not path.exists():
        raise UserError(f"{name}: {path} not found (run the stage that builds it first)")
    return load_predictor(path, threads=threads, label_vocabulary=spec.label_vocabulary, signature=spec.signature,
                          name=name)


def unsupported(path: Path) -> str | None:
    """Why a peer could not be converted (its stage's one line), or None for a real artefact."""
    marker = path / UNSUPPORTED_FILE
    return marker.read_text().strip() if path.is_dir() and marker.is_file() else None


# ---------------------------------------------------------------------------------------------
# Figures (every comparison through saved_model.compare, as optimise_saved_model reports it)
# ---------------------------------------------------------------------------------------------


def class_ids(outputs: dict[str, np.ndarray], spec: ModelSpec) -> np.ndarray:
    """The class of each row: the argmax of a float class output, or the ids it holds."""
    values = outputs[spec.class_output]
    if values.dtype.kind == "f" and values.ndim >= 2 and values.shape[-1] >= 2:
        return np.argmax(values, axis=-1).reshape(len(values), -1)[:, 0].astype(np.int64)
    return values.reshape(len(values), -1)[:, 0].astype(np.int64)


def relative_diff(reference: np.ndarray, candidate: np.ndarray) -> float:
    """max |Δ| over the reference output's range (max - min; its largest magnitude where the
    range is 0, and 1 where that is 0 too)."""
    from ..saved_model.compare import compare_outputs

    ref = np.asarray(reference, dtype=np.float64)
    scale = float(ref.max() - ref.min()) or float(np.abs(ref).max()) or 1.0
    return compare_outputs(reference, candidate)["max_abs_diff"] / scale


def fidelity(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], spec: ModelSpec) -> dict[str, float]:
    """Class agreement (with a class output), max |Δ| of the diff output (or of every compared
    output) and, without a class output, max |Δ| relative to each output's range."""
    from ..saved_model.compare import compare_outputs

    compared = {key: compare_outputs(reference[key], candidate[key]) for key in spec.compared}
    figures = {}
    if spec.class_output:
        figures["agreement"] = compared[spec.class_output]["class_agreement"]
    diffs = [spec.diff_output] if spec.diff_output else spec.compared
    figures["max_dp"] = max(compared[key]["max_abs_diff"] for key in diffs)
    if not spec.class_output:
        figures["max_rel_diff"] = max(relative_diff(reference[key], candidate[key]) for key in spec.compared)
    return figures


def accuracy_figures(outputs: dict[str, np.ndarray], labels: np.ndarray, spec: ModelSpec) -> dict[str, float | int]:
    correct = class_ids(outputs, spec) == labels
    return {"eval_accuracy": round(float(np.mean(correct)), 6), "eval_rows_correct": int(np.sum(correct))}


def sample_rows(rows: int, count: int) -> np.ndarray:
    """Evenly spaced eval rows: the Iris split is ordered by class, so these show every class."""
    return np.unique(np.linspace(0, rows - 1, num=min(count, rows)).round().astype(int))


def sample_predictions(outputs: dict[str, np.ndarray], spec: ModelSpec, rows: int) -> list[dict]:
    """The notebook's printed prediction, for a few eval rows: row, class (the vocabulary's label
    where there is one) and the diff output's values (the first 10 of a row)."""
    shown = spec.diff_output or spec.compared[0]
    total = len(outputs[shown])
    ids = class_ids(outputs, spec) if spec.class_output else None
    predictions = []
    for row in sample_rows(total, rows):
        entry = {"row": int(row)}
        if ids is not None:
            entry["class"] = spec.label_vocabulary[int(ids[row])] if spec.label_vocabulary else int(ids[row])
        entry[shown] = [round(float(v), 4) for v in np.asarray(outputs[shown][row]).reshape(-1)[:10]]
        predictions.append(entry)
    return predictions


def tolerances(params: EvaluateParams):
    """The one set of default tolerances (``saved_model.output_kinds``), with ``evaluate.tolerances``'
    overrides."""
    import dataclasses

    from ..saved_model.output_kinds import DEFAULT_TOLERANCES

    return dataclasses.replace(DEFAULT_TOLERANCES, **params.tolerances)


def judged_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], spec: ModelSpec,
                   params: EvaluateParams) -> dict[str, dict]:
    """Each compared output judged by its kind (``ModelSpec.kinds``): ``{output: {kind, metric,
    value, tolerance, verdict, checks}}``, as ``optimise_saved_model --report`` gives them."""
    from ..saved_model.output_kinds import judge

    bounds = tolerances(params)
    return {key: judge(kind, reference[key], candidate[key], bounds).to_json() for key, kind in spec.kinds().items()}


def computes_the_same_function(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                                spec: ModelSpec) -> bool:
    """Every compared output within float rounding of the reference's (saved_model.compare)."""
    from ..saved_model.compare import within_rounding

    return all(within_rounding(reference[key], candidate[key]) for key in spec.compared)


def gate_failures(figures: dict, params: EvaluateParams) -> list[str]:
    """Why a model fails the gate, if it does (an empty list when it passes): each output whose
    verdict fails on the batch, with the figures over their bounds, and eval rows lost."""
    from ..saved_model.output_kinds import Check

    failures = []
    rows = figures.get("batch_rows", params.batch_rows)
    for name, judged in sorted(figures.get("outputs", {}).items()):
        if judged["verdict"] != "fail":
            continue
        missed = [Check(c["metric"], c["value"], c["tolerance"], c["op"] == ">=").describe()
                  for c in judged["checks"] if not c["passed"]]
        failures.append(f"output '{name}' ({judged['kind']}): {', '.join(missed)} on the {rows}-row batch")
    if "eval_rows_lost" in figures and figures["eval_rows_lost"] > params.max_eval_rows_lost:
        failures.append(
            f"{figures['eval_rows_lost']} eval rows lost against the exported model "
            f"(evaluate.max_eval_rows_lost={params.max_eval_rows_lost})"
        )
    return failures


def rounded(metrics: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}


def save_outputs(path: Path, outputs: dict[str, dict[str, np.ndarray]], spec: ModelSpec) -> None:
    """The reference model's outputs per data set, for every variant's evaluation to compare to."""
    from ..atomic import atomic_file

    arrays = {f"{data}/{key}": values[key] for data, values in outputs.items() for key in spec.compared}
    with atomic_file(path, "wb") as stream:
        np.savez(stream, **arrays)


def load_outputs(path: Path) -> dict[str, dict[str, np.ndarray]]:
    if not path.is_file():
        raise UserError(f"{path}: reference outputs not found (run the reference stage first)")
    result: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as data:
        for name in data.files:
            data_set, key = name.split("/", 1)
            result.setdefault(data_set, {})[key] = data[name]
    return result


# ---------------------------------------------------------------------------------------------
# One model, end to end
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    figures: dict  # every figure, at full precision, and the sample predictions
    outputs: dict[str, dict[str, np.ndarray]]  # per data set ("eval", "batch")


def evaluate_model(
    name: str,
    path: Path,
    data: dict[str, dict[str, np.ndarray]],
    labels: np.ndarray | None,
    spec: ModelSpec,
    params: EvaluateParams,
    threads: int,
    optimised_graph: Path | None = None,
) -> Evaluation:
    """Run ``name`` on every data set and describe it; fidelity is added by :func:`compare`.

    A broken conversion fails here, naming the model: NaN or Inf in an output, a wrong shape or
    dtype, class ids that are not the argmax of the logits.
    """
    predictor = load_model(name, path, spec, threads)
    expected = spec.expected()
    if predictor.format != "tf":  # a peer keeps the numeric outputs only
        expected = {k: v for k, v in expected.items() if v[0] != "string" or k == "classes"}
    outputs = {data_set: predictor.checked(rows, spec.label_vocabulary, expected, params.chunk_bytes)
               for data_set, rows in data.items()}
    size = model_size(path)
    figures = {"size_bytes": size["size_bytes"], "gzip_bytes": size["size_gzip_bytes"]}
    if "batch" in data:
        batch_rows = len(next(iter(data["batch"].values())))
        if batch_rows < params.batch_rows:  # capped by evaluate.max_batch_bytes: the report says so
            figures["batch_rows"] = batch_rows
    if labels is not None:
        figures.update(accuracy_figures(outputs["eval"], labels, spec))
    if (path / "saved_model.pb").is_file():
        figures.update(saved_model_counts(path))
    figures["sample_predictions"] = sample_predictions(outputs["eval"], spec, params.sample_rows)
    if optimised_graph is not None:
        from ..saved_model import FrozenModel
        from .describe import describe_graph

        described = describe_graph(FrozenModel.load(optimised_graph).graph_def)
        figures.update({
            "optimised_graph_nodes": described["total_nodes"],
            "optimised_graph_const_nodes": described["const_count"],
            "optimised_graph_identity_nodes": described["identity_count"],
            "optimised_graph_dequantize_nodes": described["dequantize_count"],
        })
    return Evaluation(figures, outputs)


def compare(evaluation: Evaluation, reference_outputs: dict[str, dict[str, np.ndarray]], reference: dict,
            spec: ModelSpec, params: EvaluateParams | None = None) -> None:
    """Add fidelity against the exported model (its outputs and figures): on the batch drawn
    around the eval rows, which the gate and the headline use, and on the eval rows; with
    ``params``, each output's verdict by its kind on the batch (``outputs``)."""
    figures = evaluation.figures
    figures.update(fidelity(reference_outputs["batch"], evaluation.outputs["batch"], spec))
    if params is not None:
        figures["outputs"] = judged_outputs(reference_outputs["batch"], evaluation.outputs["batch"], spec, params)
    figures.update({f"eval_{key}": value
                    for key, value in fidelity(reference_outputs["eval"], evaluation.outputs["eval"], spec).items()})
    figures["size_ratio"] = figures["size_bytes"] / reference["size_bytes"]
    if "eval_rows_correct" in reference:
        figures["eval_rows_lost"] = reference["eval_rows_correct"] - figures["eval_rows_correct"]


def headline(figures: dict) -> dict:
    """The few figures ``dvc metrics show`` lists per model, with short names and rounded so the
    table fits a 120-column terminal (README, "Comparing runs", has the legend); full precision
    stays in the details file."""
    result = {
        "size_kb": round(figures["size_bytes"] / 1024, 1),
        "gzip_kb": round(figures["gzip_bytes"] / 1024, 1),
    }
    if "eval_accuracy" in figures:
        result["acc"] = round(figures["eval_accuracy"], 4)
    if "size_ratio" in figures:
        result["size_x"] = round(figures["size_ratio"], 3)
        if "agreement" in figures:
            result["agree"] = round(figures["agreement"], 5)
        result["max_dp"] = round(figures["max_dp"], 4)
        if "max_rel_diff" in figures:
            result["rel_dp"] = round(figures["max_rel_diff"], 4)
    if figures.get("gate", {}).get("verdict") == "fail":
        # Only a failure gets the column: `dvc metrics show` stays within 120 columns for Iris.
        result["gate"] = "fail"
    return result


def evaluation_data(samples: Samples, params: EvaluateParams) -> dict[str, dict[str, np.ndarray]]:
    """The eval rows, and the batch drawn around them (seeded) that the gate and headline use:
    ``evaluate.batch_rows`` rows, fewer where they would hold more than
    ``evaluate.max_batch_bytes`` of input (100,000 Iris rows are 1.6 MB; 100,000 48 x 48 x 3
    images would be 2.8 GB)."""
    from ..chunks import row_bytes

    rows = params.batch_rows_for(row_bytes(samples.evaluation))
    if rows < params.batch_rows:
        log.info("evaluate: the batch has %d rows, not evaluate.batch_rows=%d: "
                 "evaluate.max_batch_bytes=%d holds no more", rows, params.batch_rows, params.max_batch_bytes)
    return {"eval": samples.evaluation, "batch": rows_around(samples.evaluation, rows, params.seed)}


def evaluate_stage(
    entry: ModelEntry,
    model_path: Path,
    samples_dir: Path,
    params: EvaluateParams,
    out_metrics: Path,
    out_details: Path,
    *,
    optimised: Path | None = None,
    reference: Path | None = None,
    reference_details: Path | None = None,
    out_reference: Path | None = None,
    out_signatures: Path | None = None,
) -> str:
    """The evaluate stage for one model: its figures, compared to the exported model's (or, for
    the exported model itself, the reference outputs), gated; returns the line the stage prints."""
    from ..atomic import atomic_file
    from .io import write_json

    name = entry.name
    reason = unsupported(model_path) if entry.kind == "peer" else None
    if reason is not None:
        # Not a failure: the report lists the peers that cannot convert this model, one line each.
        write_json(out_details, {"unsupported": reason})
        write_json(out_metrics, {"unsupported": True})
        return f"evaluate: {name}: not converted ({reason})"
    samples = Samples.load(samples_dir)
    spec = samples.spec
    result = evaluate_model(name, model_path, evaluation_data(samples, params), samples.labels, spec, params,
                            entry.threads, optimised)
    if entry.is_reference:
        save_outputs(out_reference, result.outputs, spec)
    else:
        exported = json.loads(reference_details.read_text())
        compare(result, load_outputs(reference), exported, spec, params)
        failures = gate_failures(result.figures, params)
        if failures and params.stops_on_gate_failure(spec.source):
            raise UserError(f"{name}: fails the gate: {'; '.join(failures)}")
        # A failure that does not stop the run is a result: the figures say what failed, and the
        # report shows the model with its failing verdict beside the others.
        result.figures["gate"] = {"verdict": "fail" if failures else "pass", "failures": failures}
        if entry.lossy and computes_the_same_function(load_outputs(reference)["batch"], result.outputs["batch"], spec):
            # Its lossy steps found nothing to change (int8 MatMuls on a model of convolutions):
            # not a result about those steps, and the report says so.
            result.figures["no_change"] = (f"no change on this model: {', '.join(dict.fromkeys(entry.lossy))} "
                                           "left every output within float rounding of the export's")
    write_json(out_details, rounded(result.figures))
    if out_signatures is not None:
        with atomic_file(out_signatures) as stream:
            stream.write(signature_dump(model_path))
    figures = headline(result.figures)
    write_json(out_metrics, figures)
    return f"evaluate: {name}: " + ", ".join(f"{key} {value}" for key, value in figures.items())
