"""quantize_nodes: float ops become their eight-bit Quantized* versions between QuantizeV2 and
Dequantize nodes.

The node names and stages follow the C++ tool, so graphs and logs made for it still fit. This
module holds the op table, the transform and its op rewrite (stage 4); the stages around it are
in _eightbit.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2

from ..context import TransformContext
from ..errors import TransformError
from ..graph_utils import (
    NodeMatch,
    OpTypePattern,
    arg_types,
    find_invalid_inputs,
    lookup_op_def,
    make_node,
    parse_input,
    replace_matching_op_types,
)
from ..registry import get_transform, register
from ._const_builders import content_const, float_scalar
from ._eightbit import (
    FLOAT,
    INT32,
    QINT32,
    QUINT8,
    dequantize_node,
    fake_quants_to_requantize,
    hoist_fake_quants,
    merge_adjacent_requantizes,
    node_attr,
    quantize_placeholders,
    remove_redundant_quantizations,
    three_outputs,
)


@dataclass(frozen=True)
class QuantizedOpInfo:
    """How a float op maps to its eight-bit version (the C++ QuantizedOpInfo table)."""

    float_op: str
    quantized_op: str
    attrs_to_copy: tuple[str, ...]
    dtypes_to_set: tuple[tuple[str, int], ...]
    # True: the op outputs qint32 and needs a RequantizationRange + Requantize down to quint8.
    output_32_bit: bool
    unquantized_inputs: frozenset[int] = field(default_factory=frozenset)
    # Ranges as [min0, max0, min1, max1] (contiguous) or [min0, min1, max0, max1] (Concat).
    separate_min_max: bool = False
    # Attrs the C++ tool dropped, copied here only when they differ from the float op's default.
    extra_attrs: tuple[str, ...] = ()


_BINARY_TYPES = (("T1", QUINT8), ("T2", QUINT8), ("Toutput", QINT32))
_CONV_TYPES = (("Tinput", QUINT8), ("Tfilter", QUINT8), ("out_type", QINT32))
_POOL_ATTRS = ("ksize", "strides", "padding")

# Conv2DBackpropInput is missing: its QuantizedConv2DTranspose is not registered in TF 2.21,
# so the C++ tool's output for it cannot even be loaded; such nodes stay float.
QUANTIZED_OPS: dict[str, QuantizedOpInfo] = {
    info.float_op: info
    for info in (
        QuantizedOpInfo("Add", "QuantizedAdd", (), _BINARY_TYPES, True),
        # TF 2 writes AddV2 where TF 1 wrote Add; QuantizedAdd computes the same sum.
        QuantizedOpInfo("AddV2", "QuantizedAdd", (), _BINARY_TYPES, True),
        QuantizedOpInfo("AvgPool", "QuantizedAvgPool", _POOL_ATTRS, (("T", QUINT8),), False),
        QuantizedOpInfo(
            "BiasAdd", "QuantizedBiasAdd", (), (("T1", QUINT8), ("T2", QUINT8), ("out_type", QINT32)), True
        ),
        QuantizedOpInfo("Concat", "QuantizedConcat", ("N",), (("T", QUINT8),), False, frozenset({0}), True),
        QuantizedOpInfo("Conv2D", "QuantizedConv2D", ("strides", "padding"), _CONV_TYPES, True),
        QuantizedOpInfo("MatMul", "QuantizedMatMul", ("transpose_a", "transpose_b"), _BINARY_TYPES, True),
        QuantizedOpInfo("MaxPool", "QuantizedMaxPool", _POOL_ATTRS, (("T", QUINT8),), False),
        QuantizedOpInfo("Mul", "QuantizedMul", (), _BINARY_TYPES, True),
        QuantizedOpInfo("Relu", "QuantizedRelu", (), (("Tinput", QUINT8),), False),
        # half_pixel_centers is kept too (the C++ tool dropped it, changing TF 2 results).
        QuantizedOpInfo(
            "ResizeBilinear", "QuantizedResizeBilinear", ("align_corners",), (("T", QUINT8),), False,
            frozenset({1}), extra_attrs=("half_pixel_centers",),
        ),
        QuantizedOpInfo("Relu6", "QuantizedRelu6", (), (("Tinput", QUINT8),), False),
        # Tshape is kept so int64 shapes still type-check (the C++ tool left the int32 default).
        QuantizedOpInfo(
            "Reshape", "QuantizedReshape", (), (("T", QUINT8),), False, frozenset({1}), extra_attrs=("Tshape",)
        ),
    )
}


def _float_param_pair(context: TransformContext, min_name: str, max_name: str) -> tuple[float, float] | None:
    has_min, has_max = context.has(min_name), context.has(max_name)
    if not (has_min or has_max):
        return None
    if not (has_min and has_max):
        raise TransformError(f"quantize_nodes: you must pass both {min_name} and {max_name}")
    return context.get_float(min_name, 0.0), context.get_float(max_name, 0.0)


def _check_valid(graph_def: graph_pb2.GraphDef, stage: str) -> graph_pb2.GraphDef:
    invalid = find_invalid_inputs(graph_def)
    if invalid:
        node, input_string = invalid[0]
        raise TransformError(f"quantize_nodes: {stage} left node '{node}' reading missing '{input_string}'")
    return graph_def


@register(
    "quantize_nodes",
    params={
        "input_min": "(none; with input_max)", "input_max": "(none)", "fallback_min": "(none; with fallback_max)",
        "fallback_max": "(none)", "ignore_op": "(repeatable)",
        "keep_float": "(none; repeatable: node names left float)",
    },
    lossy=True,
)
def quantize_nodes(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Replace float ops by their eight-bit Quantized* versions, in the C++ tool's seven stages.

    1. With ``input_min``/``input_max``: every float Placeholder ``<p>`` becomes quint8, read
       through Consts ``<p>_eightbit/min``, ``<p>_eightbit/max`` and a Dequantize
       ``<p>_eightbit/dequantize`` (MIN_FIRST) that its former readers now use.
    2. FakeQuantWithMinMaxVars of (L0 of L1 ... of Ld, Const, Const), d = 3, 2, 1, where the
       Li are one-input Relu|Relu6|MaxPool|AvgPool|Identity read only inside the chain, is
       hoisted: ``<fq>_hoisted`` reads Ld, L(d-1) reads it, and L0 takes the name ``<fq>``.
    3. FakeQuantWithMinMaxVars of (any, Const, Const) becomes QuantizeV2
       ``<fq>_eightbit/quantize`` (qint32), Requantize ``<fq>_eightbit/requantize`` to the
       Consts' range and a Dequantize named ``<fq>``.
    4. Each node whose op is Add, AddV2, AvgPool, BiasAdd, Concat, Conv2D, MatMul, MaxPool,
       Mul, Relu, Relu6, ResizeBilinear or Reshape (minus ``ignore_op``), with float inputs
       and outputs: for each quantised input ``s``, with P = ``<node>_eightbit/<s with ^ as
       __hat__ and :k as __port__k>``, Consts ``P/reshape_dims`` and ``P/reduction_dims``,
       Reshape ``P/reshape``, Min ``P/min``, Max ``P/max`` and QuantizeV2 ``P/quantize``;
       the op ``<node>/eightbit`` (Quantized<Op>); for ops with 32-bit output a
       RequantizationRange ``<node>/eightbit/requant_range`` (or, with ``fallback_min``/
       ``fallback_max``, Consts ``<node>/eightbit/fallback_min|max``) and a Requantize
       ``<node>/eightbit/requantize``; and a Dequantize named ``<node>``.
    5. Requantize of (QuantizeV2 of (Dequantize of (Requantize of (*, *, *,
       RequantizationRange, RequantizationRange)), Const, Const)) reads the inner op directly.
    6. merge_duplicate_nodes.
    7. References to QuantizeV2 of (Dequantize, Min, Max) outputs go to the Dequantize's
       inputs, so adjacent eight-bit ops talk in eight bits. Dead helpers stay: follow with
       strip_unused_nodes.
    Params: ``input_min``/``input_max``, ``fallback_min``/``fallback_max`` (floats, both or
    neither), ``ignore_op`` (repeatable op type to leave float; ``Add`` also covers AddV2),
    ``keep_float`` (repeatable node names left float: how the guard sends a node back).
    Differs from the C++ tool: AddV2 is quantised like Add; nodes with control inputs (which
    upstream mistook for data inputs), Conv2DBackpropInput, Conv2D with dilations, NCHW or
    explicit padding, and NCHW BiasAdd/pools stay float; only float Placeholders are
    quantised; FakeQuants are hoisted only through range-preserving ops; ``keep_float`` is new; ResizeBilinear keeps
    half_pixel_centers and Reshape its Tshape; stage 7 leaves a Dequantize with a per-channel
    ``axis`` or another T than the QuantizeV2's in place; an op read twice (``Mul(x, x)``)
    gets one quantised input chain.
    """
    ignored = set(context.get_list("ignore_op"))
    if "Add" in ignored:
        ignored.add("AddV2")
    input_range = _float_param_pair(context, "input_min", "input_max")
    fallback_range = _float_param_pair(context, "fallback_min", "fallback_max")
    op_infos = {op: info for op, info in QUANTIZED_OPS.items() if op not in ignored}

    current = _check_valid(quantize_placeholders(graph_def, input_range), "placeholder quantisation")
    current = _check_valid(hoist_fake_quants(current), "FakeQuant hoisting")
    current = _check_valid(fake_quants_to_requantize(current), "FakeQuant conversion")
    if op_infos:
        keep_float = frozenset(context.get_list("keep_float"))
        current = _check_valid(quantize_ops(current, op_infos, fallback_range, keep_float), "op quantisation")
    current = _check_valid(merge_adjacent_requantizes(current), "Requantize merging")
    merge = get_transform("merge_duplicate_nodes").function
    current = _check_valid(
        merge(current, TransformContext("merge_duplicate_nodes", context.input_names, context.output_names)),
        "duplicate merging",
    )
    return _check_valid(remove_redundant_quantizations(current, context.output_names), "conversion removal")


