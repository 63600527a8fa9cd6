"""quantize_convs (beyond the old tool): float Conv2D / DepthwiseConv2dNative (+ bias) (+ residual
add) (+ Relu or Relu6) layers run in int8 through TensorFlow's fused oneDNN kernels, with calibrated
ranges, passing 8-bit codes from layer to layer.

Why these ops (measured on TF 2.21, docs/differences/quantize_convs.md): the conv kernels have no
float-output variant, so each layer requantizes to 8 bits with a frozen output range, which needs
calibration. Every layer emits quint8 codes from a ReLU kernel: after a Relu over [0, max] (a
Relu6 caps the range at 6), without one over [min, max] with min moved into the bias (the ReLU
then clips exactly at the calibrated minimum), so every reader can take the codes as they are. A
residual add runs inside the conv as oneDNN's sum post-op
(QuantizedConv2DWithBiasSumAndReluAndRequantize, quint8 summand); the signed-summand kernel
returns wrong values on TF 2.21 (50 % errors) and there is no sum kernel without a ReLU, so both
go through the same min-into-the-bias shift. A zero Pad before a VALID conv becomes the kernel's
``padding_list``, which pads with code 0: exact when code 0 is 0.0 (a depthwise conv gets SAME
padding where that pads the same, else a Pad of its codes: its shape function ignores
``padding_list``).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2

from ..calibration import DEFAULT_MAX_LAYER_ERROR, LayerProbe, fake_quantize
from ..context import TransformContext
from ..errors import TransformError
from ..graph_utils import (
    canonical_input_name,
    const_value,
    consumers_map,
    control_inputs,
    make_node,
    node_map,
    parse_input,
)
from ..registry import register
from ._activations import Activation, find_activation, float_form, float_prelu
from ._int8 import (
    BIAS_OPS,
    CONV_OPS,
    FLOAT,
    INT32,
    QINT8,
    QUINT8,
    RELU_OPS,
    attr_type,
    bias_of,
    calibration_of,
    check_range_names,
    const_behind_identity,
    float_scalar,
    float_weights,
    guard_params,
    guard_refusal,
    int8_kernels_available,
    int16_safe_levels,
    quantize_weights_symmetric,
    splice_layers,
)
from .weights import content_const

log = logging.getLogger(__name__)
UINT8 = types_pb2.DT_UINT8

SUFFIX = "quantize_convs"
FUSED_OPS = {
    "Conv2D": "QuantizedConv2DWithBiasAndReluAndRequantize",
    "DepthwiseConv2dNative": "QuantizedDepthwiseConv2DWithBiasAndReluAndRequantize",
}
SUM_OP = "QuantizedConv2DWithBiasSumAndReluAndRequantize"
PAD_OPS = ("Pad", "PadV2")
RESIDUAL_OPS = ("Add", "AddV2")
RELU6_TOP = 6.0
Range = tuple[float, float]


@dataclasses.dataclass
class _Conv:
    conv: node_def_pb2.NodeDef
    end: node_def_pb2.NodeDef  # the node whose float tensor the layer's codes replace
    absorbed: list[str]  # the nodes the fused op replaces
    filter: np.ndarray
    bias: np.ndarray  # the float bias chain, summed
    input: str  # what the fused op reads: the conv's input, or the folded Pad's
    input_range: Range  # calibrated range of the conv's input
    # Codes c of the output mean low + c * (high - low) / 255; low is 0 after a ReLU, else <= 0.
    output_range: Range
    has_relu: bool
    padding_list: list[int] | None = None  # a folded Pad, NHWC [0, 0, top, bottom, left, right, 0, 0]
    summand: str | None = None  # the residual add's other input
    summand_range: Range | None = None
    same_padding: bool = False  # the folded Pad is what SAME pads for this input's size
    quantized_input: _Conv | None = None  # the producing layer, when its codes pass as they are
    quantized_summand: _Conv | None = None
    activation: Activation | None = None  # one no conv kernel fuses, after the Dequantize

    @property
    def fused_name(self) -> str:
        return f"{self.end.name}/{SUFFIX}/conv"

    @property
    def depthwise(self) -> bool:
        return self.conv.op == "DepthwiseConv2dNative"

    @property
    def zero_padded(self) -> bool:
        """Whether the kernel adds zero codes around its input (SAME beyond 1x1, or a folded Pad)."""
        same = self.conv.attr["padding"].s == b"SAME" and self.filter.shape[:2] != (1, 1)
        return same or self.padding_list is not None


class _Ranges:
    """Calibrated ranges of tensors, by node name: a node's own entry, else (the ranges file holds
    conv inputs, bias adds and ReLUs right after a conv) the input range of a conv or MatMul that
    reads it (directly or through a zero Pad), else a bound through the constant bias adds above
    a node that has a range."""

    def __init__(self, ranges: dict, nodes: dict, consumers: dict) -> None:
        self.ranges, self.nodes, self.consumers = ranges, nodes, consumers

    def exact(self, name: str) -> Range | None:
        node = self.nodes.get(name)
        # A conv's or MatMul's entry is its input's range, not its output's.
        if node is not None and node.op not in ("MatMul", *CONV_OPS) and name in self.ranges:
            return tuple(self.ranges[name])
        for reader in self.consumers.get(name, []):
            if parse_input(reader.input[0]) != (False, name, 0):
                continue
            if reader.op in ("MatMul", *CONV_OPS) and reader.name in self.ranges:
                return tuple(self.ranges[reader.name])
            if reader.op in PAD_OPS:
                # A conv after a zero Pad sees this tensor and zeros: the range, widened to 0.
                for conv in self.consumers.get(reader.name, []):
                    if conv.op in CONV_OPS and conv.name in self.ranges:
                        if parse_input(conv.input[0]) == (False, reader.name, 0):
                            return tuple(self.ranges[conv.name])
        return None

    def bounded(self, name: str) -> Range | None:
        """The exact range, else [low + min c, high + max c] from the nearest node above ``name``
        with a range through constant adds c: conservative (channels' extremes need not coincide),
        never clipping. Keras convs with use_bias=True leave BiasAdd then the batch norm's AddV2
        after fold_batch_norms, and calibration records only the first."""
        shift_low = shift_high = 0.0
        node = self.nodes.get(name)
        while node is not None:
            found = self.exact(node.name)
            if found is not None:
                return found[0] + shift_low, found[1] + shift_high
            if node.op not in BIAS_OPS or len(node.input) != 2 or attr_type(node) != FLOAT:
                return None
            sides = [const_behind_identity(self.nodes, i) for i in node.input]
            if (sides[0] is None) == (sides[1] is None):
                return None
            values = np.asarray(const_value(sides[0] if sides[0] is not None else sides[1]), np.float64)
            if values.size == 0:
                return None
            shift_low, shift_high = shift_low + float(values.min()), shift_high + float(values.max())
            is_control, parent, port = parse_input(node.input[1 if sides[0] is not None else 0])
            node = None if is_control or port != 0 else self.nodes.get(parent)
        return None


def _only_reader(name: str, consumers: dict, ops: tuple[str, ...]) -> node_def_pb2.NodeDef | None:
    readers = consumers.get(name, [])
    if len(readers) != 1 or readers[0].op not in ops or attr_type(readers[0]) != FLOAT or control_inputs(readers[0]):
        return None
    return readers[0]


def _bias_after(producer: node_def_pb2.NodeDef, nodes: dict, consumers: dict, channels: int):
    """(bias add, values) like ``_int8.bias_of``, also for constants of shape [1, 1, 1, C]: what
    fold_batch_norms leaves of a Keras batch norm's offset."""
    adder, values = bias_of(producer, nodes, consumers, channels)
    if adder is not None:
        return adder, values
    adder = _only_reader(producer.name, consumers, BIAS_OPS)
    if adder is None or adder.op == "BiasAdd" or len(adder.input) != 2:
        return None, None
    sides = [parse_input(i) for i in adder.input]
    if (False, producer.name, 0) not in sides or sides[0] == sides[1]:
        return None, None
    constant = const_behind_identity(nodes, adder.input[1 if sides[0] == (False, producer.name, 0) else 0])
    if constant is None:
        return None, None
    values = np.asarray(const_value(constant))
    if values.dtype != np.float32 or values.ndim > 4 or values.size != channels or values.shape[-1] != channels:
        return None, None
    return adder, values.reshape(-1)


def _pad_amounts(pad: node_def_pb2.NodeDef, nodes: dict) -> tuple[list[int] | None, str]:
    """The padding_list of a zero Pad of an NHWC tensor in H and W only, or why it has none."""
    if attr_type(pad) != FLOAT or control_inputs(pad):
        return None, "it is not a float Pad without control inputs"
    amounts = const_behind_identity(nodes, pad.input[1])
    if amounts is None:
        return None, "its paddings are not a Const"
    amounts = np.asarray(const_value(amounts))
    if amounts.shape != (4, 2) or amounts[0].any() or amounts[3].any() or (amounts < 0).any():
        return None, f"paddings {amounts.tolist()} (only height and width, not negative)"
    if pad.op == "PadV2":
        value = const_behind_identity(nodes, pad.input[2])
        if value is None or np.asarray(const_value(value)).reshape(-1).tolist() != [0.0]:
            return None, "it pads with a value other than 0"
    return [0, 0, *(int(v) for v in amounts[1]), *(int(v) for v in amounts[2]), 0, 0], ""


def _relu_range(relu: node_def_pb2.NodeDef, found: Range) -> Range | str:
    top = min(found[1], RELU6_TOP) if relu.op == "Relu6" else found[1]
    if top <= 0.0:
        return f"its calibrated output never exceeds 0 ('{relu.name}': {list(found)})"
    return 0.0, top


def _signed_range(name: str, found: Range) -> Range | str:
    low, high = min(found[0], 0.0), found[1]
    if high <= low:
        return f"its calibrated output is always 0 ('{name}')"
    return low, high


def _match(node, nodes: dict, consumers: dict, ranges: _Ranges, minimum_dim: int, allow_sum: bool = True,
           notes: list | None = None) -> _Conv | str:
    """The layer that starts at conv ``node``, or why it stays float. ``notes`` collects why a
    residual add or a Pad next to an int8 layer stays float."""
    notes = [] if notes is None else notes
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
    adder, bias = _bias_after(node, nodes, consumers, channels_out)
    if adder is None:
        return "no bias add after it (its output range is calibrated there)"
    chain, bias = [adder], bias.astype(np.float64)
    while True:
        more, values_more = _bias_after(chain[-1], nodes, consumers, channels_out)
        if more is None:
            break
        chain.append(more)
        bias = bias + values_more
    if node.name not in ranges.ranges:
        return f"ranges_file has no input range for it ('{node.name}')"
    input_range = tuple(ranges.ranges[node.name])
    if input_range[1] <= input_range[0]:
        return f"its calibrated input range {list(input_range)} is empty"
    if input_range[0] < 0.0 and node.attr["padding"].s == b"SAME" and values.shape[:2] != (1, 1):
        # The kernel takes only min_input >= 0, so signed inputs are shifted by -min and the
        # shift's effect moved into the bias; zero padding would be shifted too.
        return "its input can be negative and SAME padding would shift the padded zeros"
    if input_range[0] < 0.0 and depthwise:
        return "its input can be negative (the depthwise kernel's bias cannot take the shift)"
    layer = _Conv(node, chain[-1], [node.name] + [n.name for n in chain], values, bias, node.input[0],
                  input_range, (0.0, 0.0), False)

    is_control, source, port = parse_input(node.input[0])
    pad = nodes.get(source) if not is_control and port == 0 else None
    if pad is not None and pad.op in PAD_OPS:
        padding_list, why = _pad_amounts(pad, nodes)
        if node.attr["padding"].s != b"VALID":
            why = "the conv after it pads too (SAME)"
        elif padding_list is not None and input_range[0] < 0.0:
            # The kernel pads with code 0, which is 0.0 only when the range starts at 0.
            why = f"its input can be negative (calibrated {list(input_range)}): code 0 is not 0.0"
        if padding_list is not None and not why:
            layer.padding_list, layer.input = padding_list, pad.input[0]
            if len(consumers.get(pad.name, [])) == 1:
                layer.absorbed.insert(0, pad.name)
        else:
            notes.append(f"keeps its Pad '{pad.name}' float: {why}")

    last = chain[-1]
    residual = _only_reader(last.name, consumers, RESIDUAL_OPS) if allow_sum and not depthwise else None
    if residual is not None and len(residual.input) == 2:
        sides = [parse_input(i) for i in residual.input]
        other = residual.input[1] if sides[0] == (False, last.name, 0) else residual.input[0]
        if parse_input(other)[0] or (False, last.name, 0) not in sides or sides[0] == sides[1]:
            residual = None
        elif const_behind_identity(nodes, other) is not None:
            residual = None
    else:
        residual = None
    if residual is not None:
        summand_range = ranges.bounded(parse_input(other)[1])
        relu = _only_reader(residual.name, consumers, RELU_OPS)
        found = ranges.exact(relu.name) if relu is not None else None
        if summand_range is None:
            notes.append(f"keeps its residual add '{residual.name}' float: no calibrated range for '{other}'")
        elif relu is not None and found is not None:
            output = _relu_range(relu, found)
            if isinstance(output, str):
                return output
            return dataclasses.replace(layer, end=relu, absorbed=[*layer.absorbed, residual.name, relu.name],
                                       output_range=output, has_relu=True, summand=other,
                                       summand_range=summand_range)
        elif (found := ranges.exact(residual.name)) is not None:
            output = _signed_range(residual.name, found)
            if isinstance(output, str):
                return output
            return dataclasses.replace(layer, end=residual, absorbed=[*layer.absorbed, residual.name],
                                       output_range=output, summand=other, summand_range=summand_range)
        else:
            notes.append(f"keeps its residual add '{residual.name}' float: no calibrated range for its output")
    relu = _only_reader(last.name, consumers, RELU_OPS)
    if relu is not None and parse_input(relu.input[0]) == (False, last.name, 0):
        found = ranges.exact(relu.name)
        if found is not None:
            output = _relu_range(relu, found)
            if isinstance(output, str):
                return output
            return dataclasses.replace(layer, end=relu, absorbed=[*layer.absorbed, relu.name], output_range=output,
                                       has_relu=True)
    found = ranges.bounded(last.name)
    if found is None:
        missing = relu.name if relu is not None else last.name
        return f"ranges_file has no output range for it ('{missing}')"
    if relu is not None:
        notes.append(f"keeps its {relu.op} '{relu.name}' float: no calibrated range for its output")
    output = _signed_range(last.name, found)
    if isinstance(output, str):
        return output
    return dataclasses.replace(layer, output_range=output)


def _chain(layers: dict[str, _Conv]) -> None:
    """A layer whose input or summand is another layer's output takes the codes as they are,
    unless its kernel would pad codes that do not start at 0.0."""
    by_end = {layer.end.name: layer for layer in layers.values()}
    for layer in layers.values():
        layer.quantized_input = layer.quantized_summand = None
        is_control, name, port = parse_input(layer.input)
        producer = by_end.get(name) if not is_control and port == 0 else None
        if producer is not None and (producer.output_range[0] == 0.0 or not (layer.zero_padded or layer.depthwise)):
            layer.quantized_input = producer
        if layer.summand is not None:
            is_control, name, port = parse_input(layer.summand)
            layer.quantized_summand = by_end.get(name) if not is_control and port == 0 else None


def _pads_as_same(graph_def: graph_pb2.GraphDef, layers: dict[str, _Conv]) -> None:
    """Mark the depthwise layers whose folded Pad is exactly SAME padding for their input's static
    size (Keras' ZeroPadding2D before MobileNetV2's stride-2 depthwise convs is built to be): no
    Pad to run at all. Needs the graph's static shapes, so only when such a layer exists."""
    padded = [layer for layer in layers.values() if layer.depthwise and layer.padding_list is not None]
    if not padded:
        return
    import tensorflow as tf

    graph = tf.Graph()
    try:
        with graph.as_default():
            tf.graph_util.import_graph_def(graph_def, name="")
    except (ValueError, tf.errors.OpError):
        return  # no static shapes: the Pads of codes stay
    for layer in padded:
        shape = graph.get_tensor_by_name(canonical_input_name(layer.conv.input[0])).op.inputs[0].shape
        if shape.rank != 4:
            continue
        same, strides = [], list(layer.conv.attr["strides"].list.i)[1:3]
        for size, kernel, stride in zip(shape[1:3], layer.filter.shape[:2], strides):
            if size is None:
                break
            total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
            same += [total // 2, total - total // 2]
        layer.same_padding = same == layer.padding_list[2:6]


def _input_low(layer: _Conv) -> float:
    """What code 0 of the layer's input means: below 0.0 when a signed input is shifted."""
    if layer.quantized_input is not None:
        return layer.quantized_input.output_range[0]
    return min(layer.input_range[0], 0.0)


def _weight_codes(layer: _Conv) -> tuple[np.ndarray, np.ndarray]:
    """The filter's codes and per-channel bounds; a shifted input's codes sit around 128, so its
    conv takes the weight levels the kernels without VNNI do not saturate on (along the input
    channels: :func:`int16_safe_levels`)."""
    axis = 2 if layer.depthwise else 3
    levels = 127 if layer.depthwise or _input_low(layer) >= 0.0 else int16_safe_levels(layer.filter, 2, axis)
    return quantize_weights_symmetric(layer.filter, axis=axis, levels=levels)


def _layer_nodes(layer: _Conv) -> list[node_def_pb2.NodeDef]:
    """The fused op (``fused_name``), its Consts and the QuantizeV2 of any float input."""
    conv, device, prefix = layer.conv, layer.conv.device, f"{layer.end.name}/{SUFFIX}"
    codes, bounds = _weight_codes(layer)
    nodes = [
        content_const(f"{prefix}/filter", codes, QINT8),
        content_const(f"{prefix}/filter_min", (-bounds).astype(np.float32), FLOAT),
        content_const(f"{prefix}/filter_max", bounds.astype(np.float32), FLOAT),
    ]
    bias = layer.bias.astype(np.float64)

    def quantize(what: str, source: str, low: float, high: float) -> list[str]:
        """QuantizeV2 of a float tensor over [low, high]; the kernel is told [0, high - low]."""
        name = f"{prefix}/{what}"
        nodes.extend([float_scalar(f"{name}_min", low), float_scalar(f"{name}_max", high),
                      make_node("QuantizeV2", name, [source, f"{name}_min", f"{name}_max"],
                                {"T": QUINT8, "mode": "MIN_FIRST"}),
                      float_scalar(f"{name}_span", high - low)])
        if not any(n.name == f"{prefix}/zero" for n in nodes):
            nodes.append(float_scalar(f"{prefix}/zero", 0.0))
        return [f"{name}:0", f"{prefix}/zero", f"{name}_span"]

    # Every input's codes c mean low + c * step; the kernel reads c * step, so the bias absorbs
    # low * (the summed decoded filter) per output channel for the input (exact: no zero codes are
    # padded into a shifted input, _match and _chain see to it), and low for the summand.
    if layer.quantized_input is not None:
        source = layer.quantized_input.fused_name
        inputs, input_low = [f"{source}:0", f"{source}:1", f"{source}:2"], layer.quantized_input.output_range[0]
    else:
        input_low, high = min(layer.input_range[0], 0.0), layer.input_range[1]
        inputs = quantize("quantize", layer.input, input_low, high)
    if input_low < 0.0:
        decoded = codes.astype(np.float64) * (bounds / 127.0)
        bias = bias + input_low * decoded.sum(axis=(0, 1, 2))
    summand = []
    if layer.summand is not None:
        if layer.quantized_summand is not None:
            source = layer.quantized_summand.fused_name
            summand = [f"{source}:0", f"{source}:1", f"{source}:2"]
            summand_low = layer.quantized_summand.output_range[0]
        else:
            summand_low, high = min(layer.summand_range[0], 0.0), layer.summand_range[1]
            summand = quantize("quantize_summand", layer.summand, summand_low, high)
        bias = bias + summand_low
    # Without a ReLU the output's minimum goes into the bias: the ReLU kernel then clips at it.
    low, high = layer.output_range
    bias = bias - low
    if layer.padding_list is not None and layer.depthwise and not layer.same_padding:
        # The depthwise op's shape function ignores padding_list (static shape too small; graphs
        # with small maps fail to import), so its codes are padded (code 0 is 0.0): as uint8,
        # because TensorFlow's quint8 Pad is 10x slower (measured: 104 ms against 9 ms on
        # [16, 112, 112, 96]).
        amounts = np.asarray(layer.padding_list, np.int32).reshape(4, 2)
        codes_node = make_node("Bitcast", f"{prefix}/codes", [inputs[0]], {"T": QUINT8})
        codes_node.attr["type"].type = UINT8
        padded = make_node("Bitcast", f"{prefix}/padded", [f"{prefix}/pad"], {"T": UINT8})
        padded.attr["type"].type = QUINT8
        nodes += [codes_node, content_const(f"{prefix}/paddings", amounts, INT32),
                  make_node("Pad", f"{prefix}/pad", [f"{prefix}/codes", f"{prefix}/paddings"],
                            {"T": UINT8, "Tpaddings": INT32}), padded]
        inputs = [f"{prefix}/padded", *inputs[1:]]
    nodes.append(content_const(f"{prefix}/bias", bias.astype(np.float32), FLOAT))
    nodes += [float_scalar(f"{prefix}/output_min", 0.0), float_scalar(f"{prefix}/output_max", high - low)]
    fused = make_node(
        SUM_OP if summand else FUSED_OPS[conv.op],
        layer.fused_name,
        [inputs[0], f"{prefix}/filter", f"{prefix}/bias", inputs[1], inputs[2], f"{prefix}/filter_min",
         f"{prefix}/filter_max", f"{prefix}/output_min", f"{prefix}/output_max", *summand],
        {},
        device=device,
    )
    types = {"Tinput": QUINT8, "Tfilter": QINT8, "Tbias": FLOAT, "out_type": QUINT8}
    if summand:
        types["Tsummand"] = QUINT8
    for key, dtype in types.items():
        fused.attr[key].type = dtype
    fused.attr["strides"].CopyFrom(conv.attr["strides"])
    if layer.same_padding:
        fused.attr["padding"].s = b"SAME"
    elif layer.padding_list is not None:
        fused.attr["padding"].s = b"VALID"
        if not layer.depthwise:
            fused.attr["padding_list"].list.i.extend(layer.padding_list)
    else:
        fused.attr["padding"].CopyFrom(conv.attr["padding"])
    fused.attr["dilations"].list.i.extend([1, 1, 1, 1])
    for node in nodes:
        node.device = device
    return [*nodes, fused]


def _float_output(layer: _Conv) -> list[node_def_pb2.NodeDef]:
    """A Dequantize named like the replaced node, for the readers that want floats."""
    source, prefix = layer.fused_name, f"{layer.end.name}/{SUFFIX}"
    low, high = layer.output_range
    if low == 0.0:
        return [make_node("Dequantize", layer.end.name, [f"{source}:0", f"{source}:1", f"{source}:2"],
                          {"T": QUINT8, "mode": "MIN_FIRST"}, device=layer.conv.device)]
    nodes = [float_scalar(f"{prefix}/float_min", low), float_scalar(f"{prefix}/float_max", high)]
    nodes.append(make_node("Dequantize", layer.end.name, [f"{source}:0", f"{prefix}/float_min", f"{prefix}/float_max"],
                           {"T": QUINT8, "mode": "MIN_FIRST"}))
    for node in nodes:
        node.device = layer.conv.device
    return nodes


def _candidates(graph_def: graph_pb2.GraphDef, ranges: dict, minimum_dim: int) -> dict[str, _Conv]:
    """Every conv layer the kernels take with these ranges; one log line for each that stays float
    and for each residual add or Pad beside an int8 layer that stays float."""
    nodes, consumers = node_map(graph_def), consumers_map(graph_def)
    known = _Ranges(ranges, nodes, consumers)
    layers: dict[str, _Conv] = {}
    notes: dict[str, list[str]] = {}
    for node in graph_def.node:
        if node.op not in CONV_OPS:
            continue
        notes[node.name] = []
        match = _match(node, nodes, consumers, known, minimum_dim, notes=notes[node.name])
        if isinstance(match, str):
            log.info("quantize_convs: %s '%s' stays float: %s", node.op, node.name, match)
        else:
            layers[node.name] = match
    # Both sides of a residual add can be conv layers (ResNet's projection shortcut, MobileNetV2's
    # adds after a block without one): the later conv takes the add, the other ends before it.
    claimed: dict[str, str] = {}
    for name, layer in layers.items():
        if layer.summand is not None:
            add = layer.absorbed[-2] if layer.has_relu else layer.end.name
            if add in claimed:
                earlier = claimed[add]
                notes[earlier] = []
                layers[earlier] = _match(nodes[earlier], nodes, consumers, known, minimum_dim, allow_sum=False,
                                         notes=notes[earlier])
            claimed[add] = name
    for name, layer in layers.items():
        if isinstance(layer, str):
            log.info("quantize_convs: %s '%s' stays float: %s", nodes[name].op, name, layer)
    for name, lines in notes.items():
        if name in layers and not isinstance(layers[name], str):
            layer = layers[name]
            channels = layer.filter.shape[2 if layer.depthwise else 3]
            found = None if layer.has_relu else find_activation(layer.end.name, nodes, consumers, channels)
            if found is not None and found.kind != "Relu":
                # Measured on TF 2.21 (docs/differences/int8_fusions.md): _FusedQuantizedConv2D and
                # the depthwise one take Relu alone as an activation, and have no float output.
                layer.activation = found
                cheaper = float_form(float_prelu(found, layer.end.name, ""))
                lines.append(f"ends in a Dequantize (int8 compute, float output): its {found.kind} "
                             f"'{found.end.name}' stays float{cheaper} (the int8 conv kernels of this TensorFlow "
                             "fuse only Relu)")
            for line in dict.fromkeys(lines):
                log.info("quantize_convs: %s '%s' %s", nodes[name].op, name, line)
    return {name: layer for name, layer in layers.items() if not isinstance(layer, str)}


def layer_probes(graph_def: graph_pb2.GraphDef, ranges: dict, minimum_dim: int = 16) -> list[LayerProbe]:
    """What calibration measures for each conv layer this transform would take with ``ranges``:
    the float input of the conv, the float output of its last node and the int8 layer's answer
    as the fused kernel computes it (input through 8 bits over its range, per-channel filter codes,
    float bias, the summand through 8 bits over its range, ReLU, 8-bit output range).

    A residual layer needs its summand too, and a probe is handed one tensor: the layer that
    provides the summand's values (the layer whose output it is, as int8, or one that reads it,
    as float) is probed first, on the same rows, and hands them over. A residual layer without
    such a provider gets no probe (no error, so the guard does not judge it; logged)."""
    import tensorflow as tf

    layers = _candidates(graph_def, ranges, minimum_dim)
    _chain(layers)
    order = list(layers.values())
    position = {layer.conv.name: index for index, layer in enumerate(order)}
    inputs = {layer.conv.name: canonical_input_name(layer.conv.input[0]) for layer in order}
    outputs = {layer.conv.name: f"{layer.end.name}:0" for layer in order}
    handed: dict[str, np.ndarray] = {}
    hands_input: dict[str, list[str]] = {}
    hands_output: dict[str, list[str]] = {}
    providers: dict[str, str] = {}
    for layer in order:
        if layer.summand is None:
            continue
        tensor = canonical_input_name(layer.summand)
        # Only layers that get a probe themselves can hand values over.
        earlier = [other for other in order if position[other.conv.name] < position[layer.conv.name]
                   and (other.summand is None or other.conv.name in providers)]
        by_output = [o.conv.name for o in earlier if outputs[o.conv.name] == tensor]
        by_input = [o.conv.name for o in earlier if inputs[o.conv.name] == tensor]
        if by_output:
            hands_output.setdefault(by_output[0], []).append(tensor)
        elif by_input:
            hands_input.setdefault(by_input[0], []).append(tensor)
        else:
            log.info("quantize_convs: calibration cannot measure '%s' (no earlier layer reads or writes its "
                     "summand '%s')", layer.conv.name, tensor)
            continue
        providers[layer.conv.name] = tensor

    probes = []
    for layer in order:
        name = layer.conv.name
        if layer.summand is not None and name not in providers:
            continue
        codes, bounds = _weight_codes(layer)
        scale = (bounds / 127.0).reshape((1, 1, -1, 1) if layer.depthwise else (1, 1, 1, -1))
        decoded = tf.constant((codes.astype(np.float64) * scale).astype(np.float32))
        strides = list(layer.conv.attr["strides"].list.i)
        padding = layer.conv.attr["padding"].s.decode()
        if layer.quantized_input is not None:
            input_low, input_high = layer.quantized_input.output_range
        else:
            input_low, input_high = min(layer.input_range[0], 0.0), layer.input_range[1]

        def int8_output(x: np.ndarray, layer=layer, name=name, decoded=decoded, strides=strides, padding=padding,
                        input_low=input_low, input_high=input_high) -> np.ndarray:
            for tensor in hands_input.get(name, []):
                handed[tensor] = x
            # The folded Pad's zeros are code 0 of an input range starting at 0: exact, so the
            # probe quantises the padded float tensor.
            quantized = tf.constant(fake_quantize(x, input_low, input_high))
            if layer.depthwise:
                y = tf.nn.depthwise_conv2d(quantized, decoded, strides, padding)
            else:
                y = tf.nn.conv2d(quantized, decoded, strides, padding)
            y = y.numpy().astype(np.float64) + layer.bias
            if layer.summand is not None:
                summand = handed.get(providers[name])
                if summand is None or summand.shape[0] != x.shape[0]:
                    raise TransformError(f"quantize_convs: calibration did not hand '{name}' its summand "
                                         f"'{providers[name]}' for this batch")
                if layer.quantized_summand is not None:
                    low, high = layer.quantized_summand.output_range
                else:
                    low, high = min(layer.summand_range[0], 0.0), layer.summand_range[1]
                y = y + fake_quantize(summand, low, high)
            if layer.has_relu:
                y = np.maximum(y, 0.0)
            result = fake_quantize(y.astype(np.float32), *layer.output_range)
            for tensor in hands_output.get(name, []):
                handed[tensor] = result
            return result

        probes.append(LayerProbe(name, inputs[name], outputs[name], int8_output))
    return probes


@register(
    "quantize_convs",
    params={
        "ranges_file": "(required unless calibrated by the caller: conv input ranges, bias add / ReLU / residual "
                       "add output ranges)",
        "minimum_dim": "16",
        "max_layer_error": f"{DEFAULT_MAX_LAYER_ERROR:g} (with calibration: a layer over it stays float)",
        "keep_float": "(none; repeatable: conv names that stay float)",
    },
    lossy=True,
)
def quantize_convs(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Run float conv layers in int8 with calibrated ranges, float in and float out, 8-bit codes
    between int8 layers.

    Matches: Conv2D or DepthwiseConv2dNative (T float, NHWC, SAME or VALID, not dilated,
    channel multiplier 1, no control inputs) of (any | Pad of any, Const filter, possibly behind
    Identity), read only by a chain of BiasAdd | Add | AddV2 of float Consts [] | [1] | [C] |
    [1, C], then optionally (Conv2D only) read only by Add | AddV2 of (that, any non-Const
    summand), then optionally read only by Relu or Relu6.
    Produces, for a layer whose last node is ``<n>``: ``<n>/quantize_convs/conv``, one fused
    kernel: QuantizedConv2DWithBiasAndReluAndRequantize or
    QuantizedDepthwiseConv2DWithBiasAndReluAndRequantize, or with a residual add
    QuantizedConv2DWithBiasSumAndReluAndRequantize (quint8 summand); quint8 input, qint8
    ``filter`` with one symmetric range per output channel in ``filter_min``/``filter_max``,
    float ``bias`` (the chain summed), frozen output range [``output_min`` = 0, ``output_max``].
    After a Relu the codes cover [0, the calibrated max] (capped at 6 after a Relu6); without
    one they cover [min, max] of the calibrated output, min <= 0 moved into the bias, so the
    kernel's ReLU clips at the calibrated minimum. The input and the summand are the producing
    layer's codes as they are, else ``quantize`` / ``quantize_summand`` (QuantizeV2 quint8
    MIN_FIRST over the calibrated range; the kernel is told [``zero``, ``..._span``]); a minimum
    below 0 is moved into the bias (times the summed filter for the input). A Pad of zeros in
    height and width before a VALID conv becomes the kernel's ``padding_list`` when the input
    range starts at 0 (the kernel pads code 0); before a depthwise conv it becomes SAME padding
    where that pads the same amounts for the input's static size (Keras' ZeroPadding2D before
    stride-2 convs), else ``pad``, a Pad of the codes (``codes``/``padded``: Bitcasts to uint8
    and back) (the depthwise op's shape function ignores ``padding_list``). When
    anything but an int8 layer reads ``<n>`` (or
    ``<n>`` is a graph output), a Dequantize named ``<n>`` gives it floats (MIN_FIRST, over
    ``float_min``/``float_max`` for codes that do not start at 0). Float filter and bias Consts
    nobody reads any more are removed.
    Ranges: a conv's input range under its name; an output range under the node's own name,
    else the input range of a conv or MatMul reading it, else (a bias chain) the range of the
    first bias add plus the extremes of the later constants (conservative). One file serves
    this transform and quantize_matmuls; names the graph lacks are an error.
    Params: ``ranges_file`` (required unless the caller calibrated): JSON ``{"<name>": [min,
    max]}`` as ``quantize_matmuls.calibrate_ranges`` writes it. ``minimum_dim`` (16): convs
    with fewer input or output channels stay float. ``max_layer_error``, ``keep_float``: the
    calibration guard (layers over the error, or named, stay float).
    Refused (left float, one log line each): the cases above, missing ranges, fewer channels
    than ``minimum_dim``, a signed input under SAME padding with a filter larger than 1x1 or
    into a depthwise conv (the shift would move the padded zeros). Kept float beside an int8
    layer, one log line each: a residual add without a calibrated summand or output range
    (ResNet's last block, whose ReLU only a Mean reads), a Pad of a possibly negative input or
    before a SAME conv. Where a residual add's two sides are both conv layers, the later conv
    takes it. The int8 conv kernels of TF 2.21 fuse no activation but Relu and have no float
    output (docs/differences/int8_fusions.md): a layer followed by any other activation the
    matcher names (_activations.py) ends in its Dequantize with the activation float, a
    per-channel PReLU rewritten as ``<p>`` = Maximum of (y, ``<p>/scaled`` = Mul of (y,
    ``<p>/alpha``)) (Minimum when every alpha >= 1), two ops for Keras' five, and one with a
    single alpha a LeakyRelu ``<p>``. One log line per
    int8 layer says what it became. Running it again changes nothing more.
    Differs from the old tool: the old tool has no int8 convs of this kind.
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
    _pads_as_same(graph_def, layers)
    outputs = {parse_input(name)[1] for name in context.output_names}
    removed = {name for layer in layers.values() for name in layer.absorbed}
    # Tensors some accepted layer still reads as floats (through its QuantizeV2).
    read_as_float = {parse_input(layer.input)[1] for layer in layers.values() if layer.quantized_input is None}
    read_as_float |= {parse_input(layer.summand)[1] for layer in layers.values()
                      if layer.summand is not None and layer.quantized_summand is None}
    replaced: dict[str, list[node_def_pb2.NodeDef]] = {}
    for layer in layers.values():
        new_nodes = _layer_nodes(layer)
        name = layer.end.name
        float_readers = [reader for reader in consumers.get(name, []) if reader.name not in removed]
        if float_readers or name in outputs or name in read_as_float:
            new_nodes += _float_output(layer)
        kernel = next(node.op for node in new_nodes if node.name == layer.fused_name)
        fused = f"its {layer.end.op} fused" if layer.has_relu else "codes over the calibrated output range"
        floats = "; a Dequantize for float readers" if new_nodes[-1].op == "Dequantize" else ""
        log.info("quantize_convs: int8 layer '%s' (%s) becomes %s (%s%s)", layer.conv.name, layer.conv.op, kernel,
                 fused, floats)
        replaced[name] = new_nodes
    for layer in layers.values():
        # A per-channel PReLU left float costs most of such a network's time: two ops for five.
        cheaper = float_prelu(layer.activation, layer.end.name, layer.conv.device) if layer.activation else None
        if cheaper is not None and layer.activation.end.name not in removed:
            replaced[layer.activation.end.name] = cheaper
            removed |= set(layer.activation.nodes) - {layer.activation.end.name}
    if not int8_kernels_available():
        log.warning("quantize_convs: the int8 conv kernels do not run in this process (oneDNN off: set "
                    "TF_ENABLE_ONEDNN_OPTS=1; or not an x86 oneDNN build); the rewritten graph only runs where "
                    "oneDNN is on")
    return splice_layers(graph_def, replaced, removed, context.output_names)
