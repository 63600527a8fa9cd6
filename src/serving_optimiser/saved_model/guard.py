"""The gate on lossy transforms: apply a transform list to a frozen model and, while the result
misses the output tolerances, send the tensors and layers that hurt most back to per-channel
ranges and then to float, so what comes out passes or the run fails naming why.

One entry point, :func:`guard_transforms`::

    guarded = guard_transforms(frozen, parse_and_check(transforms), decision_inputs, judging_inputs)
    guarded.passed, guarded.graph_def, guarded.report

How it decides:

1. The whole list runs as written and is judged (each output by its kind and tolerance,
   :mod:`.output_kinds`, on the judging inputs). A list that passes comes back as it is: the same
   graph, byte for byte, as without the gate.
2. Otherwise one ranking pass (:mod:`.guard_ranking`) measures, on the decision inputs (the
   calibration rows where given), how much each lossy unit alone moves what reads it:

   * a weight Const that ``round_weights`` / ``quantize_weights`` changed: its consumers run
     twice in one probe graph, once on the float weight and once on the weight as the list
     left it, both on the float activations; the figure is the relative RMS error
     ``sqrt(sum (y' - y)^2 / sum y^2)`` summed over its consumers, computed inside the graph so
     only scalars come back. A weight whose consumers sit inside a lowered loop or conditional
     branch cannot be fetched: its own relative RMS quantisation error stands in (for a linear
     consumer the output's relative error is of the same order);
   * an int8 layer of a calibrated ``quantize_matmuls`` / ``quantize_convs``: its int8 output
     error from the calibration (measured alone, on the calibration rows);
   * a node that ``quantize_nodes`` made eight-bit: the relative error of its output in the
     quantised graph minus the largest of its inputs' (what it adds), from one run of each graph.

   int8 layers without calibration (dynamic ranges) and weights inside function bodies are not
   ranked: the gate still judges them, but does not send them back one by one. Weights only
   rounded (``round_weights`` keeps float32, so the file is no smaller for it) rank before every
   unit that saves bytes: sending them back costs nothing the list was for.
3. Units go back most harmful first, doubling how many each round: 1, 2, 4, ... up to all.
   Weights that a per-tensor ``quantize_weights`` step quantised first go to per-channel ranges
   (``per_channel_for``; any ``round_weights`` step leaves them alone), rank >= 2 only; if
   every such weight per channel still fails, units go to float (``keep_float``, or the
   calibration's keep-float list for calibrated int8 steps), again 1, 2, 4, ...; when k float
   passes after k/2 failed, bisection between the two finds the shortest passing prefix of the
   ranking. One log line per unit sent back, one per run. The transforms take the names; the
   list itself is never edited.

Bound on model runs: with N ranked units, P of them with a per-channel rung, the judge runs at
most ``1 + (ceil(log2 P) + 1) + (ceil(log2 N) + 1) + ceil(log2 N)`` times
(:func:`max_judged_runs`; 39 units, 33 per channel: 21), the ranking pass once (twice with
``quantize_nodes``), plus, with a serving batch size, one judged run per int8 layer sent back
for speed.

The figure that ranks weights is per output channel (the last axis): the worst channel's
relative RMS error. Measured on basic-pitch (Intel Xeon, TensorFlow 2.21), the whole-tensor
figure ranked a constant-Q filter whose quantisation alone flips 19 onsets 6th, below a conv
that flips one: the quiet frequency bins, read through a log downstream, carry the damage.

With ``serving_batch_size`` the judge also times each passing candidate against the original; while
it is not faster, int8 layers go back to float one at a time, the slowest in int8 alone first
(:mod:`.speed_guard`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from tensorflow.core.framework import graph_pb2

from ..chunks import DEFAULT_CHUNK_BYTES
from ..graph_transforms import TransformError
from ..graph_transforms.calibration import DEFAULT_MAX_LAYER_ERROR, Calibration, read_calibration_file
from ..graph_transforms.engine import apply_transform
from ..graph_transforms.parser import ParsedTransform
from ..graph_transforms.registry import get_transform
from .calibration import CALIBRATED_TRANSFORMS, calibrate_frozen_model
from .compare import DEFAULT_TIMEOUT_S, failing_outputs
from .errors import SavedModelError
from .guard_ranking import Unit, bytes_of, float_consts, rank_units
from .model import FrozenModel
from .output_kinds import DEFAULT_TOLERANCES, GROSS_TOLERANCES, Tolerances

__all__ = ["Guarded", "Judge", "TransformSteps", "Verdict", "doubling", "guard_transforms", "max_judged_runs",
           "rank_units"]

log = logging.getLogger(__name__)

Inputs = Mapping[str, Mapping[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What a judge says of one candidate graph: a phrase per output outside its tolerance (none:
    it passes) and, where timed, its time over the original's at the serving batch."""

    failing: list[str]
    time_ratio: float | None = None

    @property
    def passed(self) -> bool:
        return not self.failing


