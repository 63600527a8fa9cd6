"""Pruning transforms: remove_nodes, strip_unused_nodes, remove_control_dependencies and
sort_by_execution_order."""

from __future__ import annotations

from collections.abc import Mapping

from tensorflow.core.framework import graph_pb2, node_def_pb2, tensor_shape_pb2
from tensorflow.python.framework import dtypes

from ..context import TransformContext
from ..errors import TransformError
from ..graph_utils import (
    control_inputs,
    data_inputs,
    new_graph_like,
    node_map,
    node_name_from_input,
    parse_input,
    reachable_names,
    sort_by_execution_order,
)
from ..op_sets import MERGE_OPS, SWITCH_OPS
from ..registry import register


@register("remove_nodes", params={"op": "(required, repeatable)", "max_inputs": "1"}, on_functions=True)
def remove_nodes(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Bypass nodes of the given op types.

    Matches: ``op`` nodes with exactly n data inputs, for n = 1..max_inputs, skipping nodes
    named as graph inputs or outputs (names compared without ``^`` and ``:port``; in a function
    body these are its args, the nodes its ``ret`` tensors come from and its control returns).
    Produces: consumers of ``<node>`` / ``<node>:0`` read the node's first data input;
    ``^<node>`` becomes ``^<first input node>``.
    Params: ``op`` (repeatable, at least one), ``max_inputs`` (1).
    Differs from the C++ tool: a node whose other output ports are read is kept rather
    than leaving a dangling reference that fails the whole pipeline. In a graph with v1 control
    flow (a Switch: frozen ``tf.cond``/``tf.while_loop``), where bypassing must not change which
    nodes run: a node read through ``^node`` whose input is a Switch port is kept (it is the
    pivot that stops a branch or a finished loop's body; ``^Switch`` would fire every time and
    the loop would never end), so is a node with control inputs that a Merge reads (a Merge
    ignores whether its control inputs are dead), and a bypassed node's control inputs move to
    its readers instead of being dropped.
    """
    op_types = context.get_list("op")
    if not op_types:
        raise TransformError("remove_nodes: expects at least one 'op' argument, e.g. remove_nodes(op=Identity)")
    max_inputs = context.get_int("max_inputs", 1)
    protected = {node_name_from_input(n) for n in context.input_names + context.output_names}
    current = graph_def
    for op_type in op_types:
        for input_count in range(1, max_inputs + 1):
            while True:
                current, removed = _bypass_once(current, op_type, input_count, protected)
                if not removed:
                    break
    return current


def _bypass_once(
    graph_def: graph_pb2.GraphDef, op_type: str, input_count: int, protected: set[str]
) -> tuple[graph_pb2.GraphDef, int]:
    other_port_readers, control_readers = set(), set()
    data_readers: dict[str, set[str]] = {}
    for node in graph_def.node:
        for input_string in node.input:
            is_control, name, port = parse_input(input_string)
            if is_control:
                control_readers.add(name)
                continue
            if port != 0:
                other_port_readers.add(name)
            data_readers.setdefault(name, set()).add(node.name)
    candidates = {
        node.name: node
        for node in graph_def.node
        if node.op == op_type
        and node.name not in protected
        and node.name not in other_port_readers
        and len(data_inputs(node)) == input_count
    }
    nodes = {node.name: node for node in graph_def.node}
    # Dead tensors only exist below a Switch; without one, control inputs only order nodes and
    # are dropped with the bypassed node, as the C++ tool did.
    has_dead_tensors = any(node.op in SWITCH_OPS for node in graph_def.node)
    if has_dead_tensors:
        # Two linked nodes are not bypassed in the same pass: the second is decided in the
        # next pass, against the graph the first one's removal left.
        chosen, linked_to_chosen = {}, set()
        for name, node in candidates.items():
            linked = _bypass_links(node, nodes, control_readers, data_readers)
            if linked is None or name in linked_to_chosen or linked & chosen.keys():
                continue
            chosen[name] = node
            linked_to_chosen |= linked
        candidates = chosen
    # (first data input, control inputs its readers take over) for each node bypassed now.
    replacements: dict[str, tuple[str, list[str]]] = {
        name: (data_inputs(node)[0], control_inputs(node) if has_dead_tensors else [])
        for name, node in candidates.items()
    }
    if not replacements:
        return graph_def, 0

    def resolve(input_string: str) -> tuple[str, list[str]]:
        """What ``input_string`` reads once the bypassed nodes are gone, and their control inputs."""
        seen, moved = set(), []
        while True:
            is_control, name, _ = parse_input(input_string)
            if name not in replacements or name in seen:
                return input_string, moved
            seen.add(name)
            target, controls = replacements[name]
            moved.extend(controls)
            input_string = f"^{node_name_from_input(target)}" if is_control else target

    kept = []
    for node in graph_def.node:
        if node.name in replacements:
            continue
        data, controls, moved = [], [], []
        for input_string in node.input:
            value, extra = resolve(input_string)
            (controls if value.startswith("^") else data).append(value)
            moved.extend(extra)
        # Moved control inputs may name bypassed nodes themselves.
        done = set()
        while moved:
            input_string = moved.pop(0)
            if input_string in done:
                continue
            done.add(input_string)
            value, extra = resolve(input_string)
            if value != f"^{node.name}":
                controls.append(value)
            moved.extend(extra)
        new_node = node_def_pb2.NodeDef()
        new_node.CopyFrom(node)
        del new_node.input[:]
        # Bypassing can make a control input duplicate a data input; TF rejects that.
        new_node.input.extend(_drop_redundant_control_inputs(data + controls))
        kept.append(new_node)
    return new_graph_like(graph_def, kept), len(replacements)


def _bypass_links(
    node: node_def_pb2.NodeDef,
    nodes: Mapping[str, node_def_pb2.NodeDef],
    control_readers: set[str],
    data_readers: Mapping[str, set[str]],
) -> set[str] | None:
    """In a graph with dead tensors: None if bypassing ``node`` could change which nodes run,
    else the neighbours whose bypassing in the same pass could.

    ``^node`` becomes ``^<input node>`` plus the node's control inputs, which is the same
    unless the input is a Switch port (``^Switch`` fires even when the port is dead), and a
    reader of ``node`` gains its control inputs, which is the same unless the reader is a
    Merge (it runs on its live data input whether its control inputs are dead or not). Each
    rule would also apply through a neighbour bypassed at the same time.
    """
    source = node_name_from_input(data_inputs(node)[0])
    source_node = nodes.get(source)
    readers = data_readers.get(node.name, set())
    read_as_control = node.name in control_readers
    if read_as_control and (source_node is None or source_node.op in SWITCH_OPS):
        return None
    if control_inputs(node) and any(nodes[reader].op in MERGE_OPS for reader in readers):
        return None
    linked = set()
    if read_as_control or (source_node is not None and control_inputs(source_node)):
        linked.add(source)
    if control_inputs(node):
        linked |= readers
    # Readers that bypass to this node and are read through ``^reader``.
    linked |= {
        reader for reader in readers
        if reader in control_readers and node_name_from_input(data_inputs(nodes[reader])[0]) == node.name
    }
    return linked


def _drop_redundant_control_inputs(inputs: list[str]) -> list[str]:
    data_sources = {node_name_from_input(i) for i in inputs if not i.startswith("^")}
    result, seen_controls = [], set()
    for input_string in inputs:
        if input_string.startswith("^"):
            name = input_string[1:]
            if name in data_sources or name in seen_controls:
                continue
            seen_controls.add(name)
        result.append(input_string)
    return result


def _parse_shape(text: str) -> list[int]:
    if not text.strip():
        raise TransformError("strip_unused_nodes: specified shape is empty")
    try:
        return [int(part.strip()) for part in text.split(",")]
    except ValueError:
        raise TransformError(f"strip_unused_nodes: shape '{text}' is not a comma-separated list of integers") from None


def _parse_type(text: str) -> int:
    try:
        return dtypes.as_dtype(text).as_datatype_enum
    except TypeError:
        raise TransformError(f"strip_unused_nodes: unknown type '{text}' (expected e.g. float, int32)") from None


@register(
    "strip_unused_nodes",
    params={
        "type": "float", "shape": '"" (a scalar)', "name": "(repeatable)", "type_for_name": "(one per name)",
        "shape_for_name": "(one per name)",
    },
)
def strip_unused_nodes(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Remove every node the outputs don't need, and turn non-Placeholder inputs into Placeholders.

    Walks back from the outputs through data and control inputs, stopping at input nodes.
    Input nodes that are not ``Placeholder`` become fresh Placeholders named as before, with
    ``dtype``/``shape`` from ``type`` (float) and ``shape`` (scalar) or the per-name
    ``name``/``type_for_name``/``shape_for_name`` lists; existing Placeholders are kept as
    they are. Kept nodes keep their order.
    """
    default_type = _parse_type(context.get_string("type", "float"))
    shape_text = context.get_string("shape")
    default_shape = _parse_shape(shape_text) if shape_text is not None else []
    names = context.get_list("name")
    types_for_name = context.get_list("type_for_name")
    shapes_for_name = context.get_list("shape_for_name")
    if len(types_for_name) not in (0, len(names)) or len(shapes_for_name) not in (0, len(names)):
        raise TransformError(
            "strip_unused_nodes: type_for_name and shape_for_name must be given once per 'name' "
            f"({len(names)} names, {len(types_for_name)} types, {len(shapes_for_name)} shapes)"
        )
    overrides: dict[str, tuple[int, list[int]]] = {}
    for index, name in enumerate(names):
        overrides[name] = (
            _parse_type(types_for_name[index]) if types_for_name else default_type,
            _parse_shape(shapes_for_name[index]) if shapes_for_name else default_shape,
        )

    nodes = node_map(graph_def)
    input_nodes = {node_name_from_input(n) for n in context.input_names}
    required = set(context.output_names) | {node_name_from_input(n) for n in context.output_names} | input_nodes
    missing: list[str] = []
    required |= reachable_names(nodes, context.output_names, stop_at=input_nodes, missing=missing)
    if missing:
        raise TransformError(f"strip_unused_nodes: input node {missing[0]} not found in graph")

    kept = []
    for node in graph_def.node:
        if node.name not in required:
            continue
        if node.name in input_nodes and node.op != "Placeholder":
            dtype, shape = overrides.get(node.name, (default_type, default_shape))
            placeholder = node_def_pb2.NodeDef(name=node.name, op="Placeholder")
            placeholder.attr["dtype"].type = dtype
            placeholder.attr["shape"].shape.CopyFrom(
                tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape])
            )
            kept.append(placeholder)
        else:
            kept.append(node)
    return new_graph_like(graph_def, kept)


@register("remove_control_dependencies", on_functions=True)
def remove_control_dependencies(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Drop every ``^control`` input; data inputs keep their order."""
    result = new_graph_like(graph_def, graph_def.node)
    for node in result.node:
        data = data_inputs(node)
        del node.input[:]
        node.input.extend(data)
    return result


@register("sort_by_execution_order", on_functions=True)
def sort_by_execution_order_transform(
    graph_def: graph_pb2.GraphDef, context: TransformContext
) -> graph_pb2.GraphDef:
    """Order nodes so each comes after its inputs (the old tool's LIFO Kahn order)."""
    return sort_by_execution_order(graph_def)
