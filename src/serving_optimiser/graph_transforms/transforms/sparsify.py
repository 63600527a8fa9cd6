"""Sparse embeddings: replace a Gather from a mostly-zero [N, 1] weight column by a hash-table lookup
that stores only the non-zero entries."""

from __future__ import annotations

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2

from ..context import TransformContext
from ..errors import TransformError
from ..graph_utils import (
    NodeMatch,
    const_value,
    control_inputs,
    data_inputs,
    make_const_node,
    make_node,
    new_graph_like,
    node_name_from_input,
    parse_input,
    pattern,
    replace_matching_op_types,
)
from ..registry import register

_WEIGHTS = pattern("Identity", pattern("Const|Variable|VariableV2"))
_GATHER = pattern("Gather", _WEIGHTS, pattern("*"))
_GATHER_V2 = pattern("GatherV2", _WEIGHTS, pattern("*"), pattern("Const"))
# Entries with a smaller magnitude are treated as zero.
_ZERO_THRESHOLD = 1.0e-5
# Nodes the clean-up deletes once they are left with a single input.
_DROP_WITH_ONE_INPUT = frozenset({"Assign", "Reshape", "Equal", "Mean", "ScalarSummary"})


@register("sparsify_gather", params={"input_checkpoint": "(none)", "group_init_node": "group_deps"})
def sparsify_gather(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Replace Gathers from sparse [N, 1] float weights by HashTable lookups.

    Matches: Gather of (Identity of (Const|Variable|VariableV2), any), then GatherV2 of
    (Identity of (Const|Variable|VariableV2), any, Const axis); the axis must be 0.
    Weights must be float of shape [N, 1]; a Variable's value is read from the V2
    checkpoint ``input_checkpoint`` (slice found through ``save*/Assign*`` -> RestoreV2,
    key = variable name without its ``/part_k`` suffix).
    Produces, for weights ``w`` and gather ``g``: Consts ``w/indices`` (int64 positions of
    entries with |v| >= 1e-5) and ``w/values`` (float; (0, 0.0) when none), ``w/HashTable``,
    ``w/InitializeTable``(table, indices, values), ``g/LookupTableFind``(table, ids,
    ``g/Const`` = 0.0), ``g/ExpandDims/Const`` (-1) and ExpandDims ``g`` (so readers of ``g``
    are unchanged). NoOp ``group_init_node`` (found or appended) gets ``^w/InitializeTable``;
    run it before the graph. Then weights, Identity and whatever is left unread are deleted
    (not inputs/outputs nor RestoreV2); ConcatV2 nodes that lose a value shrink (to an
    Identity when one value is left); Assign/Reshape/Equal/Mean/ScalarSummary left with one
    input go. ``_output_shapes`` attrs are stripped everywhere.
    Params: ``input_checkpoint`` (none), ``group_init_node`` (``group_deps``).
    Deliberate differences: int32 ids get a Cast ``g/Cast`` to int64 (the C++ tool fed them
    to an int64 table and the graph failed); a Variable's slice is taken from the
    RestoreV2 output it is assigned from (the C++ tool took the first slice saved under the
    key, wrong for every partition but the first); only matched variables need save nodes;
    the init NoOp is added only when a table was created; a shared GatherV2 axis Const is
    kept; ConcatV2 turned Identity loses ``Tidx``; unread-node bookkeeping is by node name,
    so ``x:0``/``x:1`` references count.
    """
    group_init_node = context.get_string("group_init_node", "group_deps")
    checkpoint = context.get_string("input_checkpoint")
    if checkpoint is not None:
        _check_checkpoint(checkpoint)
    current = new_graph_like(graph_def, graph_def.node)
    for node in current.node:
        if "_output_shapes" in node.attr:
            del node.attr["_output_shapes"]
    for gather_pattern in (_GATHER, _GATHER_V2):
        current = _sparsify(current, gather_pattern, context, group_init_node, checkpoint, graph_def)
    return current


def _check_checkpoint(prefix: str) -> None:
    import tensorflow as tf

    if not tf.io.gfile.exists(f"{prefix}.index"):
        raise TransformError(
            f"sparsify_gather: input_checkpoint '{prefix}' is not a V2 checkpoint prefix ({prefix}.index not found)"
        )


def _sparsify(graph_def, gather_pattern, context, group_init_node, checkpoint, original):
    refs: dict[str, int] = {}
    for node in graph_def.node:
        for input_string in node.input:
            name = node_name_from_input(input_string)
            refs[name] = refs.get(name, 0) + 1
    protected = {node_name_from_input(n) for n in context.input_names + context.output_names}
    current = graph_def
    while True:
        init_tables: list[str] = []
        removed: list[str] = []
        generate = _generator(refs, removed, init_tables, checkpoint, original)
        replaced, count = replace_matching_op_types(current, gather_pattern, generate, allow_inconsistencies=True)
        if not count:
            return current
        nodes = list(replaced.node)
        init = next((n for n in nodes if n.name == group_init_node), None)
        if init is None:
            init = node_def_pb2.NodeDef(name=group_init_node, op="NoOp")
            nodes.append(init)
        elif init.op != "NoOp":
            raise TransformError(
                f"sparsify_gather: group_init_node '{group_init_node}' is a {init.op}, expected a NoOp"
            )
        for name in init_tables:
            init.input.append(f"^{name}")
            refs[name] = refs.get(name, 0) + 1
        for name in protected:
            refs.pop(name, None)
        removed.extend(name for name, uses in refs.items() if uses == 0)
        current = new_graph_like(replaced, _sweep(nodes, removed, refs))


def _generator(refs: dict[str, int], removed: list[str], init_tables: list[str], checkpoint, original):
    """The replacement callback of one round; it records what the clean-up must delete."""

    def generate(match: NodeMatch, input_nodes: set[str], output_nodes: set[str]) -> list:
        new_nodes = _replacement(match, output_nodes, checkpoint, original)
        weights, identity = match.inputs[0].inputs[0].node, match.inputs[0].node
        removed.extend([weights.name, identity.name])
        for input_string in identity.input:
            refs[node_name_from_input(input_string)] -= 1
        for new_node in new_nodes[1:]:
            for input_string in new_node.input:
                name = node_name_from_input(input_string)
                refs[name] = refs.get(name, 0) + 1
        init_tables.append(f"{weights.name}/InitializeTable")
        return new_nodes

    return generate


def _replacement(match: NodeMatch, output_nodes: set[str], checkpoint, original) -> list:
    gather = match.node
    if gather.op == "GatherV2":
        axis_node = match.inputs[2].node
        axis = const_value(axis_node)
        if axis.dtype not in (np.int32, np.int64):
            raise TransformError(
                f"sparsify_gather: axis '{axis_node.name}' of GatherV2 '{gather.name}' is {axis.dtype}, "
                "expected int32 or int64"
            )
        if int(axis) != 0:
            raise TransformError(
                f"sparsify_gather: GatherV2 '{gather.name}' gathers over axis {int(axis)}; only axis 0 is supported"
            )
    weights = match.inputs[0].inputs[0].node
    dtype = weights.attr["dtype"].type
    if dtype != types_pb2.DT_FLOAT:
        raise TransformError(
            f"sparsify_gather: weights {weights.op} '{weights.name}' have dtype "
            f"{types_pb2.DataType.Name(dtype)}, expected DT_FLOAT"
        )
    value = const_value(weights) if weights.op == "Const" else _read_variable(weights.name, checkpoint, original)
    if value.ndim != 2 or value.shape[1] != 1:
        raise TransformError(
            f"sparsify_gather: weights '{weights.name}' have shape {list(value.shape)}, expected [N, 1]"
        )
    flat = value.reshape(-1).astype(np.float32)
    keep = np.abs(flat) >= _ZERO_THRESHOLD
    indices = np.flatnonzero(keep).astype(np.int64)
    values = flat[keep]
    if indices.size == 0:
        # InitializeTable rejects empty keys, so store one harmless (0, 0.0) pair.
        indices, values = np.zeros(1, np.int64), np.zeros(1, np.float32)

    ids_node = match.inputs[1].node
    ids = data_inputs(gather)[1]
    new_nodes = [ids_node]
    if gather.attr["Tindices"].type == types_pb2.DT_INT32:
        cast = make_node("Cast", f"{gather.name}/Cast", [ids], {"SrcT": types_pb2.DT_INT32, "DstT": types_pb2.DT_INT64})
        new_nodes.append(cast)
        ids = cast.name
    table = make_node("HashTable", f"{weights.name}/HashTable")
    table.attr["key_dtype"].type = types_pb2.DT_INT64
    table.attr["value_dtype"].type = types_pb2.DT_FLOAT
    indices_node = make_const_node(f"{weights.name}/indices", indices)
    values_node = make_const_node(f"{weights.name}/values", values)
    init = make_node(
        "InitializeTable",
        f"{weights.name}/InitializeTable",
        [table.name, indices_node.name, values_node.name],
        {"Tkey": types_pb2.DT_INT64, "Tval": types_pb2.DT_FLOAT},
    )
    default = make_const_node(f"{gather.name}/Const", np.float32(0.0))
    lookup = make_node(
        "LookupTableFind",
        f"{gather.name}/LookupTableFind",
        [table.name, ids, default.name],
        {"Tin": types_pb2.DT_INT64, "Tout": types_pb2.DT_FLOAT},
    )
    dim = make_const_node(f"{gather.name}/ExpandDims/Const", np.int32(-1))
    expand = make_node("ExpandDims", gather.name, [lookup.name, dim.name], {"T": types_pb2.DT_FLOAT})
    expand.input.extend(control_inputs(gather))
    new_nodes += [indices_node, values_node, table, init, lookup, default, dim, expand]
    if gather.op == "GatherV2" and match.inputs[2].node.name in output_nodes:
        new_nodes.append(match.inputs[2].node)
    return new_nodes


def _read_variable(name: str, checkpoint: str | None, graph_def: graph_pb2.GraphDef) -> np.ndarray:
    if checkpoint is None:
        raise TransformError(
            f"sparsify_gather: weights '{name}' are a variable; pass input_checkpoint=<V2 checkpoint prefix>"
        )
    key = _monolithic_key(name)
    shape_and_slice = _saved_slice(name, key, graph_def)
    import tensorflow as tf

    with tf.Graph().as_default() as graph:
        tensor = tf.raw_ops.RestoreV2(
            prefix=checkpoint, tensor_names=[key], shape_and_slices=[shape_and_slice], dtypes=[tf.float32]
        )[0]
    try:
        with tf.compat.v1.Session(graph=graph) as session:
            return session.run(tensor)
    except tf.errors.OpError as error:
        raise TransformError(
            f"sparsify_gather: cannot read '{key}' ({shape_and_slice or 'whole'}) of variable '{name}' "
            f"from {checkpoint}: {error.message}"
        ) from None


def _monolithic_key(name: str) -> str:
    """``w/part_1`` -> ``w``: partitions are saved under the whole variable's name."""
    parts = name.split("/")
    if len(parts) > 1 and parts[-1].startswith("part_"):
        parts.pop()
    return "/".join(parts)


def _saved_slice(name: str, key: str, graph_def: graph_pb2.GraphDef) -> str:
    """The shape_and_slice string RestoreV2 uses for variable ``name``, found via its save Assign."""
    nodes = {node.name: node for node in graph_def.node}
    restore_input = None
    for node in graph_def.node:
        parts = node.name.split("/")
        if (
            len(parts) == 2 and parts[0].startswith("save") and parts[1].startswith("Assign")
            and len(node.input) >= 2 and node.input[0] == name
        ):
            restore_input = node.input[1]
            break
    _, restore_name, port = parse_input(restore_input or "")
    restore = nodes.get(restore_name)
    if restore is None or restore.op != "RestoreV2":
        raise TransformError(f"sparsify_gather: no save/Assign from a RestoreV2 found for variable '{name}'")
    names_node = nodes.get(node_name_from_input(restore.input[1]))
    slices_node = nodes.get(node_name_from_input(restore.input[2]))
    if names_node is None or slices_node is None or names_node.op != "Const" or slices_node.op != "Const":
        raise TransformError(f"sparsify_gather: RestoreV2 '{restore.name}' does not read Const tensor names and slices")
    saved_names = [n.decode() for n in const_value(names_node).reshape(-1)]
    slices = [s.decode() for s in const_value(slices_node).reshape(-1)]
    if port < len(saved_names) and saved_names[port] == key:
        return slices[port]
    if key in saved_names:
        return slices[saved_names.index(key)]
    raise TransformError(f"sparsify_gather: RestoreV2 '{restore.name}' has no entry '{key}' for variable '{name}'")


def _sweep(nodes: list, removed: list[str], refs: dict[str, int]) -> list:
    """Delete the named nodes and, transitively, whatever they leave unread (the C++ clean-up)."""
    nodes = list(nodes)
    while removed:
        name = removed.pop()
        index = 0
        while index < len(nodes):
            node = nodes[index]
            if node.name == name and node.op != "RestoreV2":
                for input_string in node.input:
                    source = node_name_from_input(input_string)
                    refs[source] = refs.get(source, 0) - 1
                    if refs[source] == 0:
                        removed.append(source)
                del nodes[index]
                continue
            kept = [i for i in node.input if node_name_from_input(i) != name]
            if len(kept) != len(node.input):
                node = _with_inputs(node, kept)
                nodes[index] = node
                if node.op == "ConcatV2":
                    _shrink_concat(node, refs, removed)
                if node.op in _DROP_WITH_ONE_INPUT and len(node.input) == 1:
                    removed.append(node.name)
                if not node.input:
                    removed.append(node.name)
            index += 1
    return nodes


def _with_inputs(node, inputs: list[str]):
    result = type(node)()
    result.CopyFrom(node)
    del result.input[:]
    result.input.extend(inputs)
    return result


def _shrink_concat(node, refs: dict[str, int], removed: list[str]) -> None:
    values, axis = data_inputs(node)[:-1], data_inputs(node)[-1:]
    if len(values) >= 2:
        node.attr["N"].i = len(values)
    elif len(values) == 1:
        axis_name = node_name_from_input(axis[0])
        if refs.get(axis_name, 0) != 1:
            raise TransformError(
                f"sparsify_gather: ConcatV2 '{node.name}' left with one value, but its axis '{axis_name}' "
                "is read elsewhere"
            )
        refs[axis_name] -= 1
        removed.append(axis_name)
        controls = control_inputs(node)
        del node.input[:]
        node.input.extend(values + controls)
        node.op = "Identity"
        for attr in ("N", "Tidx"):
            if attr in node.attr:
                del node.attr[attr]
    else:
        raise TransformError(f"sparsify_gather: ConcatV2 '{node.name}' lost all its values")
