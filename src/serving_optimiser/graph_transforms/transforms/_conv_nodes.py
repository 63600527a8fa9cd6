"""quantize_convs' emitter: the nodes an int8 conv layer becomes (filter codes, the quantize steps
of float inputs, the bias with every shift folded in, the fused kernel, a Pad of codes) and the
Dequantize its float readers get."""

from __future__ import annotations

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2

from ..context import TransformContext
from ..graph_utils import consumers_map, make_node, parse_input
from ._conv_layers import FUSED_OPS, SUFFIX, SUM_OP, _chain, _Conv, _pads_as_same, log
from ._int8 import (
    FLOAT,
    INT32,
    QINT8,
    QUINT8,
    float_scalar,
    int16_safe_levels,
    quantize_weights_symmetric,
)
from .weights import content_const

UINT8 = types_pb2.DT_UINT8


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



def emit_convs(graph_def: graph_pb2.GraphDef, layers: dict[str, _Conv], context: TransformContext,
               _minimum_dim: int) -> tuple[dict[str, list[node_def_pb2.NodeDef]], set[str]]:
    """The accepted layers joined (codes passed on, Pads as SAME) and their nodes, with a
    Dequantize where anything but an int8 layer reads a layer's output; one log line each."""
    _chain(layers)
    _pads_as_same(graph_def, layers)
    consumers = consumers_map(graph_def)
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
    return replaced, removed
