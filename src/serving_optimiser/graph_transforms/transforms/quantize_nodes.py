"""Eight-bit inference transforms: quantize_nodes (float ops become Quantized* ops between
QuantizeV2 and Dequantize nodes) and freeze_requantization_ranges (logged ranges replace the
run-time RequantizationRange ops).

The node names and stages follow the C++ tool, so graphs and logs made for it still fit.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import numpy as np
from tensorflow.core.framework import attr_value_pb2, graph_pb2, node_def_pb2, types_pb2
from tensorflow.python.framework import op_def_registry

from ..context import TransformContext
from ..errors import TransformError
from ..graph_utils import (
    NodeMatch,
    OpTypePattern,
    data_inputs,
    find_invalid_inputs,
    make_node,
    new_graph_like,
    node_name_from_input,
    parse_input,
    pattern,
    rename_node_inputs,
    replace_matching_op_types,
)
from ..registry import get_transform, register
from .weights import content_const

QUINT8, QINT32 = types_pb2.DT_QUINT8, types_pb2.DT_QINT32
FLOAT, INT32 = types_pb2.DT_FLOAT, types_pb2.DT_INT32


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

# Ops a FakeQuant may be hoisted through: they keep values inside the range the FakeQuant
# records (the C++ tool hoisted through any one-input op, Sigmoid and Softmax included).
HOISTABLE_OPS = ("Relu", "Relu6", "MaxPool", "AvgPool", "Identity")


def _float_param_pair(context: TransformContext, min_name: str, max_name: str) -> tuple[float, float] | None:
    has_min, has_max = context.has(min_name), context.has(max_name)
    if not (has_min or has_max):
        return None
    if not (has_min and has_max):
        raise TransformError(f"quantize_nodes: you must pass both {min_name} and {max_name}")
    return context.get_float(min_name, 0.0), context.get_float(max_name, 0.0)


def _float_scalar(name: str, value: float) -> node_def_pb2.NodeDef:
    return content_const(name, np.float32(value), FLOAT)


def _check_valid(graph_def: graph_pb2.GraphDef, stage: str) -> graph_pb2.GraphDef:
    invalid = find_invalid_inputs(graph_def)
    if invalid:
        node, input_string = invalid[0]
        raise TransformError(f"quantize_nodes: {stage} left node '{node}' reading missing '{input_string}'")
    return graph_def


@register("quantize_nodes", params=("input_min", "input_max", "fallback_min", "fallback_max", "ignore_op"))
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
    neither), ``ignore_op`` (repeatable op type to leave float; ``Add`` also covers AddV2).
    Differs from the C++ tool: AddV2 is quantised like Add; nodes with control inputs (which
    upstream mistook for data inputs), Conv2DBackpropInput, Conv2D with dilations, NCHW or
    explicit padding, and NCHW BiasAdd/pools stay float; only float Placeholders are
    quantised; FakeQuants are hoisted only through range-preserving ops; ResizeBilinear keeps
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
        current = _check_valid(quantize_ops(current, op_infos, fallback_range), "op quantisation")
    current = _check_valid(merge_adjacent_requantizes(current), "Requantize merging")
    merge = get_transform("merge_duplicate_nodes").function
    current = _check_valid(
        merge(current, TransformContext("merge_duplicate_nodes", context.input_names, context.output_names)),
        "duplicate merging",
    )
    return _check_valid(remove_redundant_quantizations(current, context.output_names), "conversion removal")


# ---------------------------------------------------------------------------------------------
# Stage 1: placeholders
# ---------------------------------------------------------------------------------------------


def quantize_placeholders(graph_def: graph_pb2.GraphDef, input_range: tuple[float, float] | None):
    """Stage 1: float Placeholders become quint8, read through ``<p>_eightbit/dequantize``."""
    if input_range is None:
        return graph_def
    renames: dict[str, str] = {}
    nodes = []
    for node in graph_def.node:
        if node.op != "Placeholder" or _attr(node, "dtype").type != FLOAT:
            nodes.append(node)
            continue
        prefix = f"{node.name}_eightbit"
        placeholder = copy.deepcopy(node)
        placeholder.attr["dtype"].type = QUINT8
        dequantize = make_node(
            "Dequantize", f"{prefix}/dequantize", [node.name, f"{prefix}/min", f"{prefix}/max"],
            {"T": QUINT8, "mode": "MIN_FIRST"},
        )
        nodes += [placeholder, _float_scalar(f"{prefix}/min", input_range[0]),
                  _float_scalar(f"{prefix}/max", input_range[1]), dequantize]
        renames[node.name] = dequantize.name
    if not renames:
        return graph_def
    result = new_graph_like(graph_def, nodes)
    for node in result.node:
        for index, input_string in enumerate(node.input):
            is_control, name, port = parse_input(input_string)
            if not is_control and port == 0 and name in renames and node.name != renames[name]:
                node.input[index] = renames[name]
    return result


# ---------------------------------------------------------------------------------------------
# Stages 2 and 3: FakeQuantWithMinMaxVars
# ---------------------------------------------------------------------------------------------


def hoist_fake_quants(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    """Stage 2: move FakeQuants up chains of 3, 2, then 1 range-preserving ops."""
    current = graph_def
    for depth in (3, 2, 1):
        chain = pattern("*")
        for _ in range(depth):
            chain = pattern("|".join(HOISTABLE_OPS), chain)
        fake_quant_pattern = pattern("FakeQuantWithMinMaxVars", chain, pattern("Const"), pattern("Const"))

        def hoist(match: NodeMatch, _inputs: set[str], _outputs: set[str], depth=depth) -> list:
            fake_quant = match.node
            linear, current_match = [], match
            for _ in range(depth + 1):
                current_match = current_match.inputs[0]
                linear.append(copy.deepcopy(current_match.node))
            hoisted = copy.deepcopy(fake_quant)
            hoisted.name = f"{fake_quant.name}_hoisted"
            hoisted.input[0] = linear[-2].input[0]
            linear[-2].input[0] = hoisted.name
            linear[0].name = fake_quant.name
            return [hoisted, match.inputs[1].node, match.inputs[2].node, *linear]

        current, _ = replace_matching_op_types(current, fake_quant_pattern, hoist)
    return current


def fake_quants_to_requantize(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    """Stage 3: FakeQuant -> QuantizeV2 (qint32) -> Requantize to its range -> Dequantize."""

    def convert(match: NodeMatch, _inputs: set[str], _outputs: set[str]) -> list:
        fake_quant = match.node
        original, low, high = (m.node for m in match.inputs)
        prefix = f"{fake_quant.name}_eightbit"
        quantize = make_node(
            "QuantizeV2", f"{prefix}/quantize", [fake_quant.input[0], low.name, high.name],
            {"T": QINT32, "mode": "MIN_FIRST"},
        )
        requantize = make_node(
            "Requantize", f"{prefix}/requantize", [*_three_outputs(quantize.name), low.name, high.name],
            {"Tinput": QINT32, "out_type": QUINT8},
        )
        dequantize = _dequantize(fake_quant.name, requantize.name)
        return [original, low, high, quantize, requantize, dequantize]

    fake_quant_pattern = pattern("FakeQuantWithMinMaxVars", pattern("*"), pattern("Const"), pattern("Const"))
    return replace_matching_op_types(graph_def, fake_quant_pattern, convert)[0]


def _three_outputs(name: str) -> list[str]:
    return [f"{name}:0", f"{name}:1", f"{name}:2"]


def _dequantize(name: str, eight_bit: str) -> node_def_pb2.NodeDef:
    return make_node("Dequantize", name, _three_outputs(eight_bit), {"T": QUINT8, "mode": "MIN_FIRST"})


# ---------------------------------------------------------------------------------------------
# Stage 4: the op rewrite
# ---------------------------------------------------------------------------------------------


def _attr(node: node_def_pb2.NodeDef, key: str) -> attr_value_pb2.AttrValue:
    """An attr's value, or an empty AttrValue (reading ``node.attr[key]`` would add the key)."""
    return node.attr[key] if key in node.attr else attr_value_pb2.AttrValue()