# ---------------------------------------------------------------------------------------------
# Stage 4: the op rewrite
# ---------------------------------------------------------------------------------------------


def _arg_types(node: node_def_pb2.NodeDef, op_def, args) -> list[int] | None:
    """Dtypes of a node's input or output args; None when an attr needed to know them is missing."""
    try:
        return [dtype for _, types in arg_types(node, op_def, args) for dtype in types]
    except TransformError:
        return None


def _stays_float(node: node_def_pb2.NodeDef, info: QuantizedOpInfo) -> bool:
    """Whether a matched node must be left alone (see the quantize_nodes docstring)."""
    if any(i.startswith("^") for i in node.input):
        return True
    op_def = lookup_op_def(node.op)
    input_types = _arg_types(node, op_def, op_def.input_arg)
    output_types = _arg_types(node, op_def, op_def.output_arg)
    if input_types is None or output_types is None or len(input_types) != len(node.input):
        return True
    if any(t != FLOAT for i, t in enumerate(input_types) if i not in info.unquantized_inputs):
        return True
    if any(t != FLOAT for t in output_types):
        return True
    # The quantized kernels know only NHWC, unit dilations and SAME/VALID padding.
    if node_attr(node, "data_format").s not in (b"", b"NHWC"):
        return True
    if node.op == "Conv2D":
        dilations = list(node_attr(node, "dilations").list.i)
        if any(d != 1 for d in dilations) or node_attr(node, "padding").s == b"EXPLICIT":
            return True
    return False


