"""quantize_matmuls' emitter: the nodes an int8 MatMul layer becomes (weight codes, the quantize
step or the codes it is handed, the compensated bias, the fused kernel and the Reshape back), and
which activation after it the kernel applies."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2

from ..context import TransformContext
from ..graph_utils import consumers_map, make_node, node_map, parse_input
from ._activations import ACTIVATIONS, find_activation, float_form, float_prelu
from ._int8 import (
    FLOAT,
    INT32,
    QINT8,
    QUINT8,
    float_scalar,
    int16_safe_levels,
    min_first_output_range,
    quantize_weights_symmetric,
)
from ._matmul_layers import SUFFIX, _chain, _Layer, _share_quantize, log
from .weights import content_const

QUANTIZED_OP = "QuantizedMatMulWithBiasAndDequantize"
CHAINED_OP = "QuantizedMatMulWithBiasAndReluAndRequantize"
# The kernel that applies an activation other than Relu before its float output: fused_ops
# [BiasAdd, <post-op>, Dequantize], the post-ops of _activations.ACTIVATIONS (measured on TF 2.21:
# docs/differences/int8_fusions.md).
ACTIVATION_OP = "_QuantizedMatMul"


@dataclasses.dataclass(frozen=True)
class MatmulOptions:
    """quantize_matmuls' own params, checked."""

    minimum_dim: int
    chain_max_weights: int
    quantize_kernel: str


def _weight_levels(layer: _Layer) -> int:
    """All 127 weight levels for a ReLU's output; a shifted signed input's codes sit around 128,
    so fewer where the kernels without VNNI would saturate (:func:`int16_safe_levels`)."""
    return 127 if layer.non_negative else int16_safe_levels(layer.weights, reduce_axis=0)


def _tensorflow_quantize(layer: _Layer) -> bool:
    """Whether the layer's own QuantizeV2 (or the one it shares) runs on TensorFlow's kernel: with
    ``quantize_kernel=tensorflow``, for an input that is never negative or has a calibrated range
    (a per-batch minimum would need MIN_FIRST's run-time shift)."""
    return (layer.quantize_kernel == "tensorflow" and layer.quantized_input is None
            and (layer.non_negative or layer.input_range is not None))


