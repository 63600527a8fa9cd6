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
import logging
from collections.abc import Iterable

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2

from ..calibration import DEFAULT_MAX_LAYER_ERROR, LayerProbe, fake_quantize
from ..context import TransformContext
from ..errors import TransformError
from ..graph_utils import canonical_input_name, consumers_map, control_inputs, make_node, node_map, parse_input
from ..registry import register
from ._int8 import (
    FLOAT,
    INT32,
    QINT8,
    QUINT8,
    RELU_OPS,
    attr_type,
    bias_of,
    calibrate_ranges,
    calibration_of,
    check_range_names,
    float_scalar,
    float_weights,
    guard_params,
    guard_refusal,
    int8_kernels_available,
    quantize_weights_symmetric,
    splice_layers,
)
from .weights import content_const

log = logging.getLogger(__name__)

QUANTIZED_OP = "QuantizedMatMulWithBiasAndDequantize"
CHAINED_OP = "QuantizedMatMulWithBiasAndReluAndRequantize"
SUFFIX = "quantize_matmuls"
# For the callers that import them from here (the calibrate stage, the benchmark, the tests).
__all__ = ["CHAINED_OP", "QUANTIZED_OP", "calibrate_ranges", "int8_kernels_available", "layer_probes",
           "quantize_matmuls"]
# Ops whose outputs are never negative: an input read from one needs no run-time minimum.
NON_NEGATIVE_OPS = RELU_OPS


# ---------------------------------------------------------------------------------------------
# Finding the layers
# ---------------------------------------------------------------------------------------------


def _refusal(node: node_def_pb2.NodeDef, nodes: dict, minimum_dim: int) -> str | None:
    """Why MatMul ``node`` stays float, or None if the kernel can take it and it pays."""
    if attr_type(node) != FLOAT:
        return f"its T is not float (DataType {attr_type(node)})"
    if node.attr["transpose_a"].b if "transpose_a" in node.attr else False:
        return "transpose_a=true (the int8 kernel is not worth a transpose of the activations)"
    if control_inputs(node):
        return "it has control inputs"
    values, reason = float_weights(nodes, node.input[1], rank=2)
    if values is None:
        return reason
    if min(values.shape) < minimum_dim:
        return (f"its weights are {values.shape[0]}x{values.shape[1]}, under minimum_dim={minimum_dim} "
                "(too few multiply-adds per value moved for int8 to pay)")
    return None


def _candidates(graph_def: graph_pb2.GraphDef, minimum_dim: int, ranges: dict) -> list[_Layer]:
    """Every MatMul (+ bias) the kernel takes, with its calibrated range where ``ranges`` has one;
    one log line for each that stays float."""
    nodes = node_map(graph_def)
    consumers = consumers_map(graph_def)
    layers = []
    for node in graph_def.node:
        if node.op != "MatMul":
            continue
        reason = _refusal(node, nodes, minimum_dim)
        if reason is not None:
            log.info("quantize_matmuls: MatMul '%s' stays float: %s", node.name, reason)
            continue
        weights = float_weights(nodes, node.input[1], rank=2)[0]
        if node.attr["transpose_b"].b if "transpose_b" in node.attr else False:
            weights = weights.T
        adder, bias = bias_of(node, nodes, consumers, weights.shape[1])
        producer = nodes.get(parse_input(node.input[0])[1])
        input_range = ranges.get(node.name)
        # A calibrated min >= 0 also allows the plain path: QuantizeV2 clips to the range anyway.
        non_negative = (producer is not None and producer.op in NON_NEGATIVE_OPS) or (
            input_range is not None and input_range[0] >= 0.0
        )
        layers.append(_Layer(
            node, adder if adder is not None else node, weights,
            bias if bias is not None else np.zeros(weights.shape[1], np.float32), input_range, non_negative,
        ))
    return layers


