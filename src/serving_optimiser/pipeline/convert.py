"""The convert stage: one optimised GraphDef back to a SavedModel with the model's signatures."""

from __future__ import annotations

import os

from ..errors import UserError
from .params import PipelineParams, require, require_list


def convert_stage(params: PipelineParams, variant: str, optimised_dir: str | os.PathLike,
                  out: str | os.PathLike) -> str:
    """Convert ``optimised_dir`` to the SavedModel ``out`` as the params file's ``convert``
    section says (``dequantize_once``, ``warmup_batch_sizes``); returns the summary line."""
    convert = params.section("convert")
    dequantize_once = require(convert, "dequantize_once", bool, "convert", params.path)
    warmup_batch_sizes = require_list(convert, "warmup_batch_sizes", int, "convert", params.path)
    if any(size < 1 for size in warmup_batch_sizes):
        raise UserError(f"{params.path}: 'convert.warmup_batch_sizes' must hold positive integers")
    from ..saved_model import FrozenModel, convert_to_saved_model

    convert_to_saved_model(
        FrozenModel.load(optimised_dir), out, dequantize_once=dequantize_once, warmup_batch_sizes=warmup_batch_sizes,
    )
    return f"convert: {variant} -> {out}"