Judge = Callable[[graph_pb2.GraphDef], Verdict]


@dataclasses.dataclass
class Guarded:
    """The graph to write (the last judged), whether it passed, its failing outputs and the report."""

    graph_def: graph_pb2.GraphDef
    passed: bool
    failing: list[str]
    report: dict
    verdict: Verdict | None = None


def max_judged_runs(units: int, per_channel_units: int) -> int:
    """The most judged runs for the accuracy fallback (see the module docstring)."""
    def rounds(count: int) -> int:
        return 0 if count == 0 else math.ceil(math.log2(count)) + 1

    # The bisection after the float rung's doubling: at most ceil(log2 N) - 1 tries and one re-run.
    bisection = 0 if units < 2 else math.ceil(math.log2(units))
    return 1 + rounds(per_channel_units) + rounds(units) + bisection


def doubling(count: int) -> list[int]:
    """How many units go back each round: 1, 2, 4, ... and finally ``count``."""
    sizes, size = [], 1
    while size < count:
        sizes.append(size)
        size *= 2
    return sizes + ([count] if count else [])


# --------------------------------------------------------------------------------------------
# The list, run with units sent back
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SendBack:
    """Units sent back: weights per channel, and units (weights, int8 layers, nodes) in float."""

    per_channel: frozenset[str] = frozenset()
    to_float: frozenset[str] = frozenset()


