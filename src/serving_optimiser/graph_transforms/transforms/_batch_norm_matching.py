"""The match machinery fold_batch_norms and fold_old_batch_norms share: who reads each node,
one replace pass that can refuse a match and keep it as it was, and the helpers that scale a
convolution's or MatMul's weights per output channel."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2

from ..context import TransformContext
from ..graph_utils import (
    NodeMatch,
    OpTypePattern,
    const_value,
    control_inputs,
    data_inputs,
    make_tensor_proto,
    parse_input,
    pattern,
    rename_node_inputs,
    replace_matching_op_types,
)

log = logging.getLogger(__name__)

ANY = pattern("*")
CONST = pattern("Const")
FLOAT_TYPES = frozenset({types_pb2.DT_HALF, types_pb2.DT_BFLOAT16, types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE})


class RefuseError(Exception):
    """This match must stay as it is; the message says why."""


class Readers:
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
            raise RefuseError(f"'{node.name}' is also read by '{others[0]}'")
        if node.name in self.protected:
            raise RefuseError(f"'{node.name}' is a graph input or output")

    def read_elsewhere(self, node: node_def_pb2.NodeDef, *allowed: node_def_pb2.NodeDef) -> bool:
        names = {n.name for n in allowed}
        return bool(self.control.get(node.name)) or any(r not in names for r, _ in self.data.get(node.name, []))


Builder = Callable[[NodeMatch, Readers, dict[str, str]], list[node_def_pb2.NodeDef]]


def _unique(nodes: list[node_def_pb2.NodeDef]) -> list[node_def_pb2.NodeDef]:
    """First node of each name: a match can meet the same node twice (shared input)."""
    seen: dict[str, node_def_pb2.NodeDef] = {}
    for node in nodes:
        seen.setdefault(node.name, node)
    return list(seen.values())


def replace_matches(
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
    readers = Readers(graph_def, protected)
    renames: dict[str, str] = {}
    folded = 0

    def generate(match: NodeMatch, input_nodes: set[str], output_nodes: set[str]) -> list[node_def_pb2.NodeDef]:
        nonlocal folded
        try:
            new_nodes = build(match, readers, renames)
        except RefuseError as reason:
            log.info("%s: left '%s' unchanged: %s", context.transform, match.node.name, reason)
            return _unique(refused_order(match))
        folded += 1
        return _unique(new_nodes)

    result, _ = replace_matching_op_types(graph_def, op_pattern, generate, allow_inconsistencies=True)
    if renames:
        # Only control inputs move: data readers of the old name were rebuilt by ``build``.
        control_renames = {f"^{old}": f"^{new}" for old, new in renames.items()}
        renamed = rename_node_inputs(result, control_renames, follow_chains=False)
        for before, node in zip(result.node, renamed.node):
            if before.input != node.input:
                set_inputs(node, data_inputs(node), [c[1:] for c in control_inputs(node)])
        result = renamed
    return result, folded


def set_inputs(node: node_def_pb2.NodeDef, data: list[str], controls: list[str]) -> None:
    """Data inputs as given, then each control input once, unless it is already a data input."""
    sources = {parse_input(i)[1] for i in data} | {node.name}
    del node.input[:]
    node.input.extend(data + [f"^{c}" for c in dict.fromkeys(controls) if c not in sources])


def renamed(node: node_def_pb2.NodeDef, name: str, *dropped: node_def_pb2.NodeDef) -> node_def_pb2.NodeDef:
    """A copy of ``node`` called ``name`` that also waits for what the ``dropped`` nodes waited for."""
    result = node_def_pb2.NodeDef()
    result.CopyFrom(node)
    result.name = name
    controls = [c[1:] for n in (node, *dropped) for c in control_inputs(n) if c[1:] != node.name]
    set_inputs(result, [i for i in node.input if not i.startswith("^")], controls)
    return result


def with_value(node: node_def_pb2.NodeDef, value: np.ndarray) -> node_def_pb2.NodeDef:
    """``node`` (a Const) holding ``value`` instead, in its own dtype."""
    result = node_def_pb2.NodeDef()
    result.CopyFrom(node)
    dtype = node.attr["dtype"].type
    result.attr["value"].tensor.CopyFrom(make_tensor_proto(value, dtype=dtype))
    return result


def float_values(node: node_def_pb2.NodeDef) -> np.ndarray:
    if node.attr["dtype"].type not in FLOAT_TYPES:
        raise RefuseError(f"Const '{node.name}' is not a float tensor")
    return const_value(node)


# ---------------------------------------------------------------------------------------------
# Weights layout
# ---------------------------------------------------------------------------------------------


def weight_columns(conv: node_def_pb2.NodeDef, weights: np.ndarray) -> int:
    """How many output channels the weights have (the C++ ``weights_cols``)."""
    if weights.ndim != (2 if conv.op == "MatMul" else 4):
        raise RefuseError(f"weights of '{conv.name}' have rank {weights.ndim}")
    if conv.op == "Conv2D":
        return weights.shape[3]
    if conv.op == "DepthwiseConv2dNative":
        return weights.shape[2] * weights.shape[3]
    transpose_b = conv.attr["transpose_b"].b if "transpose_b" in conv.attr else False
    return weights.shape[0] if transpose_b else weights.shape[1]


def scaled_weights(conv: node_def_pb2.NodeDef, weights: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """weights[i] * scale[i mod cols] over the flat buffer, as C++; rows for MatMul(transpose_b)."""
    scale = scale.astype(weights.dtype)
    if conv.op == "MatMul" and "transpose_b" in conv.attr and conv.attr["transpose_b"].b:
        return weights * scale[:, None]
    return (weights.reshape(-1, scale.shape[0]) * scale).reshape(weights.shape)
