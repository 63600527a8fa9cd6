"""Backports: rewrite newer ops as their older equivalents so older TensorFlow runtimes can load
the graph (ConcatV2 -> Concat, the TensorArray V3 family -> V2)."""

from __future__ import annotations

import numpy as np
from tensorflow.core.framework import graph_pb2

from ..context import TransformContext
from ..graph_utils import (
    control_inputs,
    data_inputs,
    lookup_op_def,
    make_const_node,
    new_graph_like,
    rename_node_inputs,
)
from ..registry import register


@register("backport_concatv2", on_functions=True)
def backport_concatv2(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Turn every ``ConcatV2`` into the v1 ``Concat``.

    Matches: ConcatV2 (a single node, any inputs).
    Produces: a ``Concat`` of the same name whose data inputs are the axis (ConcatV2's last
    data input) followed by the values in order; ``Tidx`` is dropped, other attrs kept.
    Params: none.
    Deliberate difference: control inputs stay at the end; the C++ tool took the last
    input string as the axis even when it was a ``^control`` input.
    """
    result = new_graph_like(graph_def, graph_def.node)
    for node in result.node:
        if node.op != "ConcatV2":
            continue
        data, controls = data_inputs(node), control_inputs(node)
        node.op = "Concat"
        del node.input[:]
        node.input.extend(data[-1:] + data[:-1] + controls)
        if "Tidx" in node.attr:
            del node.attr["Tidx"]
    return result


_TENSOR_ARRAY_ROOTS = {"TensorArrayV3": "TensorArrayV2", "TensorArrayGradV3": "TensorArrayGradV2"}
_TENSOR_ARRAY_USERS = {
    f"TensorArray{kind}V3": f"TensorArray{kind}V2"
    for kind in ("Write", "Read", "Gather", "Scatter", "Concat", "Split", "Size", "Close")
}
# TensorArrayV2 and its family are deprecated from GraphDef producer 26 on.
_LAST_PRODUCER_WITH_TENSOR_ARRAY_V2 = 25


@register("backport_tensor_array_v3", on_functions=True)
def backport_tensor_array_v3(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Turn the TensorArray V3 ops into their V2 versions.

    Matches: TensorArrayV3 and TensorArrayGradV3 nodes, then
    TensorArray{Write,Read,Gather,Scatter,Concat,Split,Size,Close}V3 nodes.
    Produces: the same nodes with op ``...V2``. V3 arrays have a second ``flow`` output
    that V2 lacks, so each array gets a float scalar Const ``<name>/replacement_flow_node``
    (1.0, right after it) and every ``<name>:1`` input reads that instead.
    Params: none.
    Deliberate differences: attrs the V2 op does not define (``identical_element_shapes``)
    are dropped, so the node loads; and when the graph's ``versions.producer`` is 26 or more
    it is lowered to 25, the last producer for which TensorFlow still loads the V2 ops (the
    C++ tool dropped ``versions`` altogether, i.e. producer 0).
    """
    renames: dict[str, str] = {}
    nodes = []
    for node in graph_def.node:
        new_node = type(node)()
        new_node.CopyFrom(node)
        nodes.append(new_node)
        if node.op in _TENSOR_ARRAY_ROOTS:
            _retype(new_node, _TENSOR_ARRAY_ROOTS[node.op])
            flow = make_const_node(f"{node.name}/replacement_flow_node", np.float32(1.0))
            nodes.append(flow)
            renames[f"{node.name}:1"] = flow.name
        elif node.op in _TENSOR_ARRAY_USERS:
            _retype(new_node, _TENSOR_ARRAY_USERS[node.op])
    changed = any(node.op in _TENSOR_ARRAY_ROOTS or node.op in _TENSOR_ARRAY_USERS for node in graph_def.node)
    result = rename_node_inputs(new_graph_like(graph_def, nodes), renames)
    if changed and result.HasField("versions") and result.versions.producer > _LAST_PRODUCER_WITH_TENSOR_ARRAY_V2:
        result.versions.producer = _LAST_PRODUCER_WITH_TENSOR_ARRAY_V2
    return result


def _retype(node, new_op: str) -> None:
    node.op = new_op
    known = {attr.name for attr in lookup_op_def(new_op).attr}
    for key in [key for key in node.attr if key not in known and not key.startswith("_")]:
        del node.attr[key]
