"""quantize_convs (beyond the old tool): float Conv2D / DepthwiseConv2dNative (+ bias) (+ Relu or
Relu6) layers run in int8 through TensorFlow's fused oneDNN kernels, with calibrated ranges.

Why these ops (measured on TF 2.21, docs/differences/quantize_matmuls.md): the conv kernels have
no float-output variant, so each layer requantizes to 8 bits with a frozen output range, which
needs calibration; quint8 outputs feed the next conv as they are. A Relu6 is the ReLU variant
with an output range capped at 6: 8-bit codes cannot go past the top of their range. Unlike the
MatMul kernels these take one filter range per output channel.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2

from ..calibration import DEFAULT_MAX_LAYER_ERROR, LayerProbe, fake_quantize
from ..context import TransformContext
from ..errors import TransformError
from ..graph_utils import canonical_input_name, consumers_map, control_inputs, make_node, node_map, parse_input
from ..registry import register
from ._int8 import (
    CONV_OPS,
    FLOAT,
    QINT8,
    QUINT8,
    RELU_OPS,
    attr_type,
    bias_of,
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

SUFFIX = "quantize_convs"
# (op, activation) -> the fused kernel; a depthwise conv without a ReLU has no requantizing kernel.
FUSED_OPS = {
    ("Conv2D", True): "QuantizedConv2DWithBiasAndReluAndRequantize",
    ("Conv2D", False): "QuantizedConv2DWithBiasAndRequantize",
    ("DepthwiseConv2dNative", True): "QuantizedDepthwiseConv2DWithBiasAndReluAndRequantize",
}
RELU6_TOP = 6.0


@dataclasses.dataclass
class _Conv:
    conv: node_def_pb2.NodeDef
    end: node_def_pb2.NodeDef  # the Relu/Relu6, else the bias add: the float tensor it replaces
    absorbed: list[str]  # the nodes the fused op replaces
    filter: np.ndarray
    bias: np.ndarray
    input_range: tuple[float, float]
    output_range: tuple[float, float]  # [0, top] after a ReLU (quint8), else [-m, m] (qint8)
    quantized_input: str | None = None  # the producing fused op, when the codes pass as they are

    @property
    def fused_name(self) -> str:
        return f"{self.end.name}/{SUFFIX}/conv"

    @property
    def has_relu(self) -> bool:
        return self.end.op in RELU_OPS


def _match(node, nodes: dict, consumers: dict, ranges: dict, minimum_dim: int) -> _Conv | str:
    """The layer that starts at conv ``node``, or why it stays float."""
    if attr_type(node) != FLOAT:
        return f"its T is not float (DataType {attr_type(node)})"
    if control_inputs(node):
        return "it has control inputs"
    if node.attr["data_format"].s not in (b"", b"NHWC"):
        return f"data_format {node.attr['data_format'].s.decode()} (the int8 kernels take NHWC)"
    if node.attr["padding"].s not in (b"SAME", b"VALID"):
        return f"padding {node.attr['padding'].s.decode()} (the int8 kernels take SAME or VALID)"
    if any(d != 1 for d in node.attr["dilations"].list.i):
        return "it is dilated"
    strides = list(node.attr["strides"].list.i)
    if len(strides) != 4 or strides[0] != 1 or strides[3] != 1:
        return f"strides {strides} (batch and channel strides must be 1)"
    values, reason = float_weights(nodes, node.input[1], rank=4)
    if values is None:
        return reason
    depthwise = node.op == "DepthwiseConv2dNative"
    if depthwise and values.shape[3] != 1:
        return f"channel multiplier {values.shape[3]} (the int8 kernel takes 1)"
    channels_in = values.shape[2]
    channels_out = values.shape[2] if depthwise else values.shape[3]
    if min(channels_in, channels_out) < minimum_dim:
        return f"{channels_in} -> {channels_out} channels, under minimum_dim={minimum_dim}"
    adder, bias = bias_of(node, nodes, consumers, channels_out)
    if adder is None:
        return "no bias add after it (its output range is calibrated there)"
    end, absorbed = adder, [node.name, adder.name]
    readers = consumers.get(adder.name, [])
    if len(readers) == 1 and readers[0].op in RELU_OPS and attr_type(readers[0]) == FLOAT:
        if not control_inputs(readers[0]) and parse_input(readers[0].input[0]) == (False, adder.name, 0):
            end = readers[0]
            absorbed.append(end.name)
    if (node.op, end.op in RELU_OPS) not in FUSED_OPS:
        return "a depthwise conv needs a Relu or Relu6 after its bias (no requantizing kernel without one)"
    for name, what in ((node.name, "input"), (end.name, "output")):
        if name not in ranges:
            return f"ranges_file has no {what} range for it ('{name}')"
    input_range, (low, high) = ranges[node.name], ranges[end.name]
    if input_range[1] <= input_range[0]:
        return f"its calibrated input range {list(input_range)} is empty"
    if input_range[0] < 0.0 and node.attr["padding"].s == b"SAME" and values.shape[:2] != (1, 1):
        # The kernel takes only min_input >= 0, so signed inputs are shifted by -min and the
        # shift's effect moved into the bias; zero padding would be shifted too.
        return "its input can be negative and SAME padding would shift the padded zeros"
    if input_range[0] < 0.0 and depthwise:
        return "its input can be negative (the depthwise kernel's bias cannot take the shift)"
    if end.op in RELU_OPS:
        top = min(high, RELU6_TOP) if end.op == "Relu6" else high
        if top <= 0.0:
            return f"its calibrated output never exceeds 0 ('{end.name}': {[low, high]})"
        output_range = (0.0, top)
    else:
        bound = max(abs(low), abs(high))
        if bound <= 0.0:
            return f"its calibrated output is always 0 ('{end.name}')"
        output_range = (-bound, bound)
    return _Conv(node, end, absorbed, values, bias, input_range, output_range)


def _chain(layers: dict[str, _Conv]) -> None:
    """A layer whose input is another layer's quint8 output takes the codes as they are."""
    by_end = {layer.end.name: layer for layer in layers.values()}
    for layer in layers.values():
        is_control, name, port = parse_input(layer.conv.input[0])
        producer = by_end.get(name)
        if producer is not None and producer.has_relu and not is_control and port == 0:
            layer.quantized_input = producer.fused_name


