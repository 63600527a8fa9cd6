"""Constant folding: fold_constants evaluates every part of the graph that does not depend on
the graph's inputs, once, and replaces it with Const nodes.

The C++ tool ran TensorFlow's own ConstantFold pass on an imported Graph. Here the same
decisions are made in Python on the GraphDef, and all the values are computed by ONE
``tf.compat.v1.Session`` run on an import of the pruned graph, so a frozen MobileNet folds in
well under a second.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.util import _pywrap_kernel_registry

from ...errors import first_line
from ..context import TransformContext
from ..errors import TransformError
from ..graph_utils import lookup_op_def, make_tensor_proto, new_graph_like, node_map, parse_input, reachable_names
from ..registry import register

log = logging.getLogger(__name__)

# The C++ default of ConstantFoldingOptions::max_constant_size_in_bytes.
DEFAULT_MAX_CONSTANT_SIZE_IN_BYTES = 10 * 1024 * 1024

# TensorFlow's IsControlFlow / IsSend / IsRecv / session-handle / FakeParam ops: never folded.
_NEVER_FOLDED_OPS = frozenset({
    "Switch", "RefSwitch", "_SwitchN", "Merge", "RefMerge", "_XlaMerge", "Enter", "RefEnter",
    "Exit", "RefExit", "NextIteration", "RefNextIteration", "LoopCond", "ControlTrigger",
    "_Send", "_Recv", "_HostSend", "_HostRecv", "_Arg", "_Retval", "_DeviceArg", "_DeviceRetval",
    "GetSessionHandle", "GetSessionHandleV2", "GetSessionTensor", "DeleteSessionTensor", "FakeParam",
})
# A Placeholder nobody listed as an input still needs a feed: it is never folded either.
_PLACEHOLDERS = frozenset({"Placeholder", "PlaceholderV2"})

# Ops whose value follows from the static shape of their inputs (TF's IsShapeOp).
_SHAPE_OPS = frozenset({"Shape", "ShapeN", "Size", "Rank"})

# Tensors of these types cannot be stored in a Const.
_UNSTORABLE_DTYPES = frozenset({types_pb2.DT_RESOURCE, types_pb2.DT_VARIANT})

_INT32_MAX = 2**31 - 1


@dataclass
class _Analysis:
    """What the foldability pass found about the pruned graph."""

    foldable: set[str] = field(default_factory=set)
    # Non-foldable nodes a foldable node waits for (control edges, or the data input of a
    # shape op folded from its static shape): the replacement Const must wait for them too.
    control_deps: dict[str, set[str]] = field(default_factory=dict)
    # Shape ops folded from static shapes: node name -> one value per output.
    shape_values: dict[str, list[np.ndarray]] = field(default_factory=dict)
    # The order the foldable shape ops were found in (it numbers their constants).
    shape_order: list[str] = field(default_factory=list)


@register(
    "fold_constants",
    params={
        "clear_output_shapes": "true", "exclude_op": "(repeatable)", "exclude_node": "(repeatable)",
        "max_constant_size_in_bytes": str(DEFAULT_MAX_CONSTANT_SIZE_IN_BYTES),
    },
    on_functions=True,
)
def fold_constants(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Replace everything computable without the graph's inputs by Consts.

    Matches: every node whose data inputs all come, transitively, from Consts, except stateful
    ops, control-flow ops, Placeholders, calls of library functions, ops without a CPU kernel,
    ``exclude_op`` types, ``exclude_node`` names, resource/variant producers and nodes with a
    statically known output larger than ``max_constant_size_in_bytes``. Shape/ShapeN/Size/Rank
    fold from static shapes even when their input is not constant. Output nodes never fold.
    Produces: each tensor a folded node hands to a kept node becomes a Const named
    ``<producer>/_<n>__cf__<k>`` (attrs dtype and value; n counts the new Consts in order of
    ``(producer, port)``, k also counts the shape-op constants first, as TensorFlow did). A new
    Const gets control inputs on the non-foldable nodes the folded subgraph waited for. The
    graph is pruned to what the outputs need; input nodes are kept, a listed
    PlaceholderWithDefault becomes a Placeholder. Requires at least one output; every input
    must be a Placeholder or PlaceholderWithDefault.
    Params: ``clear_output_shapes`` (true: strip ``_output_shapes``), ``exclude_op``,
    ``exclude_node`` (repeatable), ``max_constant_size_in_bytes`` (10485760).
    Differs from C++: a control edge from a folded node is moved to the non-foldable nodes it
    waited for (a stateless computation has no effect to wait for), so a TF 2 frozen graph's
    ``NoOp`` and the weights it ties disappear instead of surviving as duplicates; an unlisted
    Placeholder is left alone instead of failing the run; unneeded nodes are pruned before
    folding; an output that other nodes also read is not folded for them; inputs keep their
    spelling (``ph``, not ``ph:0``); the node order is kept (new Consts sit where their
    producer was); ``exclude_op`` also stops the static shape-op folding.
    """
    if not context.output_names:
        raise TransformError("fold_constants: needs at least one output node to know what to keep")
    clear_output_shapes = context.get_bool("clear_output_shapes", True)
    excluded_ops = set(context.get_list("exclude_op"))
    excluded_nodes = set(context.get_list("exclude_node"))
    max_bytes = context.get_int("max_constant_size_in_bytes", DEFAULT_MAX_CONSTANT_SIZE_IN_BYTES)

    nodes = node_map(graph_def)
    input_names = list(dict.fromkeys(parse_input(name)[1] for name in context.input_names))
    output_names = list(dict.fromkeys(parse_input(name)[1] for name in context.output_names))
    for name in output_names:
        if name not in nodes:
            raise TransformError(f"fold_constants: output node '{name}' not found in the graph")
    for name in input_names:
        if name not in nodes:
            raise TransformError(f"fold_constants: input node '{name}' not found in the graph")
        if nodes[name].op not in ("Placeholder", "PlaceholderWithDefault"):
            raise TransformError(
                f"fold_constants: input '{name}' is a {nodes[name].op}, "
                "expected a Placeholder or PlaceholderWithDefault"
            )

    pruned = _prepare(graph_def, nodes, input_names, output_names, clear_output_shapes)
    graph = _import_for_analysis(graph_def, pruned)
    analysis = _classify(
        pruned, graph, set(input_names), set(output_names), excluded_ops, excluded_nodes, max_bytes
    )
    boundaries = _boundary_tensors(pruned, analysis)
    values = _evaluate(graph, boundaries, analysis, nodes)
    return _rebuild(graph_def, pruned, graph, analysis, boundaries, values, input_names, output_names, max_bytes)


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


