"""fuse_layer_norms: put Keras 3's LayerNormalization in the form TensorFlow fuses into one op.

Keras 3 computes a layer norm as ``x * inv + (beta - mean * inv)`` spelled with a Neg, a
StopGradient and its gamma and beta reshaped to the input's rank. Grappler's remapper fuses a
layer norm into one ``_MklLayerNorm`` op when oneDNN is on, but only in one spelling (the one
tf-keras' non-fused path produced): the reduction axis given as ``rank - 1``, gamma and beta
1-D Consts, ``beta - (gamma * rsqrt(var + eps)) * mean`` as a Sub. This transform rewrites the
Keras 3 spelling into that one. Without oneDNN, or wherever the remapper does not fuse it, the
rewritten graph computes the same float32 values bit for bit (same ops, ``a + -(b)`` written
``a - b``); fused, to within float rounding (oneDNN's layer norm sums in another order).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2

from ..context import TransformContext
from ..graph_utils import (
    const_value,
    consumers_map,
    control_inputs,
    data_inputs,
    make_node,
    node_map,
    node_name_from_input,
)
from ..registry import register
from ._int8 import splice_layers
from .weights import content_const

log = logging.getLogger(__name__)

SUFFIX = "fuse_layer_norms"
FLOAT = types_pb2.DT_FLOAT
INT32 = types_pb2.DT_INT32


@dataclass
class _LayerNorm:
    x: str  # the normalised tensor, as the Mean reads it
    mean: node_def_pb2.NodeDef
    variance: node_def_pb2.NodeDef
    squared_difference: node_def_pb2.NodeDef
    stop_gradient: node_def_pb2.NodeDef | None
    rsqrt: str  # Rsqrt(variance + eps), as the scale reads it
    scale: node_def_pb2.NodeDef  # Mul(rsqrt, gamma)
    gamma: np.ndarray
    beta: np.ndarray
    scaled_x: node_def_pb2.NodeDef  # Mul(x, scale)
    negated_mean: node_def_pb2.NodeDef
    shift: node_def_pb2.NodeDef  # Mul(-mean, scale)
    shifted: node_def_pb2.NodeDef  # AddV2(shift, beta)
    output: node_def_pb2.NodeDef  # AddV2(scaled_x, shifted)
    axis: int  # the reduction axis as the graph gives it (Keras: -1)


def _other(node: node_def_pb2.NodeDef, name: str) -> str | None:
    """The data input of a two-input node that is not ``name`` (either order)."""
    inputs = data_inputs(node)
    if len(inputs) != 2 or control_inputs(node):
        return None
    if inputs[0] == name:
        return inputs[1]
    if inputs[1] == name:
        return inputs[0]
    return None


def _only_reader(consumers: dict, name: str, op: str) -> node_def_pb2.NodeDef | None:
    readers = consumers.get(name, [])
    if len(readers) == 1 and readers[0].op == op and readers[0].attr["T"].type == FLOAT:
        return readers[0]
    return None


def _channel_const(nodes: dict, input_string: str) -> np.ndarray | None:
    """A float Const that broadcasts over the last axis only ([C], [1, C], [1, 1, C], ...), as [C];
    whether it has no more axes than the input is checked once the input's rank is known."""
    node = nodes.get(node_name_from_input(input_string))
    if node is None or node.op != "Const" or node.attr["dtype"].type != FLOAT or input_string != node.name:
        return None
    value = const_value(node)
    if value.ndim < 1 or any(d != 1 for d in value.shape[:-1]):
        return None
    return value


def _static_ranks(graph_def: graph_pb2.GraphDef, tensors: set[str]) -> dict[str, int | None]:
    """Each tensor's rank as TensorFlow's shape inference knows it (None: unknown, or the graph
    does not import)."""
    import tensorflow as tf

    graph = tf.Graph()
    try:
        with graph.as_default():
            # import_graph_def adds default attrs to the GraphDef it is given: give it a copy.
            tf.compat.v1.import_graph_def(copy.deepcopy(graph_def), name="")
    except (ValueError, TypeError, tf.errors.OpError):
        return dict.fromkeys(tensors)
    return {name: graph.get_tensor_by_name(name if ":" in name else f"{name}:0").shape.rank for name in tensors}


