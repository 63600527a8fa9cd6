"""The optimise stage: one named transform list of the params file on the frozen model."""

from __future__ import annotations

import os

from ..errors import UserError
from .params import PipelineParams


def optimise_stage(params: PipelineParams, variant: str, frozen_dir: str | os.PathLike,
                   out: str | os.PathLike) -> str:
    """Apply ``optimise.<variant>`` to the frozen model in ``frozen_dir``, write ``out``; the
    transform list is checked before TensorFlow loads, so a typo in the params file is reported
    at once, naming the file and the variant. Returns the stage's summary line."""
    from ..graph_transforms.catalogue import check_transforms
    from ..graph_transforms.errors import TransformError
    from ..graph_transforms.parser import parse_transforms

    transforms = params.transforms(variant)
    try:
        check_transforms(parse_transforms(" ".join(transforms)))
    except TransformError as error:
        raise UserError(f"{params.path}: 'optimise.{variant}': {error}") from None
    from ..graph_transforms import TransformGraph
    from ..saved_model import FrozenModel

    frozen = FrozenModel.load(frozen_dir)
    optimised = TransformGraph(frozen.graph_def, frozen.input_node_names(), frozen.output_node_names(), transforms)
    frozen.with_graph_def(optimised).save(out)
    return f"optimise: {variant}: {frozen.graph_def.ByteSize()} -> {optimised.ByteSize()} bytes -> {out}"
