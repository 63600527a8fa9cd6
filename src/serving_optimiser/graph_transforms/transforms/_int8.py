"""What quantize_matmuls and quantize_convs share: weight codes, layer matching, the ranges file
and which tensors its calibration measures, the kernel probe and the clean-up of float weights
nobody reads any more."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2

from ..calibration import DEFAULT_MAX_LAYER_ERROR, Calibration, read_calibration_file
from ..context import TransformContext
from ..errors import TransformError
from ..graph_utils import const_value, control_inputs, new_graph_like, parse_input
from .weights import content_const

FLOAT, QINT8, QUINT8, INT32 = types_pb2.DT_FLOAT, types_pb2.DT_QINT8, types_pb2.DT_QUINT8, types_pb2.DT_INT32
BIAS_OPS = ("BiasAdd", "Add", "AddV2")
CONV_OPS = ("Conv2D", "DepthwiseConv2dNative")
RELU_OPS = ("Relu", "Relu6")
# What quantize_matmuls and quantize_convs emit for a layer.
INT8_LAYER_OPS = frozenset({
    "QuantizedMatMulWithBiasAndDequantize",
    "QuantizedMatMulWithBiasAndReluAndRequantize",
    "QuantizedConv2DWithBiasAndReluAndRequantize",
    "QuantizedConv2DWithBiasAndRequantize",
    "QuantizedDepthwiseConv2DWithBiasAndReluAndRequantize",
    "_QuantizedMatMul",  # quantize_matmuls with a fused activation (_activations.py)
})


def float_scalar(name: str, value: float) -> node_def_pb2.NodeDef:
    return content_const(name, np.float32(value), FLOAT)


def min_first_output_range(low: float, high: float, ensure_minimum_range: float = 0.01) -> tuple[float, float]:
    """The output_min and output_max that QuantizeV2 (MIN_FIRST, the default ensure_minimum_range)
    reports for a constant range [low, high]: TensorFlow's and oneDNN's kernels both widen it to
    hold 0 and to span at least 1 % of its largest magnitude, in float32."""
    low32, high32 = np.float32(low), np.float32(high)
    minimum = min(np.float32(0.0), low32)
    epsilon = max(np.float32(1.0), max(abs(low32), abs(high32))) * np.float32(ensure_minimum_range)
    maximum = max(np.float32(0.0), max(high32, np.float32(minimum + epsilon)))
    return float(minimum), float(maximum)


def quantize_weights_symmetric(
    values: np.ndarray, axis: int | None = None, levels: int = 127
) -> tuple[np.ndarray, np.ndarray]:
    """qint8 codes in [-levels, levels] and the range bound (one per slice along ``axis``, or one
    in all) for the kernel's range [-bound, bound]: a code c decodes to c * bound / 127.

    -128 is never used so that the range is symmetric, which the kernels' SCALED weights need.
    Fewer ``levels`` keep the pairs of u8 x s8 products that the kernels without VNNI add in
    int16 (vpmaddubsw saturates past 32767) from overflowing (quantize_matmuls). An all-zero
    slice gets a = 1 (any a decodes zeros exactly).
    """
    values = values.astype(np.float64)
    if axis is None:
        bound = np.asarray(np.abs(values).max() if values.size else 0.0)
        scale = bound
    else:
        others = tuple(i for i in range(values.ndim) if i != axis)
        bound = np.abs(values).max(axis=others)
        scale = np.expand_dims(bound, others)
    bound = np.where(bound > 0.0, bound, 1.0)
    scale = np.where(scale > 0.0, scale, 1.0)
    codes = np.clip(np.rint(values * (levels / scale)), -levels, levels).astype(np.int8)
    return codes, (bound * (127.0 / levels)).astype(np.float64)


def int16_safe_levels(values: np.ndarray, reduce_axis: int, channel_axis: int | None = None) -> int:
    """Weight levels for a layer whose input codes sit around 128 (a signed input shifted to
    [0, max - min]). The kernels without VNNI (AVX2, AVX-512 before VNNI) add each pair of
    neighbouring u8 x s8 products along the reduction axis in int16 (vpmaddubsw), which saturates
    past 32767: two neighbouring weight codes may sum to 128 at most (255 x 128 < 32767). 127
    where the weights allow, else as many as the worst pair leaves (64 at the least)."""
    codes, _ = quantize_weights_symmetric(values, channel_axis)
    magnitudes = np.abs(np.moveaxis(codes.astype(np.int32), reduce_axis, 0))
    if magnitudes.shape[0] % 2:
        magnitudes = np.concatenate([magnitudes, np.zeros_like(magnitudes[:1])])
    worst = int((magnitudes[0::2] + magnitudes[1::2]).max()) if magnitudes.size else 0
    return 127 if worst <= 128 else max(64, (127 * 128) // worst)


@functools.cache
def int8_kernels_available() -> bool:
    """Whether this process runs QuantizedMatMulWithBiasAndDequantize (x86 oneDNN builds, oneDNN on).

    With TF_ENABLE_ONEDNN_OPTS=0 TF 2.21 still registers the op but its kernel produces no
    output ("Missing 0-th output" in a graph, empty tensors eagerly), so we run it once.
    """
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        out = tf.raw_ops.QuantizedMatMulWithBiasAndDequantize(
            a=tf.constant(np.ones((1, 1), np.uint8), tf.quint8), b=tf.constant(np.ones((1, 1), np.int8), tf.qint8),
            bias=tf.zeros([1]), min_a=0.0, max_a=1.0, min_b=-1.0, max_b=1.0,
            min_freezed_output=0.0, max_freezed_output=1.0, Toutput=tf.float32,
        )
    try:
        with tf.compat.v1.Session(graph=graph) as session:
            return session.run(out).shape == (1, 1)
    except (tf.errors.OpError, ValueError):
        return False


def attr_type(node: node_def_pb2.NodeDef, key: str = "T") -> int:
    return node.attr[key].type if key in node.attr else FLOAT


def const_behind_identity(nodes: dict, input_string: str) -> node_def_pb2.NodeDef | None:
    is_control, name, port = parse_input(input_string)
    node = nodes.get(name)
    while node is not None and node.op == "Identity" and len(node.input) == 1 and not is_control and port == 0:
        is_control, name, port = parse_input(node.input[0])
        node = nodes.get(name)
    if node is None or is_control or port != 0 or node.op != "Const":
        return None
    return node


def float_weights(nodes: dict, input_string: str, rank: int) -> tuple[np.ndarray | None, str | None]:
    """(values, None) when ``input_string`` reads a finite float Const of ``rank``, else (None, why)."""
    weights = const_behind_identity(nodes, input_string)
    if weights is None:
        return None, f"its weights '{input_string}' are not a Const"
    values = np.asarray(const_value(weights))
    if values.dtype != np.float32 or values.ndim != rank:
        return None, f"its weights '{weights.name}' are not a {rank}-D float Const"
    if not np.isfinite(values).all():
        return None, f"its weights '{weights.name}' hold inf or NaN"
    return values, None


def bias_of(producer: node_def_pb2.NodeDef, nodes: dict, consumers: dict, channels: int):
    """(bias-add node, bias values) when ``producer``'s only reader adds a constant [channels] vector."""
    readers = consumers.get(producer.name, [])
    if len(readers) != 1 or readers[0].op not in BIAS_OPS or control_inputs(readers[0]):
        return None, None
    adder = readers[0]
    if attr_type(adder) != FLOAT or len(adder.input) != 2:
        return None, None
    if adder.op == "BiasAdd" and adder.attr["data_format"].s not in (b"", b"NHWC"):
        return None, None
    sides = [parse_input(i)[1] for i in adder.input]
    if adder.op == "BiasAdd" and sides[0] != producer.name:
        return None, None
    if producer.name not in sides or sides[0] == sides[1]:
        return None, None
    other = adder.input[1] if sides[0] == producer.name else adder.input[0]
    if parse_input(adder.input[0 if sides[0] == producer.name else 1])[2] != 0:
        return None, None
    bias = const_behind_identity(nodes, other)
    if bias is None:
        return None, None
    values = np.asarray(const_value(bias))
    # Shapes that broadcast to one value per output channel: [], [1], [channels], [1, channels].
    if values.dtype != np.float32 or values.size not in (1, channels) or values.ndim > 2:
        return None, None
    if values.ndim == 2 and values.shape[0] != 1:
        return None, None
    return adder, np.broadcast_to(values.reshape(-1), (channels,)).astype(np.float32)