class TransformSteps:
    """The transform list on the frozen graph, calibrating each int8 step that has no ranges_file
    once (a rerun with units sent back reuses it), with names added to the lossy steps'
    ``keep_float`` / ``per_channel_for`` params."""

    def __init__(self, frozen: FrozenModel, parsed: Sequence[ParsedTransform], calibration_inputs: Inputs | None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, serving_batch_size: int | None = None,
                 chunk_bytes: int | None = DEFAULT_CHUNK_BYTES) -> None:
        self.frozen, self.parsed, self.chunk_bytes = frozen, list(parsed), chunk_bytes
        self.calibration_inputs, self.timeout_s = calibration_inputs, timeout_s
        self.serving_batch_size = serving_batch_size
        self.calibrations: dict[int, Calibration] = {}
        self.before_lossy: graph_pb2.GraphDef | None = None  # the graph the first lossy step reads

    @property
    def lossy_steps(self) -> list[int]:
        return [index for index, step in enumerate(self.parsed) if get_transform(step.name).lossy]

    def run(self, send_back: SendBack = SendBack()) -> graph_pb2.GraphDef:
        graph_def = self.frozen.graph_def
        inputs, outputs = self.frozen.input_node_names(), self.frozen.output_node_names()
        lossy = set(self.lossy_steps)
        try:
            for index, step in enumerate(self.parsed):
                if index == min(lossy, default=-1):
                    self.before_lossy = graph_def
                calibration = self._calibration(index, step, graph_def, send_back)
                graph_def = apply_transform(graph_def, self._with_names(step, send_back, calibration is not None),
                                            inputs, outputs, calibration)
        except TransformError as error:
            raise SavedModelError(str(error)) from None
        return graph_def

    @staticmethod
    def _with_names(step: ParsedTransform, send_back: SendBack, calibrated: bool) -> ParsedTransform:
        """``step`` with the sent-back names in its params (none: the step itself, unchanged)."""
        params = {key: list(values) for key, values in step.params.items()}
        if step.name == "round_weights":
            # Rounding costs a per-channel weight its precision too: it stays exact there.
            names = send_back.per_channel | send_back.to_float
        elif step.name == "quantize_weights":
            names = send_back.to_float
            if send_back.per_channel - send_back.to_float:
                params.setdefault("per_channel_for", []).extend(sorted(send_back.per_channel - send_back.to_float))
        elif calibrated:
            names = frozenset()  # through the calibration's keep_float, which names the fallback in its log
        else:
            names = send_back.to_float
        if names:
            params.setdefault("keep_float", []).extend(sorted(names))
        if params == step.params:
            return step
        return dataclasses.replace(step, params=params)

    def _calibration(self, index: int, step: ParsedTransform, graph_def, send_back: SendBack) -> Calibration | None:
        if step.name in CALIBRATED_TRANSFORMS and "ranges_file" in step.params:
            return self._file_calibration(index, step, send_back)
        if step.name not in CALIBRATED_TRANSFORMS or self.calibration_inputs is None:
            return None
        if index not in self.calibrations:
            minimum_dim = step.params.get("minimum_dim")
            try:
                minimum_dim = int(minimum_dim[0]) if minimum_dim else None
            except ValueError:
                minimum_dim = None  # the transform itself reports the bad value
            self.calibrations[index] = calibrate_frozen_model(
                self.frozen.with_graph_def(graph_def), self.calibration_inputs, step.name, minimum_dim,
                timeout_s=self.timeout_s, serving_batch_size=self.serving_batch_size, chunk_bytes=self.chunk_bytes,
            )
        return self.calibrations[index].with_keep_float(send_back.to_float & set(self.calibrations[index].layer_errors))

    def _file_calibration(self, index: int, step: ParsedTransform, send_back: SendBack) -> None:
        """A step's own ``ranges_file``, read once so its layers' int8 errors rank them (the
        pipeline's calibrate stage writes them). The step still reads its file itself (a
        ranges_file wins over a calibration handed in), so a layer sent back goes to float through
        the step's ``keep_float`` param, as for dynamic int8: returns None."""
        if index not in self.calibrations:
            try:
                self.calibrations[index] = read_calibration_file(step.name, step.params["ranges_file"][0])
            except TransformError as error:
                raise SavedModelError(str(error)) from None
        return None

    def bound(self, index: int) -> float:
        values = self.parsed[index].params.get("max_layer_error")
        try:
            return float(values[0]) if values else DEFAULT_MAX_LAYER_ERROR
        except ValueError:
            return DEFAULT_MAX_LAYER_ERROR

    def int8_layers(self) -> list[tuple[int, str, float]]:
        """``(step, layer, int8 error)`` of every calibrated layer the list runs in int8 (a layer
        once, under the first step: one ranges_file may serve quantize_matmuls and quantize_convs,
        and lists both's layers)."""
        layers: dict[str, tuple[int, str, float]] = {}
        for index, calibration in sorted(self.calibrations.items()):
            for layer, error in sorted(calibration.layer_errors.items()):
                if error <= self.bound(index) and layer not in set(self.parsed[index].params.get("keep_float", [])):
                    layers.setdefault(layer, (index, layer, error))
        return sorted(layers.values())


# --------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------