def _match(mean: node_def_pb2.NodeDef, nodes: dict, consumers: dict, protected: set[str]) -> _LayerNorm | str:
    """The Keras 3 layer norm whose first Mean is ``mean``, or why it is not one."""
    x, axes = data_inputs(mean)[:2] if len(data_inputs(mean)) == 2 else (None, None)
    axes_node = nodes.get(node_name_from_input(axes)) if axes else None
    if axes_node is None or axes_node.op != "Const" or not mean.attr["keep_dims"].b or control_inputs(mean):
        return "its Mean does not keep dims over a Const axis"
    axis_values = const_value(axes_node).reshape(-1)
    if axis_values.size != 1:
        return "it reduces over more than one axis"
    readers = consumers.get(mean.name, [])
    negated = [r for r in readers if r.op == "Neg"]
    centred = [r for r in readers if r.op in ("StopGradient", "Identity", "SquaredDifference")]
    if len(negated) != 1 or len(centred) != 1 or len(readers) != 2:
        return "its mean is read by other ops"
    stop_gradient = centred[0] if centred[0].op != "SquaredDifference" else None
    squared = centred[0] if stop_gradient is None else _only_reader(consumers, stop_gradient.name, "SquaredDifference")
    if squared is None or data_inputs(squared) != [x, stop_gradient.name if stop_gradient else mean.name]:
        return "no SquaredDifference of the input and its mean"
    variance = _only_reader(consumers, squared.name, "Mean")
    if variance is None or not variance.attr["keep_dims"].b:
        return "no Mean of the squared difference"
    variance_axes = nodes.get(node_name_from_input(data_inputs(variance)[1]))
    if variance_axes is None or variance_axes.op != "Const" or not np.array_equal(
            const_value(variance_axes).reshape(-1), axis_values):
        return "the variance reduces over another axis"
    add_epsilon = _only_reader(consumers, variance.name, "AddV2")
    epsilon = _other(add_epsilon, variance.name) if add_epsilon is not None else None
    epsilon_node = nodes.get(node_name_from_input(epsilon)) if epsilon else None
    if epsilon_node is None or epsilon_node.op != "Const" or const_value(epsilon_node).size != 1:
        return "no Const epsilon added to the variance"
    rsqrt = _only_reader(consumers, add_epsilon.name, "Rsqrt")
    scale = _only_reader(consumers, rsqrt.name, "Mul") if rsqrt is not None else None
    gamma_input = _other(scale, rsqrt.name) if scale is not None else None
    if gamma_input is None:
        return "no Mul of the inverse deviation by gamma"
    gamma = _channel_const(nodes, gamma_input)
    if gamma is None:
        return "gamma is not a float Const over the last axis"
    (shift,) = consumers[negated[0].name] if len(consumers.get(negated[0].name, [])) == 1 else (None,)
    scale_readers = consumers.get(scale.name, [])
    scaled_x = [r for r in scale_readers if r is not shift]
    if (shift is None or shift.op != "Mul" or _other(shift, negated[0].name) != scale.name or len(scale_readers) != 2
            or scaled_x[0].op != "Mul" or _other(scaled_x[0], scale.name) != x):
        return "not the -mean * scale, x * scale form"
    shifted = _only_reader(consumers, shift.name, "AddV2")
    beta_input = _other(shifted, shift.name) if shifted is not None else None
    beta = _channel_const(nodes, beta_input) if beta_input else None
    if beta is None or beta.shape != gamma.shape:
        return "no float Const beta over the last axis added to the shift"
    output = _only_reader(consumers, shifted.name, "AddV2")
    if (output is None or _other(output, shifted.name) != scaled_x[0].name
            or len(consumers.get(scaled_x[0].name, [])) != 1):
        return "the scaled input and the shift are not added"
    inner = [mean, squared, variance, add_epsilon, rsqrt, scale, negated[0], shift, shifted, scaled_x[0]]
    if stop_gradient is not None:
        inner.append(stop_gradient)
    if any(node.name in protected for node in inner) or any(control_inputs(node) for node in [*inner, output]):
        return "a node inside it is a graph output or has control inputs"
    rsqrt_input = _other(scale, gamma_input)
    return _LayerNorm(x, mean, variance, squared, stop_gradient, rsqrt_input, scale, gamma, beta, scaled_x[0],
                      negated[0], shift, shifted, output, int(axis_values[0]))


def _with_inputs(node: node_def_pb2.NodeDef, *inputs: str) -> node_def_pb2.NodeDef:
    rewritten = copy.deepcopy(node)
    del rewritten.input[:]
    rewritten.input.extend(inputs)
    rewritten.attr.pop("_output_shapes", None)
    return rewritten


def _rewritten(norm: _LayerNorm, last_axis: int | None) -> tuple[dict[str, list[node_def_pb2.NodeDef]], set[str]]:
    """The canonical form: the nodes that take each old node's place, and the names that go;
    ``last_axis`` (rank - 1) replaces a negative axis when the input's rank is known."""
    prefix = f"{norm.output.name}/{SUFFIX}"
    axes = [data_inputs(norm.mean)[1]]
    if last_axis is not None:
        axes = [f"{prefix}/axis"]
    mean = _with_inputs(norm.mean, norm.x, *axes)
    variance = _with_inputs(norm.variance, norm.squared_difference.name, *axes)
    if last_axis is not None:
        for node in (mean, variance):
            node.attr["Tidx"].type = INT32
    new_nodes = [
        content_const(f"{prefix}/gamma", norm.gamma.reshape(-1).astype(np.float32), FLOAT),
        content_const(f"{prefix}/beta", norm.beta.reshape(-1).astype(np.float32), FLOAT),
        make_node("Mul", f"{prefix}/scaled_mean", [norm.scale.name, norm.mean.name], {"T": FLOAT}),
        make_node("Sub", f"{prefix}/shift", [f"{prefix}/beta", f"{prefix}/scaled_mean"], {"T": FLOAT}),
        _with_inputs(norm.output, norm.scaled_x.name, f"{prefix}/shift"),
    ]
    if last_axis is not None:
        new_nodes.insert(0, content_const(f"{prefix}/axis", np.array([last_axis], np.int32), INT32))
    for node in new_nodes:
        node.device = norm.output.device
    replaced = {
        norm.mean.name: [mean],
        norm.variance.name: [variance],
        norm.squared_difference.name: [_with_inputs(norm.squared_difference, norm.x, norm.mean.name)],
        norm.scale.name: [_with_inputs(norm.scale, norm.rsqrt, f"{prefix}/gamma")],
        norm.scaled_x.name: [_with_inputs(norm.scaled_x, norm.x, norm.scale.name)],
        norm.output.name: new_nodes,
    }
    removed = {norm.negated_mean.name, norm.shift.name, norm.shifted.name}
    if norm.stop_gradient is not None:
        removed.add(norm.stop_gradient.name)
    return replaced, removed