def _prepare(
    graph_def: graph_pb2.GraphDef,
    nodes: dict[str, node_def_pb2.NodeDef],
    input_names: list[str],
    output_names: list[str],
    clear_output_shapes: bool,
) -> list[node_def_pb2.NodeDef]:
    """Copies of the nodes the outputs need (the walk stops at inputs, which are always kept),
    in graph order, with listed PlaceholderWithDefaults turned into Placeholders."""
    inputs = set(input_names)
    missing: list[str] = []
    needed = reachable_names(nodes, output_names, stop_at=inputs, missing=missing)
    if missing:
        raise TransformError(f"fold_constants: a node reads '{missing[0]}', which is not in the graph")
    needed |= inputs
    result = []
    for node in graph_def.node:
        if node.name not in needed:
            continue
        copy = node_def_pb2.NodeDef()
        copy.CopyFrom(node)
        if clear_output_shapes and "_output_shapes" in copy.attr:
            del copy.attr["_output_shapes"]
        if node.name in inputs:
            # Inputs are fed: a PlaceholderWithDefault loses its default, like TensorFlow's feed.
            copy.op = "Placeholder"
            del copy.input[:]
        result.append(copy)
    return result


def _import_for_analysis(graph_def: graph_pb2.GraphDef, nodes: list[node_def_pb2.NodeDef]) -> tf.Graph:
    """Import the pruned graph once: shape inference, dtypes and the evaluation all use it.

    Control inputs, devices and colocation attrs are dropped from this copy: folded nodes are
    stateless, so what they compute does not depend on them, and a ``_class`` naming a pruned
    node would stop the import. Library and versions come along (function calls, old ops).
    """
    stripped = new_graph_like(graph_def)
    for node in nodes:
        copy = stripped.node.add()
        copy.CopyFrom(node)
        copy.device = ""
        if "_class" in copy.attr:
            del copy.attr["_class"]
        data = [i for i in copy.input if not i.startswith("^")]
        del copy.input[:]
        copy.input.extend(data)
    graph = tf.Graph()
    try:
        with graph.as_default():
            tf.compat.v1.import_graph_def(stripped, name="")
    except (ValueError, tf.errors.OpError) as error:
        raise TransformError(f"fold_constants: TensorFlow cannot load the graph: {first_line(error)}") from None
    return graph


def _depth_first_order(nodes: dict[str, node_def_pb2.NodeDef]) -> list[str]:
    """Every node after all its (data and control) inputs, except along cycles (loops)."""
    order: list[str] = []
    state: dict[str, bool] = {}  # False while being visited, True when done
    for root in nodes:
        stack = [(root, False)]
        while stack:
            name, leaving = stack.pop()
            if leaving:
                state[name] = True
                order.append(name)
                continue
            if name in state:
                continue
            state[name] = False
            stack.append((name, True))
            for input_string in reversed(nodes[name].input):
                source = parse_input(input_string)[1]
                if source not in state:
                    stack.append((source, False))
    return order


