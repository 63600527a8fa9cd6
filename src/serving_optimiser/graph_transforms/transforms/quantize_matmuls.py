"""quantize_matmuls (beyond the old tool): float MatMul (+ bias) layers run in int8 through the
fused oneDNN kernel QuantizedMatMulWithBiasAndDequantize, float in and float out; with calibrated
ranges, consecutive ReLU layers chain through QuantizedMatMulWithBiasAndReluAndRequantize.

Why this op (measured on TF 2.21, docs/differences/quantize_matmuls.md): it takes quint8
activations and qint8 weights and returns float, so no qint32 tensor ever needs a Dequantize
(which has no kernel for qint32 under oneDNN) and no Cast + Mul pass is paid; the Relu that
follows stays a float op. The MatMul kernels accept only scalar weight ranges, so weights are
quantised per tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Iterable, Mapping

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2

from ..context import TransformContext
from ..errors import TransformError
from ..graph_utils import (
    const_value,
    consumers_map,
    control_inputs,
    make_node,
    new_graph_like,
    node_map,
    parse_input,
)
from ..registry import register
from .weights import content_const

log = logging.getLogger(__name__)

FLOAT, QINT8, QUINT8, INT32 = types_pb2.DT_FLOAT, types_pb2.DT_QINT8, types_pb2.DT_QUINT8, types_pb2.DT_INT32
QUANTIZED_OP = "QuantizedMatMulWithBiasAndDequantize"
CHAINED_OP = "QuantizedMatMulWithBiasAndReluAndRequantize"
SUFFIX = "quantize_matmuls"
BIAS_OPS = ("BiasAdd", "Add", "AddV2")
# Ops whose outputs are never negative: an input read from one needs no run-time minimum.
NON_NEGATIVE_OPS = ("Relu", "Relu6")


def _float_scalar(name: str, value: float) -> node_def_pb2.NodeDef:
    return content_const(name, np.float32(value), FLOAT)


def quantize_weights_symmetric(values: np.ndarray) -> tuple[np.ndarray, float]:
    """qint8 codes in [-127, 127] and the range bound a, for the kernel's range [-a, a].

    -128 is never used so that the range is symmetric, which the kernel's SCALED weights need.
    An all-zero weight gets a = 1 (any a decodes zeros exactly).
    """
    bound = float(np.abs(values).max()) if values.size else 0.0
    bound = bound if bound > 0.0 else 1.0
    codes = np.clip(np.rint(values.astype(np.float64) * (127.0 / bound)), -127, 127).astype(np.int8)
    return codes, bound


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


# ---------------------------------------------------------------------------------------------
# Finding the layers
# ---------------------------------------------------------------------------------------------


def _attr_type(node: node_def_pb2.NodeDef, key: str = "T") -> int:
    return node.attr[key].type if key in node.attr else FLOAT


def _const_behind_identity(nodes: dict, input_string: str) -> node_def_pb2.NodeDef | None:
    is_control, name, port = parse_input(input_string)
    node = nodes.get(name)
    while node is not None and node.op == "Identity" and len(node.input) == 1 and not is_control and port == 0:
        is_control, name, port = parse_input(node.input[0])
        node = nodes.get(name)
    if node is None or is_control or port != 0 or node.op != "Const":
        return None
    return node


def _refusal(node: node_def_pb2.NodeDef, nodes: dict, minimum_dim: int) -> str | None:
    """Why MatMul ``node`` stays float, or None if the kernel can take it and it pays."""
    if _attr_type(node) != FLOAT:
        return f"its T is not float (DataType {_attr_type(node)})"
    if node.attr["transpose_a"].b if "transpose_a" in node.attr else False:
        return "transpose_a=true (the int8 kernel is not worth a transpose of the activations)"
    if control_inputs(node):
        return "it has control inputs"
    weights = _const_behind_identity(nodes, node.input[1])
    if weights is None:
        return f"its weights '{node.input[1]}' are not a Const"
    values = const_value(weights)
    if values.dtype != np.float32 or values.ndim != 2:
        return f"its weights '{weights.name}' are not a 2-D float Const"
    if not np.isfinite(values).all():
        return f"its weights '{weights.name}' hold inf or NaN"
    if min(values.shape) < minimum_dim:
        return (f"its weights are {values.shape[0]}x{values.shape[1]}, under minimum_dim={minimum_dim} "
                "(too few multiply-adds per value moved for int8 to pay)")
    return None


def _bias_of(matmul: node_def_pb2.NodeDef, nodes: dict, consumers: dict, columns: int):
    """(bias-add node, bias values) when the MatMul's only reader adds a constant [columns] vector."""
    readers = consumers.get(matmul.name, [])
    if len(readers) != 1 or readers[0].op not in BIAS_OPS or control_inputs(readers[0]):
        return None, None
    adder = readers[0]
    if _attr_type(adder) != FLOAT or len(adder.input) != 2:
        return None, None
    if adder.op == "BiasAdd" and adder.attr["data_format"].s not in (b"", b"NHWC"):
        return None, None
    sides = [parse_input(i)[1] for i in adder.input]
    if adder.op == "BiasAdd" and sides[0] != matmul.name:
        return None, None
    other = adder.input[1] if sides[0] == matmul.name else adder.input[0]
    if parse_input(adder.input[0 if sides[0] == matmul.name else 1])[2] != 0:
        return None, None
    bias = _const_behind_identity(nodes, other)
    if bias is None:
        return None, None
    values = np.asarray(const_value(bias))
    # Shapes that broadcast to one value per output column: [], [1], [columns], [1, columns].
    if values.dtype != np.float32 or values.size not in (1, columns) or values.ndim > 2:
        return None, None
    if values.ndim == 2 and values.shape[0] != 1:
        return None, None
    return adder, np.broadcast_to(values.reshape(-1), (columns,)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The rewrite
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Layer:
    """One MatMul (+ bias) the kernel takes, and how it joins its neighbours."""

    matmul: node_def_pb2.NodeDef
    last: node_def_pb2.NodeDef  # the bias add, else the MatMul: the node the fused op replaces
    weights: np.ndarray
    bias: np.ndarray
    input_range: tuple[float, float] | None  # calibrated, else None: per batch
    non_negative: bool
    # Set when calibrated layers chain: this layer ends in the Relu ``output_name`` and emits
    # quint8 in [0, requantize_max]; the next layer reads those codes (``quantized_input``).
    output_name: str = ""
    requantize_max: float | None = None
    quantized_input: str | None = None

    def __post_init__(self) -> None:
        self.output_name = self.output_name or self.last.name


def _layer_nodes(layer: _Layer) -> list[node_def_pb2.NodeDef]:
    """The fused op named ``layer.output_name``, and the QuantizeV2 and Consts it reads."""
    name, device = layer.output_name, layer.matmul.device
    prefix = f"{name}/{SUFFIX}"
    codes, bound = quantize_weights_symmetric(layer.weights)
    nodes = [
        content_const(f"{prefix}/weights", codes, QINT8),
        _float_scalar(f"{prefix}/weights_min", -bound),
        _float_scalar(f"{prefix}/weights_max", bound),
    ]
    activations, input_range = layer.matmul.input[0], layer.input_range
    if layer.quantized_input is not None:
        source = layer.quantized_input
        quantized, min_a, max_a = f"{source}:0", f"{source}:1", f"{source}:2"
    else:
        if input_range is not None:
            # Calibrated: a constant range; values outside it are clipped by QuantizeV2.
            low, high = (0.0, input_range[1]) if layer.non_negative else input_range
            nodes += [_float_scalar(f"{prefix}/input_min", low), _float_scalar(f"{prefix}/input_max", high)]
        else:
            nodes.append(content_const(f"{prefix}/reduction_dims", np.array([0, 1], np.int32), INT32))
            nodes.append(make_node("Max", f"{prefix}/input_max", [activations, f"{prefix}/reduction_dims"],
                                   {"T": FLOAT, "Tidx": INT32, "keep_dims": False}))
            if layer.non_negative:
                nodes.append(_float_scalar(f"{prefix}/input_min", 0.0))
            else:
                nodes.append(make_node("Min", f"{prefix}/input_min", [activations, f"{prefix}/reduction_dims"],
                                       {"T": FLOAT, "Tidx": INT32, "keep_dims": False}))
        quantize = f"{prefix}/quantize"
        nodes.append(make_node("QuantizeV2", quantize,
                               [activations, f"{prefix}/input_min", f"{prefix}/input_max"],
                               {"T": QUINT8, "mode": "MIN_FIRST"}))
        quantized, min_a, max_a = f"{quantize}:0", f"{quantize}:1", f"{quantize}:2"
    if layer.non_negative:
        bias_input = f"{prefix}/bias"
        nodes.append(content_const(bias_input, layer.bias, FLOAT))
    else:
        # The kernel mis-handles a negative min_a (errors of ~1e5 measured, MIN_FIRST and SCALED
        # alike), so it is told the codes cover [0, max - min], i.e. it computes (x - min) @ W,
        # and min * column sums of the decoded weights go into the bias.
        decoded = codes.astype(np.float64) * (bound / 127.0)
        bias_input = f"{prefix}/bias_compensated"
        nodes += [
            content_const(f"{prefix}/bias", layer.bias, FLOAT),
            content_const(f"{prefix}/column_sums", decoded.sum(axis=0).astype(np.float32), FLOAT),
            make_node("Mul", f"{prefix}/bias_shift", [min_a, f"{prefix}/column_sums"], {"T": FLOAT}),
            make_node("AddV2", bias_input, [f"{prefix}/bias", f"{prefix}/bias_shift"], {"T": FLOAT}),
            make_node("Sub", f"{prefix}/input_span", [max_a, min_a], {"T": FLOAT}),
            _float_scalar(f"{prefix}/zero", 0.0),
        ]
        min_a, max_a = f"{prefix}/zero", f"{prefix}/input_span"
    if layer.requantize_max is None:
        # min/max_freezed_output are required inputs that the float-output kernel ignores
        # (checked: any values give the same result); the weight range Consts fill them.
        op, output_range, output_type = QUANTIZED_OP, [f"{prefix}/weights_min", f"{prefix}/weights_max"], FLOAT
    else:
        nodes += [_float_scalar(f"{prefix}/output_min", 0.0),
                  _float_scalar(f"{prefix}/output_max", layer.requantize_max)]
        op, output_range, output_type = CHAINED_OP, [f"{prefix}/output_min", f"{prefix}/output_max"], QUINT8
    fused = make_node(
        op,
        name,
        [quantized, f"{prefix}/weights", bias_input, min_a, max_a,
         f"{prefix}/weights_min", f"{prefix}/weights_max", *output_range],
        {"T1": QUINT8, "T2": QINT8, "Toutput": output_type, "input_quant_mode": "MIN_FIRST"},
        device=device,
    )
    fused.attr["Tbias"].type = FLOAT
    for node in nodes:
        node.device = device
    return [*nodes, fused]


def _chain(layers: dict[str, _Layer], consumers: dict, output_names: Iterable[str]) -> None:
    """Join calibrated layers whose Relu feeds only the next calibrated layer (see the docstring)."""
    outputs = {parse_input(name)[1] for name in output_names}
    for layer in layers.values():
        readers = consumers.get(layer.last.name, [])
        if layer.input_range is None or len(readers) != 1:
            continue
        relu = readers[0]
        if relu.op != "Relu" or _attr_type(relu) != FLOAT or control_inputs(relu) or relu.name in outputs:
            continue
        if parse_input(relu.input[0])[2] != 0:
            continue
        next_readers = consumers.get(relu.name, [])
        following = layers.get(next_readers[0].name) if len(next_readers) == 1 else None
        if following is None or following.input_range is None or following.input_range[1] <= 0.0:
            continue
        if parse_input(following.matmul.input[0]) != (False, relu.name, 0) or relu.name in following.matmul.input[1:]:
            continue
        layer.output_name, layer.requantize_max = relu.name, following.input_range[1]
        following.quantized_input = relu.name


def read_ranges_file(path: str) -> dict[str, tuple[float, float]]:
    """``{"<MatMul name>": [min, max], ...}`` from a JSON file; errors name the file and entry."""
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except OSError as error:
        raise TransformError(f"quantize_matmuls: cannot read ranges_file '{path}': {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise TransformError(f"quantize_matmuls: ranges_file '{path}' is not JSON: {error.msg}") from None
    if not isinstance(raw, dict):
        raise TransformError(f"quantize_matmuls: ranges_file '{path}' must hold an object of name: [min, max]")
    ranges = {}
    for name, pair in raw.items():
        ok = isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int | float) for v in pair)
        if not ok or not pair[0] <= pair[1]:
            raise TransformError(f"quantize_matmuls: ranges_file '{path}': '{name}' needs [min, max] with "
                                 f"min <= max, found {pair!r}")
        ranges[name] = (float(pair[0]), float(pair[1]))
    return ranges


