"""fold_batch_norms: bake a per-channel Mul that follows a Conv2D, DepthwiseConv2dNative or
MatMul into its weights; also the match machinery fold_old_batch_norms (old_batch_norms.py)
shares.

Both only ever rewrite a match whose intermediate results nobody else reads: a folded
convolution computes the batch-normed value, so another reader of the plain value would get
the wrong numbers. Shared-use checks count data readers only; a control edge (a TF 2 frozen
graph ties every weight to a NoOp) is moved to whatever replaces the node it pointed at.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2

from ..context import TransformContext
from ..errors import TransformError
from ..graph_utils import (
    NodeMatch,
    OpTypePattern,
    const_value,
    control_inputs,
    make_tensor_proto,
    parse_input,
    pattern,
    replace_matching_op_types,
)
from ..registry import register

log = logging.getLogger(__name__)

ANY = pattern("*")
CONST = pattern("Const")
_CONVS = "Conv2D|MatMul|DepthwiseConv2dNative"
_FLOAT_TYPES = frozenset({types_pb2.DT_HALF, types_pb2.DT_BFLOAT16, types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE})

_MUL_AFTER_CONV = pattern("Mul", pattern(_CONVS, ANY, CONST), CONST)
_MUL_AFTER_BIAS = pattern("Mul", pattern("BiasAdd|Add|AddV2", pattern(_CONVS, ANY, CONST), CONST), CONST)


class _RefuseError(Exception):
    """This match must stay as it is; the message says why."""


class _Readers:
    """Who reads each node: data readers (with the port they read) and control readers."""

    def __init__(self, graph_def: graph_pb2.GraphDef, protected: set[str]):
        self.data: dict[str, list[tuple[str, int]]] = {}
        self.control: dict[str, list[str]] = {}
        self.protected = protected
        for node in graph_def.node:
            for input_string in node.input:
                is_control, source, port = parse_input(input_string)
                if is_control:
                    self.control.setdefault(source, []).append(node.name)
                else:
                    self.data.setdefault(source, []).append((node.name, port))

    def require_only(self, node: node_def_pb2.NodeDef, *allowed: node_def_pb2.NodeDef) -> None:
        """Refuse unless ``allowed`` are the only data readers (port 0) and ``node`` is no graph input/output."""
        names = {n.name for n in allowed}
        others = sorted({r for r, port in self.data.get(node.name, []) if r not in names or port != 0})
        if others:
            raise _RefuseError(f"'{node.name}' is also read by '{others[0]}'")
        if node.name in self.protected:
            raise _RefuseError(f"'{node.name}' is a graph input or output")

    def read_elsewhere(self, node: node_def_pb2.NodeDef, *allowed: node_def_pb2.NodeDef) -> bool:
        names = {n.name for n in allowed}
        return bool(self.control.get(node.name)) or any(r not in names for r, _ in self.data.get(node.name, []))


Builder = Callable[[NodeMatch, _Readers, dict[str, str]], list[node_def_pb2.NodeDef]]


def _unique(nodes: list[node_def_pb2.NodeDef]) -> list[node_def_pb2.NodeDef]:
    """First node of each name: a match can meet the same node twice (shared input)."""
    seen: dict[str, node_def_pb2.NodeDef] = {}
    for node in nodes:
        seen.setdefault(node.name, node)
    return list(seen.values())


def _replace(
    graph_def: graph_pb2.GraphDef,
    op_pattern: OpTypePattern,
    build: Builder,
    context: TransformContext,
    refused_order: Callable[[NodeMatch], list[node_def_pb2.NodeDef]] = lambda match: match.all_nodes(),
) -> tuple[graph_pb2.GraphDef, int]:
    """One pass of ``build`` over the matches; returns the graph and how many were folded.

    ``build`` fills ``renames`` (old node name -> new) for nodes whose name moves to another
    node; control inputs on the old names are redirected afterwards.
    """
    protected = {parse_input(n)[1] for n in context.input_names + context.output_names}
    readers = _Readers(graph_def, protected)
    renames: dict[str, str] = {}
    folded = 0

    def generate(match: NodeMatch, input_nodes: set[str], output_nodes: set[str]) -> list[node_def_pb2.NodeDef]:
        nonlocal folded
        try:
            new_nodes = build(match, readers, renames)
        except _RefuseError as reason:
            log.info("%s: left '%s' unchanged: %s", context.transform, match.node.name, reason)
            return _unique(refused_order(match))
        folded += 1
        return _unique(new_nodes)

    result, _ = replace_matching_op_types(graph_def, op_pattern, generate, allow_inconsistencies=True)
    if renames:
        for node in result.node:
            if any(i.startswith("^") and i[1:] in renames for i in node.input):
                data = [i for i in node.input if not i.startswith("^")]
                controls = [renames.get(i[1:], i[1:]) for i in node.input if i.startswith("^")]
                _set_inputs(node, data, controls)
    return result, folded


def _set_inputs(node: node_def_pb2.NodeDef, data: list[str], controls: list[str]) -> None:
    """Data inputs as given, then each control input once, unless it is already a data input."""
    sources = {parse_input(i)[1] for i in data} | {node.name}
    del node.input[:]
    node.input.extend(data + [f"^{c}" for c in dict.fromkeys(controls) if c not in sources])


def _renamed(node: node_def_pb2.NodeDef, name: str, *dropped: node_def_pb2.NodeDef) -> node_def_pb2.NodeDef:
    """A copy of ``node`` called ``name`` that also waits for what the ``dropped`` nodes waited for."""
    result = node_def_pb2.NodeDef()
    result.CopyFrom(node)
    result.name = name
    controls = [c[1:] for n in (node, *dropped) for c in control_inputs(n) if c[1:] != node.name]
    _set_inputs(result, [i for i in node.input if not i.startswith("^")], controls)
    return result


def _with_value(node: node_def_pb2.NodeDef, value: np.ndarray) -> node_def_pb2.NodeDef:
    """``node`` (a Const) holding ``value`` instead, in its own dtype."""
    result = node_def_pb2.NodeDef()
    result.CopyFrom(node)
    dtype = node.attr["dtype"].type
    result.attr["value"].tensor.CopyFrom(make_tensor_proto(value, dtype=dtype))
    return result


def _float_values(node: node_def_pb2.NodeDef) -> np.ndarray:
    if node.attr["dtype"].type not in _FLOAT_TYPES:
        raise _RefuseError(f"Const '{node.name}' is not a float tensor")
    return const_value(node)


# ---------------------------------------------------------------------------------------------
# Weights layout
# ---------------------------------------------------------------------------------------------


def _weight_columns(conv: node_def_pb2.NodeDef, weights: np.ndarray) -> int:
    """How many output channels the weights have (the C++ ``weights_cols``)."""
    if weights.ndim != (2 if conv.op == "MatMul" else 4):
        raise _RefuseError(f"weights of '{conv.name}' have rank {weights.ndim}")
    if conv.op == "Conv2D":
        return weights.shape[3]
    if conv.op == "DepthwiseConv2dNative":
        return weights.shape[2] * weights.shape[3]
    transpose_b = conv.attr["transpose_b"].b if "transpose_b" in conv.attr else False
    return weights.shape[0] if transpose_b else weights.shape[1]


def _scaled_weights(conv: node_def_pb2.NodeDef, weights: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """weights[i] * scale[i mod cols] over the flat buffer, as C++; rows for MatMul(transpose_b)."""
    scale = scale.astype(weights.dtype)
    if conv.op == "MatMul" and "transpose_b" in conv.attr and conv.attr["transpose_b"].b:
        return weights * scale[:, None]
    return (weights.reshape(-1, scale.shape[0]) * scale).reshape(weights.shape)


def _is_nchw(conv: node_def_pb2.NodeDef) -> bool:
    return conv.op != "MatMul" and "data_format" in conv.attr and conv.attr["data_format"].s == b"NCHW"


def _channel_scale(conv: node_def_pb2.NodeDef, cols: int, mul_const: node_def_pb2.NodeDef) -> np.ndarray:
    """The Mul constant as one factor per output channel.

    Accepts a [cols] vector (the C++ tool's only shape), a scalar, or any shape that
    broadcasts along the channel axis only; anything else cannot be a batch norm.
    """
    values = _float_values(mul_const)
    rank = 2 if conv.op == "MatMul" else 4
    if values.size == 1 and values.ndim <= rank:
        return np.full(cols, values.reshape(()), dtype=values.dtype)
    if _is_nchw(conv):
        raise _RefuseError(f"'{conv.name}' is NCHW, so '{mul_const.name}' does not scale its channels")
    if values.ndim <= rank and values.shape[-1] == cols and all(d == 1 for d in values.shape[:-1]):
        return values.reshape(cols)
    raise TransformError(
        f"fold_batch_norms: Mul constant '{mul_const.name}' has shape {list(values.shape)}, expected [{cols}]"
    )


# ---------------------------------------------------------------------------------------------
# fold_batch_norms
# ---------------------------------------------------------------------------------------------


def _fold_mul_into_conv(match: NodeMatch, readers: _Readers, renames: dict[str, str]) -> list[node_def_pb2.NodeDef]:
    mul, conv = match.node, match.inputs[0].node
    source, weights = match.inputs[0].inputs[0].node, match.inputs[0].inputs[1].node
    mul_const = match.inputs[1].node
    readers.require_only(conv, mul)
    readers.require_only(weights, conv)
    if source.name == weights.name:
        raise _RefuseError(f"'{conv.name}' reads its weights as its input too")
    weight_values = _float_values(weights)
    scale = _channel_scale(conv, _weight_columns(conv, weight_values), mul_const)
    keep_const = readers.read_elsewhere(mul_const, mul)
    new_conv = _renamed(conv, mul.name, mul, *([] if keep_const else [mul_const]))
    renames[conv.name] = mul.name
    new_nodes = [_with_value(weights, _scaled_weights(conv, weight_values, scale)), source, new_conv]
    return new_nodes + ([mul_const] if keep_const else [])


def _fold_mul_into_biased_conv(
    match: NodeMatch, readers: _Readers, renames: dict[str, str]
) -> list[node_def_pb2.NodeDef]:
    mul, add, bias, mul_const = match.node, match.inputs[0].node, match.inputs[0].inputs[1].node, match.inputs[1].node
    conv_match = match.inputs[0].inputs[0]
    conv, source, weights = conv_match.node, conv_match.inputs[0].node, conv_match.inputs[1].node
    readers.require_only(conv, add)
    readers.require_only(add, mul)
    readers.require_only(weights, conv)
    readers.require_only(bias, add)
    if source.name in (weights.name, bias.name) or weights.name == bias.name:
        raise _RefuseError(f"'{conv.name}' shares a Const between its weights, bias and input")
    weight_values, bias_values = _float_values(weights), _float_values(bias)
    scale = _channel_scale(conv, _weight_columns(conv, weight_values), mul_const)
    if add.op == "BiasAdd":
        new_bias = bias_values * scale.astype(bias_values.dtype)
    else:
        # (x + b) * s == x * s + b * s, with b * s broadcast exactly as the Mul would.
        new_bias = (bias_values * const_value(mul_const)).astype(bias_values.dtype)
    keep_const = readers.read_elsewhere(mul_const, mul)
    new_add = _renamed(add, mul.name, mul, *([] if keep_const else [mul_const]))
    renames[add.name] = mul.name
    new_nodes = [
        _with_value(weights, _scaled_weights(conv, weight_values, scale)),
        source,
        conv,
        _with_value(bias, new_bias),
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
        current, plain = _replace(
            current, _MUL_AFTER_CONV, _fold_mul_into_conv, context,
            refused_order=lambda m: [m.node, m.inputs[0].node, *[i.node for i in m.inputs[0].inputs], m.inputs[1].node],
        )
        current, biased = _replace(current, _MUL_AFTER_BIAS, _fold_mul_into_biased_conv, context)
        if not plain + biased:
            break
    return current
