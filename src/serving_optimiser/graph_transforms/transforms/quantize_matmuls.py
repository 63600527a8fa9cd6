"""quantize_matmuls (beyond the old tool): float MatMul (+ bias) layers, and the rank-3 forms Keras 3
gives them (tf.tensordot's MatMul between Reshapes, EinsumDense's Einsum or BatchMatMulV2 with Const
weights), run in int8 through the fused oneDNN kernel QuantizedMatMulWithBiasAndDequantize, float in
and float out; with calibrated ranges, consecutive ReLU layers chain through
QuantizedMatMulWithBiasAndReluAndRequantize.

Why this op (measured on TF 2.21, docs/differences/quantize_matmuls.md): it takes quint8
activations and qint8 weights and returns float, so no qint32 tensor ever needs a Dequantize
(which has no kernel for qint32 under oneDNN) and no Cast + Mul pass is paid; the Relu that
follows stays a float op. The MatMul kernels accept only scalar weight ranges, so weights are
quantised per tensor.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterable

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2

from ..calibration import DEFAULT_MAX_LAYER_ERROR, LayerProbe, fake_quantize
from ..context import TransformContext
from ..errors import TransformError
from ..graph_utils import (
    canonical_input_name,
    const_value,
    consumers_map,
    control_inputs,
    lowered_control_flow_nodes,
    make_node,
    node_map,
    parse_input,
)
from ..registry import register
from ._activations import ACTIVATIONS, Activation, find_activation, float_form, float_prelu
from ._int8 import (
    BIAS_OPS,
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
    const_behind_identity,
    float_scalar,
    float_weights,
    guard_params,
    guard_refusal,
    int8_kernels_available,
    int16_safe_levels,
    min_first_output_range,
    quantize_weights_symmetric,
    splice_layers,
)
from .weights import content_const

log = logging.getLogger(__name__)

QUANTIZED_OP = "QuantizedMatMulWithBiasAndDequantize"
CHAINED_OP = "QuantizedMatMulWithBiasAndReluAndRequantize"
# The kernel that applies an activation other than Relu before its float output: fused_ops
# [BiasAdd, <post-op>, Dequantize], the post-ops of _activations.ACTIVATIONS (measured on TF 2.21:
# docs/differences/int8_fusions.md).
ACTIVATION_OP = "_QuantizedMatMul"
SUFFIX = "quantize_matmuls"
# Above this many weights (K x N) a calibrated ReLU layer ends in ...AndDequantize + Relu instead
# of chaining in quint8: TF 2.21's ...AndRequantize kernel costs an extra per call that grows
# faster than K x N past a few hundred KB of weights (one layer alone, 16 rows,
# AVX-512: +0.3 ms at 512 x 512, +0.8 ms at 784 x 1024, +12.8 ms at 2048 x 2048). Whole models
# put the break-even between 512 x 512 (the Iris DNN chained: 1.29 x / 0.30 x float at 1 / 100,000
# rows, unchained 1.68 x / 0.35 x) and 784 x 1024 (a Keras MLP chained: 1.84 x / 1.23 x / 0.73 x
# at 1 / 16 / 64 rows, unchained 0.79 x / 0.65 x / 0.51 x).
DEFAULT_CHAIN_MAX_WEIGHTS = 512 * 512
# Which kernel quantizes a float activation (``quantize_kernel``). oneDNN's QuantizeV2 (MIN_FIRST,
# which TensorFlow hands to oneDNN) builds a new oneDNN primitive at every call: 0.1-0.16 ms at
# 64 x 128 floats. SCALED with round_mode HALF_AWAY_FROM_ZERO is left to TensorFlow's own kernel
# (oneDNN's rewrite takes only HALF_TO_EVEN): 8 us there, no slower up to ~512 K floats per call,
# slower beyond (AVX-512, 2 threads: 0.68 against 0.52 ms at 16384 x 128).
QUANTIZE_KERNELS = ("onednn", "tensorflow")
# For the callers that import them from here (the calibrate stage, the benchmark, the tests).
__all__ = ["CHAINED_OP", "QUANTIZED_OP", "calibrate_ranges", "int8_kernels_available", "layer_probes",
           "quantize_matmuls"]
# Ops whose outputs are never negative: an input read from one needs no run-time minimum.
NON_NEGATIVE_OPS = RELU_OPS


# ---------------------------------------------------------------------------------------------
# Finding the layers
# ---------------------------------------------------------------------------------------------

# Ops that multiply an activation by a weight matrix; all but MatMul first flatten the activation.
LAYER_OPS = ("MatMul", "BatchMatMul", "BatchMatMulV2", "Einsum")


@dataclasses.dataclass
class _Layer:
    """One float layer the kernel takes, and how it joins its neighbours."""

    matmul: node_def_pb2.NodeDef  # the MatMul, BatchMatMul(V2) or Einsum: its name keys ranges and errors
    last: node_def_pb2.NodeDef  # the bias add, else a trailing Reshape, else the matmul: the node replaced
    weights: np.ndarray  # [K, N]
    bias: np.ndarray  # [N]
    input_range: tuple[float, float] | None  # calibrated, else None: per batch
    non_negative: bool
    activations: str = ""  # the tensor multiplied
    flatten: bool = False  # reshape ``activations`` to [-1, K] first
    contracted: int = 1  # how many trailing axes of ``activations`` make up K
    out_dims: tuple[int, ...] = ()  # the trailing axes of the matmul's output, N in all
    # The layer's output is the 2-D product reshaped to this: a shape tensor read from the graph
    # (a trailing Reshape's), or the activations' leading dims + ``out_dims`` (str / tuple);
    # None: the 2-D product is the output.
    output_shape: str | tuple[int, ...] | None = None
    bias_after_reshape: bool = False  # the bias was added after a trailing Reshape
    absorbed: tuple[str, ...] = ()  # nodes the layer replaces (besides ``output_name``)
    source: str = ""  # the node whose values the matmul reads, behind ``front``
    source_input: str = ""
    front: tuple[str, ...] = ()  # a tensordot's identity Transpose and flattening Reshape
    shape_readers: tuple[str, ...] = ()  # Shape ops of the activations, which read codes when chained
    # Set when calibrated layers chain: this layer ends in the Relu ``output_name`` and emits
    # quint8 in [0, requantize_max]; the next layer reads those codes, min and max
    # (``quantized_input``).
    output_name: str = ""
    requantize_max: float | None = None
    quantized_input: tuple[str, str, str] | None = None
    # Another layer's fused-op prefix whose QuantizeV2 of the same activations and range this
    # layer reads (attention's query, key and value projections read one tensor).
    shared_quantize: str | None = None
    quantize_kernel: str = "onednn"  # one of QUANTIZE_KERNELS
    # An activation the kernel applies (ACTIVATION_OP): the layer then ends in its last node.
    activation: Activation | None = None
    float_activation: Activation | None = None  # one no kernel applies, after the float output

    def __post_init__(self) -> None:
        self.output_name = self.output_name or self.last.name
        self.activations = self.activations or self.matmul.input[0]


def _const_int_vector(nodes: dict, input_string: str) -> list[int] | None:
    """The values of an int32/int64 vector known before run time: a Const, or a ConcatV2 of
    Consts along axis 0."""
    node = const_behind_identity(nodes, input_string)
    if node is not None:
        values = np.asarray(const_value(node))
        return [int(v) for v in values.reshape(-1)] if values.dtype.kind == "i" and values.ndim <= 1 else None
    node = nodes.get(parse_input(input_string)[1])
    if node is None or node.op != "ConcatV2" or control_inputs(node) or len(node.input) < 2:
        return None
    if _const_int_vector(nodes, node.input[-1]) != [0]:
        return None
    parts = [_const_int_vector(nodes, i) for i in node.input[:-1]]
    return None if any(p is None for p in parts) else [v for p in parts for v in p]


def _trailing_const_dims(nodes: dict, input_string: str) -> list[int] | None:
    """The trailing entries of a Reshape's shape that are known before run time: the whole
    Const, or the last Const part of a ConcatV2 (a tensordot's [leading dims of x, N])."""
    whole = _const_int_vector(nodes, input_string)
    if whole is not None:
        return whole
    node = nodes.get(parse_input(input_string)[1])
    if node is None or node.op != "ConcatV2" or len(node.input) < 3 or _const_int_vector(nodes, node.input[-1]) != [0]:
        return None
    return _const_int_vector(nodes, node.input[-2])


def _matrix_weights(nodes: dict, input_string: str) -> tuple[np.ndarray | None, str | None, str | None]:
    """(values [K, N], None, the float Reshape to remove or None) for a finite 2-D float Const,
    possibly behind a Reshape to a constant shape (Keras' EinsumDense as BatchMatMulV2), else
    (None, why, None)."""
    values, reason = float_weights(nodes, input_string, rank=2)
    if values is not None:
        return values, None, None
    node = nodes.get(parse_input(input_string)[1])
    while node is not None and node.op == "Identity" and len(node.input) == 1:
        node = nodes.get(parse_input(node.input[0])[1])
    if node is None or node.op != "Reshape" or control_inputs(node):
        return None, reason, None
    source, shape = const_behind_identity(nodes, node.input[0]), _const_int_vector(nodes, node.input[1])
    if source is None or shape is None or len(shape) != 2:
        return None, reason, None
    values, reason = float_weights(nodes, node.input[0], rank=np.ndim(const_value(source)))
    if values is None:
        return None, reason, None
    try:
        return values.reshape(shape), None, node.name
    except ValueError:
        return None, f"its weights '{node.name}' do not reshape to {shape}", None


def _einsum_plan(equation: str, weights_first: bool) -> tuple[int, list[int], int] | str:
    """(contracted axes k, the weight permutation to [contracted..., free...], number of free
    weight axes) when ``equation`` contracts the activation's trailing k axes with k weight axes
    and keeps the free axes in order (activation's, then weight's); else why not."""
    if "..." in equation or "->" not in equation:
        return f"its equation '{equation}' has an ellipsis or no output"
    inputs, out = equation.replace(" ", "").split("->")
    operands = inputs.split(",")
    if len(operands) != 2 or not all(part.isalpha() for part in (*operands, out)):
        return f"its equation '{equation}' is not a product of two operands"
    w_sub, x_sub = operands if weights_first else operands[::-1]
    if any(len(set(part)) != len(part) for part in (x_sub, w_sub, out)):
        return f"its equation '{equation}' repeats a subscript (a trace or diagonal)"
    shared = set(x_sub) & set(w_sub)
    k = len(shared)
    if not shared or shared & set(out) or set(x_sub[-k:]) != shared:
        return (f"its equation '{equation}' is not a contraction of the activation's trailing axes "
                "(a batch axis shared with the weights, or contracted axes that are not last)")
    free_x, free_w = x_sub[:-k], set(w_sub) - shared
    if out[:len(free_x)] != free_x or set(out[len(free_x):]) != free_w or len(out) != len(free_x) + len(free_w):
        return f"its equation '{equation}' reorders or sums the free axes"
    return k, [w_sub.index(c) for c in x_sub[-k:]] + [w_sub.index(c) for c in out[len(free_x):]], len(free_w)


def _front(nodes: dict, consumers: dict, matmul: node_def_pb2.NodeDef) -> tuple[str, tuple[str, ...]]:
    """(the tensor a MatMul's activations come from, the nodes between): through a Reshape that
    only it reads and an identity Transpose that only that reads (tf.tensordot's front)."""
    reshape = nodes.get(parse_input(matmul.input[0])[1])
    if (reshape is None or reshape.op != "Reshape" or parse_input(matmul.input[0])[2] != 0 or control_inputs(reshape)
            or [r.name for r in consumers.get(reshape.name, [])] != [matmul.name]):
        return matmul.input[0], ()
    transpose = nodes.get(parse_input(reshape.input[0])[1])
    if transpose is None or transpose.op != "Transpose" or parse_input(reshape.input[0])[2] != 0:
        return reshape.input[0], (reshape.name,)
    perm = _const_int_vector(nodes, transpose.input[1])
    if (perm is None or perm != list(range(len(perm))) or control_inputs(transpose)
            or [r.name for r in consumers.get(transpose.name, [])] != [reshape.name]):
        return matmul.input[0], ()
    return transpose.input[0], (reshape.name, transpose.name)


def _bias_over(producer: node_def_pb2.NodeDef, nodes: dict, consumers: dict, dims: list[int], rank: int):
    """(bias add, bias [N]) when ``producer``'s only reader adds a Const that broadcasts over its
    trailing ``dims`` (N values) without growing its rank (at least ``rank``)."""
    readers = consumers.get(producer.name, [])
    if len(readers) != 1 or readers[0].op not in BIAS_OPS or control_inputs(readers[0]) or len(readers[0].input) != 2:
        return None, None
    adder = readers[0]
    if attr_type(adder) != FLOAT or (adder.op == "BiasAdd" and adder.attr["data_format"].s not in (b"", b"NHWC")):
        return None, None
    sides = [parse_input(i) for i in adder.input]
    mine = [index for index, (_, name, port) in enumerate(sides) if name == producer.name and port == 0]
    if len(mine) != 1 or (adder.op == "BiasAdd" and mine != [0]):
        return None, None
    bias = const_behind_identity(nodes, adder.input[1 - mine[0]])
    if bias is None:
        return None, None
    values = np.asarray(const_value(bias))
    extra = values.shape[:max(0, values.ndim - len(dims))]
    if values.dtype != np.float32 or values.ndim > max(len(dims), rank) or any(d != 1 for d in extra):
        return None, None
    trailing = values.reshape(values.shape[len(extra):])
    try:
        if np.broadcast_shapes(trailing.shape, tuple(dims)) != tuple(dims):
            return None, None
    except ValueError:
        return None, None
    return adder, np.broadcast_to(trailing, dims).reshape(-1).astype(np.float32)


def _suffix_for(dims: list[int] | None, channels: int) -> list[int] | None:
    """The shortest suffix of ``dims`` holding ``channels`` values: the axes one row of the
    product is reshaped into."""
    if not dims:
        return None
    for start in range(len(dims) - 1, -1, -1):
        suffix = dims[start:]
        if any(d < 1 for d in suffix):
            return None
        if int(np.prod(suffix)) == channels:
            return suffix
        if int(np.prod(suffix)) > channels:
            return None
    return None


def _match(node, nodes: dict, consumers: dict, minimum_dim: int, loop: set[str]):
    """(a _Layer without its range, None) when the kernel takes ``node`` and it pays, else
    (None, why it stays float)."""
    if node.name in loop:
        return None, ("it is inside a while loop (lowered control flow: its weights reach it through the loop's "
                      "Enter and calibration cannot fetch its tensors; left float)")
    if attr_type(node) != FLOAT:
        return None, f"its T is not float (DataType {attr_type(node)})"
    if control_inputs(node):
        return None, "it has control inputs"
    removed_weights = None
    if node.op == "Einsum":
        if len(node.input) != 2:
            return None, "it has more than two operands"
        consts = [const_behind_identity(nodes, i) is not None for i in node.input]
        if not any(consts):
            return None, "neither operand is a Const (a product of two activations: no int8 kernel takes it)"
        w_index = 0 if consts[0] else 1
        equation = node.attr["equation"].s.decode()
        plan = _einsum_plan(equation, weights_first=w_index == 0)
        if isinstance(plan, str):
            return None, plan
        contracted, permutation, _ = plan
        raw = np.asarray(const_value(const_behind_identity(nodes, node.input[w_index])))
        if raw.dtype != np.float32 or raw.ndim != len(permutation):
            return None, f"its weights '{node.input[w_index]}' are not a float Const of rank {len(permutation)}"
        if not np.isfinite(raw).all():
            return None, f"its weights '{node.input[w_index]}' hold inf or NaN"
        arranged = np.transpose(raw, permutation)
        out_dims = tuple(int(d) for d in arranged.shape[contracted:])
        weights = arranged.reshape(int(np.prod(arranged.shape[:contracted])), -1)
        activations, flatten, rank = node.input[1 - w_index], True, len(equation.split("->")[1].strip())
    else:
        transpose_a, transpose_b = ("adj_x", "adj_y") if node.op != "MatMul" else ("transpose_a", "transpose_b")
        if node.attr[transpose_a].b if transpose_a in node.attr else False:
            return None, f"{transpose_a}=true (the int8 kernel is not worth a transpose of the activations)"
        if node.op == "MatMul":
            weights, reason = float_weights(nodes, node.input[1], rank=2)
        else:
            weights, reason, removed_weights = _matrix_weights(nodes, node.input[1])
        if weights is None:
            return None, reason
        if node.attr[transpose_b].b if transpose_b in node.attr else False:
            weights = weights.T
        contracted, out_dims, activations = 1, (int(weights.shape[1]),), node.input[0]
        flatten, rank = node.op != "MatMul", 2
    if min(weights.shape) < minimum_dim:
        return None, (f"its weights are {weights.shape[0]}x{weights.shape[1]}, under minimum_dim={minimum_dim} "
                      "(too few multiply-adds per value moved for int8 to pay)")
    channels = int(weights.shape[1])
    layer = _Layer(node, node, weights, np.zeros(channels, np.float32), None, False, activations=activations,
                   flatten=flatten, contracted=contracted, out_dims=out_dims,
                   output_shape=out_dims if flatten else None,
                   absorbed=(node.name,) + ((removed_weights,) if removed_weights else ()))
    if node.op == "MatMul":
        adder, bias = bias_of(node, nodes, consumers, channels)
    else:
        adder, bias = _bias_over(node, nodes, consumers, list(out_dims), rank)
    if adder is None:
        # A bias added after a Reshape of the product (tf.tensordot, Keras' EinsumDense as
        # BatchMatMulV2): the Reshape only regroups each row's N values, so the bias goes into
        # the fused op and the Reshape reads its output.
        readers = consumers.get(node.name, [])
        reshape = readers[0] if len(readers) == 1 else None
        if (reshape is not None and reshape.op == "Reshape" and not control_inputs(reshape)
                and parse_input(reshape.input[0]) == (False, node.name, 0)):
            suffix = _suffix_for(_trailing_const_dims(nodes, reshape.input[1]), channels)
            if suffix is not None:
                adder, bias = _bias_over(reshape, nodes, consumers, suffix, len(suffix))
            if adder is not None:
                layer.output_shape, layer.bias_after_reshape = reshape.input[1], True
                layer.absorbed += (reshape.name,)
    if adder is not None:
        layer.last, layer.bias = adder, bias
        layer.absorbed += (adder.name,)
        layer.output_name = adder.name
    source_input, layer.front = (_front(nodes, consumers, node) if node.op == "MatMul" else (activations, ()))
    is_control, source, port = parse_input(source_input)
    layer.source, layer.source_input = (source if port == 0 and not is_control else ""), source_input
    return layer, None


def _candidates(graph_def: graph_pb2.GraphDef, minimum_dim: int, ranges: dict) -> list[_Layer]:
    """Every layer the kernel takes, with its calibrated range where ``ranges`` has one; one log
    line for each MatMul, BatchMatMul or Einsum that stays float, including those inside the
    function library, which this transform does not enter."""
    nodes = node_map(graph_def)
    consumers = consumers_map(graph_def)
    loop = lowered_control_flow_nodes(graph_def, conditionals=False)
    layers = []
    for node in graph_def.node:
        if node.op not in LAYER_OPS:
            continue
        layer, reason = _match(node, nodes, consumers, minimum_dim, loop)
        if layer is None:
            log.info("quantize_matmuls: %s '%s' stays float: %s", node.op, node.name, reason)
            continue
        layer.input_range = ranges.get(node.name)
        producer = nodes.get(parse_input(layer.source_input)[1])
        # A calibrated min >= 0 also allows the plain path: QuantizeV2 clips to the range anyway.
        layer.non_negative = (producer is not None and producer.op in NON_NEGATIVE_OPS) or (
            layer.input_range is not None and layer.input_range[0] >= 0.0
        )
        layers.append(layer)
    for function in graph_def.library.function:
        for node in function.node_def:
            if node.op in LAYER_OPS:
                log.info("quantize_matmuls: %s '%s' in function '%s' stays float: the transform does not run "
                         "on function bodies", node.op, node.name, function.signature.name)
    return layers


def layer_probes(graph_def: graph_pb2.GraphDef, ranges: dict, minimum_dim: int = 32) -> list[LayerProbe]:
    """What calibration measures for each layer this transform would take: its float input, its
    float output (the bias add, else the product) and the int8 layer's answer to that input
    (the input through 8 bits over its calibrated range, or the batch's own range without one;
    the weights as :func:`quantize_weights_symmetric` codes them). A bias added after a Reshape
    of the product is left out of both sides (the product is measured before it)."""
    probes = []
    for layer in _candidates(graph_def, minimum_dim, ranges):
        codes, bound = quantize_weights_symmetric(layer.weights, levels=_weight_levels(layer))
        decoded = (codes.astype(np.float64) * (bound / 127.0)).astype(np.float32)
        bias = np.zeros_like(layer.bias) if layer.bias_after_reshape else layer.bias

        def int8_output(x: np.ndarray, layer=layer, decoded=decoded, bias=bias) -> np.ndarray:
            low, high = layer.input_range if layer.input_range is not None else (float(x.min()), float(x.max()))
            low = 0.0 if layer.non_negative else min(low, 0.0)
            rows = fake_quantize(x, low, max(high, low)).reshape(-1, decoded.shape[0])
            return (rows @ decoded + bias).reshape(x.shape[:x.ndim - layer.contracted] + layer.out_dims)

        output = layer.matmul.name if layer.bias_after_reshape else layer.last.name
        probes.append(LayerProbe(layer.matmul.name, canonical_input_name(layer.activations), f"{output}:0",
                                 int8_output))
    return probes


# ---------------------------------------------------------------------------------------------
# The rewrite
# ---------------------------------------------------------------------------------------------


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


def _chain(layers: dict[str, _Layer], consumers: dict, output_names: Iterable[str], max_weights: int) -> None:
    """Join calibrated layers whose Relu feeds only the next calibrated layer (see the docstring):
    directly, through a tensordot's front (an identity Transpose and a Reshape, which go) or an
    einsum's flattening; Shape ops may read the Relu too (they then read the codes, which have
    its shape). A layer with more than ``max_weights`` weights does not chain: TF 2.21's
    ...AndRequantize kernel pays a fixed cost per call that grows with K x N."""
    outputs = {parse_input(name)[1] for name in output_names}
    by_source: dict[str, list[_Layer]] = {}
    for layer in layers.values():
        if layer.source:
            by_source.setdefault(layer.source, []).append(layer)
    for layer in layers.values():
        readers = consumers.get(layer.last.name, [])
        if layer.input_range is None or len(readers) != 1 or layer.weights.size > max_weights:
            continue
        relu = readers[0]
        if relu.op != "Relu" or attr_type(relu) != FLOAT or control_inputs(relu) or relu.name in outputs:
            continue
        if parse_input(relu.input[0])[2] != 0:
            continue
        following = by_source.get(relu.name, [])
        if len(following) != 1 or following[0].quantized_input is not None:
            continue
        following = following[0]
        if following.input_range is None or following.input_range[1] <= 0.0:
            continue
        allowed = {following.matmul.name, *following.front}
        if any(reader.name not in allowed and reader.op != "Shape" for reader in consumers.get(relu.name, [])):
            continue
        following.shape_readers = tuple(r.name for r in consumers.get(relu.name, []) if r.op == "Shape")
        if any(parse_input(i)[1] == relu.name for i in following.matmul.input[1:]):
            continue
        fused = relu.name if layer.output_shape is None else f"{relu.name}/{SUFFIX}/matmul"
        layer.output_name, layer.requantize_max = relu.name, following.input_range[1]
        following.quantized_input = (f"{relu.name}:0", f"{fused}:1", f"{fused}:2")
        if following.front:
            following.activations, following.flatten = following.source_input, True
            following.absorbed += following.front


def _share_quantize(layers: Iterable[_Layer]) -> None:
    """Layers that quantize the same activations over the same range read one QuantizeV2 (and
    one flattening Reshape): the first such layer's. Per-batch ranges are shared too (one Min,
    one Max), since they are computed from the same tensor."""
    owners: dict[tuple, str] = {}
    for layer in layers:
        if layer.quantized_input is not None:
            continue
        key = (layer.activations, layer.flatten, layer.weights.shape[0], layer.non_negative, layer.input_range)
        owner = owners.setdefault(key, f"{layer.output_name}/{SUFFIX}")
        if owner != f"{layer.output_name}/{SUFFIX}":
            layer.shared_quantize = owner


@register(
    "quantize_matmuls",
    params={
        "minimum_dim": "32",
        "chain_max_weights": f"{DEFAULT_CHAIN_MAX_WEIGHTS} (calibrated ReLU layers with more weights do not chain)",
        "ranges_file": "(none: ranges measured per batch at run time)",
        "max_layer_error": f"{DEFAULT_MAX_LAYER_ERROR:g} (with calibration: a layer over it stays float)",
        "keep_float": "(none; repeatable: MatMul, BatchMatMul or Einsum names that stay float)",
        "quantize_kernel": "onednn (or tensorflow: TensorFlow's QuantizeV2, far faster on small tensors)",
    },
    lossy=True,
)
def quantize_matmuls(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Run float MatMul, BatchMatMul and Einsum (+ constant bias) layers as int8 MatMuls, float in and out.

    Matches: MatMul (T float, transpose_a false, no control inputs) of (any, Const [K, N],
    possibly behind Identity), optionally read only by BiasAdd (NHWC) | Add | AddV2 of a float
    Const of shape [], [1], [N] or [1, N]; or read only by a Reshape whose shape ends in known
    dims holding N values (tf.tensordot: Reshape of (MatMul, ConcatV2 of (leading dims, [N])))
    read only by such a bias add, whose Const broadcasts over those dims. BatchMatMul(V2)
    (adj_x false) of (any, Const [K, N], possibly behind a Reshape of a constant shape: Keras'
    EinsumDense on a fixed sequence length), and Einsum of (any, Const) or (Const, any) whose
    equation contracts the activation's trailing axes with weight axes (in any order) and keeps
    the free axes in order, activation's then weight's (``abc,cde->abde``, ``abcd,cde->abe``):
    the same, the activations reshaped to [-1, K], with the bias added after the product or
    after a Reshape of it. A Relu/Relu6 after it stays a float op (the float-output kernel has
    no Relu variant; the qint32 ...AndRelu path measured slower because its output needs a Cast
    and a Mul), except in a calibrated chain (below).
    Produces, for a layer whose last node (the bias add, else the MatMul) is ``<n>``:
    ``<n>`` itself as a QuantizedMatMulWithBiasAndDequantize (quint8 x qint8, float bias and
    output, input_quant_mode SCALED: the kernel always sees [0, max]), so every reader is
    unchanged; ``<n>/quantize_matmuls/``
    ``weights`` (qint8 codes, symmetric range ``weights_min``/``weights_max`` = -a/a, a the
    largest |weight|, transpose_b applied), ``bias`` (zeros without a bias add), ``quantize``
    (QuantizeV2 quint8 MIN_FIRST of the activations), ``input_min``/``input_max``: per batch
    at run time (Max, and Min over ``reduction_dims``) by default, Consts with ``ranges_file``.
    An activation read from a Relu/Relu6 gets min 0 as a Const. Otherwise a negative minimum
    is folded into ``bias_compensated`` (``bias`` + min * ``column_sums``: a Const when the
    range is calibrated, else computed per call via ``bias_shift``) and the kernel sees the range
    [``zero``, ``input_span``] (a Const too when calibrated). Float weight and bias Consts that
    nothing else reads are removed.
    Where the output is not the 2-D product (a bias after a Reshape, a BatchMatMul, an Einsum),
    the fused op is ``<n>/quantize_matmuls/matmul`` and ``<n>`` is a Reshape of it: to the
    absorbed Reshape's own shape tensor, or to ``output_shape`` (ConcatV2 of ``leading_shape``,
    a StridedSlice of ``input_shape`` = Shape of the activations, and ``output_dims``), so any
    batch and sequence length works; ``flat`` (Reshape to ``flat_shape`` [-1, K]) feeds it.
    Layers that multiply the same activations over the same range (attention's query, key and
    value) share the first one's ``flat``, ``quantize`` and range nodes.
    Calibrated chains: when a layer with a calibrated range is read only by a Relu ``<r>``
    (not a graph output) that only the next layer with a calibrated range reads, ``<r>``
    becomes a QuantizedMatMulWithBiasAndReluAndRequantize emitting quint8 in [0, the next
    layer's calibrated max] (``output_min``/``output_max``), and the next layer takes those
    codes as they are: no float tensor, Relu or QuantizeV2 between them (0.31 x float against
    0.38 x per batch on the Iris DNN, 100,000 rows), unless the first layer has more than
    ``chain_max_weights`` weights (K x N, default 262144 = 512 x 512): TF 2.21's ...AndRequantize
    kernel costs an extra per call that outgrows the chain's gain beyond that, so such a layer
    ends in ...AndDequantize and a float Relu (a 784 -> 1024 -> 1024 MLP: 0.65 x float at 16 rows
    unchained, 1.23 x chained).
    The next layer may read the Relu through a
    tensordot's identity Transpose and flattening Reshape (removed) or flatten it itself; Shape
    ops of the Relu then read the codes (quint8, same shape: ``<r>`` is then a Reshape of
    ``<r>/quantize_matmuls/matmul``).
    Params: ``ranges_file`` (none: dynamic ranges): JSON ``{"<MatMul name>": [min, max]}``;
    MatMuls missing from it get dynamic ranges; entries of other nodes (quantize_convs' ranges)
    and of MatMuls that stay float are unused; a name the graph lacks is an error (unless the
    graph holds this transform's ops already).
    Refused (left float, one log line each): MatMuls inside a lowered while loop (between Enter
    and Exit: their weights come through the Enter and calibration cannot fetch per-iteration
    tensors), non-float T, transpose_a/adj_x, control inputs, weights that are not a finite
    float Const, Einsums of two activations (attention scores) or with other equations, and
    weights with fewer than ``minimum_dim`` (32) rows or columns (K and N of the 2-D matrix):
    below that int8 is no faster (measured break-even at 32 for K and for N on 100,000 rows),
    and a narrow input layer reads raw features whose scales differ, which one 8-bit range
    resolves badly (on the Iris DNN its 4x512 layer caused nearly all the flips).
    MatMuls, BatchMatMuls and Einsums inside library functions (kept While/If bodies) get one
    line each too: this transform does not run on function bodies.
    ``quantize_kernel``: which kernel turns a float activation into codes. ``onednn`` (the
    default) as above. ``tensorflow``: ``quantize`` is QuantizeV2 SCALED, round_mode
    HALF_AWAY_FROM_ZERO, which oneDNN's rewrite leaves to TensorFlow's own kernel; a shifted
    input with a calibrated range is first moved to [0, span] by ``shifted`` (Sub of
    ``input_shift``, the calibrated minimum), and the fused op reads QuantizeV2's own output range.
    The same codes up to ties (+-1); oneDNN's MIN_FIRST QuantizeV2 builds a primitive at every call
    (0.1-0.16 ms at 64 x 128 floats) and is faster only past ~512 K floats per call, so
    ``tensorflow`` suits serving batches (an encoder at batch 1: 2.44 -> 1.90 ms, float 1.75 ms).
    Per-batch shifted inputs keep MIN_FIRST (their shift is QuantizeV2's own).
    Activations (_activations.py, one table; docs/differences/int8_fusions.md): when the layer's
    2-D output (not chained) is read only by an activation the kernel applies on this TensorFlow
    (Relu6, LeakyRelu or a PReLU with one alpha, Elu, Sigmoid, Tanh, exact or tanh GELU, in any
    spelling: the matcher runs the elementwise nodes on a grid), the fused op is a
    _QuantizedMatMul with fused_ops [BiasAdd, <post-op>, Dequantize] (``leakyrelu_alpha``) named
    like the activation's last node, whose nodes go. A per-channel PReLU, swish or hard-swish
    stays float after the float output; a per-channel PReLU becomes ``<p>`` = Maximum of (y,
    ``<p>/scaled`` = Mul of (y, ``<p>/alpha``)) (Minimum when every alpha >= 1). A Relu keeps the
    paths above. One log line per int8 layer says what it became and why.
    Running it again changes nothing more.
    """
    minimum_dim = context.get_int("minimum_dim", 32)
    if minimum_dim < 1:
        raise TransformError(f"quantize_matmuls: minimum_dim must be >= 1, got {minimum_dim}")
    chain_max_weights = context.get_int("chain_max_weights", DEFAULT_CHAIN_MAX_WEIGHTS)
    if chain_max_weights < 0:
        raise TransformError(f"quantize_matmuls: chain_max_weights must be >= 0, got {chain_max_weights}")
    quantize_kernel = context.get_string("quantize_kernel", "onednn")
    if quantize_kernel not in QUANTIZE_KERNELS:
        raise TransformError(f"quantize_matmuls: quantize_kernel must be one of {', '.join(QUANTIZE_KERNELS)}, "
                             f"got '{quantize_kernel}'")
    bound, keep_float = guard_params("quantize_matmuls", context)
    calibration = calibration_of("quantize_matmuls", context)
    ranges = dict(calibration.ranges) if calibration is not None else {}
    consumers = consumers_map(graph_def)
    layers: dict[str, _Layer] = {}
    for layer in _candidates(graph_def, minimum_dim, ranges):
        name = layer.matmul.name
        reason = guard_refusal(name, calibration, bound, keep_float)
        if reason is not None:
            log.info("quantize_matmuls: %s '%s' stays float: %s", layer.matmul.op, name, reason)
            continue
        layer.quantize_kernel = quantize_kernel
        layers[name] = layer
        if name not in ranges and ranges:
            log.info("quantize_matmuls: %s '%s' is not in ranges_file; its input range is per batch",
                     layer.matmul.op, name)
    check_range_names("quantize_matmuls", ranges, graph_def)
    if not layers:
        return graph_def
    _chain(layers, consumers, context.output_names, chain_max_weights)
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
    for layer in layers.values():
        # A per-channel PReLU left float: two ops for Keras' five (_activations.float_prelu).
        found = layer.float_activation
        cheaper = float_prelu(found, layer.output_name, layer.matmul.device) if found else None
        if cheaper is not None and found.end.name not in removed and found.end.name not in replaced:
            replaced[found.end.name] = cheaper
            removed |= set(found.nodes) - {found.end.name}
    if not int8_kernels_available():
        log.warning("quantize_matmuls: %s does not run in this process (oneDNN off: set TF_ENABLE_ONEDNN_OPTS=1; "
                    "or not an x86 oneDNN build); the rewritten graph only runs where oneDNN is on", QUANTIZED_OP)
    return splice_layers(graph_def, replaced, removed, context.output_names)
