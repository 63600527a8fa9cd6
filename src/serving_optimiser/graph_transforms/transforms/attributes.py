"""Node-field transforms: attribute defaults, removal and renaming, devices, node and op renames.

Each rewrites one field of matching nodes and leaves everything else as it was; none of them
looks at what the graph computes.
"""

from __future__ import annotations

from tensorflow.core.framework import graph_pb2

from ..context import TransformContext
from ..errors import TransformError
from ..graph_utils import fix_colocation_attrs, lookup_op_def, new_graph_like, rename_nodes
from ..registry import register


def _exactly_one(context: TransformContext, name: str, example: str) -> str:
    values = context.get_list(name)
    if len(values) != 1:
        found = "none" if not values else f"{len(values)}"
        raise TransformError(
            f"{context.transform}: expects exactly one '{name}' argument (found {found}), e.g. {example}"
        )
    return values[0]


def _op_filter(context: TransformContext) -> str:
    """``op_name``: at most one value; absent or ``*`` means every op."""
    return context.get_string("op_name", "*")


@register("add_default_attributes", on_functions=True)
def add_default_attributes(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Give every node the attrs its OpDef has defaults for and the node lacks.

    Matches: every node; its op is looked up in TF's op registry, then among the graph's
    library functions (their signatures). Attrs already set are left untouched.
    Produces: the same nodes, same order, plus the missing default attrs.
    Params: none.
    Errors: a node whose op neither TF nor the library defines.
    Deliberate difference: none in the graph itself; the engine may also run it on function
    bodies (the C++ tool left them alone).
    """
    result = new_graph_like(graph_def, graph_def.node)
    for node in result.node:
        op_def = lookup_op_def(node.op, graph_def.library)
        if op_def is None:
            raise TransformError(
                f"add_default_attributes: node '{node.name}' has op '{node.op}', which is not "
                "registered in TensorFlow nor defined in the graph's function library"
            )
        for attr in op_def.attr:
            if attr.HasField("default_value") and attr.name not in node.attr:
                node.attr[attr.name].CopyFrom(attr.default_value)
    return result


@register("remove_attribute", params={"attribute_name": "(required)", "op_name": "*"}, on_functions=True)
def remove_attribute(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Delete one attr from nodes of one op type (or of every op).

    Matches: nodes whose op equals ``op_name`` (or every node when it is absent or ``*``)
    and that carry ``attribute_name``.
    Produces: the same nodes without that attr.
    Params: ``attribute_name`` (exactly one, required), ``op_name`` (at most one, ``*``).
    Deliberate difference: the C++ error messages said ``remove_nodes``; ours say
    ``remove_attribute``.
    """
    attribute = _exactly_one(context, "attribute_name", "remove_attribute(op_name=Mul, attribute_name=foo)")
    op_name = _op_filter(context)
    result = new_graph_like(graph_def, graph_def.node)
    for node in result.node:
        if op_name in ("*", node.op) and attribute in node.attr:
            del node.attr[attribute]
    return result


@register(
    "rename_attribute",
    params={"old_attribute_name": "(required)", "new_attribute_name": "(required)", "op_name": "*"},
    on_functions=True,
)
def rename_attribute(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Move an attr's value to a new key on nodes of one op type (or of every op).

    Matches: nodes whose op equals ``op_name`` (or every node when absent or ``*``) and
    that carry ``old_attribute_name``.
    Produces: the value under ``new_attribute_name``; the old key is gone.
    Params: ``old_attribute_name``, ``new_attribute_name`` (exactly one each), ``op_name``
    (at most one, ``*``).
    Deliberate differences: a repeated ``op_name`` is an error (C++ used the first value
    silently); when the node already has ``new_attribute_name``, the moved value replaces
    it (C++ kept the old value there and still deleted the moved attr).
    """
    example = "rename_attribute(old_attribute_name=foo, new_attribute_name=bar)"
    old_name = _exactly_one(context, "old_attribute_name", example)
    new_name = _exactly_one(context, "new_attribute_name", example)
    op_name = _op_filter(context)
    result = new_graph_like(graph_def, graph_def.node)
    for node in result.node:
        if op_name in ("*", node.op) and old_name in node.attr:
            value = type(node.attr[old_name])()
            value.CopyFrom(node.attr[old_name])
            del node.attr[old_name]
            node.attr[new_name].CopyFrom(value)
    return result


@register("remove_device", on_functions=True)
def remove_device(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Clear every node's device.

    Matches: every node. Produces: the same nodes with ``device`` empty. Params: none.
    """
    result = new_graph_like(graph_def, graph_def.node)
    for node in result.node:
        node.device = ""
    return result


@register("set_device", params={"device": '""', "if_default": "false"}, on_functions=True)
def set_device(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Put nodes on one device.

    Matches: every node, or with ``if_default=true`` only nodes whose device is empty.
    Produces: the same nodes with ``device`` set (no ``device`` param clears it).
    Params: ``device`` (string, ""), ``if_default`` (bool, false).
    """
    device = context.get_string("device", "")
    if_default = context.get_bool("if_default", False)
    result = new_graph_like(graph_def, graph_def.node)
    for node in result.node:
        if not if_default or not node.device:
            node.device = device
    return result


@register("rename_node", params={"old_node_name": "(required)", "new_node_name": "(required)"})
def rename_node(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Rename one node and every reference to it.

    Matches: the node named ``old_node_name`` and every input string naming it.
    Produces: the node named ``new_node_name``; inputs keep their ``^`` and ``:port``
    (``splitter:1`` -> ``demux:1``); ``_class`` entries ``loc:@<old>`` become ``loc:@<new>``.
    Params: ``old_node_name``, ``new_node_name`` (exactly one each).
    Errors: a node already named ``new_node_name``.
    Deliberate differences: renaming a node that does not exist is an error (C++ returned
    the graph unchanged); C++ left ``_class`` entries naming the old name, which stopped the
    import.
    """
    example = "rename_node(old_node_name=super/deep/output, new_node_name=output)"
    old_name = _exactly_one(context, "old_node_name", example)
    new_name = _exactly_one(context, "new_node_name", example)
    names = {node.name for node in graph_def.node}
    if new_name in names:
        raise TransformError(f"rename_node: a node named '{new_name}' already exists")
    if old_name not in names:
        raise TransformError(f"rename_node: no node named '{old_name}' in the graph")
    result = rename_nodes(new_graph_like(graph_def, graph_def.node), {old_name: new_name})
    return fix_colocation_attrs(result, {old_name: new_name})


@register("rename_op", params={"old_op_name": "(required)", "new_op_name": "(required)"}, on_functions=True)
def rename_op(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Change the op type of every node of one op (attrs untouched).

    Matches: nodes whose op is ``old_op_name``. Produces: the same nodes with op
    ``new_op_name``. Params: ``old_op_name``, ``new_op_name`` (exactly one each).
    """
    example = "rename_op(old_op_name=Mul, new_op_name=Multiply)"
    old_op = _exactly_one(context, "old_op_name", example)
    new_op = _exactly_one(context, "new_op_name", example)
    result = new_graph_like(graph_def, graph_def.node)
    for node in result.node:
        if node.op == old_op:
            node.op = new_op
    return result
