"""The graph rewrites quantize_nodes (quantize_nodes.py) runs around its op rewrite: float
Placeholders made eight-bit (stage 1), FakeQuant hoisting and conversion (stages 2 and 3), and
the clean-up of conversions between adjacent eight-bit ops (stages 5 and 7), with the node
builders they share with the op rewrite and freeze_requantization_ranges.
"""

from __future__ import annotations

import copy

from tensorflow.core.framework import attr_value_pb2, graph_pb2, node_def_pb2, types_pb2

from ..graph_utils import (
    NodeMatch,
    data_inputs,
    make_node,
    new_graph_like,
    node_name_from_input,
    pattern,
    rename_node_inputs,
    replace_matching_op_types,
)
from ._const_builders import float_scalar

QUINT8, QINT32 = types_pb2.DT_QUINT8, types_pb2.DT_QINT32
FLOAT, INT32 = types_pb2.DT_FLOAT, types_pb2.DT_INT32


# Ops a FakeQuant may be hoisted through: they keep values inside the range the FakeQuant
# records (the C++ tool hoisted through any one-input op, Sigmoid and Softmax included).
HOISTABLE_OPS = ("Relu", "Relu6", "MaxPool", "AvgPool", "Identity")


def three_outputs(name: str) -> list[str]:
    return [f"{name}:0", f"{name}:1", f"{name}:2"]


def dequantize_node(name: str, eight_bit: str) -> node_def_pb2.NodeDef:
    return make_node("Dequantize", name, three_outputs(eight_bit), {"T": QUINT8, "mode": "MIN_FIRST"})


def node_attr(node: node_def_pb2.NodeDef, key: str) -> attr_value_pb2.AttrValue:
    """An attr's value, or an empty AttrValue (reading ``node.attr[key]`` would add the key)."""
    return node.attr[key] if key in node.attr else attr_value_pb2.AttrValue()


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
        if node.op != "Placeholder" or node_attr(node, "dtype").type != FLOAT:
            nodes.append(node)
            continue
        prefix = f"{node.name}_eightbit"
        placeholder = copy.deepcopy(node)
        placeholder.attr["dtype"].type = QUINT8
        dequantize = make_node(
            "Dequantize", f"{prefix}/dequantize", [node.name, f"{prefix}/min", f"{prefix}/max"],
            {"T": QUINT8, "mode": "MIN_FIRST"},
        )
        nodes += [placeholder, float_scalar(f"{prefix}/min", input_range[0]),
                  float_scalar(f"{prefix}/max", input_range[1]), dequantize]
        renames[node.name] = dequantize.name
    if not renames:
        return graph_def
    # Data reads of port 0 move to the Dequantize (a Placeholder has no other port); control
    # inputs keep waiting for the Placeholder, and the Dequantize itself still reads it.
    return rename_node_inputs(
        new_graph_like(graph_def, nodes),
        {f"{name}:0": dequantize for name, dequantize in renames.items()},
        nodes_to_ignore=renames.values(),
        follow_chains=False,
    )


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
            "Requantize", f"{prefix}/requantize", [*three_outputs(quantize.name), low.name, high.name],
            {"Tinput": QINT32, "out_type": QUINT8},
        )
        dequantize = dequantize_node(fake_quant.name, requantize.name)
        return [original, low, high, quantize, requantize, dequantize]

    fake_quant_pattern = pattern("FakeQuantWithMinMaxVars", pattern("*"), pattern("Const"), pattern("Const"))
    return replace_matching_op_types(graph_def, fake_quant_pattern, convert)[0]


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
        requantize.input.extend([*three_outputs(original.name), low.name, high.name])
        return [original, low, high, requantize]

    return replace_matching_op_types(graph_def, outer, merge)[0]


def remove_redundant_quantizations(graph_def: graph_pb2.GraphDef, output_names: list[str]):
    """Stage 7: readers of QuantizeV2(Dequantize(q, min, max), Min, Max) read q, min, max."""
    graph_outputs = {node_name_from_input(name) for name in output_names}
    renames: dict[str, str] = {}

    def remove(match: NodeMatch, _inputs: set[str], outputs: set[str]) -> list:
        quantize, dequantize = match.node, match.inputs[0].node
        per_channel = "axis" in dequantize.attr and dequantize.attr["axis"].i != -1
        same_type = node_attr(dequantize, "T").type == node_attr(quantize, "T").type
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
