"""The evaluate stage: run one model (a SavedModel or a peer's artefact) on the eval rows and the
batch drawn around them, count its graph, and compare it to the exported model; the figures and
the gate themselves are :mod:`serving_optimiser.pipeline.figures`, its size
:mod:`serving_optimiser.pipeline.sizes`.

Everything here is deterministic: the stages that call it run with pinned kernels and threads
(:mod:`serving_optimiser.runtime`), so the figures are the same on any x86-64 machine. Timings
live apart, in :mod:`serving_optimiser.pipeline.latency`.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .artefacts import load_model, unsupported
from .entries import REFERENCE, ModelEntry
from .figures import (
    accuracy_figures,
    computes_the_same_function,
    evaluation_data,
    fidelity,
    gate_failures,
    headline,
    judged_outputs,
    rounded,
    sample_predictions,
)
from .model import ModelSpec, Samples
from .params import EvaluateParams
from .sizes import model_size

__all__ = ["REFERENCE", "EvaluateParams", "Evaluation", "evaluate_stage"]


# ---------------------------------------------------------------------------------------------
# Graph counts and signatures of a SavedModel
# ---------------------------------------------------------------------------------------------


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
# The reference model's outputs, which every other model is compared to
# ---------------------------------------------------------------------------------------------


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