def _static_shape_values(op: tf.Operation) -> list[np.ndarray] | None:
    """The outputs of a Shape/ShapeN/Size/Rank op if its inputs' static shapes decide them."""
    shapes = [tensor.shape for tensor in op.inputs]
    out_dtype = op.outputs[0].dtype.as_numpy_dtype
    if op.type == "Rank":
        return None if shapes[0].rank is None else [np.array(shapes[0].rank, dtype=np.int32)]
    if not all(shape.is_fully_defined() for shape in shapes):
        return None
    if op.type == "Size":
        values = [np.array(shapes[0].num_elements(), dtype=np.int64)]
    else:
        values = [np.array(shape.as_list(), dtype=np.int64) for shape in shapes]
    if out_dtype == np.int32 and any(np.any(value > _INT32_MAX) for value in values):
        return None  # TensorFlow leaves these to fail at run time
    return [value.astype(out_dtype) for value in values]


def _has_cpu_kernel(op: tf.Operation) -> bool:
    node_def = op.node_def
    node_def.device = "/cpu:0"
    return bool(_pywrap_kernel_registry.TryFindKernelClass(node_def.SerializeToString()))


def _output_too_big(op: tf.Operation, max_bytes: int) -> bool:
    for tensor in op.outputs:
        if tensor.shape.is_fully_defined() and tensor.dtype != tf.string:
            if tensor.shape.num_elements() * tensor.dtype.size > max_bytes:
                return True
    return False


def _classify(
    nodes: list[node_def_pb2.NodeDef],
    graph: tf.Graph,
    inputs: set[str],
    outputs: set[str],
    excluded_ops: set[str],
    excluded_nodes: set[str],
    max_bytes: int,
) -> _Analysis:
    """Decide which nodes fold (TensorFlow's IsConstantFoldable, node by node in data order)."""
    by_name = {node.name: node for node in nodes}
    analysis = _Analysis()

    def may_fold(node: node_def_pb2.NodeDef, op: tf.Operation) -> bool:
        if node.name in inputs or node.name in outputs:
            return False
        if node.op in excluded_ops or node.name in excluded_nodes:
            return False
        if any(tensor.dtype.as_datatype_enum in _UNSTORABLE_DTYPES for tensor in op.outputs):
            return False
        if node.op == "Const":
            return True
        if node.op in _NEVER_FOLDED_OPS or node.op in _PLACEHOLDERS or "_scoped_allocator" in node.attr:
            return False
        op_def = lookup_op_def(node.op)
        if op_def is None or op_def.is_stateful:  # None: a call of a library function
            return False
        return not _output_too_big(op, max_bytes) and _has_cpu_kernel(op)

    for name in _depth_first_order(by_name):
        node = by_name[name]
        op = graph.get_operation_by_name(name)
        if not may_fold(node, op):
            continue
        shape_values = _static_shape_values(op) if node.op in _SHAPE_OPS else None
        if shape_values is None and node.op != "Const":
            if not all(parse_input(i)[1] in analysis.foldable for i in node.input if not i.startswith("^")):
                continue
        analysis.foldable.add(name)
        if shape_values is not None:
            analysis.shape_values[name] = shape_values
            analysis.shape_order.append(name)
        deps: set[str] = set()
        for input_string in node.input:
            is_control, source, _ = parse_input(input_string)
            if source in analysis.foldable:
                deps |= analysis.control_deps[source]
            elif is_control or source in inputs or by_name[source].op not in _PLACEHOLDERS:
                # A control input, or the data input of a shape op folded from its static shape
                # (kept as a control edge to preserve the order, as TensorFlow does). A Placeholder
                # nobody feeds counts as constant there, as in TensorFlow, so no edge to it.
                deps.add(source)
        analysis.control_deps[name] = deps
    return analysis


def _boundary_tensors(nodes: list[node_def_pb2.NodeDef], analysis: _Analysis) -> list[tuple[str, int]]:
    """Tensors of folded nodes that a non-folded node reads, in TensorFlow's replacement order.

    TensorFlow sorts them by the name of the node that computes them in its constant graph:
    the node itself, or for a shape op its stand-in Const ``<op>/_<i>__cf__<i>``.
    """
    stand_in: dict[tuple[str, int], str] = {}
    index = 0
    for name in analysis.shape_order:
        for port in range(len(analysis.shape_values[name])):
            stand_in[(name, port)] = f"{name}/_{index}__cf__{index}"
            index += 1
    found: set[tuple[str, int]] = set()
    for node in nodes:
        if node.name in analysis.foldable:
            continue
        for input_string in node.input:
            is_control, source, port = parse_input(input_string)
            if not is_control and source in analysis.foldable:
                found.add((source, port))

    def key(tensor: tuple[str, int]) -> tuple[bytes, int]:
        if tensor in stand_in:
            return stand_in[tensor].encode(), 0
        return tensor[0].encode(), tensor[1]

    return sorted(found, key=key)


