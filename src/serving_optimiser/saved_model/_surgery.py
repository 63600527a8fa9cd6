"""GraphDef surgery the freezer needs: prefixing a signature's nodes, merging several frozen
signatures into one graph (sharing identical constants), dropping control edges that only
order pure computations, and giving library functions stable names."""

from __future__ import annotations

import re
from collections.abc import Iterable

from tensorflow.core.framework import graph_pb2

from ..graph_transforms.graph_utils import (
    consumers_map,
    copy_graph,
    lookup_op_def,
    new_graph_like,
    node_name_from_input,
    remove_unreachable,
    rename_nodes,
)

# Ops that exist to fail loudly: a control edge to one of them is a check, not an ordering.
CHECKING_OPS = frozenset({"Assert", "CheckNumerics", "CheckNumericsV2", "VerifyTensorAllFinite"})
# Control-flow ops: a control edge from inside a loop frame or a cond branch puts a node there.
CONTROL_FLOW_OPS = frozenset({
    "Switch", "RefSwitch", "_SwitchN", "Merge", "RefMerge", "Enter", "RefEnter", "Exit", "RefExit",
    "NextIteration", "RefNextIteration", "LoopCond", "ControlTrigger",
})
_NODE_NAME_INVALID = re.compile(r"[^A-Za-z0-9_.\-/>]")


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ... whichever is not in ``taken`` (added to it)."""
    name, index = base, 0
    while name in taken or any(t.startswith(name + "/") for t in taken if t.startswith(name)):
        index += 1
        name = f"{base}_{index}"
    taken.add(name)
    return name


def scope_name(signature_key: str) -> str:
    """A valid node-name scope for a signature key (``serving_default`` stays as it is)."""
    name = _NODE_NAME_INVALID.sub("_", signature_key)
    return name if name and re.match(r"[A-Za-z0-9.]", name) else f"signature_{name}"


def prefix_nodes(graph_def: graph_pb2.GraphDef, prefix: str) -> graph_pb2.GraphDef:
    return rename_nodes(graph_def, {node.name: f"{prefix}/{node.name}" for node in graph_def.node})


def _is_stateful(op: str, library_names: set[str]) -> bool:
    if op in CHECKING_OPS or op in CONTROL_FLOW_OPS or op in library_names:
        return True
    op_def = lookup_op_def(op)
    return op_def is None or op_def.is_stateful


def drop_pure_control_edges(graph_def: graph_pb2.GraphDef, keep: Iterable[str]) -> graph_pb2.GraphDef:
    """Remove control inputs on nodes whose whole ancestry is pure, then unreachable nodes.

    In a frozen TF 2 graph every output carries ``^NoOp`` and the NoOp a control input on each
    former variable read: ordering edges between constants, which stop the old tool's folding
    transforms. An edge is kept when its source is stateful, a check (Assert, CheckNumerics),
    a control-flow op (it places nodes in loop frames and cond branches) or downstream of one,
    so side effects still happen and lowered control flow stays valid. ``keep`` names the nodes to keep
    (signature inputs and outputs, init nodes).
    """
    library_names = {f.signature.name for f in graph_def.library.function}
    consumers = consumers_map(graph_def)
    impure = {node.name for node in graph_def.node if _is_stateful(node.op, library_names)}
    pending = list(impure)
    while pending:
        for consumer in consumers.get(pending.pop(), []):
            if consumer.name not in impure:
                impure.add(consumer.name)
                pending.append(consumer.name)
    result = copy_graph(graph_def)
    for node in result.node:
        inputs = [i for i in node.input if not i.startswith("^") or node_name_from_input(i) in impure]
        if len(inputs) != len(node.input):
            del node.input[:]
            node.input.extend(inputs)
    keep = list(keep)
    return remove_unreachable(result, keep, keep)


def _const_key(node) -> bytes | None:
    if node.op != "Const" or node.input:
        return None
    return node.device.encode() + b"|" + b"|".join(
        key.encode() + b"=" + node.attr[key].SerializeToString(deterministic=True) for key in sorted(node.attr)
    )


def merge_graphs(parts: list[graph_pb2.GraphDef]) -> graph_pb2.GraphDef:
    """One GraphDef from several with disjoint node names; a Const identical to one in an
    earlier part is dropped and its readers read the earlier one (signatures sharing weights
    store them once)."""
    result = graph_pb2.GraphDef()
    if parts and parts[0].HasField("versions"):
        result.versions.CopyFrom(parts[0].versions)
    seen: dict[bytes, str] = {}
    functions: dict[str, bytes] = {}
    for part in parts:
        local: dict[bytes, str] = {}
        renames: dict[str, str] = {}
        for node in part.node:
            key = _const_key(node)
            if key is not None and key in seen:
                renames[node.name] = seen[key]
            elif key is not None:
                local.setdefault(key, node.name)
        seen.update({k: v for k, v in local.items() if k not in seen})
        renamed = rename_nodes(new_graph_like(part, (n for n in part.node if n.name not in renames)), renames)
        clashes = {}
        for function in renamed.library.function:
            name = function.signature.name
            if name in functions and functions[name] != function.SerializeToString(deterministic=True):
                clashes[name] = unique_name(f"{name}_{len(functions)}", set(functions))
        if clashes:
            for node in list(renamed.node) + [n for f in renamed.library.function for n in f.node_def]:
                _rename_function_refs(node, clashes)
            for function in renamed.library.function:
                function.signature.name = clashes.get(function.signature.name, function.signature.name)
        for function in renamed.library.function:
            data = function.SerializeToString(deterministic=True)
            if functions.setdefault(function.signature.name, data) is data:
                result.library.function.add().CopyFrom(function)
        result.node.extend(renamed.node)
        gradients = {(g.function_name, g.gradient_func) for g in result.library.gradient}
        for gradient in renamed.library.gradient:
            if (gradient.function_name, gradient.gradient_func) not in gradients:
                result.library.gradient.add().CopyFrom(gradient)
    return result


def _rename_function_refs(node, renames: dict[str, str]) -> None:
    if node.op in renames:
        node.op = renames[node.op]
    for value in node.attr.values():
        if value.HasField("func") and value.func.name in renames:
            value.func.name = renames[value.func.name]
        for func in value.list.func:
            if func.name in renames:
                func.name = renames[func.name]


def canonical_function_names(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    """Rename library functions ``<base>_<k>`` in order of first use, dropping unused ones.

    TensorFlow gives loaded functions process-unique numeric suffixes, so the same SavedModel
    frozen twice would otherwise give different bytes.
    """
    if not graph_def.library.function:
        return graph_def
    functions = {f.signature.name: f for f in graph_def.library.function}
    order: list[str] = []

    def visit(nodes) -> None:
        for node in nodes:
            called = [node.op] if node.op in functions else []
            for key in sorted(node.attr):
                value = node.attr[key]
                if value.HasField("func"):
                    called.append(value.func.name)
                called.extend(f.name for f in value.list.func)
            for name in called:
                if name in functions and name not in order:
                    order.append(name)
                    visit(functions[name].node_def)

    visit(graph_def.node)
    renames = {name: f"{_UID_SUFFIX.sub('', name)}_{index}" for index, name in enumerate(order)}
    result = new_graph_like(graph_def, graph_def.node)
    del result.library.function[:]
    del result.library.gradient[:]
    for node in result.node:
        _rename_function_refs(node, renames)
    for name in order:
        function = result.library.function.add()
        function.CopyFrom(functions[name])
        function.signature.name = renames[name]
        for node in function.node_def:
            _rename_function_refs(node, renames)
    for gradient in graph_def.library.gradient:
        if gradient.function_name in renames and gradient.gradient_func in renames:
            result.library.gradient.add(
                function_name=renames[gradient.function_name], gradient_func=renames[gradient.gradient_func]
            )
    return result


_LOAD_SUFFIX = re.compile(rb"_load_\d+$")
_UID_SUFFIX = re.compile(r"_\d+$")


def strip_load_suffixes(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    """Remove the ``_load_<uid>`` suffix TF's loader appends to ``shared_name`` attrs."""
    result = copy_graph(graph_def)
    nodes = list(result.node) + [n for f in result.library.function for n in f.node_def]
    for node in nodes:
        if "shared_name" in node.attr and _LOAD_SUFFIX.search(node.attr["shared_name"].s):
            node.attr["shared_name"].s = _LOAD_SUFFIX.sub(b"", node.attr["shared_name"].s)
    return result