def read_ranges_file(transform: str, path: str) -> dict[str, tuple[float, float]]:
    """The ranges of a ``ranges_file`` (either format of :func:`read_calibration_file`)."""
    return dict(read_calibration_file(transform, path).ranges)


def calibration_of(transform: str, context: TransformContext) -> Calibration | None:
    """The ``ranges_file``'s calibration where the step names one, else the one handed in by the
    caller (the guard's in-process calibration), else None."""
    path = context.get_string("ranges_file")
    if path:
        return read_calibration_file(transform, path)
    return context.calibration


def guard_params(transform: str, context: TransformContext) -> tuple[float, frozenset[str]]:
    """``max_layer_error`` (the per-layer guard's bound) and the ``keep_float`` layer names."""
    bound = context.get_float("max_layer_error", DEFAULT_MAX_LAYER_ERROR)
    if not bound > 0:
        raise TransformError(f"{transform}: max_layer_error must be positive, got {bound:g}")
    return bound, frozenset(context.get_list("keep_float"))


def guard_refusal(
    name: str, calibration: Calibration | None, bound: float, keep_float: frozenset[str]
) -> str | None:
    """Why layer ``name`` stays float by the guard, or None."""
    if name in keep_float:
        return "keep_float names it"
    if calibration is None:
        return None
    if name in calibration.keep_float:
        return "the agreement fallback keeps it float"
    error = calibration.layer_errors.get(name)
    if error is not None and error > bound:
        return (f"its int8 output error {error:.3g} (relative RMS on the calibration rows) is over "
                f"max_layer_error={bound:g}")
    return None


