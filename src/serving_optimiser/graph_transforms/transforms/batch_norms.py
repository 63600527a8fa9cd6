"""fold_batch_norms: bake a per-channel Mul that follows a Conv2D, DepthwiseConv2dNative or
MatMul into its weights (the match machinery it shares with fold_old_batch_norms is in
_batch_norm_matching.py).

Both only ever rewrite a match whose intermediate results nobody else reads: a folded
convolution computes the batch-normed value, so another reader of the plain value would get
the wrong numbers. Shared-use checks count data readers only; a control edge (a TF 2 frozen
graph ties every weight to a NoOp) is moved to whatever replaces the node it pointed at.
"""

from __future__ import annotations

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2

from ..context import TransformContext
from ..errors import TransformError
from ..graph_utils import NodeMatch, const_value, pattern
from ..registry import register
from ._batch_norm_matching import (
    ANY,
    CONST,
    Readers,
    RefuseError,
    float_values,
    renamed,
    replace_matches,
    scaled_weights,
    weight_columns,
    with_value,
)

_CONVS = "Conv2D|MatMul|DepthwiseConv2dNative"

_MUL_AFTER_CONV = pattern("Mul", pattern(_CONVS, ANY, CONST), CONST)
_MUL_AFTER_BIAS = pattern("Mul", pattern("BiasAdd|Add|AddV2", pattern(_CONVS, ANY, CONST), CONST), CONST)


def _is_nchw(conv: node_def_pb2.NodeDef) -> bool:
    return conv.op != "MatMul" and "data_format" in conv.attr and conv.attr["data_format"].s == b"NCHW"


def _channel_scale(conv: node_def_pb2.NodeDef, cols: int, mul_const: node_def_pb2.NodeDef) -> np.ndarray:
    """The Mul constant as one factor per output channel.

    Accepts a [cols] vector (the C++ tool's only shape), a scalar, or any shape that
    broadcasts along the channel axis only; anything else cannot be a batch norm.
    """
    values = float_values(mul_const)
    rank = 2 if conv.op == "MatMul" else 4
    if values.size == 1 and values.ndim <= rank:
        return np.full(cols, values.reshape(()), dtype=values.dtype)
    if _is_nchw(conv):
        raise RefuseError(f"'{conv.name}' is NCHW, so '{mul_const.name}' does not scale its channels")
    if values.ndim <= rank and values.shape[-1] == cols and all(d == 1 for d in values.shape[:-1]):
        return values.reshape(cols)
    raise TransformError(
        f"fold_batch_norms: Mul constant '{mul_const.name}' has shape {list(values.shape)}, expected [{cols}]"
    )


# ---------------------------------------------------------------------------------------------
# fold_batch_norms
# ---------------------------------------------------------------------------------------------


def _fold_mul_into_conv(match: NodeMatch, readers: Readers, renames: dict[str, str]) -> list[node_def_pb2.NodeDef]:
    mul, conv = match.node, match.inputs[0].node
    source, weights = match.inputs[0].inputs[0].node, match.inputs[0].inputs[1].node
    mul_const = match.inputs[1].node
    readers.require_only(conv, mul)
    readers.require_only(weights, conv)
    if source.name == weights.name:
        raise RefuseError(f"'{conv.name}' reads its weights as its input too")
    weight_values = float_values(weights)
    scale = _channel_scale(conv, weight_columns(conv, weight_values), mul_const)
    keep_const = readers.read_elsewhere(mul_const, mul)
    new_conv = renamed(conv, mul.name, mul, *([] if keep_const else [mul_const]))
    renames[conv.name] = mul.name
    new_nodes = [with_value(weights, scaled_weights(conv, weight_values, scale)), source, new_conv]
    return new_nodes + ([mul_const] if keep_const else [])


def _fold_mul_into_biased_conv(
    match: NodeMatch, readers: Readers, renames: dict[str, str]
) -> list[node_def_pb2.NodeDef]:
    mul, add, bias, mul_const = match.node, match.inputs[0].node, match.inputs[0].inputs[1].node, match.inputs[1].node
    conv_match = match.inputs[0].inputs[0]
    conv, source, weights = conv_match.node, conv_match.inputs[0].node, conv_match.inputs[1].node
    readers.require_only(conv, add)
    readers.require_only(add, mul)
    readers.require_only(weights, conv)
    readers.require_only(bias, add)
    if source.name in (weights.name, bias.name) or weights.name == bias.name:
        raise RefuseError(f"'{conv.name}' shares a Const between its weights, bias and input")
    weight_values, bias_values = float_values(weights), float_values(bias)
    scale = _channel_scale(conv, weight_columns(conv, weight_values), mul_const)
    if add.op == "BiasAdd":
        new_bias = bias_values * scale.astype(bias_values.dtype)
    else:
        # (x + b) * s == x * s + b * s, with b * s broadcast exactly as the Mul would.
        new_bias = (bias_values * const_value(mul_const)).astype(bias_values.dtype)
    keep_const = readers.read_elsewhere(mul_const, mul)
    new_add = renamed(add, mul.name, mul, *([] if keep_const else [mul_const]))
    renames[add.name] = mul.name
    new_nodes = [
        with_value(weights, scaled_weights(conv, weight_values, scale)),
        source,
        conv,
        with_value(bias, new_bias),
        new_add,
    ]
    return new_nodes + ([mul_const] if keep_const else [])


@register("fold_batch_norms", on_functions=True)
def fold_batch_norms(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Bake a per-channel Mul into the weights of the convolution or MatMul before it.

    Matches: Mul of (Conv2D|MatMul|DepthwiseConv2dNative of (any, Const), Const), and (beyond
    the C++ tool) Mul of (BiasAdd|Add|AddV2 of (that conv, Const), Const), the shape a Keras
    layer with a bias plus a frozen BatchNormalization takes after fold_constants.
    Produces: the weights Const, same name, scaled per output channel; the conv (first form) or
    the bias add (second form, its bias Const scaled too) takes the Mul's name; the Mul is gone.
    Params: none. Run fold_constants first so the batch-norm factors are plain Consts.
    Errors: a Mul constant that is not one factor per channel, e.g. shape [3] for 2 channels.
    Differs from C++: shared-use checks count data readers only (control edges, such as a TF 2
    NoOp's, move to the renamed node), a Mul constant read elsewhere is kept instead of blocking
    the fold, a conv or weights that is a graph input/output is left alone, scalar and
    [1,..,1,cols] constants fold (C++ fails), MatMul(transpose_b) scales rows, NCHW convs are
    left alone, and passes repeat until nothing changes (C++ made one pass).
    """
    current = graph_def
    for _ in range(len(graph_def.node) + 1):
        current, plain = replace_matches(
            current, _MUL_AFTER_CONV, _fold_mul_into_conv, context,
            refused_order=lambda m: [m.node, m.inputs[0].node, *[i.node for i in m.inputs[0].inputs], m.inputs[1].node],
        )
        current, biased = replace_matches(current, _MUL_AFTER_BIAS, _fold_mul_into_biased_conv, context)
        if not plain + biased:
            break
    return current