def _unique_input_name(input_string: str) -> str:
    is_control, name, _ = parse_input(input_string)
    _, sep, tail = input_string.rpartition(":")
    port_suffix = f"__port__{tail}" if sep and tail.isdigit() else ""
    return f"{'__hat__' if is_control else ''}{name}{port_suffix}"


def _quantize_input_nodes(prefix: str, input_string: str) -> list[node_def_pb2.NodeDef]:
    """Reshape to 1-D, Min and Max over it, and QuantizeV2 with that range (P/quantize)."""
    reshape_dims = content_const(f"{prefix}/reshape_dims", np.array([-1], np.int32), INT32)
    reduction_dims = content_const(f"{prefix}/reduction_dims", np.array([0], np.int32), INT32)
    for const in (reshape_dims, reduction_dims):
        const.input.append(f"^{input_string}")
    reshape = make_node("Reshape", f"{prefix}/reshape", [input_string, reshape_dims.name], {"T": FLOAT})
    reducers = [
        make_node(op, f"{prefix}/{op.lower()}", [reshape.name, reduction_dims.name],
                  {"T": FLOAT, "keep_dims": False})
        for op in ("Min", "Max")
    ]
    quantize = make_node(
        "QuantizeV2", f"{prefix}/quantize", [input_string, reducers[0].name, reducers[1].name],
        {"T": QUINT8, "mode": "MIN_FIRST"},
    )
    return [reshape_dims, reduction_dims, reshape, *reducers, quantize]