def _arg_types(node: node_def_pb2.NodeDef, op_def, args) -> list[int]:
    """Dtypes of a node's input or output args, resolving type/number attrs (or defaults)."""
    defaults = {attr.name: attr.default_value for attr in op_def.attr}

    def attr(key: str):
        return node.attr[key] if key in node.attr else defaults.get(key, attr_value_pb2.AttrValue())

    types: list[int] = []
    for arg in args:
        if arg.type_list_attr:
            types.extend(attr(arg.type_list_attr).list.type)
            continue
        dtype = arg.type or attr(arg.type_attr).type
        types.extend([dtype] * (attr(arg.number_attr).i if arg.number_attr else 1))
    return types


def _stays_float(node: node_def_pb2.NodeDef, info: QuantizedOpInfo) -> bool:
    """Whether a matched node must be left alone (see the quantize_nodes docstring)."""
    if any(i.startswith("^") for i in node.input):
        return True
    op_def = op_def_registry.get(node.op)
    input_types = _arg_types(node, op_def, op_def.input_arg)
    if len(input_types) != len(node.input):
        return True
    if any(t != FLOAT for i, t in enumerate(input_types) if i not in info.unquantized_inputs):
        return True
    if any(t != FLOAT for t in _arg_types(node, op_def, op_def.output_arg)):
        return True
    # The quantized kernels know only NHWC, unit dilations and SAME/VALID padding.
    if _attr(node, "data_format").s not in (b"", b"NHWC"):
        return True
    if node.op == "Conv2D":
        dilations = list(_attr(node, "dilations").list.i)
        if any(d != 1 for d in dilations) or _attr(node, "padding").s == b"EXPLICIT":
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