def _layer_nodes(layer: _Layer) -> list[node_def_pb2.NodeDef]:
    """The fused op (named ``layer.output_name``, or ``<output_name>/quantize_matmuls/matmul``
    when a Reshape named ``output_name`` restores the output's shape), and the nodes it reads."""
    name, device = layer.output_name, layer.matmul.device
    prefix = f"{name}/{SUFFIX}"
    fused_name = name if layer.output_shape is None else f"{prefix}/matmul"
    tensorflow_kernel = _tensorflow_quantize(layer)
    codes, bound = quantize_weights_symmetric(layer.weights, levels=_weight_levels(layer))
    nodes = [
        content_const(f"{prefix}/weights", codes, QINT8),
        float_scalar(f"{prefix}/weights_min", -bound),
        float_scalar(f"{prefix}/weights_max", bound),
    ]
    activations, input_range = layer.activations, layer.input_range
    if layer.flatten:
        # The kernel is 2-D: every leading axis becomes a row, the contracted axes one K axis.
        nodes.append(content_const(f"{prefix}/flat_shape", np.array([-1, layer.weights.shape[0]], np.int32), INT32))
        nodes.append(make_node("Reshape", f"{prefix}/flat", [activations, f"{prefix}/flat_shape"],
                               {"T": QUINT8 if layer.quantized_input is not None else FLOAT, "Tshape": INT32}))
    if layer.quantized_input is not None:
        quantized, min_a, max_a = layer.quantized_input
        if layer.flatten:
            quantized = f"{prefix}/flat:0"
    elif layer.shared_quantize is not None:
        nodes = [node for node in nodes if not node.name.startswith(f"{prefix}/flat")]
        quantize = f"{layer.shared_quantize}/quantize"
        quantized, min_a, max_a = f"{quantize}:0", f"{quantize}:1", f"{quantize}:2"
    else:
        if layer.flatten:
            activations = f"{prefix}/flat"
        if tensorflow_kernel and not layer.non_negative:
            # Shifted by the calibrated minimum (as MIN_FIRST would) so that SCALED's [0, max] holds it.
            low, high = min_first_output_range(*input_range)
            nodes += [float_scalar(f"{prefix}/input_shift", low),
                      make_node("Sub", f"{prefix}/shifted", [activations, f"{prefix}/input_shift"], {"T": FLOAT}),
                      float_scalar(f"{prefix}/input_min", 0.0),
                      float_scalar(f"{prefix}/input_max", np.float32(high) - np.float32(low))]
            activations = f"{prefix}/shifted"
        elif input_range is not None:
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
        # Codes in [0, max] either way on TensorFlow's kernel (the input is >= 0 or shifted).
        mode = {"mode": "SCALED", "round_mode": "HALF_AWAY_FROM_ZERO"} if tensorflow_kernel else {"mode": "MIN_FIRST"}
        nodes.append(make_node("QuantizeV2", quantize,
                               [activations, f"{prefix}/input_min", f"{prefix}/input_max"], {"T": QUINT8, **mode}))
        quantized, min_a, max_a = f"{quantize}:0", f"{quantize}:1", f"{quantize}:2"
    if layer.non_negative:
        bias_input = f"{prefix}/bias"
        nodes.append(content_const(bias_input, layer.bias, FLOAT))
    else:
        # The kernel mis-handles a negative min_a (errors of ~1e5 measured, MIN_FIRST and SCALED
        # alike), so it is told the codes cover [0, max - min], i.e. it computes (x - min) @ W,
        # and min * column sums of the decoded weights go into the bias.
        decoded = codes.astype(np.float64) * (bound / 127.0)
        column_sums = decoded.sum(axis=0).astype(np.float32)
        bias_input = f"{prefix}/bias_compensated"
        if layer.quantized_input is None and input_range is not None:
            # A calibrated range: QuantizeV2 reports the same min and max at every call, so the
            # compensated bias and the span are Consts, the same float32 values the run-time ops
            # below compute (three small ops per layer fewer: ~0.1 ms of an encoder at batch 1).
            low, high = min_first_output_range(*input_range)
            compensated = layer.bias.astype(np.float32) + np.float32(low) * column_sums
            nodes.append(content_const(bias_input, compensated, FLOAT))
            if not tensorflow_kernel:
                nodes.append(float_scalar(f"{prefix}/input_span", np.float32(high) - np.float32(low)))
        else:
            nodes += [
                content_const(f"{prefix}/bias", layer.bias, FLOAT),
                content_const(f"{prefix}/column_sums", column_sums, FLOAT),
                make_node("Mul", f"{prefix}/bias_shift", [min_a, f"{prefix}/column_sums"], {"T": FLOAT}),
                make_node("AddV2", bias_input, [f"{prefix}/bias", f"{prefix}/bias_shift"], {"T": FLOAT}),
                make_node("Sub", f"{prefix}/input_span", [max_a, min_a], {"T": FLOAT}),
            ]
        # On TensorFlow's kernel the codes are of x - low over [0, QuantizeV2's max] already, so the
        # fused op reads QuantizeV2's own range; MIN_FIRST's codes are told [0, span].
        if not tensorflow_kernel:
            nodes.append(float_scalar(f"{prefix}/zero", 0.0))
            min_a, max_a = f"{prefix}/zero", f"{prefix}/input_span"
    if layer.activation is not None:
        bias_is_const = any(node.name == bias_input and node.op == "Const" for node in nodes)
        nodes.append(_activation_op(layer, fused_name, [quantized, f"{prefix}/weights", bias_input],
                                    [min_a, max_a, f"{prefix}/weights_min", f"{prefix}/weights_max"],
                                    bias_is_const, device))
        for node in nodes:
            node.device = device
        return nodes
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
        fused_name,
        [quantized, f"{prefix}/weights", bias_input, min_a, max_a,
         f"{prefix}/weights_min", f"{prefix}/weights_max", *output_range],
        # The kernel always sees [0, max] here, where SCALED and MIN_FIRST read the codes alike;
        # MIN_FIRST would recompute K x N weight column sums on one thread at every call (oneDNN v3
        # kernel), 1.2-1.7 ms of a 784 x 1024 layer's 2.2 ms at batch 1 to 64 on AVX-512.
        {"T1": QUINT8, "T2": QINT8, "Toutput": output_type, "input_quant_mode": "SCALED"},
        device=device,
    )
    fused.attr["Tbias"].type = FLOAT
    nodes.append(fused)
    if isinstance(layer.output_shape, tuple):
        # The einsum's output shape at run time: the activations' leading axes, then the weights'.
        source = layer.activations
        nodes += [
            make_node("Shape", f"{prefix}/input_shape", [source],
                      {"T": QUINT8 if layer.quantized_input is not None else FLOAT, "out_type": INT32}),
            content_const(f"{prefix}/leading_begin", np.array([0], np.int32), INT32),
            content_const(f"{prefix}/leading_end", np.array([-layer.contracted], np.int32), INT32),
            content_const(f"{prefix}/leading_strides", np.array([1], np.int32), INT32),
            make_node("StridedSlice", f"{prefix}/leading_shape",
                      [f"{prefix}/input_shape", f"{prefix}/leading_begin", f"{prefix}/leading_end",
                       f"{prefix}/leading_strides"],
                      {"T": INT32, "begin_mask": 1, "end_mask": 0, "ellipsis_mask": 0, "new_axis_mask": 0,
                       "shrink_axis_mask": 0}),
            content_const(f"{prefix}/output_dims", np.array(layer.out_dims, np.int32), INT32),
            content_const(f"{prefix}/concat_axis", np.array(0, np.int32), INT32),
            make_node("ConcatV2", f"{prefix}/output_shape",
                      [f"{prefix}/leading_shape", f"{prefix}/output_dims", f"{prefix}/concat_axis"],
                      {"T": INT32, "Tidx": INT32, "N": 2}),
        ]
        nodes[-4].attr["Index"].type = INT32  # not one of make_node's dtype attrs
        shape_input = f"{prefix}/output_shape"
    else:
        shape_input = layer.output_shape
    if shape_input is not None:
        nodes.append(make_node("Reshape", name, [fused_name, shape_input],
                               {"T": output_type, "Tshape": INT32}))
    for node in nodes:
        node.device = device
    return nodes


