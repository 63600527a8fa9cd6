"""The calibrate stage: each float MatMul's and conv's input range over the calibration rows, run
through the frozen float graph, written as the ``ranges_file`` of quantize_matmuls and
quantize_convs (the old tool's insert_logging -> run -> freeze_requantization_ranges step, for
the transforms that have no RequantizationRange ops)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import UserError


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


def calibrate(frozen, rows: Mapping[str, np.ndarray], out: str | os.PathLike) -> dict[str, tuple[float, float]]:
    """Ranges over ``rows`` (calibration rows by the signature's input keys) of ``frozen`` (a
    frozen model directory or a :class:`~serving_optimiser.saved_model.FrozenModel`), written
    atomically to ``out`` as JSON ``{node name: [min, max]}``; returns them."""
    from ..graph_transforms.transforms.quantize_matmuls import calibrate_ranges
    from ..saved_model import FrozenModel
    from .io import write_json

    if not isinstance(frozen, FrozenModel):
        frozen = FrozenModel.load(Path(frozen))
    signature = _signature_for(frozen, rows, str(out))
    feed = {signature.inputs[key].name: np.asarray(values) for key, values in rows.items()}
    ranges = calibrate_ranges(frozen.graph_def, [feed])
    write_json(out, {name: [low, high] for name, (low, high) in sorted(ranges.items())})
    return ranges