def layer_probes(graph_def: graph_pb2.GraphDef, ranges: dict, minimum_dim: int = 32) -> list[LayerProbe]:
    """What calibration measures for each MatMul layer this transform would take: its float input,
    its float output (the bias add, else the MatMul) and the int8 layer's answer to that input
    (the input through 8 bits over its calibrated range, or the batch's own range without one;
    the weights as :func:`quantize_weights_symmetric` codes them)."""
    probes = []
    for layer in _candidates(graph_def, minimum_dim, ranges):
        codes, bound = quantize_weights_symmetric(layer.weights)
        decoded = (codes.astype(np.float64) * (bound / 127.0)).astype(np.float32)

        def int8_output(x: np.ndarray, layer=layer, decoded=decoded) -> np.ndarray:
            low, high = layer.input_range if layer.input_range is not None else (float(x.min()), float(x.max()))
            low = 0.0 if layer.non_negative else min(low, 0.0)
            return fake_quantize(x, low, max(high, low)) @ decoded + layer.bias

        probes.append(LayerProbe(layer.matmul.name, canonical_input_name(layer.matmul.input[0]),
                                 f"{layer.last.name}:0", int8_output))
    return probes


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
        float_scalar(f"{prefix}/weights_min", -bound),
        float_scalar(f"{prefix}/weights_max", bound),
    ]
    activations, input_range = layer.matmul.input[0], layer.input_range
    if layer.quantized_input is not None:
        source = layer.quantized_input
        quantized, min_a, max_a = f"{source}:0", f"{source}:1", f"{source}:2"
    else:
        if input_range is not None:
            # Calibrated: a constant range; values outside it are clipped by QuantizeV2.
            low, high = (0.0, input_range[1]) if layer.non_negative else input_range
            nodes += [float_scalar(f"{prefix}/input_min", low), float_scalar(f"{prefix}/input_max", high)]
        else:
            nodes.append(content_const(f"{prefix}/reduction_dims", np.array([0, 1], np.int32), INT32))
            nodes.append(make_node("Max", f"{prefix}/input_max", [activations, f"{prefix}/reduction_dims"],
                                   {"T": FLOAT, "Tidx": INT32, "keep_dims": False}))
            if layer.non_negative:
                nodes.append(float_scalar(f"{prefix}/input_min", 0.0))
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
            float_scalar(f"{prefix}/zero", 0.0),
        ]
        min_a, max_a = f"{prefix}/zero", f"{prefix}/input_span"
    if layer.requantize_max is None:
        # min/max_freezed_output are required inputs that the float-output kernel ignores
        # (checked: any values give the same result); the weight range Consts fill them.
        op, output_range, output_type = QUANTIZED_OP, [f"{prefix}/weights_min", f"{prefix}/weights_max"], FLOAT
    else:
        nodes += [float_scalar(f"{prefix}/output_min", 0.0),
                  float_scalar(f"{prefix}/output_max", layer.requantize_max)]
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
        if relu.op != "Relu" or attr_type(relu) != FLOAT or control_inputs(relu) or relu.name in outputs:
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


@register(
    "quantize_matmuls",
    params={
        "minimum_dim": "32",
        "ranges_file": "(none: ranges measured per batch at run time)",
        "max_layer_error": f"{DEFAULT_MAX_LAYER_ERROR:g} (with calibration: a layer over it stays float)",
        "keep_float": "(none; repeatable: MatMul names that stay float)",
    },
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
    MatMuls missing from it get dynamic ranges; entries of other nodes (quantize_convs' ranges)
    and of MatMuls that stay float are unused; a name the graph lacks is an error (unless the
    graph holds this transform's ops already).
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
    bound, keep_float = guard_params("quantize_matmuls", context)
    calibration = calibration_of("quantize_matmuls", context)
    ranges = dict(calibration.ranges) if calibration is not None else {}
    consumers = consumers_map(graph_def)
    layers: dict[str, _Layer] = {}
    for layer in _candidates(graph_def, minimum_dim, ranges):
        name = layer.matmul.name
        reason = guard_refusal(name, calibration, bound, keep_float)
        if reason is not None:
            log.info("quantize_matmuls: MatMul '%s' stays float: %s", name, reason)
            continue
        layers[name] = layer
        if name not in ranges and ranges:
            log.info("quantize_matmuls: MatMul '%s' is not in ranges_file; its input range is per batch", name)
    check_range_names("quantize_matmuls", ranges, graph_def)
    if not layers:
        return graph_def
    _chain(layers, consumers, context.output_names)
    # Each layer's nodes go where the node it ends in was; the nodes it absorbs go.
    replaced = {layer.output_name: _layer_nodes(layer) for layer in layers.values()}
    removed = {name for layer in layers.values() for name in (layer.matmul.name, layer.last.name)}
    if not int8_kernels_available():
        log.warning("quantize_matmuls: %s does not run in this process (oneDNN off: set TF_ENABLE_ONEDNN_OPTS=1; "
                    "or not an x86 oneDNN build); the rewritten graph only runs where oneDNN is on", QUANTIZED_OP)
    return splice_layers(graph_def, replaced, removed, context.output_names)
