"""The optimise stage's gate: a variant's lossy transforms guarded as ``optimise_saved_model``
guards them, judged the way the evaluate stage will judge the result.

One gate, :func:`serving_optimiser.saved_model.guard.guard_transforms` (ranking, per-channel then
float fallback, the bound on model runs); what the pipeline adds is where its inputs come from:

* the fallback decisions (which weights and layers hurt most) are made on the **calibration
  split** of ``data/samples``;
* the verdicts are given on the **evaluation batch** (the eval rows and the batch drawn around
  them, :func:`serving_optimiser.pipeline.figures.evaluation_data`; of the batch, its first rows
  up to ``evaluate.fallback_batch_bytes`` of input: all of Iris's), each compared output judged
  by its kind against ``evaluate.tolerances`` and ``evaluate.max_eval_rows_lost``, through the
  same functions the evaluate stage calls. The reference is the frozen model itself, run with
  the same pinned kernels.

A list whose result already passes comes back as it is, the same bytes as without the gate (the
Iris variants do). One that cannot be made to pass is written as the gate left it, and its
verdict is recorded: the evaluate stage then fails it (stopping ``dvc repro`` or not, as
``evaluate.stop_on_gate_failure`` says).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .model import Samples
from .params import PipelineParams

log = logging.getLogger(__name__)


class PipelineJudge:
    """Judges candidate graphs of ``frozen`` on the evaluation data, as the evaluate stage would:
    each written as a SavedModel under ``scratch`` and run through the TensorFlow predictor."""

    def __init__(self, frozen, samples: Samples, params: PipelineParams, scratch: Path) -> None:
        from .figures import evaluation_data

        self.frozen, self.samples, self.scratch = frozen, samples, scratch
        self.evaluate = params.evaluate()
        data = evaluation_data(samples, self.evaluate)
        # Up to evaluate.fallback_batch_bytes of the batch (its first rows): every judged run is a
        # whole model run, and the evaluate stage judges the result on the whole batch anyway.
        from ..chunks import capped_rows, row_bytes

        rows = capped_rows(len(next(iter(data["batch"].values()))), row_bytes(data["batch"]),
                           self.evaluate.fallback_batch_bytes)
        self.data = {"eval": data["eval"], "batch": {key: values[:rows] for key, values in data["batch"].items()}}
        self.runs = 0
        self.reference = self._outputs(frozen.graph_def, "reference")
        self.reference_correct = self._eval_rows_correct(self.reference)

    def _outputs(self, graph_def, name: str) -> dict[str, dict[str, np.ndarray]]:
        from ..peers.tf import TFPredictor
        from ..saved_model.convert import write_saved_model

        spec = self.samples.spec
        directory = self.scratch / name
        write_saved_model(self.frozen.with_graph_def(graph_def), directory, warmup_batch_sizes=())
        predictor = TFPredictor.load(directory, None, label_vocabulary=spec.label_vocabulary,
                                     signature=spec.signature, name=name)
        return {data_set: predictor.checked(rows, spec.label_vocabulary, spec.expected(),
                                            self.evaluate.chunk_bytes)
                for data_set, rows in self.data.items()}

    def _eval_rows_correct(self, outputs) -> int | None:
        from .figures import accuracy_figures

        if self.samples.labels is None:
            return None
        return accuracy_figures(outputs["eval"], self.samples.labels, self.samples.spec)["eval_rows_correct"]

    def figures(self, graph_def) -> dict:
        """The gate's figures of one candidate, as the evaluate stage records them."""
        from .figures import judged_outputs

        self.runs += 1
        outputs = self._outputs(graph_def, f"candidate-{self.runs}")
        figures = {"outputs": judged_outputs(self.reference["batch"], outputs["batch"], self.samples.spec,
                                             self.evaluate)}
        batch_rows = len(next(iter(self.data["batch"].values())))
        if batch_rows < self.evaluate.batch_rows:
            figures["batch_rows"] = batch_rows
        if self.reference_correct is not None:
            figures["eval_rows_lost"] = self.reference_correct - self._eval_rows_correct(outputs)
        return figures

    def __call__(self, graph_def):
        from ..saved_model.guard import Verdict
        from .figures import gate_failures

        return Verdict(gate_failures(self.figures(graph_def), self.evaluate))


def guarded_variant(frozen, transforms: Sequence[str], samples: Samples, params: PipelineParams,
                    judge: PipelineJudge | None = None):
    """``transforms`` on ``frozen`` through the gate: decided on the calibration split, judged on
    the evaluation batch. Returns the :class:`~serving_optimiser.saved_model.guard.Guarded`."""
    from ..graph_transforms.parser import parse_transforms
    from ..saved_model.guard import guard_transforms

    spec = samples.spec
    decision_inputs = {spec.signature: samples.calibration}
    if judge is not None:
        return guard_transforms(frozen, parse_transforms(" ".join(transforms)), decision_inputs, None, judge=judge)
    with tempfile.TemporaryDirectory(prefix="optimise-gate-") as scratch:
        judge = PipelineJudge(frozen, samples, params, Path(scratch))
        return guard_transforms(frozen, parse_transforms(" ".join(transforms)), decision_inputs, None, judge=judge)


def gate_summary(report: Mapping) -> str:
    """One line: the verdict, what went back, the share of weight bytes kept float."""
    share = report.get("weights", {}).get("kept_float_share")
    sent = report.get("sent_back", [])
    kept = "" if share is None else f", {share:.1%} of the weight bytes float"
    if report["verdict"] == "pass" and not sent:
        return f"gate: passes as written{kept}"
    moved = f"{len(sent)} unit(s) sent back" if sent else "nothing could be sent back"
    failing = "" if report["verdict"] == "pass" else f": {'; '.join(report['failing_outputs'])}"
    return f"gate: {report['verdict']} after {report['model_runs']['judged']} judged runs, {moved}{kept}{failing}"