def _layer_nodes(layer: _Conv) -> list[node_def_pb2.NodeDef]:
    """The fused op (``fused_name``), its Consts and, when the input is float, its QuantizeV2."""
    conv, device, prefix = layer.conv, layer.conv.device, f"{layer.end.name}/{SUFFIX}"
    depthwise = conv.op == "DepthwiseConv2dNative"
    codes, bounds = quantize_weights_symmetric(layer.filter, axis=2 if depthwise else 3)
    nodes = [
        content_const(f"{prefix}/filter", codes, QINT8),
        content_const(f"{prefix}/filter_min", (-bounds).astype(np.float32), FLOAT),
        content_const(f"{prefix}/filter_max", bounds.astype(np.float32), FLOAT),
    ]
    bias = layer.bias.astype(np.float64)
    if layer.quantized_input is not None:
        source = layer.quantized_input
        quantized, min_input, max_input = f"{source}:0", f"{source}:1", f"{source}:2"
    else:
        low, high = layer.input_range
        low = min(low, 0.0)
        nodes += [float_scalar(f"{prefix}/input_min", low), float_scalar(f"{prefix}/input_max", high)]
        quantized = f"{prefix}/quantize"
        nodes.append(make_node("QuantizeV2", quantized, [layer.conv.input[0], f"{prefix}/input_min",
                                                         f"{prefix}/input_max"], {"T": QUINT8, "mode": "MIN_FIRST"}))
        min_input, max_input = f"{prefix}/zero", f"{prefix}/input_span"
        nodes += [float_scalar(min_input, 0.0), float_scalar(max_input, high - low)]
        if low < 0.0:
            # The kernel sees x - low in [0, high - low]; low * the summed decoded filter per
            # output channel goes back into the bias (no padding reaches these convs: 1x1 or VALID).
            decoded = codes.astype(np.float64) * (bounds / 127.0)
            bias = bias + low * decoded.sum(axis=(0, 1, 2))
        quantized = f"{quantized}:0"
    nodes.append(content_const(f"{prefix}/bias", bias.astype(np.float32), FLOAT))
    nodes += [float_scalar(f"{prefix}/output_min", layer.output_range[0]),
              float_scalar(f"{prefix}/output_max", layer.output_range[1])]
    fused = make_node(
        FUSED_OPS[(conv.op, layer.has_relu)],
        layer.fused_name,
        [quantized, f"{prefix}/filter", f"{prefix}/bias", min_input, max_input,
         f"{prefix}/filter_min", f"{prefix}/filter_max", f"{prefix}/output_min", f"{prefix}/output_max"],
        {},
        device=device,
    )
    types = {"Tinput": QUINT8, "Tfilter": QINT8, "Tbias": FLOAT, "out_type": QUINT8 if layer.has_relu else QINT8}
    for key, dtype in types.items():
        fused.attr[key].type = dtype
    for key in ("strides", "padding"):
        fused.attr[key].CopyFrom(conv.attr[key])
    fused.attr["dilations"].list.i.extend([1, 1, 1, 1])
    for node in nodes:
        node.device = device
    return [*nodes, fused]