@register("fuse_layer_norms")
def fuse_layer_norms(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Rewrite Keras 3 LayerNormalization subgraphs into the form grappler fuses into ``_MklLayerNorm``.

    Matches, for a float tensor ``x``: ``mean`` = Mean(x, [axis], keep_dims) read only by a Neg
    and by SquaredDifference(x, mean) (directly or through a StopGradient/Identity);
    ``variance`` = Mean of it over the same axis; Rsqrt(AddV2(variance, Const eps)) times a
    Const gamma (``scale``); ``x * scale + (-mean * scale + beta)`` with a Const beta; gamma
    and beta broadcast over the last axis only ([C] or [1, ..., C]); Mul and AddV2 operands in
    either order; no control inputs, no intermediate node read elsewhere or a graph output.
    Produces: the same node names for the Means, SquaredDifference (now of x and ``mean``),
    ``scale`` = Mul(Rsqrt, gamma), ``x * scale`` and the output AddV2 = Add(x * scale,
    ``<out>/fuse_layer_norms/shift``), where ``shift`` = Sub(``beta``, ``scaled_mean`` =
    Mul(scale, mean)); gamma and beta become 1-D Consts ``<out>/fuse_layer_norms/gamma|beta``;
    axis -1 becomes ``<out>/fuse_layer_norms/axis`` = rank - 1 when TensorFlow's shape
    inference knows the input's rank (the remapper fuses only a non-negative last axis, and only
    rank 2 or 3 inputs, and only where shape inference proves the output has the input's shape:
    after a residual Add it does, straight after a tensordot's run-time Reshape it may not). The
    Neg, the StopGradient and the old shift nodes go, and so do the old gamma and beta Consts
    when nothing else reads them.
    A norm whose gamma or beta has more axes than its input (or any but one of an input of
    unknown rank) stays as it is: [1, 1, C] and [C] would not broadcast alike.
    Every other graph is returned unchanged; a near miss is logged with its reason.
    Running it again changes nothing more.
    """
    nodes = node_map(graph_def)
    consumers = consumers_map(graph_def)
    protected = {node_name_from_input(name) for name in context.output_names}
    norms: list[_LayerNorm] = []
    for node in graph_def.node:
        if node.op != "Mean" or node.attr["T"].type != FLOAT:
            continue
        if not any(reader.op == "Neg" for reader in consumers.get(node.name, [])):
            continue  # not a Keras 3 layer norm's first Mean (or already rewritten)
        norm = _match(node, nodes, consumers, protected)
        if isinstance(norm, str):
            log.info("fuse_layer_norms: Mean '%s' stays as it is: %s", node.name, norm)
        else:
            norms.append(norm)
    if not norms:
        return graph_def
    ranks = _static_ranks(graph_def, {norm.x for norm in norms})
    replaced: dict[str, list[node_def_pb2.NodeDef]] = {}
    removed: set[str] = set()
    for norm in norms:
        rank = ranks[norm.x]
        # gamma [1, ..., C] and [C] broadcast alike only against an input with at least as many axes.
        if max(norm.gamma.ndim, norm.beta.ndim) > (rank if rank is not None else 1):
            log.info("fuse_layer_norms: Mean '%s' stays as it is: gamma or beta has more axes than its input "
                     "(rank %s)", norm.mean.name, "unknown" if rank is None else rank)
            continue
        last_axis = rank - 1 if rank is not None and norm.axis == -1 else None
        norm_replaced, norm_removed = _rewritten(norm, last_axis)
        replaced.update(norm_replaced)
        removed |= norm_removed
        if norm.axis < 0 and last_axis is None:
            log.info("fuse_layer_norms: layer norm '%s' reduces over axis %d of an input of unknown rank: "
                     "rewritten, but TensorFlow will not fuse it", norm.output.name, norm.axis)
    if not replaced:
        return graph_def
    return splice_layers(graph_def, replaced, removed, context.output_names)
