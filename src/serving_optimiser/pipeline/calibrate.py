"""The calibrate stage: calibration for the variants whose transform list reads its file as a
``ranges_file``, taken **at that point of the list** (after the transforms before it, which may
rename or remove the nodes calibration would name) and through the model's own call path, with
:func:`serving_optimiser.saved_model.calibrate_frozen_model`, as ``optimise_saved_model
--calibration-inputs`` does. The file holds each tensor's range and each candidate layer's int8
output error, so the variants' ``max_layer_error`` guard keeps the layers over it float.

Every variant that names the file must reach it after the same transforms: one file describes
one graph. All the calibrated transforms that name it (quantize_matmuls, quantize_convs) are
measured on the graph before the first of them, in float: the stage pins oneDNN off for
reproducible bits, and the int8 ops the first would emit only run with it on.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import UserError
from .params import PipelineParams


@dataclasses.dataclass(frozen=True)
class CalibrationPlan:
    """What the calibrate stage runs: the transforms before the calibrated point (the same in
    every variant that reads the file), then the calibrated transforms named at that point."""

    variants: tuple[str, ...]
    before: tuple[str, ...]
    transforms: tuple[str, ...]
    minimum_dims: Mapping[str, int | None]


def _reads_file(step, ranges_file: str) -> bool:
    return any(os.path.normpath(value) == os.path.normpath(ranges_file) for value in step.params.get("ranges_file", []))


def calibration_plan(params: PipelineParams, ranges_file: str) -> CalibrationPlan:
    """The variants of ``params`` whose list names ``ranges_file``, and where; a one-line error
    naming the variants when they reach it after different transforms, or when none names it."""
    from ..graph_transforms.errors import TransformError
    from ..graph_transforms.parser import parse_transforms
    from ..saved_model.calibration import CALIBRATED_TRANSFORMS

    found: dict[str, tuple[tuple[str, ...], list]] = {}
    for variant in sorted(params.variants()):
        transforms = params.transforms(variant)
        try:
            steps = parse_transforms(" ".join(transforms))
        except TransformError as error:
            raise UserError(f"{params.path}: 'optimise.{variant}': {error}") from None
        reading = [index for index, step in enumerate(steps) if _reads_file(step, ranges_file)]
        if not reading:
            continue
        for index in reading:
            if steps[index].name not in CALIBRATED_TRANSFORMS:
                raise UserError(f"{params.path}: 'optimise.{variant}': {steps[index].name} reads ranges_file="
                                f"{ranges_file}, but only {', '.join(CALIBRATED_TRANSFORMS)} are calibrated")
        found[variant] = (tuple(transforms[: reading[0]]), [steps[index] for index in reading])
    if not found:
        raise UserError(f"{params.path}: no variant of 'optimise' names ranges_file={ranges_file}: "
                        "nothing to calibrate")
    befores = {before for before, _ in found.values()}
    if len(befores) > 1:
        first = min(found)
        second = min(variant for variant in found if found[variant][0] != found[first][0])
        raise UserError(f"{params.path}: 'optimise.{first}' and 'optimise.{second}' read ranges_file={ranges_file} "
                        "after different transforms; one calibration describes one graph (give each its own "
                        "file and calibrate stage, or the same transforms before it)")
    minimum_dims: dict[str, int | None] = {}
    for _, steps in found.values():
        for step in steps:
            values = step.params.get("minimum_dim")
            try:
                dim = int(values[0]) if values else None
            except ValueError:
                raise UserError(f"{params.path}: {step.name}: minimum_dim must be an integer, "
                                f"found '{values[0]}'") from None
            if minimum_dims.setdefault(step.name, dim) != dim:
                raise UserError(f"{params.path}: the variants that read ranges_file={ranges_file} give "
                                f"{step.name} different minimum_dim values ({minimum_dims[step.name]}, {dim})")
    names = tuple(dict.fromkeys(step.name for _, steps in found.values() for step in steps))
    return CalibrationPlan(tuple(sorted(found)), befores.pop(), names, minimum_dims)


def _signature_for(frozen, rows: Mapping[str, np.ndarray], where: str):
    """The frozen model's signature whose inputs are exactly the rows' keys (any such one: the
    rows feed its tensors by name, so two signatures over the same tensors give the same ranges)."""
    matching = [s for _, s in sorted(frozen.signatures.items()) if set(s.inputs) == set(rows)]
    if not matching:
        have = "; ".join(f"{key}: {', '.join(sorted(s.inputs))}" for key, s in sorted(frozen.signatures.items()))
        raise UserError(f"{where}: no signature takes exactly the inputs {', '.join(sorted(rows))} (has {have})")
    tensors = {tuple(sorted((k, t.name) for k, t in s.inputs.items())) for s in matching}
    if len(tensors) > 1:
        raise UserError(f"{where}: signatures {', '.join(s.key for s in matching)} take these input keys "
                        f"from different tensors")
    return matching[0]


def calibrate(frozen, rows: Mapping[str, np.ndarray], plan: CalibrationPlan, out: str | os.PathLike):
    """Calibrate ``frozen`` (a frozen model directory or a
    :class:`~serving_optimiser.saved_model.FrozenModel`) over ``rows`` (calibration rows by the
    signature's input keys) as ``plan`` says, and write the calibration file atomically to
    ``out``; returns the :class:`~serving_optimiser.saved_model.Calibration`."""
    from ..graph_transforms import TransformGraph
    from ..graph_transforms.calibration import Calibration
    from ..saved_model import FrozenModel, SavedModelError, calibrate_frozen_model
    from .io import write_json

    if not isinstance(frozen, FrozenModel):
        frozen = FrozenModel.load(Path(frozen))
    signature = _signature_for(frozen, rows, str(out))
    graph_def = frozen.graph_def
    if plan.before:
        graph_def = TransformGraph(graph_def, frozen.input_node_names(), frozen.output_node_names(),
                                   list(plan.before))
    at_point = frozen.with_graph_def(graph_def)
    ranges, errors, count = {}, {}, 0
    for transform in plan.transforms:
        try:
            calibration = calibrate_frozen_model(at_point, {signature.key: dict(rows)}, transform,
                                                 plan.minimum_dims.get(transform))
        except SavedModelError as error:
            raise UserError(f"{out}: {error}") from None
        ranges.update(calibration.ranges)
        errors.update(calibration.layer_errors)
        count = calibration.rows
    result = Calibration(ranges, errors, frozenset(), count)
    write_json(out, result.to_json())
    return result


def calibrate_stage(params: PipelineParams, frozen_dir: str | os.PathLike, samples_dir: str | os.PathLike,
                    out: str) -> str:
    """The stage: the plan for ``out`` from the params file, the model stage's calibration rows,
    the file written; returns what it measured, one line per layer."""
    from .model import Samples

    plan = calibration_plan(params, out)
    calibration = calibrate(frozen_dir, Samples.load(samples_dir).calibration, plan, out)
    lines = [f"calibrate: {', '.join(plan.transforms)} for {', '.join(plan.variants)} after {len(plan.before)} "
             f"transforms: {len(calibration.ranges)} ranges, {len(calibration.layer_errors)} layer errors over "
             f"{calibration.rows} calibration rows -> {out}"]
    for name, error in sorted(calibration.layer_errors.items()):
        low, high = calibration.ranges.get(name, (float("nan"), float("nan")))
        lines.append(f"  {name}: input [{low:.6g}, {high:.6g}], int8 output error {error:.4f}")
    return "\n".join(lines)