def _rounds(units: list[Unit]):
    """The rounds of the accuracy fallback, as a generator that is sent each round's verdict
    (True: passed) and yields ``(send_back, newly sent [(unit, where)], label)``.

    Per-channel rung: the top 1, 2, 4, ... per-channel-capable units, until one passes or all
    are per channel. Float rung (every per-channel unit kept per channel): the top 1, 2, 4, ...
    units float; once a size k passes after k/2 failed, bisection between them finds the
    smallest passing prefix, and a last run re-judges it when the last try failed."""
    channel = [unit for unit in units if unit.per_channel]
    per_channel: frozenset[str] = frozenset()
    sent: set[str] = set()
    failed_at = 0
    for size in doubling(len(channel)):
        per_channel = frozenset(u.name for u in channel[:size])
        new = [(u, "per-channel ranges") for u in channel[:size] if u.name not in sent]
        sent.update(u.name for u, _ in new)
        passed = yield SendBack(per_channel=per_channel), new, f"top {size} per channel"
        if passed:
            return
    floated: set[str] = set()
    passing = None
    for size in doubling(len(units)):
        new = [(u, "float") for u in units[:size] if u.name not in floated]
        floated.update(u.name for u, _ in new)
        passed = yield SendBack(per_channel, frozenset(floated)), new, f"top {size} float"
        if passed:
            passing = size
            break
        failed_at = size
    if passing is None:
        return
    low, high, last_passed = failed_at, passing, True
    while high - low > 1:
        middle = (low + high) // 2
        names = frozenset(u.name for u in units[:middle])
        last_passed = yield SendBack(per_channel, names), [], f"bisecting: top {middle} float"
        low, high = (low, middle) if last_passed else (middle, high)
    if not last_passed:
        yield SendBack(per_channel, frozenset(u.name for u in units[:high])), [], f"top {high} float again"


def _reference_judge(frozen: FrozenModel, judging_inputs: Inputs | None, tolerances: Tolerances,
                     generated_tolerances: Tolerances, output_kinds: Mapping[str, str] | None,
                     timeout_s: float, scratch: Path, chunk_bytes: int | None = DEFAULT_CHUNK_BYTES) -> Judge:
    """A judge that compares each candidate with ``frozen`` itself, both written as SavedModels
    under ``scratch``."""
    from .compare import compare_saved_models
    from .convert import write_saved_model

    reference = scratch / "reference"
    write_saved_model(frozen, reference, dequantize_once=False, warmup_batch_sizes=())
    count = [0]

    def judge(graph_def: graph_pb2.GraphDef) -> Verdict:
        count[0] += 1
        candidate = scratch / f"candidate-{count[0]}"
        write_saved_model(frozen.with_graph_def(graph_def), candidate, warmup_batch_sizes=())
        comparison = compare_saved_models(
            reference, candidate, judging_inputs, sorted(frozen.signatures), frozen.tags, timeout_s=timeout_s,
            output_kind_overrides=output_kinds, tolerances=tolerances, generated_tolerances=generated_tolerances,
            chunk_bytes=chunk_bytes,
        )
        return Verdict(failing_outputs(comparison))

    return judge


def guard_transforms(
    frozen: FrozenModel,
    transforms: Sequence[ParsedTransform],
    decision_inputs: Inputs | None,
    judging_inputs: Inputs | None,
    tolerances: Tolerances = DEFAULT_TOLERANCES,
    *,
    generated_tolerances: Tolerances = GROSS_TOLERANCES,
    output_kinds: Mapping[str, str] | None = None,
    calibration_inputs: Inputs | None = None,
    judge: Judge | None = None,
    serving_batch_size: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
) -> Guarded:
    """Apply ``transforms`` (parsed, checked) to ``frozen`` and send lossy units back until every
    output is within its tolerance (see the module docstring for how, and the bound on runs).

    ``decision_inputs`` (signature -> input -> rows; None: generated rows) rank the units;
    ``judging_inputs`` give the verdicts, under ``tolerances`` (``generated_tolerances`` for
    signatures they omit), each output's kind inferred or from ``output_kinds``. ``judge``
    replaces that comparison (``optimise_saved_model`` writes and compares the real output with
    the original SavedModel). ``calibration_inputs`` calibrate int8 steps without a ranges_file;
    with ``serving_batch_size`` the judge's time ratios drive the speed fallback. Every model run
    takes at most ``chunk_bytes`` of input rows per call (None: all rows in one call).

    Returns the last graph judged, ``passed``, the failing outputs and a report: ``verdict``,
    ``model_runs`` (``judged``, ``ranking``, ``max_judged``), ``ranked`` (every unit with its
    error), ``sent_back`` (name, transforms, where it went, its error and bytes), ``weights``
    (float weight bytes before the lossy steps, how many the result keeps exact, the share) and,
    for calibrated int8 steps, ``calibration``.
    """
    steps = TransformSteps(frozen, transforms, calibration_inputs, timeout_s, serving_batch_size, chunk_bytes)
    with tempfile.TemporaryDirectory(prefix="guard-") as scratch:
        if judge is None:
            judge = _reference_judge(frozen, judging_inputs, tolerances, generated_tolerances, output_kinds,
                                     timeout_s, Path(scratch), chunk_bytes)
        return _gate(frozen, steps, judge, decision_inputs, timeout_s, serving_batch_size)


