"""The whole round trip on any SavedModel: freeze, TransformGraph, convert back, compare with the
original, and only then move the result into place."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from tensorflow.core.framework import graph_pb2

from ..atomic import atomic_directory
from ..graph_transforms import TransformError, parse_and_check
from ..graph_transforms.calibration import DEFAULT_MAX_LAYER_ERROR, Calibration
from ..graph_transforms.engine import apply_transform
from ..graph_transforms.parser import ParsedTransform
from ..graph_transforms.transforms._int8 import int8_kernels_available
from ._files import check_output_directory, clear_directory, directory_size
from .calibration import CALIBRATED_TRANSFORMS, calibrate_frozen_model, load_calibration_inputs
from .compare import (
    DEFAULT_TIMEOUT_S,
    check_output_kinds,
    compare_saved_models,
    failing_outputs,
    load_sample_inputs,
    min_class_agreement,
)
from .convert import write_saved_model
from .errors import SavedModelError
from .freeze import freeze_saved_model
from .onednn import missing_kernels_message, onednn_only_ops
from .output_kinds import DEFAULT_TOLERANCES, GROSS_TOLERANCES, KINDS
from .safety import check_allow_ops
from .warmup import DEFAULT_BATCH_SIZES

log = logging.getLogger(__name__)

SampleInputs = Mapping[str, Mapping[str, np.ndarray]]


class AgreementError(SavedModelError):
    """With ``min_agreement``, an output of the converted model failed its verdict (its class
    agreement under the minimum, or another kind's metric over its tolerance); ``report`` has the
    details."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def _transform_string(transforms: str | Sequence[str]) -> str:
    return transforms if isinstance(transforms, str) else " ".join(transforms)


def optimise_saved_model(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    transforms: str | Sequence[str],
    signature_keys: Sequence[str] | None = None,
    tags: str | Iterable[str] = ("serve",),
    allow_ops: Iterable[str] = (),
    *,
    sample_inputs: SampleInputs | str | os.PathLike | None = None,
    compare: bool = True,
    min_agreement: float | None = None,
    dequantize_once: bool = True,
    frozen_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    warmup_batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    compare_timeout_s: float = DEFAULT_TIMEOUT_S,
    calibration_inputs: SampleInputs | str | os.PathLike | None = None,
    serving_batch_size: int | None = None,
    output_kinds: Mapping[str, str] | None = None,
) -> dict:
    """Freeze ``in_dir``, apply ``transforms`` (old-tool syntax), write the SavedModel ``out_dir``.

    The transform string, options and output directory are checked before anything loads. The
    result is written in a temporary directory beside ``out_dir`` and compared with the original:
    each output gets its kind (inferred from the original's graph, or ``output_kinds``: output or
    ``signature/output`` -> ``class``, ``label``, ``multi_label`` or ``regression``), its metric
    and a verdict under the default tolerances (:mod:`.output_kinds`). ``sample_inputs``
    (signature -> input -> array, or an ``.npz`` path) feed the comparison; signatures without
    get generated inputs, on which only the gross-breakage tolerances apply. Without
    ``min_agreement`` the verdicts are only reported; with it, ``min_agreement`` is the class
    and label agreement tolerance and ``out_dir`` is renamed into place only when every output
    passes (AgreementError otherwise, naming the outputs and figures, ``out_dir`` not created).
    ``frozen_dir``, if given, receives the frozen (untransformed) model. ``warmup_batch_sizes``
    (empty: none) are the batch sizes of the TF Serving warm-up records written for each kept
    signature, from the sample inputs where given. A signature call that takes longer than
    ``compare_timeout_s`` stops the comparison with an error naming it.

    When the transforms emit int8 ops that only oneDNN implements and this process cannot run
    them (oneDNN's rewrites off), the comparison could not call the model: that is an error
    saying what to set, before anything is written.

    ``calibration_inputs`` (like ``sample_inputs``) calibrate each quantize_matmuls or
    quantize_convs step without a ``ranges_file`` on the graph as it is at that step; a layer
    whose int8 output error is over the step's ``max_layer_error`` stays float, and with
    ``min_agreement`` the int8 layers go back to float one at a time, largest error first,
    until every output passes. With ``serving_batch_size`` each calibrated layer is also timed
    in int8 and float at that many rows on this machine, and stays float where int8 is not
    faster.
    Returns a report: sizes, node counts, timings and the per-output comparison.
    """
    transform_string = _transform_string(transforms)
    try:
        parse_and_check(transform_string)
    except TransformError as error:
        raise SavedModelError(f"transforms: {error}") from None
    allow_ops = check_allow_ops(allow_ops)
    if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
        raise SavedModelError(f"min_agreement must be between 0 and 1, found {min_agreement}")
    if min_agreement is not None and not compare:
        raise SavedModelError("min_agreement needs the comparison (compare=True)")
    output_kinds = dict(output_kinds or {})
    for name, kind in sorted(output_kinds.items()):
        if kind not in KINDS:
            raise SavedModelError(f"output kind '{kind}' for '{name}' is unknown (expected {', '.join(KINDS)})")
    check_output_directory(out_dir, overwrite)
    if isinstance(sample_inputs, (str, os.PathLike)) and not Path(sample_inputs).is_file():
        raise SavedModelError(f"{sample_inputs}: no such sample inputs file")
    if isinstance(calibration_inputs, (str, os.PathLike)) and not Path(calibration_inputs).is_file():
        raise SavedModelError(f"{calibration_inputs}: no such calibration inputs file")
    if not compare_timeout_s > 0:
        raise SavedModelError(f"compare_timeout_s must be positive, found {compare_timeout_s}")
    if serving_batch_size is not None:
        if calibration_inputs is None:
            raise SavedModelError("serving_batch_size times the calibrated layers: it needs calibration_inputs")
        if not serving_batch_size >= 1:
            raise SavedModelError(f"serving_batch_size must be at least 1, found {serving_batch_size}")
    timings = {}

    start = time.perf_counter()
    frozen = freeze_saved_model(in_dir, signature_keys, tags, allow_ops)
    check_output_kinds(output_kinds, frozen.signatures.values())  # before frozen_dir is written
    if frozen_dir is not None:
        frozen.save(frozen_dir)
    timings["freeze_s"] = time.perf_counter() - start

    if isinstance(calibration_inputs, (str, os.PathLike)):
        calibration_inputs = load_calibration_inputs(calibration_inputs, frozen.signatures)
    if isinstance(sample_inputs, (str, os.PathLike)):
        sample_inputs = load_sample_inputs(sample_inputs, frozen.signatures.values())
    if sample_inputs is None and calibration_inputs is not None and compare:
        sample_inputs = calibration_inputs
        log.info("comparing on the calibration inputs (pass sample inputs to compare on other rows)")
    start = time.perf_counter()
    log.info("transforming: %s", transform_string)
    steps = _TransformSteps(frozen, parse_and_check(transform_string), calibration_inputs, compare_timeout_s,
                            serving_batch_size)
    graph_def = steps.run()
    timings["transform_s"] = time.perf_counter() - start
    optimised = frozen.with_graph_def(graph_def)
    int8_ops = onednn_only_ops(graph_def)
    if int8_ops and not int8_kernels_available():
        if compare:
            raise SavedModelError(f"{missing_kernels_message(int8_ops)}; {Path(out_dir)} not written")
        log.warning("not compared, and it will not load here: %s", missing_kernels_message(int8_ops))

    report = {
        "input_dir": str(in_dir),
        "output_dir": str(out_dir),
        "source_format": frozen.source_format,
        "signatures": sorted(frozen.signatures),
        "transforms": transform_string,
    }
    # An explicit min_agreement is the user's tolerance for classes and labels, on any inputs.
    tolerances = DEFAULT_TOLERANCES, GROSS_TOLERANCES
    if min_agreement is not None:
        tolerances = tuple(dataclasses.replace(t, agreement=min_agreement) for t in tolerances)
    if compare:
        report["tolerances"] = {"sample": dataclasses.asdict(tolerances[0]),
                                "generated": dataclasses.asdict(tolerances[1])}
    speed = None
    if serving_batch_size is not None and steps.calibrated:
        from .speed_guard import OriginalTimer

        speed = OriginalTimer(in_dir, calibration_inputs, frozen.tags, serving_batch_size)
    with atomic_directory(check_output_directory(out_dir, overwrite)) as temporary:
        while True:
            _write_and_compare(
                report, timings, optimised, frozen, temporary, in_dir, sample_inputs, compare, allow_ops,
                dequantize_once, warmup_batch_sizes, compare_timeout_s, output_kinds, tolerances,
            )
            failing = report.get("failing_outputs")
            if min_agreement is not None and failing:
                layer = steps.next_fallback()
                if layer is None:
                    report["timings"] = timings
                    report["calibration"] = steps.report()
                    raise AgreementError(
                        "; ".join(failing)
                        + ("" if not steps.calibrated else " with every calibrated layer back to float")
                        + f"; {Path(out_dir)} not written",
                        report,
                    )
                log.info("%s: %s goes back to float", failing[0], layer)
            elif speed is not None:
                start = time.perf_counter()
                ratio = speed.ratio(temporary)
                timings["speed_s"] = timings.get("speed_s", 0.0) + time.perf_counter() - start
                steps.speed_ratios.append(ratio)
                layer = steps.next_fallback(for_speed=True) if ratio >= 1.0 else None
                if layer is None:
                    if ratio >= 1.0:
                        # Every int8 layer is float again: what is left costs the list's float rewrites.
                        log.warning("at batch %d the optimised model still takes %.2f x the original's time with "
                                    "no int8 layer left to send back: the list's other transforms cost that here",
                                    serving_batch_size, ratio)
                    else:
                        log.info("at batch %d the optimised model takes %.2f x the original's time",
                                 serving_batch_size, ratio)
                    break
                log.info("at batch %d the optimised model takes %.2f x the original's time: %s goes back to float",
                         serving_batch_size, ratio, layer)
            else:
                break
            start = time.perf_counter()
            optimised = frozen.with_graph_def(steps.run())
            timings["transform_s"] += time.perf_counter() - start
            clear_directory(temporary)
    report["nodes"] = {"frozen": len(frozen.graph_def.node), "optimised": len(optimised.graph_def.node)}
    report["graph_bytes"] = {"frozen": frozen.graph_def.ByteSize(), "optimised": optimised.graph_def.ByteSize()}
    if steps.calibrated:
        report["calibration"] = steps.report()
    if speed is not None:
        # One figure per model tried, the last the one written.
        report["serving_batch"] = {"batch_size": serving_batch_size, "time_ratios": list(steps.speed_ratios)}
    report["timings"] = timings
    log.info("wrote %s", out_dir)
    return report


def _write_and_compare(
    report, timings, optimised, frozen, temporary, in_dir, sample_inputs, compare, allow_ops,
    dequantize_once, warmup_batch_sizes, compare_timeout_s, output_kinds, tolerances,
) -> None:
    start = time.perf_counter()
    converted = write_saved_model(
        optimised, temporary, dequantize_once, label=str(report["output_dir"]),
        warmup_batch_sizes=warmup_batch_sizes, warmup_samples=sample_inputs,
    )
    timings["convert_s"] = timings.get("convert_s", 0.0) + time.perf_counter() - start
    report["dequantized_once"] = converted["dequantized_once"]
    report["onednn_only_ops"] = converted["onednn_only_ops"]
    report["warmup_batch_sizes"] = converted["warmup_batch_sizes"]
    size_in, size_out = directory_size(in_dir), directory_size(temporary)
    report["size_bytes"] = {"input": size_in, "output": size_out}
    report["size_ratio"] = size_out / size_in if size_in else None
    if compare:
        start = time.perf_counter()
        log.info("comparing with the original")
        comparison = compare_saved_models(
            in_dir, temporary, sample_inputs, sorted(frozen.signatures), frozen.tags, allow_ops,
            timeout_s=compare_timeout_s, output_kind_overrides=output_kinds, tolerances=tolerances[0],
            generated_tolerances=tolerances[1],
        )
        timings["compare_s"] = timings.get("compare_s", 0.0) + time.perf_counter() - start
        report["comparison"] = comparison
        report["min_class_agreement"] = min_class_agreement(comparison)
        report["generated_inputs"] = sorted(
            key for key, outputs in comparison.items() if any(o["inputs"] == "generated" for o in outputs.values())
        )
        report["failing_outputs"] = failing_outputs(comparison)
        report["verdict"] = "fail" if report["failing_outputs"] else "pass"


class _TransformSteps:
    """The transform list on the frozen graph, calibrating each int8 step that has no ranges_file
    (once: a rerun for the agreement fallback reuses it, with more layers kept float)."""

    def __init__(self, frozen, parsed: list[ParsedTransform], calibration_inputs, timeout_s: float,
                 serving_batch_size: int | None = None) -> None:
        self.frozen, self.parsed = frozen, parsed
        self.calibration_inputs, self.timeout_s = calibration_inputs, timeout_s
        self.serving_batch_size = serving_batch_size
        self.calibrations: dict[int, Calibration] = {}
        self.fallback: list[tuple[int, str]] = []  # (step, layer) back to float, in order
        self.for_speed: set[tuple[int, str]] = set()  # of those, the ones the speed guard sent back
        self.speed_ratios: list[float] = []  # the whole model's time over the original's, per try

    @property
    def calibrated(self) -> bool:
        return bool(self.calibrations)

    def run(self) -> graph_pb2.GraphDef:
        graph_def = self.frozen.graph_def
        inputs, outputs = self.frozen.input_node_names(), self.frozen.output_node_names()
        try:
            for index, step in enumerate(self.parsed):
                calibration = self._calibration(index, step, graph_def)
                graph_def = apply_transform(graph_def, step, inputs, outputs, calibration)
        except TransformError as error:
            raise SavedModelError(str(error)) from None
        return graph_def

    def _calibration(self, index: int, step: ParsedTransform, graph_def) -> Calibration | None:
        if step.name not in CALIBRATED_TRANSFORMS or "ranges_file" in step.params or self.calibration_inputs is None:
            return None
        if index not in self.calibrations:
            minimum_dim = step.params.get("minimum_dim")
            try:
                minimum_dim = int(minimum_dim[0]) if minimum_dim else None
            except ValueError:
                minimum_dim = None  # the transform itself reports the bad value
            self.calibrations[index] = calibrate_frozen_model(
                self.frozen.with_graph_def(graph_def), self.calibration_inputs, step.name, minimum_dim,
                timeout_s=self.timeout_s, serving_batch_size=self.serving_batch_size,
            )
        kept = [layer for step_index, layer in self.fallback if step_index == index]
        return self.calibrations[index].with_keep_float(kept)

    def _bound(self, index: int) -> float:
        values = self.parsed[index].params.get("max_layer_error")
        try:
            return float(values[0]) if values else DEFAULT_MAX_LAYER_ERROR
        except ValueError:
            return DEFAULT_MAX_LAYER_ERROR

    def next_fallback(self, for_speed: bool = False) -> str | None:
        """The next int8 layer back to float ("step: layer"), or None when none is left: the one
        with the largest int8 error, or, ``for_speed``, the slowest in int8 alone (the largest
        time ratio; untimed layers after the timed ones)."""
        done = set(self.fallback)
        keep = {index: set(self.parsed[index].params.get("keep_float", [])) for index in self.calibrations}
        candidates = [
            ((calibration.layer_time_ratios.get(layer, 0.0), error) if for_speed else (error,), index, layer)
            for index, calibration in self.calibrations.items()
            for layer, error in calibration.layer_errors.items()
            if error <= self._bound(index) and (index, layer) not in done and layer not in keep[index]
        ]
        if not candidates:
            return None
        order, index, layer = max(candidates)
        self.fallback.append((index, layer))
        if for_speed:
            self.for_speed.add((index, layer))
            return f"{self.parsed[index].name} layer '{layer}' (int8 alone {order[0]:.2f} x float)"
        return f"{self.parsed[index].name} layer '{layer}' (int8 output error {order[0]:.4f})"

    def report(self) -> list[dict]:
        result = []
        for index, calibration in sorted(self.calibrations.items()):
            bound = self._bound(index)
            fallback = [layer for step_index, layer in self.fallback
                        if step_index == index and (step_index, layer) not in self.for_speed]
            for_speed = [layer for step_index, layer in self.fallback
                         if step_index == index and (step_index, layer) in self.for_speed]
            result.append({
                "step": index,
                "transform": self.parsed[index].name,
                "rows": calibration.rows,
                "max_layer_error": bound,
                "layer_errors": dict(sorted(calibration.layer_errors.items())),
                "float_by_guard": sorted(k for k, v in calibration.layer_errors.items() if v > bound),
                "float_by_speed": for_speed,
                "timed_batch_size": calibration.timed_batch_size,
                "layer_time_ratios": dict(sorted(calibration.layer_time_ratios.items())),
                "float_by_agreement": fallback,
            })
        return result