def _activation_op(layer: _Layer, name: str, device_inputs: list[str], host_inputs: list[str],
                   bias_is_const: bool, device: str) -> node_def_pb2.NodeDef:
    """The _QuantizedMatMul that applies ``layer.activation`` before its float output: the same
    codes, weights, bias and ranges as QUANTIZED_OP, fused_ops [BiasAdd, <post-op>, Dequantize]."""
    activation = layer.activation
    fused = make_node(ACTIVATION_OP, name, [*device_inputs, *host_inputs],
                      {"T1": QUINT8, "T2": QINT8, "input_quant_mode": "SCALED", "output_quant_mode": "SCALED"},
                      device=device)
    for key, dtype in (("Tbias", FLOAT), ("Tout", FLOAT), ("U", FLOAT)):
        fused.attr[key].type = dtype
    fused.attr["Tdevice_inputs"].list.type.extend([QUINT8, QINT8, FLOAT])
    fused.attr["Thost_inputs"].list.type.extend([FLOAT] * len(host_inputs))
    fused.attr["Tdevice_outputs"].list.type.append(FLOAT)
    fused.attr["Thost_outputs"].list.SetInParent()
    fused.attr["fused_ops"].list.s.extend(
        [b"BiasAdd", ACTIVATIONS[activation.kind].matmul_post_op.encode(), b"Dequantize"])
    # A bias computed per call (per-batch ranges) must not be cached by the kernel.
    fused.attr["is_bias_const"].b = bias_is_const
    if activation.kind == "LeakyRelu":
        fused.attr["leakyrelu_alpha"].f = float(activation.alpha)
    return fused


