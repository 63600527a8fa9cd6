"""Duplicate merging: nodes that compute the same thing from the same inputs become one node."""

from __future__ import annotations

from tensorflow.core.framework import graph_pb2, node_def_pb2

from ..context import TransformContext
from ..errors import TransformError
from ..graph_utils import (
    canonical_input_name,
    fix_colocation_attrs,
    lookup_op_def,
    new_graph_like,
    rename_node_inputs,
)
from ..registry import register


def _content_key(node: node_def_pb2.NodeDef, keep_name: bool) -> tuple:
    """What the C++ tool hashed: op, name (only if protected), canonical inputs, device, attrs."""
    attrs = tuple(
        (key, node.attr[key].SerializeToString(deterministic=True)) for key in sorted(node.attr)
    )
    inputs = tuple(canonical_input_name(i) for i in node.input)
    return node.op, node.name if keep_name else "", inputs, node.device, attrs


@register("merge_duplicate_nodes", on_functions=True)
def merge_duplicate_nodes(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Keep one node of each set of identical stateless nodes and point readers at it.

    Matches: nodes with equal op, canonical inputs (``a`` == ``a:0``, order kept), device
    and attrs (compared serialised). A node's name takes part only when it is literally one
    of the input or output names, so those nodes are never merged away.
    Produces: the first node of each set (graph order) survives; references to the others
    (``dup``, ``dup:1``, ``^dup``) are redirected to it, keeping ``^`` and ``:port``, and
    ``_class`` entries ``loc:@dup`` become ``loc:@<survivor>``.
    Repeats until nothing merges, so whole duplicated chains collapse (nodes that differed
    only by colocation with merged twins merge in the next round). Stateful ops
    (OpDef ``is_stateful``; library functions by their signature) are never merged.
    Params: none. Errors: a node whose op TF does not know and the library does not define.
    Deliberate differences: survivors keep graph order (the C++ tool emitted them in hash
    order, so which duplicate survived a second round varied); the C++ tool left ``loc:@dup``
    entries naming merged-away nodes, so the result did not import, and never merged their
    holders.
    """
    protected = set(context.input_names) | set(context.output_names)
    stateful: dict[str, bool] = {}
    current = graph_def
    while True:
        first_of: dict[tuple, str] = {}
        renames: dict[str, str] = {}
        survivors: dict[str, str] = {}
        kept = []
        for node in current.node:
            if node.op not in stateful:
                op_def = lookup_op_def(node.op, graph_def.library)
                if op_def is None:
                    raise TransformError(
                        f"merge_duplicate_nodes: node '{node.name}' has op '{node.op}', which is not "
                        "registered in TensorFlow nor defined in the graph's function library"
                    )
                stateful[node.op] = op_def.is_stateful
            key = _content_key(node, node.name in protected)
            survivor = first_of.setdefault(key, node.name)
            if survivor != node.name and not stateful[node.op]:
                renames[f"{node.name}:*"] = survivor
                survivors[node.name] = survivor
            else:
                kept.append(node)
        if not renames:
            return current if current is not graph_def else new_graph_like(graph_def, graph_def.node)
        current = fix_colocation_attrs(rename_node_inputs(new_graph_like(current, kept), renames), survivors)