def check_range_names(transform: str, ranges: Mapping, graph_def: graph_pb2.GraphDef) -> None:
    """A name the graph lacks is an error, unless the graph holds int8 layers already (a ranges
    file's names go when quantize_matmuls or quantize_convs rewrites their layers, and one file
    serves both, in either order, and reruns)."""
    present = {node.name for node in graph_def.node}
    unknown = sorted(set(ranges) - present)
    if unknown and not any(node.op in INT8_LAYER_OPS for node in graph_def.node):
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise TransformError(f"{transform}: ranges_file names nodes that are not in the graph: {shown}")


def splice_layers(
    graph_def: graph_pb2.GraphDef,
    replaced: Mapping[str, list[node_def_pb2.NodeDef]],
    removed: set[str],
    output_names: Iterable[str],
) -> graph_pb2.GraphDef:
    """Each rewritten layer's nodes where the node it replaces was, without the nodes it absorbed,
    and without the float weights that nothing reads any more (the int8 transforms,
    fuse_layer_norms)."""
    nodes = []
    for node in graph_def.node:
        if node.name in replaced:
            nodes.extend(replaced[node.name])
        elif node.name not in removed:
            nodes.append(node)
    return drop_unread_float_consts(new_graph_like(graph_def, nodes), graph_def, output_names)


def drop_unread_float_consts(
    graph_def: graph_pb2.GraphDef, before: graph_pb2.GraphDef, output_names: Iterable[str]
) -> graph_pb2.GraphDef:
    """Remove float Consts (and Identities of them) that were read before and are not any more."""
    was_read = {parse_input(i)[1] for node in before.node for i in node.input}
    keep = {parse_input(name)[1] for name in output_names}
    while True:
        read = {parse_input(i)[1] for node in graph_def.node for i in node.input}
        dead = {
            node.name
            for node in graph_def.node
            if node.name in was_read and node.name not in read and node.name not in keep
            and ((node.op == "Const" and attr_type(node, "dtype") == FLOAT) or node.op == "Identity")
        }
        if not dead:
            return graph_def
        graph_def = new_graph_like(graph_def, [node for node in graph_def.node if node.name not in dead])


# Products whose int8 layer (quantize_matmuls) is calibrated on the operand that is not a constant.
WEIGHTED_PRODUCT_OPS = ("Einsum", "BatchMatMul", "BatchMatMulV2")


def _constant_operand(nodes: dict, input_string: str) -> bool:
    """Whether ``input_string`` reads a Const, through Identity and Reshape (of the weights)."""
    is_control, name, _ = parse_input(input_string)
    node = nodes.get(name)
    while node is not None and not is_control and node.op in ("Identity", "Reshape") and node.input:
        is_control, name, _ = parse_input(node.input[0])
        node = nodes.get(name)
    return node is not None and not is_control and node.op == "Const"


def _calibrated_tensors(graph_def: graph_pb2.GraphDef) -> dict[str, tuple[str, int]]:
    """name in the ranges file -> (node, input index or -1 for its output).

    A float MatMul, Conv2D or DepthwiseConv2dNative: the range of its input; an Einsum or
    BatchMatMul with one constant operand: the range of the other. After a conv, its bias add and
    the Relu/Relu6 after that: the range of their outputs.
    """
    readers: dict[str, list[node_def_pb2.NodeDef]] = {}
    for node in graph_def.node:
        for input_string in node.input:
            readers.setdefault(parse_input(input_string)[1], []).append(node)
    nodes = {node.name: node for node in graph_def.node}
    tensors = {}
    for node in graph_def.node:
        if node.op in WEIGHTED_PRODUCT_OPS and attr_type(node) == FLOAT:
            constant = [_constant_operand(nodes, input_string) for input_string in node.input[:2]]
            if constant.count(True) == 1:  # a product of two activations has no int8 layer
                tensors[node.name] = (node.name, constant.index(False))
            continue
        if node.op not in ("MatMul", *CONV_OPS) or attr_type(node) != FLOAT:
            continue
        tensors[node.name] = (node.name, 0)
        follower = node
        while node.op in CONV_OPS and follower.op not in RELU_OPS:
            next_nodes = readers.get(follower.name, [])
            if len(next_nodes) != 1 or next_nodes[0].op not in (*BIAS_OPS, *RELU_OPS):
                break
            if follower.op in BIAS_OPS and next_nodes[0].op in BIAS_OPS:
                break
            follower = next_nodes[0]
            tensors[follower.name] = (follower.name, -1)
    return tensors