def quantize_ops(graph_def, op_infos: dict[str, QuantizedOpInfo], fallback_range) -> graph_pb2.GraphDef:
    """Stage 4: each listed float op becomes QuantizeV2s -> Quantized<Op> [-> Requantize] -> Dequantize."""

    def quantize(match: NodeMatch, _inputs: set[str], _outputs: set[str]) -> list:
        float_node = match.node
        info = op_infos[float_node.op]
        if _stays_float(float_node, info):
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
        defaults = {attr.name: attr.default_value for attr in op_def_registry.get(float_node.op).attr}
        for key in info.extra_attrs:
            if key in float_node.attr and float_node.attr[key] != defaults.get(key):
                main.attr[key].CopyFrom(float_node.attr[key])
        for key, dtype in info.dtypes_to_set:
            main.attr[key].type = dtype
        new_nodes.append(main)
        eight_bit = main.name
        if info.output_32_bit:
            if fallback_range is not None:
                range_nodes = [_float_scalar(f"{main.name}/fallback_min", fallback_range[0]),
                               _float_scalar(f"{main.name}/fallback_max", fallback_range[1])]
                range_inputs = [range_nodes[0].name, range_nodes[1].name]
            else:
                range_nodes = [make_node("RequantizationRange", f"{main.name}/requant_range",
                                         _three_outputs(main.name), {"Tinput": QINT32})]
                range_inputs = [f"{main.name}/requant_range:0", f"{main.name}/requant_range:1"]
            requantize = make_node("Requantize", f"{main.name}/requantize",
                                   [*_three_outputs(main.name), *range_inputs],
                                   {"Tinput": QINT32, "out_type": QUINT8})
            new_nodes += [*range_nodes, requantize]
            eight_bit = requantize.name
        new_nodes.append(_dequantize(float_node.name, eight_bit))
        return new_nodes

    return replace_matching_op_types(graph_def, OpTypePattern("|".join(op_infos)), quantize)[0]


# ---------------------------------------------------------------------------------------------
# Stages 5 and 7: cleaning up conversions between adjacent eight-bit ops
# ---------------------------------------------------------------------------------------------


