"""The evaluate stage's figures and gate, computed from outputs already in memory: accuracy,
fidelity against the exported model, each output judged by its kind, the gate's failures, the
headline for ``dvc metrics show``, and the rows evaluated. No model runs here, and importing it
loads no TensorFlow (the comparisons import :mod:`serving_optimiser.saved_model.compare` when
called), so the optimise stage's gate and the latency stage judge as the evaluate stage does
without depending on the code that runs models (:mod:`serving_optimiser.pipeline.evaluate`)."""

from __future__ import annotations

import logging

import numpy as np

from .model import ModelSpec, Samples, rows_around
from .params import EvaluateParams

log = logging.getLogger(__name__)


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