def _gate(frozen: FrozenModel, steps: TransformSteps, judge: Judge, decision_inputs, timeout_s: float,
          serving_batch_size: int | None) -> Guarded:
    parsed = steps.parsed
    graph_def = steps.run()
    unguarded = graph_def
    verdict = judge(graph_def)
    judged, ranking_runs = 1, 0
    units: list[Unit] | None = None
    rounds: Iterator | None = None
    send_back = SendBack()
    for_speed: list[tuple[int, str]] = []
    time_ratios: list[float] = []
    in_speed = False
    label = ""
    while True:
        if verdict.passed and rounds is not None and not in_speed:
            # The accuracy fallback may still be bisecting towards fewer units sent back.
            next_round = _send(rounds, True)
            if next_round is not None:
                accuracy, new, label = next_round
                send_back = SendBack(accuracy.per_channel, accuracy.to_float | {name for _, name in for_speed})
                graph_def = steps.run(send_back)
                verdict = judge(graph_def)
                judged += 1
                log.info("guard: run %d (%s): %s", judged, label,
                         verdict.failing[0] if verdict.failing else "every output passes")
                continue
            rounds = None
        if verdict.passed:
            if verdict.time_ratio is None:
                break
            in_speed = True
            time_ratios.append(verdict.time_ratio)
            layer = _slowest(steps, send_back, for_speed) if verdict.time_ratio >= 1.0 else None
            if layer is None:
                if verdict.time_ratio >= 1.0:
                    # Every int8 layer is float again: what is left costs the list's float rewrites.
                    log.warning("at batch %d the optimised model still takes %.2f x the original's time with no "
                                "int8 layer left to send back: the list's other transforms cost that here",
                                serving_batch_size, verdict.time_ratio)
                else:
                    log.info("at batch %d the optimised model takes %.2f x the original's time",
                             serving_batch_size, verdict.time_ratio)
                break
            index, name, ratio = layer
            for_speed.append((index, name))
            send_back = dataclasses.replace(send_back, to_float=send_back.to_float | {name})
            log.info("at batch %d the optimised model takes %.2f x the original's time: %s layer '%s' (int8 alone "
                     "%.2f x float) goes back to float", serving_batch_size, verdict.time_ratio, parsed[index].name,
                     name, ratio)
        else:
            if units is None:
                units, ranking_runs = rank_units(frozen, steps, unguarded, decision_inputs, timeout_s,
                                                 steps.chunk_bytes)
                rounds = _rounds(units)
                log.info("guard: %s; %d lossy unit(s) ranked by their measured error", verdict.failing[0], len(units))
                next_round = next(rounds, None)
            else:
                next_round = None if rounds is None else _send(rounds, False)
            if next_round is None:
                break
            accuracy, new, label = next_round
            speed_names = frozenset(name for _, name in for_speed)
            send_back = SendBack(accuracy.per_channel, accuracy.to_float | speed_names)
            for unit, where in new:
                log.info("guard: %s goes back to %s", unit.describe(parsed), where)
        graph_def = steps.run(send_back)
        verdict = judge(graph_def)
        judged += 1
        log.info("guard: run %d (%s): %s", judged, label or "speed",
                 verdict.failing[0] if verdict.failing else "every output passes")
    sent = [
        {"name": unit.name, "kind": unit.kind, "transforms": sorted({parsed[i].name for i in unit.steps}),
         "to": "float" if unit.name in send_back.to_float else "per_channel", "error": unit.error,
         "measured": unit.measured, "weight_bytes": unit.weight_bytes}
        for unit in units or [] if unit.name in send_back.to_float | send_back.per_channel
    ]
    report = _report(frozen, steps, graph_def, verdict, units or [], sent, send_back, for_speed, time_ratios,
                     judged, ranking_runs, serving_batch_size)
    return Guarded(graph_def, verdict.passed, list(verdict.failing), report, verdict)