def merge_adjacent_requantizes(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    """Stage 5: a dynamic Requantize followed by a FakeQuant's constant one becomes the latter."""
    inner = pattern("Requantize", pattern("*"), pattern("*"), pattern("*"),
                    pattern("RequantizationRange"), pattern("RequantizationRange"))
    dequantize = pattern("Dequantize", inner, pattern("Requantize"), pattern("Requantize"))
    quantize = pattern("QuantizeV2", dequantize, pattern("Const"), pattern("Const"))
    outer = pattern("Requantize", quantize, pattern("QuantizeV2"), pattern("QuantizeV2"),
                    pattern("Const"), pattern("Const"))

    def merge(match: NodeMatch, _inputs: set[str], _outputs: set[str]) -> list:
        original = match.inputs[0].inputs[0].inputs[0].inputs[0].node
        low, high = match.inputs[3].node, match.inputs[4].node
        requantize = copy.deepcopy(match.node)
        del requantize.input[:]
        requantize.input.extend([*_three_outputs(original.name), low.name, high.name])
        return [original, low, high, requantize]

    return replace_matching_op_types(graph_def, outer, merge)[0]


def remove_redundant_quantizations(graph_def: graph_pb2.GraphDef, output_names: list[str]):
    """Stage 7: readers of QuantizeV2(Dequantize(q, min, max), Min, Max) read q, min, max."""
    graph_outputs = {node_name_from_input(name) for name in output_names}
    renames: dict[str, str] = {}

    def remove(match: NodeMatch, _inputs: set[str], outputs: set[str]) -> list:
        quantize, dequantize = match.node, match.inputs[0].node
        per_channel = "axis" in dequantize.attr and dequantize.attr["axis"].i != -1
        same_type = _attr(dequantize, "T").type == _attr(quantize, "T").type
        if per_channel or not same_type or len(data_inputs(dequantize)) != 3:
            return match.all_nodes()
        for port in range(3):
            renames[f"{quantize.name}:{port}"] = dequantize.input[port]
        # The float value is still read elsewhere: keep it (the renames rewire the eight-bit ops).
        if dequantize.name in outputs or dequantize.name in graph_outputs:
            return match.all_nodes()
        return []

    redundant = pattern("QuantizeV2", pattern("Dequantize"), pattern("Min"), pattern("Max"))
    replaced, _ = replace_matching_op_types(graph_def, redundant, remove, allow_inconsistencies=True)
    return rename_node_inputs(replaced, renames) if renames else replaced


# ---------------------------------------------------------------------------------------------
# freeze_requantization_ranges
# ---------------------------------------------------------------------------------------------

_PRINT_SUFFIX = "__print__"
_REQUANT_PREFIX = "__requant_min_max:"
# What strtof accepts as a whole field (Python's float() also takes "1_0", which it must not).
_FLOAT_TEXT = re.compile(
    r"\s*[+-]?(\d+\.?\d*(e[+-]?\d+)?|\.\d+(e[+-]?\d+)?|inf(inity)?|nan)\s*", re.IGNORECASE
)


def parse_min_max_log(text: str) -> list[tuple[str, float, float]]:
    """(node name, min, max) records from ``insert_logging`` output; other lines are skipped.

    A record line holds ``...;<name>__print__;__requant_min_max:[<min>][<max>]...``: the last
    ``;``-field starting with the prefix must split on ``[`` into exactly the prefix and two
    ``<number>]<rest>`` parts, and the field before it must end in ``__print__``.
    """
    records = []
    for line in text.split("\n"):
        if f"{_PRINT_SUFFIX};{_REQUANT_PREFIX}" not in line:
            continue
        fields = line.split(";")
        found = [i for i in range(1, len(fields)) if fields[i].startswith(_REQUANT_PREFIX)]
        if not found:
            continue
        index = found[-1]
        parts = fields[index].split("[")
        if len(parts) != 3 or parts[0] != _REQUANT_PREFIX:
            continue
        numbers = [part.split("]") for part in parts[1:]]
        if any(len(pieces) != 2 or not _FLOAT_TEXT.fullmatch(pieces[0]) for pieces in numbers):
            continue
        name_field = fields[index - 1]
        if not name_field.endswith(_PRINT_SUFFIX):
            continue
        low, high = (float(np.float32(float(pieces[0]))) for pieces in numbers)
        records.append((name_field[: -len(_PRINT_SUFFIX)], low, high))
    return records


def _percentile_range(mins: list[float], maxes: list[float], min_percentile: float, max_percentile: float):
    """mins[round(n * min%/100)] and maxes[round(n * (1 - max%/100))], in float32 like upstream."""
    count, hundred = np.float32(len(mins)), np.float32(100.0)
    min_index = np.float32(count * np.float32(np.float32(min_percentile) / hundred))
    max_index = np.float32(count * np.float32(np.float32(1.0) - np.float32(max_percentile) / hundred))
    # Clamped at both ends (upstream clamped the min index only below, the max only above).
    low = int(np.clip(np.sign(min_index) * np.floor(abs(min_index) + 0.5), 0, len(mins) - 1))
    high = int(np.clip(np.sign(max_index) * np.floor(abs(max_index) + 0.5), 0, len(maxes) - 1))
    return sorted(mins)[low], sorted(maxes)[high]


@register("freeze_requantization_ranges", params=("min_max_log_file", "min_percentile", "max_percentile"))
def freeze_requantization_ranges(
    graph_def: graph_pb2.GraphDef, context: TransformContext
) -> graph_pb2.GraphDef:
    """Replace RequantizationRange ops by Consts holding the ranges logged for them.

    Matches: ``RequantizationRange`` nodes named in the log (a graph run after
    ``insert_logging(op=RequantizationRange, show_name=true, message="__requant_min_max:")``).
    Produces: float scalar Consts ``<name>/frozen_min`` and ``<name>/frozen_max``; readers of
    ``<name>:0`` / ``<name>:1`` read them instead. Per node, with n records, the min is the
    sorted mins' element round(n * min_percentile / 100) and the max the sorted maxes'
    element round(n * (1 - max_percentile / 100)), both clamped to the list.
    Params: ``min_max_log_file`` (required), ``min_percentile`` (5), ``max_percentile`` (5).
    Errors: no file name, an unreadable file, a log without records, a logged name missing
    from the graph, a logged node that is not a RequantizationRange.
    Differs from the C++ tool: indexes are clamped at both ends (an out-of-range percentile
    read past the list upstream); a control input ``^<name>`` moves to ``^<name>/frozen_min``
    instead of dangling.
    """
    log_file = context.get_string("min_max_log_file", "")
    if not log_file:
        raise TransformError("freeze_requantization_ranges: you must pass a file name to min_max_log_file")
    min_percentile = context.get_float("min_percentile", 5.0)
    max_percentile = context.get_float("max_percentile", 5.0)
    try:
        with open(log_file, encoding="utf-8", errors="replace") as handle:
            records = parse_min_max_log(handle.read())
    except OSError as error:
        raise TransformError(f"freeze_requantization_ranges: cannot read min_max_log_file '{log_file}': "
                             f"{error.strerror}") from None
    if not records:
        raise TransformError(
            f"freeze_requantization_ranges: no min/max range logs were found in '{log_file}'"
        )
    by_node: dict[str, tuple[list[float], list[float]]] = {}
    for name, low, high in records:
        mins, maxes = by_node.setdefault(name, ([], []))
        mins.append(low)
        maxes.append(high)
    present = {node.name: node for node in graph_def.node}
    missing = sorted(name for name in by_node if name not in present)
    if missing:
        raise TransformError(
            f"freeze_requantization_ranges: nodes in the log are not in the graph: {', '.join(missing)}"
        )
    nodes, renames = [], {}
    for node in graph_def.node:
        if node.name not in by_node:
            nodes.append(node)
            continue
        if node.op != "RequantizationRange":
            raise TransformError(
                f"freeze_requantization_ranges: node '{node.name}' is a {node.op}, "
                "expected a RequantizationRange"
            )
        low, high = _percentile_range(*by_node[node.name], min_percentile, max_percentile)
        nodes += [_float_scalar(f"{node.name}/frozen_min", low),
                  _float_scalar(f"{node.name}/frozen_max", high)]
        renames[f"{node.name}:0"] = f"{node.name}/frozen_min:0"
        renames[f"{node.name}:1"] = f"{node.name}/frozen_max:0"
    result = rename_node_inputs(new_graph_like(graph_def, nodes), renames)
    for node in result.node:
        for index, input_string in enumerate(node.input):
            if input_string.startswith("^") and input_string[1:] in by_node:
                node.input[index] = f"^{input_string[1:]}/frozen_min"
    return result