def _fuse_activation(layer: _Layer, nodes: dict, consumers: dict, outputs: set[str]) -> str:
    """Let the kernel apply the activation after ``layer`` where ACTIVATION_OP takes it; returns
    what became of the activation, for the layer's log line. A Relu keeps its path (a float Relu,
    or the chain), so the graphs of ReLU networks stay as they were."""
    if layer.requantize_max is not None:
        return "chained: its Relu runs in the kernel and the next layer reads its quint8 codes"
    if layer.output_shape is not None:
        return "its output reshaped after the kernel; nothing after it is fused"
    found = find_activation(layer.last.name, nodes, consumers, int(layer.weights.shape[1]), outputs)
    if found is None:
        return "float output; no activation after it"
    if found.kind == "Relu":
        return f"float output; its Relu '{found.end.name}' stays a float op"
    post_op = ACTIVATIONS[found.kind].matmul_post_op
    if post_op is None:
        layer.float_activation = found
        cheaper = float_form(float_prelu(found, layer.output_name, ""))
        return (f"int8 compute, float output; its {found.kind} '{found.end.name}' stays float{cheaper}: no int8 "
                "MatMul kernel of this TensorFlow fuses it")
    layer.activation = found
    layer.absorbed += tuple(name for name in found.nodes if name != found.end.name)
    if layer.output_name not in layer.absorbed:
        layer.absorbed += (layer.output_name,)
    layer.output_name = found.end.name
    alpha = f", leakyrelu_alpha {found.alpha:g}" if found.kind == "LeakyRelu" else ""
    return f"fused_ops [BiasAdd, {post_op}, Dequantize]{alpha}: the kernel applies its {found.kind} '{found.end.name}'"



def emit_matmuls(graph_def: graph_pb2.GraphDef, layers: dict[str, _Layer], context: TransformContext,
                 options: MatmulOptions) -> tuple[dict[str, list[node_def_pb2.NodeDef]], set[str]]:
    """The accepted layers chained, their activations fused where the kernel takes them, sharing
    one quantize step where they can, and their nodes; one log line each."""
    for layer in layers.values():
        layer.quantize_kernel = options.quantize_kernel
    consumers = consumers_map(graph_def)
    _chain(layers, consumers, context.output_names, options.chain_max_weights)
    nodes = node_map(graph_def)
    outputs = {parse_input(name)[1] for name in context.output_names}
    for layer in layers.values():
        note = _fuse_activation(layer, nodes, consumers, outputs)
        op = ACTIVATION_OP if layer.activation else CHAINED_OP if layer.requantize_max is not None else QUANTIZED_OP
        log.info("quantize_matmuls: int8 layer '%s' (%s) becomes %s (%s)", layer.matmul.name, layer.matmul.op, op, note)
    _share_quantize(layers.values())
    # Each layer's nodes go where the node it ends in was; the nodes it absorbs go.
    replaced = {layer.output_name: _layer_nodes(layer) for layer in layers.values()}
    for name in (name for layer in layers.values() for name in layer.shape_readers):
        # The codes have the Relu's shape: its Shape readers need only their input type changed.
        reader = copy.deepcopy(nodes[name])
        reader.attr["T"].type = QUINT8
        replaced[name] = [reader]
    removed = {name for layer in layers.values() for name in layer.absorbed}
    return replaced, removed