def _send(rounds, passed: bool):
    try:
        return rounds.send(passed)
    except StopIteration:
        return None


def _slowest(steps: TransformSteps, send_back: SendBack, for_speed) -> tuple[int, str, float] | None:
    """The int8 layer still int8 that is slowest in int8 alone (untimed layers after the timed)."""
    candidates = [
        ((steps.calibrations[index].layer_time_ratios.get(layer, 0.0), error), index, layer)
        for index, layer, error in steps.int8_layers() if layer not in send_back.to_float
    ]
    if not candidates:
        return None
    (ratio, _), index, layer = max(candidates)
    return index, layer, ratio


def _report(frozen, steps: TransformSteps, graph_def, verdict: Verdict, units: list[Unit], sent: list[dict],
            send_back: SendBack, for_speed, time_ratios, judged: int, ranking_runs: int,
            serving_batch_size: int | None) -> dict:
    # Without a lossy step every weight of the result is as exact as the list made it: all float.
    before = steps.before_lossy if steps.before_lossy is not None else graph_def
    floats = float_consts(before)
    after = {node.name: node for node in graph_def.node}
    total = sum(bytes_of(node) for node in floats.values())
    exact = sum(bytes_of(node) for name, node in floats.items() if after.get(name) == node)
    speed_names = {name for _, name in for_speed}
    report = {
        "verdict": "pass" if verdict.passed else "fail",
        "failing_outputs": list(verdict.failing),
        "lossy_steps": [steps.parsed[i].name for i in steps.lossy_steps],
        "model_runs": {"judged": judged, "ranking": ranking_runs,
                       "max_judged": max_judged_runs(len(units), sum(u.per_channel for u in units))
                       + len(for_speed)},
        "ranked": [{"name": u.name, "kind": u.kind, "error": u.error, "measured": u.measured} for u in units],
        "sent_back": sent,
        "weights": {"float_bytes_before": total, "exact_float_bytes": exact,
                    "kept_float_share": exact / total if total else None,
                    "sent_back_float_bytes": sum(s["weight_bytes"] for s in sent if s["to"] == "float")},
    }
    if steps.calibrations:
        report["calibration"] = []
        for index, calibration in sorted(steps.calibrations.items()):
            bound = steps.bound(index)
            layers = set(calibration.layer_errors)
            report["calibration"].append({
                "step": index,
                "transform": steps.parsed[index].name,
                "rows": calibration.rows,
                "max_layer_error": bound,
                "layer_errors": dict(sorted(calibration.layer_errors.items())),
                "float_by_guard": sorted(k for k, v in calibration.layer_errors.items() if v > bound),
                "float_by_speed": [name for step, name in for_speed if step == index],
                "timed_batch_size": calibration.timed_batch_size,
                "layer_time_ratios": dict(sorted(calibration.layer_time_ratios.items())),
                "float_by_agreement": [s["name"] for s in sent if s["kind"] == "layer" and s["to"] == "float"
                                       and s["name"] in layers and s["name"] not in speed_names],
            })
    if serving_batch_size is not None and time_ratios:
        report["serving_batch"] = {"batch_size": serving_batch_size, "time_ratios": time_ratios}
    return report