def _evaluate(
    graph: tf.Graph, boundaries: list[tuple[str, int]], analysis: _Analysis, nodes: dict[str, node_def_pb2.NodeDef]
) -> dict[tuple[str, int], np.ndarray]:
    """Compute every boundary tensor in one Session run; shape ops are fed their static values."""
    values: dict[tuple[str, int], np.ndarray] = {}
    fetches = []
    for source, port in boundaries:
        if nodes[source].op == "Const":
            continue  # never replaced
        if source in analysis.shape_values:
            values[(source, port)] = analysis.shape_values[source][port]
        else:
            fetches.append((source, port))
    if not fetches:
        return values
    feeds = {
        graph.get_tensor_by_name(f"{name}:{port}"): value
        for name, outputs in analysis.shape_values.items()
        for port, value in enumerate(outputs)
    }
    config = config_pb2.ConfigProto()
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    config.graph_options.rewrite_options.constant_folding = rewriter_config_pb2.RewriterConfig.OFF
    config.graph_options.optimizer_options.opt_level = config_pb2.OptimizerOptions.L0
    config.graph_options.optimizer_options.do_constant_folding = False
    try:
        with tf.compat.v1.Session(graph=graph, config=config) as session:
            results = session.run([graph.get_tensor_by_name(f"{n}:{p}") for n, p in fetches], feed_dict=feeds)
    except tf.errors.OpError as error:
        raise TransformError(
            f"fold_constants: evaluating {len(fetches)} constant tensor(s) failed: {first_line(error)}"
        ) from None
    values.update(zip(fetches, results))
    return values


def _rebuild(
    graph_def: graph_pb2.GraphDef,
    nodes: list[node_def_pb2.NodeDef],
    graph: tf.Graph,
    analysis: _Analysis,
    boundaries: list[tuple[str, int]],
    values: dict[tuple[str, int], np.ndarray],
    input_names: list[str],
    output_names: list[str],
    max_bytes: int,
) -> graph_pb2.GraphDef:
    taken = {node.name for node in graph_def.node}
    shape_constants = sum(len(v) for v in analysis.shape_values.values())
    replacement: dict[tuple[str, int], str] = {}
    new_consts: dict[str, list[node_def_pb2.NodeDef]] = {}
    counter = 0
    for tensor in boundaries:
        if tensor not in values:
            continue
        value = np.asarray(values[tensor])
        if _byte_size(value) > max_bytes:
            continue  # too big to store: the original nodes keep computing it
        source, port = tensor
        name = f"{source}/_{counter}__cf__{counter + shape_constants}"
        while name in taken:
            counter += 1
            name = f"{source}/_{counter}__cf__{counter + shape_constants}"
        counter += 1
        taken.add(name)
        dtype = graph.get_tensor_by_name(f"{source}:{port}").dtype.as_datatype_enum
        const = node_def_pb2.NodeDef(name=name, op="Const")
        const.input.extend(f"^{dep}" for dep in sorted(analysis.control_deps[source]))
        const.attr["dtype"].type = dtype
        const.attr["value"].tensor.CopyFrom(make_tensor_proto(value, dtype=dtype))
        new_consts.setdefault(source, []).append(const)
        replacement[tensor] = name

    def rewritten_inputs(node: node_def_pb2.NodeDef) -> list[str]:
        data, controls = [], []
        for input_string in node.input:
            is_control, source, port = parse_input(input_string)
            if not is_control:
                data.append(replacement.get((source, port), input_string))
            elif source in analysis.foldable:
                controls.extend(sorted(analysis.control_deps[source]))
            else:
                controls.append(source)
        data_sources = {parse_input(i)[1] for i in data}
        controls = [c for c in dict.fromkeys(controls) if c not in data_sources]
        return data + [f"^{c}" for c in controls]

    candidates: dict[str, node_def_pb2.NodeDef] = {}
    for node in nodes:
        new_node = node_def_pb2.NodeDef()
        new_node.CopyFrom(node)
        del new_node.input[:]
        new_node.input.extend(rewritten_inputs(node))
        candidates[node.name] = new_node
    for consts in new_consts.values():
        for const in consts:
            candidates[const.name] = const

    inputs = set(input_names)
    needed = reachable_names(candidates, output_names, stop_at=inputs) | inputs

    ordered = []
    for node in nodes:
        if node.name in needed:
            ordered.append(candidates[node.name])
        ordered.extend(c for c in new_consts.get(node.name, []) if c.name in needed)
    return new_graph_like(graph_def, ordered)


def _byte_size(value: np.ndarray) -> int:
    if value.dtype == object:
        return sum(len(item) for item in value.flat)
    return value.nbytes