@register(
    "quantize_matmuls",
    params={"minimum_dim": "32", "ranges_file": "(none: ranges measured per batch at run time)"},
)
def quantize_matmuls(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Run float MatMul (+ constant bias) layers as int8 MatMuls, float in and float out.

    Matches: MatMul (T float, transpose_a false, no control inputs) of (any, Const [K, N],
    possibly behind Identity), optionally read only by BiasAdd (NHWC) | Add | AddV2 of a float
    Const of shape [], [1], [N] or [1, N]. A Relu/Relu6 after it stays a float op (the
    float-output kernel has no Relu variant; the qint32 ...AndRelu path measured slower because
    its output needs a Cast and a Mul), except in a calibrated chain (below).
    Produces, for a layer whose last node (the bias add, else the MatMul) is ``<n>``:
    ``<n>`` itself as a QuantizedMatMulWithBiasAndDequantize (quint8 x qint8, float bias and
    output, input_quant_mode MIN_FIRST), so every reader is unchanged; ``<n>/quantize_matmuls/``
    ``weights`` (qint8 codes, symmetric range ``weights_min``/``weights_max`` = -a/a, a the
    largest |weight|, transpose_b applied), ``bias`` (zeros without a bias add), ``quantize``
    (QuantizeV2 quint8 MIN_FIRST of the activations), ``input_min``/``input_max``: per batch
    at run time (Max, and Min over ``reduction_dims``) by default, Consts with ``ranges_file``.
    An activation read from a Relu/Relu6 gets min 0 as a Const. Otherwise a negative minimum
    is folded into ``bias_compensated`` (``bias`` + min * ``column_sums``, via ``bias_shift``)
    and the kernel sees the range [``zero``, ``input_span``]. Float weight and bias Consts that
    nothing else reads are removed.
    Calibrated chains: when a layer with a calibrated range is read only by a Relu ``<r>``
    (not a graph output) that only the next layer with a calibrated range reads, ``<r>``
    becomes a QuantizedMatMulWithBiasAndReluAndRequantize emitting quint8 in [0, the next
    layer's calibrated max] (``output_min``/``output_max``), and the next layer takes those
    codes as they are: no float tensor, Relu or QuantizeV2 between them (0.31 x float against
    0.38 x per batch on the Iris DNN, 100,000 rows).
    Params: ``ranges_file`` (none: dynamic ranges): JSON ``{"<MatMul name>": [min, max]}``;
    MatMuls missing from it get dynamic ranges, entries of MatMuls that stay float are unused,
    a name that is not a MatMul is an error (unless the graph holds this transform's ops already).
    Refused (left float, one log line each): non-float T, transpose_a, control inputs, weights
    that are not a finite 2-D float Const, and weights with fewer than ``minimum_dim`` (32) rows
    or columns: below that int8 is no faster (measured break-even at 32 for K and for N on
    100,000 rows), and a narrow input layer reads raw features whose scales differ, which one
    8-bit range resolves badly (on the Iris DNN its 4x512 layer caused nearly all the flips).
    Running it again changes nothing more.
    """
    minimum_dim = context.get_int("minimum_dim", 32)
    if minimum_dim < 1:
        raise TransformError(f"quantize_matmuls: minimum_dim must be >= 1, got {minimum_dim}")
    ranges_path = context.get_string("ranges_file")
    ranges = read_ranges_file(ranges_path) if ranges_path else {}
    nodes = node_map(graph_def)
    consumers = consumers_map(graph_def)
    layers: dict[str, _Layer] = {}
    matmuls = {node.name for node in graph_def.node if node.op == "MatMul"}
    for node in graph_def.node:
        if node.op != "MatMul":
            continue
        reason = _refusal(node, nodes, minimum_dim)
        if reason is not None:
            log.info("quantize_matmuls: MatMul '%s' stays float: %s", node.name, reason)
            continue
        weights = np.asarray(const_value(_const_behind_identity(nodes, node.input[1])), np.float32)
        if node.attr["transpose_b"].b if "transpose_b" in node.attr else False:
            weights = weights.T
        adder, bias = _bias_of(node, nodes, consumers, weights.shape[1])
        producer = nodes.get(parse_input(node.input[0])[1])
        input_range = ranges.get(node.name)
        # A calibrated min >= 0 also allows the plain path: QuantizeV2 clips to the range anyway.
        non_negative = (producer is not None and producer.op in NON_NEGATIVE_OPS) or (
            input_range is not None and input_range[0] >= 0.0
        )
        layers[node.name] = _Layer(
            node, adder if adder is not None else node, weights,
            bias if bias is not None else np.zeros(weights.shape[1], np.float32), input_range, non_negative,
        )
        if node.name not in ranges and ranges:
            log.info("quantize_matmuls: MatMul '%s' is not in ranges_file; its input range is per batch", node.name)
    unknown = sorted(set(ranges) - matmuls)
    # In a graph this transform already rewrote, the names are gone: a rerun changes nothing.
    if unknown and not any(node.op in (QUANTIZED_OP, CHAINED_OP) for node in graph_def.node):
        raise TransformError(
            f"quantize_matmuls: ranges_file names nodes that are not MatMuls here: {', '.join(unknown)}"
        )
    if not layers:
        return graph_def
    _chain(layers, consumers, context.output_names)
    # Each layer's nodes go where the node it ends in was; the nodes it absorbs go.
    replaced = {layer.output_name: _layer_nodes(layer) for layer in layers.values()}
    removed = {name for layer in layers.values() for name in (layer.matmul.name, layer.last.name)}
    if not int8_kernels_available():
        log.warning("quantize_matmuls: this TensorFlow has no working %s kernel (oneDNN off or not an x86 "
                    "oneDNN build); the rewritten graph will only run where it has one", QUANTIZED_OP)
    new_nodes = []
    for node in graph_def.node:
        if node.name in replaced:
            new_nodes.extend(replaced[node.name])
        elif node.name not in removed:
            new_nodes.append(node)
    return _drop_unread_float_consts(new_graph_like(graph_def, new_nodes), graph_def, context.output_names)


def _drop_unread_float_consts(
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
            and ((node.op == "Const" and _attr_type(node, "dtype") == FLOAT) or node.op == "Identity")
        }
        if not dead:
            return graph_def
        graph_def = new_graph_like(graph_def, [node for node in graph_def.node if node.name not in dead])


def calibrate_ranges(
    graph_def: graph_pb2.GraphDef, feeds: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, tuple[float, float]]:
    """Each float MatMul's activation range over ``feeds`` (batches of {input tensor: array}).

    Runs the float graph once per batch; the result, written as JSON, is a ``ranges_file``.
    """
    import tensorflow as tf

    names = [node.name for node in graph_def.node if node.op == "MatMul" and _attr_type(node) == FLOAT]
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    fetches = {name: graph.get_operation_by_name(name).inputs[0] for name in names}
    low = {name: np.inf for name in names}
    high = {name: -np.inf for name in names}
    with tf.compat.v1.Session(graph=graph) as session:
        for feed in feeds:
            values = session.run(fetches, {(k if ":" in k else f"{k}:0"): v for k, v in feed.items()})
            for name, array in values.items():
                low[name] = min(low[name], float(array.min()))
                high[name] = max(high[name], float(array.max()))
    return {name: (low[name], high[name]) for name in names if np.isfinite(low[name])}
