"""quantize_matmuls (beyond the old tool): float MatMul (+ bias) layers run in int8 through the
fused oneDNN kernel QuantizedMatMulWithBiasAndDequantize, float in and float out.

Why this op (measured on TF 2.21, docs/differences/quantize_matmuls.md): it takes quint8
activations and qint8 weights and returns float, so no qint32 tensor ever needs a Dequantize
(which has no kernel for qint32 under oneDNN) and no Cast + Mul pass is paid; the Relu that
follows stays a float op. The MatMul kernels accept only scalar weight ranges, so weights are
quantised per tensor.
"""

from __future__ import annotations

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


def _refusal(node: node_def_pb2.NodeDef, nodes: dict) -> str | None:
    """Why MatMul ``node`` stays float, or None if the kernel can take it."""
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


def _layer_nodes(
    name: str,
    activations: str,
    weights: np.ndarray,
    bias: np.ndarray,
    input_range: tuple[float, float] | None,
    non_negative: bool,
    device: str,
) -> list[node_def_pb2.NodeDef]:
    """QuantizeV2 of the activations and the fused op named ``name``, plus their helpers."""
    prefix = f"{name}/{SUFFIX}"
    codes, bound = quantize_weights_symmetric(weights)
    nodes = [
        content_const(f"{prefix}/weights", codes, QINT8),
        _float_scalar(f"{prefix}/weights_min", -bound),
        _float_scalar(f"{prefix}/weights_max", bound),
    ]
    if input_range is not None:
        # Calibrated: a constant range; values outside it are clipped by QuantizeV2.
        low, high = (0.0, input_range[1]) if non_negative else input_range
        nodes += [_float_scalar(f"{prefix}/input_min", low), _float_scalar(f"{prefix}/input_max", high)]
    else:
        nodes.append(content_const(f"{prefix}/reduction_dims", np.array([0, 1], np.int32), INT32))
        nodes.append(make_node("Max", f"{prefix}/input_max", [activations, f"{prefix}/reduction_dims"],
                               {"T": FLOAT, "Tidx": INT32, "keep_dims": False}))
        if non_negative:
            nodes.append(_float_scalar(f"{prefix}/input_min", 0.0))
        else:
            nodes.append(make_node("Min", f"{prefix}/input_min", [activations, f"{prefix}/reduction_dims"],
                                   {"T": FLOAT, "Tidx": INT32, "keep_dims": False}))
    quantize = f"{prefix}/quantize"
    nodes.append(make_node("QuantizeV2", quantize, [activations, f"{prefix}/input_min", f"{prefix}/input_max"],
                           {"T": QUINT8, "mode": "MIN_FIRST"}))
    if non_negative:
        bias_input, min_a, max_a = f"{prefix}/bias", f"{quantize}:1", f"{quantize}:2"
        nodes.append(content_const(bias_input, bias, FLOAT))
    else:
        # The kernel mis-handles a negative min_a (errors of ~1e5 measured, MIN_FIRST and SCALED
        # alike), so it is told the codes cover [0, max - min], i.e. it computes (x - min) @ W,
        # and min * column sums of the decoded weights go into the bias.
        decoded = codes.astype(np.float64) * (bound / 127.0)
        bias_input, min_a, max_a = f"{prefix}/bias_compensated", f"{prefix}/zero", f"{prefix}/input_span"
        nodes += [
            content_const(f"{prefix}/bias", bias, FLOAT),
            content_const(f"{prefix}/column_sums", decoded.sum(axis=0).astype(np.float32), FLOAT),
            make_node("Mul", f"{prefix}/bias_shift", [f"{quantize}:1", f"{prefix}/column_sums"], {"T": FLOAT}),
            make_node("AddV2", bias_input, [f"{prefix}/bias", f"{prefix}/bias_shift"], {"T": FLOAT}),
            make_node("Sub", max_a, [f"{quantize}:2", f"{quantize}:1"], {"T": FLOAT}),
            _float_scalar(min_a, 0.0),
        ]
    # min/max_freezed_output are required inputs that the float-output kernel ignores
    # (checked: any values give the same result); the weight range Consts fill them.
    fused = make_node(
        QUANTIZED_OP,
        name,
        [f"{quantize}:0", f"{prefix}/weights", bias_input, min_a, max_a,
         f"{prefix}/weights_min", f"{prefix}/weights_max", f"{prefix}/weights_min", f"{prefix}/weights_max"],
        {"T1": QUINT8, "T2": QINT8, "Toutput": FLOAT, "input_quant_mode": "MIN_FIRST"},
        device=device,
    )
    fused.attr["Tbias"].type = FLOAT
    for node in nodes:
        node.device = device
    return [*nodes, fused]


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


@register("quantize_matmuls", params={"ranges_file": "(none: ranges measured per batch at run time)"})
def quantize_matmuls(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Run float MatMul (+ constant bias) layers as int8 MatMuls, float in and float out.

    Matches: MatMul (T float, transpose_a false, no control inputs) of (any, Const [K, N],
    possibly behind Identity), optionally read only by BiasAdd (NHWC) | Add | AddV2 of a float
    Const of shape [], [1], [N] or [1, N]. A Relu/Relu6 after it is not matched: it stays a
    float op (the float-output kernel has no Relu variant; the qint32 ...AndRelu path measured
    slower because its output needs a Cast and a Mul).
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
    Params: ``ranges_file`` (none: dynamic ranges): JSON ``{"<MatMul name>": [min, max]}``;
    MatMuls missing from it get dynamic ranges, a name that is not a quantisable MatMul is an
    error.
    Refused (left float, one log line each): non-float T, transpose_a, control inputs, weights
    that are not a finite 2-D float Const. Running it again changes nothing more.
    """
    ranges_path = context.get_string("ranges_file")
    ranges = read_ranges_file(ranges_path) if ranges_path else {}
    nodes = node_map(graph_def)
    consumers = consumers_map(graph_def)
    replaced: dict[str, list[node_def_pb2.NodeDef]] = {}  # last node of a layer -> its new nodes
    removed: set[str] = set()
    quantised = set()
    for node in graph_def.node:
        if node.op != "MatMul":
            continue
        reason = _refusal(node, nodes)
        if reason is not None:
            log.info("quantize_matmuls: MatMul '%s' stays float: %s", node.name, reason)
            continue
        weights = np.asarray(const_value(_const_behind_identity(nodes, node.input[1])), np.float32)
        if node.attr["transpose_b"].b if "transpose_b" in node.attr else False:
            weights = weights.T
        adder, bias = _bias_of(node, nodes, consumers, weights.shape[1])
        last = adder if adder is not None else node
        if bias is None:
            bias = np.zeros(weights.shape[1], np.float32)
        activations = node.input[0]
        producer = nodes.get(parse_input(activations)[1])
        input_range = ranges.get(node.name)
        # A calibrated min >= 0 also allows the plain path: QuantizeV2 clips to the range anyway.
        non_negative = (producer is not None and producer.op in NON_NEGATIVE_OPS) or (
            input_range is not None and input_range[0] >= 0.0
        )
        replaced[last.name] = _layer_nodes(
            last.name, activations, weights, bias, input_range, non_negative, node.device
        )
        removed.update({node.name, last.name})
        quantised.add(node.name)
        if node.name not in ranges and ranges:
            log.info("quantize_matmuls: MatMul '%s' is not in ranges_file; its input range is per batch", node.name)
    unknown = sorted(set(ranges) - quantised)
    if unknown:
        raise TransformError(
            f"quantize_matmuls: ranges_file names nodes that are not quantisable MatMuls here: {', '.join(unknown)}"
        )
    if not replaced:
        return graph_def
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
