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

import logging

import numpy as np
from tensorflow.core.framework import graph_pb2

from ..calibration import DEFAULT_MAX_LAYER_ERROR, LayerProbe, fake_quantize
from ..context import TransformContext
from ..errors import TransformError
from ..graph_utils import canonical_input_name
from ..registry import register
from ._conv_layers import FUSED_OPS, SUFFIX, SUM_OP, _candidates, _chain
from ._conv_nodes import _weight_codes, emit_convs
from ._int8_driver import Int8Transform, run_int8_transform

log = logging.getLogger(__name__)
# For the callers that import them from here.
__all__ = ["FUSED_OPS", "SUFFIX", "SUM_OP", "layer_probes", "quantize_convs"]

TRANSFORM = Int8Transform(
    "quantize_convs",
    log,
    match=lambda graph_def, ranges, minimum_dim: _candidates(graph_def, ranges, minimum_dim).values(),
    emit=emit_convs,
    kernel_warning="the int8 conv kernels do not run in this process (oneDNN off: set TF_ENABLE_ONEDNN_OPTS=1; "
                   "or not an x86 oneDNN build); the rewritten graph only runs where oneDNN is on",
    needs_calibration="needs ranges_file (conv ranges are calibrated, not measured per batch)",
)


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
    summand), then optionally read only by Relu or Relu6. A DepthwiseConv2dNative read only by
    a conv with a calibrated input range (SeparableConv2D's depthwise half) needs no bias add: its
    bias is zero and its output range is that conv's input range.
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
    return run_int8_transform(TRANSFORM, graph_def, context, minimum_dim)
