"""quantize_convs' matcher: which Conv2D and DepthwiseConv2dNative layers (with their bias chain,
residual add, ReLU and zero Pad) the int8 kernels take with the calibrated ranges, why the others
stay float, and how layers pass codes to each other."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2

from ..graph_utils import (
    canonical_input_name,
    const_value,
    consumers_map,
    control_inputs,
    node_map,
    parse_input,
)
from ._activations import Activation, find_activation, float_form, float_prelu
from ._int8 import (
    BIAS_OPS,
    CONV_OPS,
    FLOAT,
    RELU_OPS,
    attr_type,
    bias_of,
    const_behind_identity,
    float_weights,
)

# The transform's own logger: its log lines name quantize_convs, whichever module writes them.
log = logging.getLogger(f"{__package__}.quantize_convs")
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
    float_activation: Activation | None = None  # one no conv kernel fuses, after the Dequantize

    @property
    def node(self) -> node_def_pb2.NodeDef:
        return self.conv

    @property
    def float_producer(self) -> str:
        return self.end.name

    @property
    def device(self) -> str:
        return self.conv.device

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


def _separable_pointwise(node: node_def_pb2.NodeDef, consumers: dict, ranges: _Ranges) -> bool:
    """Whether ``node``'s only reader is a conv with a calibrated input range (the pointwise half of
    a SeparableConv2D), so that ``node``'s output range is known without a bias add."""
    readers = consumers.get(node.name, [])
    return (len(readers) == 1 and readers[0].op in CONV_OPS and readers[0].name in ranges.ranges
            and parse_input(readers[0].input[0]) == (False, node.name, 0) and not control_inputs(readers[0]))


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
    if adder is None and not (depthwise and _separable_pointwise(node, consumers, ranges)):
        return "no bias add after it (its output range is calibrated there)"
    # A SeparableConv2D's depthwise half has no bias of its own: a zero bias, and its output range
    # is the pointwise conv's calibrated input range.
    chain, bias = ([adder], bias.astype(np.float64)) if adder is not None else ([], np.zeros(channels_out))
    while chain:
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
    end = chain[-1] if chain else node
    layer = _Conv(node, end, [node.name] + [n.name for n in chain], values, bias, node.input[0], input_range,
                  (0.0, 0.0), False)

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

    last = end
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
                layer.float_activation = found
                cheaper = float_form(float_prelu(found, layer.end.name, ""))
                lines.append(f"ends in a Dequantize (int8 compute, float output): its {found.kind} "
                             f"'{found.end.name}' stays float{cheaper} (the int8 conv kernels of this TensorFlow "
                             "fuse only Relu)")
            for line in dict.fromkeys(lines):
                log.info("quantize_convs: %s '%s' %s", nodes[name].op, name, line)
    return {name: layer for name, layer in layers.items() if not isinstance(layer, str)}