def quantize_ops(graph_def, op_infos: dict[str, QuantizedOpInfo], fallback_range,
                 keep_float: frozenset[str] = frozenset()) -> graph_pb2.GraphDef:
    """Stage 4: each listed float op becomes QuantizeV2s -> Quantized<Op> [-> Requantize] -> Dequantize
    (nodes named in ``keep_float`` stay float)."""

    def quantize(match: NodeMatch, _inputs: set[str], _outputs: set[str]) -> list:
        float_node = match.node
        info = op_infos[float_node.op]
        if float_node.name in keep_float or _stays_float(float_node, info):
            return [float_node]
        prefix = f"{float_node.name}_eightbit"
        new_nodes: list[node_def_pb2.NodeDef] = []
        quantized_inputs: dict[str, str] = {}  # input string -> its QuantizeV2, one per input
        main_inputs = []
        for index, input_string in enumerate(float_node.input):
            if index in info.unquantized_inputs:
                main_inputs.append(input_string)
                continue
            if input_string not in quantized_inputs:
                chain = _quantize_input_nodes(f"{prefix}/{_unique_input_name(input_string)}", input_string)
                new_nodes.extend(chain)
                quantized_inputs[input_string] = chain[-1].name
            main_inputs.append(f"{quantized_inputs[input_string]}:0")
        quantized_names = [
            quantized_inputs[s] for i, s in enumerate(float_node.input) if i not in info.unquantized_inputs
        ]
        if info.separate_min_max:
            main_inputs += [f"{q}:1" for q in quantized_names] + [f"{q}:2" for q in quantized_names]
        else:
            main_inputs += [f"{q}:{port}" for q in quantized_names for port in (1, 2)]
        main = make_node(info.quantized_op, f"{float_node.name}/eightbit", main_inputs)
        for key in info.attrs_to_copy:
            if key in float_node.attr:
                main.attr[key].CopyFrom(float_node.attr[key])
        defaults = {attr.name: attr.default_value for attr in lookup_op_def(float_node.op).attr}
        for key in info.extra_attrs:
            if key in float_node.attr and float_node.attr[key] != defaults.get(key):
                main.attr[key].CopyFrom(float_node.attr[key])
        for key, dtype in info.dtypes_to_set:
            main.attr[key].type = dtype
        new_nodes.append(main)
        eight_bit = main.name
        if info.output_32_bit:
            if fallback_range is not None:
                range_nodes = [float_scalar(f"{main.name}/fallback_min", fallback_range[0]),
                               float_scalar(f"{main.name}/fallback_max", fallback_range[1])]
                range_inputs = [range_nodes[0].name, range_nodes[1].name]
            else:
                range_nodes = [make_node("RequantizationRange", f"{main.name}/requant_range",
                                         three_outputs(main.name), {"Tinput": QINT32})]
                range_inputs = [f"{main.name}/requant_range:0", f"{main.name}/requant_range:1"]
            requantize = make_node("Requantize", f"{main.name}/requantize",
                                   [*three_outputs(main.name), *range_inputs],
                                   {"Tinput": QINT32, "out_type": QUINT8})
            new_nodes += [*range_nodes, requantize]
            eight_bit = requantize.name
        new_nodes.append(dequantize_node(float_node.name, eight_bit))
        return new_nodes

    return replace_matching_op_types(graph_def, OpTypePattern("|".join(op_infos)), quantize)[0]
