"""quantize_matmuls' matcher: which MatMul, BatchMatMul and Einsum layers the int8 kernel takes
(with their weights, bias and shape plumbing), why the others stay float, and how calibrated
layers chain and share their quantize step."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2

from ..graph_utils import (
    const_value,
    consumers_map,
    control_inputs,
    lowered_control_flow_nodes,
    node_map,
    parse_input,
)
from ._activations import Activation
from ._int8 import (
    BIAS_OPS,
    FLOAT,
    RELU_OPS,
    attr_type,
    bias_of,
    const_behind_identity,
    float_weights,
)

# The transform's own logger: its log lines name quantize_matmuls, whichever module writes them.
log = logging.getLogger(f"{__package__}.quantize_matmuls")
SUFFIX = "quantize_matmuls"
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

    @property
    def node(self) -> node_def_pb2.NodeDef:
        return self.matmul

    @property
    def float_producer(self) -> str:
        return self.output_name

    @property
    def device(self) -> str:
        return self.matmul.device


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