def _float_output(layer: _Conv) -> node_def_pb2.NodeDef:
    """A Dequantize named like the replaced node, for the readers that want floats."""
    source = layer.fused_name
    return make_node(
        "Dequantize", layer.end.name, [f"{source}:0", f"{source}:1", f"{source}:2"],
        {"T": QUINT8 if layer.has_relu else QINT8, "mode": "MIN_FIRST" if layer.has_relu else "SCALED"},
        device=layer.conv.device,
    )


def _candidates(graph_def: graph_pb2.GraphDef, ranges: dict, minimum_dim: int) -> dict[str, _Conv]:
    """Every conv layer the kernels take with these ranges; one log line for each that stays float."""
    nodes, consumers = node_map(graph_def), consumers_map(graph_def)
    layers: dict[str, _Conv] = {}
    for node in graph_def.node:
        if node.op not in CONV_OPS:
            continue
        match = _match(node, nodes, consumers, ranges, minimum_dim)
        if isinstance(match, str):
            log.info("quantize_convs: %s '%s' stays float: %s", node.op, node.name, match)
        else:
            layers[node.name] = match
    return layers


def _requantize(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """The fused kernel's 8-bit output: quint8 over [0, high] after a ReLU, qint8 over [-m, m] else."""
    if low >= 0.0:
        return fake_quantize(values, 0.0, high)
    step = high / 127.0
    return (np.round(np.clip(values, -high, high) / step) * step).astype(np.float32)


def layer_probes(graph_def: graph_pb2.GraphDef, ranges: dict, minimum_dim: int = 16) -> list[LayerProbe]:
    """What calibration measures for each conv layer this transform would take with ``ranges``:
    the float input of the conv, the float output of its last node (ReLU, else bias add) and
    the int8 layer's answer (input through 8 bits over its range, per-channel filter codes,
    float bias, ReLU, 8-bit output range)."""
    import tensorflow as tf

    probes = []
    for layer in _candidates(graph_def, ranges, minimum_dim).values():
        depthwise = layer.conv.op == "DepthwiseConv2dNative"
        codes, bounds = quantize_weights_symmetric(layer.filter, axis=2 if depthwise else 3)
        scale = (bounds / 127.0).reshape((1, 1, -1, 1) if depthwise else (1, 1, 1, -1))
        decoded = tf.constant((codes.astype(np.float64) * scale).astype(np.float32))
        strides = list(layer.conv.attr["strides"].list.i)
        padding = layer.conv.attr["padding"].s.decode()

        def int8_output(x: np.ndarray, layer=layer, decoded=decoded, strides=strides, padding=padding,
                        depthwise=depthwise) -> np.ndarray:
            low, high = layer.input_range
            quantized = tf.constant(fake_quantize(x, min(low, 0.0), high))
            if depthwise:
                y = tf.nn.depthwise_conv2d(quantized, decoded, strides, padding)
            else:
                y = tf.nn.conv2d(quantized, decoded, strides, padding)
            y = y.numpy() + layer.bias
            if layer.has_relu:
                y = np.maximum(y, 0.0)
            return _requantize(y, *layer.output_range)

        probes.append(LayerProbe(layer.conv.name, canonical_input_name(layer.conv.input[0]),
                                 f"{layer.end.name}:0", int8_output))
    return probes


@register(
    "quantize_convs",
    params={
        "ranges_file": "(required unless calibrated by the caller: input and output ranges)",
        "minimum_dim": "16",
        "max_layer_error": f"{DEFAULT_MAX_LAYER_ERROR:g} (with calibration: a layer over it stays float)",
        "keep_float": "(none; repeatable: conv names that stay float)",
    },
)
def quantize_convs(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Run float conv layers in int8 with calibrated ranges, float in and float out.

    Matches: Conv2D or DepthwiseConv2dNative (T float, NHWC, SAME or VALID, not dilated,
    channel multiplier 1, no control inputs) of (any, Const filter, possibly behind Identity),
    read only by BiasAdd | Add | AddV2 of a float Const [] | [1] | [C] | [1, C], optionally read
    only by Relu or Relu6; a depthwise conv needs the ReLU.
    Produces, for a layer whose last node is ``<n>``: ``<n>/quantize_convs/conv``, the fused
    kernel (QuantizedConv2DWithBiasAndReluAndRequantize, ...AndRequantize without a ReLU, or
    QuantizedDepthwiseConv2DWithBiasAndReluAndRequantize; quint8 input, qint8 ``filter`` with
    one symmetric range per output channel in ``filter_min``/``filter_max``, float ``bias``,
    frozen output range ``output_min``/``output_max``: [0, the calibrated max of ``<n>``] after
    a Relu, capped at 6 after a Relu6, symmetric [-m, m] (qint8) without one). Its input is the
    previous layer's quint8 codes when that layer ends in a ReLU, else ``quantize``
    (QuantizeV2 quint8 MIN_FIRST of the float input over its calibrated range; a negative
    minimum is shifted out: the kernel sees [``zero``, ``input_span``] and the bias absorbs
    min * the summed filter). When anything but such a layer reads ``<n>`` (or ``<n>`` is a
    graph output), a Dequantize named ``<n>`` gives it floats. Float filter and bias Consts
    nobody reads any more are removed.
    Params: ``ranges_file`` (required): JSON ``{"<name>": [min, max]}``, a conv's input range
    under the conv's name and its output range under ``<n>``'s, as
    ``quantize_matmuls.calibrate_ranges`` writes them; names the graph lacks are an error.
    ``minimum_dim`` (16): convs with fewer input or output channels stay float.
    Refused (left float, one log line each): the cases above, missing ranges, fewer channels
    than ``minimum_dim``, a signed input under SAME padding with a filter larger than 1x1 or
    into a depthwise conv (the shift would move the padded zeros). Running it again changes
    nothing more.
    """
    minimum_dim = context.get_int("minimum_dim", 16)
    if minimum_dim < 1:
        raise TransformError(f"quantize_convs: minimum_dim must be >= 1, got {minimum_dim}")
    bound, keep_float = guard_params("quantize_convs", context)
    calibration = calibration_of("quantize_convs", context)
    if calibration is None:
        raise TransformError("quantize_convs: needs ranges_file (conv ranges are calibrated, not measured per batch)")
    ranges = dict(calibration.ranges)
    check_range_names("quantize_convs", ranges, graph_def)
    consumers = consumers_map(graph_def)
    layers: dict[str, _Conv] = {}
    for name, layer in _candidates(graph_def, ranges, minimum_dim).items():
        reason = guard_refusal(name, calibration, bound, keep_float)
        if reason is not None:
            log.info("quantize_convs: %s '%s' stays float: %s", layer.conv.op, name, reason)
        else:
            layers[name] = layer
    if not layers:
        return graph_def
    _chain(layers)
    outputs = {parse_input(name)[1] for name in context.output_names}
    replaced: dict[str, list[node_def_pb2.NodeDef]] = {}
    for layer in layers.values():
        new_nodes = _layer_nodes(layer)
        float_readers = [
            reader for reader in consumers.get(layer.end.name, [])
            if not (reader.name in layers and layers[reader.name].quantized_input == layer.fused_name)
        ]
        if float_readers or layer.end.name in outputs:
            new_nodes.append(_float_output(layer))
        replaced[layer.end.name] = new_nodes
    removed = {name for layer in layers.values() for name in layer.absorbed}
    if not int8_kernels_available():
        log.warning("quantize_convs: the int8 conv kernels do not run in this process (oneDNN off: set "
                    "TF_ENABLE_ONEDNN_OPTS=1; or not an x86 oneDNN build); the rewritten graph only runs where "
                    "oneDNN is on")
    return splice_layers(graph_def, replaced, removed, context.output_names)
