"""graph_utils.matching: the op-type pattern matcher (alternatives, wildcard, nested inputs, the
old tool's match order) and its replace helper, which keeps a match read from outside."""

import numpy as np
import pytest
from graph_helpers import graph_of, ops_by_name, run_graph
from tensorflow.core.framework import graph_pb2, types_pb2

from serving_optimiser.graph_transforms.graph_utils import make_const_node, make_node
from serving_optimiser.graph_transforms.graph_utils.matching import GraphMatcher, pattern, replace_matching_op_types

FLOAT = types_pb2.DT_FLOAT


def conv_bias_mul_graph() -> graph_pb2.GraphDef:
    """input -> Conv2D(weights) -> BiasAdd(bias) -> Mul(scale) `output`, plus an unrelated Relu."""
    return graph_of(
        make_node("Placeholder", "input", attrs={"dtype": FLOAT}),
        make_node("Const", "weights"),
        make_node("Const", "bias"),
        make_node("Const", "scale"),
        make_node("Conv2D", "conv", ["input", "weights"]),
        make_node("BiasAdd", "biased", ["conv", "bias"]),
        make_node("Mul", "output", ["biased", "scale"]),
        make_node("Relu", "unrelated", ["input"]),
    )


@pytest.mark.parametrize(
    ("op_pattern", "roots"),
    [
        (pattern("Mul", pattern("BiasAdd", pattern("Conv2D", pattern("*"), pattern("Const")), pattern("Const")),
                 pattern("Const")), ["output"]),
        # Roots come in the old tool's execution order (LIFO Kahn), not graph order.
        (pattern("Mul|Relu"), ["unrelated", "output"]),
        (pattern("BiasAdd|Add", pattern("Conv2D|MatMul"), pattern("*")), ["biased"]),
        (pattern("Mul", pattern("Conv2D"), pattern("Const")), []),
        (pattern("Conv2D", pattern("*")), []),
    ],
    ids=["nested", "alternatives", "alternatives-and-wildcard", "wrong-input-op", "wrong-input-count"],
)
def test_matcher_finds_roots(op_pattern, roots):
    assert [m.node.name for m in GraphMatcher(conv_bias_mul_graph()).matches(op_pattern)] == roots


def test_matches_do_not_overlap_and_list_nodes_breadth_first():
    matcher = GraphMatcher(conv_bias_mul_graph())
    [match] = matcher.matches(pattern("BiasAdd", pattern("Conv2D", pattern("*"), pattern("Const")), pattern("Const")))
    assert [n.name for n in match.all_nodes()] == ["biased", "conv", "bias", "input", "weights"]
    # Within one pattern a node matched once is never matched again: biased would match too,
    # but its input conv is already taken.
    assert [m.node.name for m in matcher.matches(pattern("Conv2D|BiasAdd", pattern("*"), pattern("*")))] == ["conv"]


def test_replace_swaps_a_match_for_the_generated_nodes():
    def fuse(match, input_nodes, output_nodes):
        conv, bias = match.inputs[0].node, match.inputs[1].node
        return [match.inputs[0].inputs[0].node, match.inputs[0].inputs[1].node, bias,
                make_node("FusedConv", match.node.name, [conv.input[0], conv.input[1], bias.name])]

    op_pattern = pattern("BiasAdd", pattern("Conv2D", pattern("*"), pattern("Const")), pattern("Const"))
    result, replaced = replace_matching_op_types(conv_bias_mul_graph(), op_pattern, fuse)
    assert replaced == 1
    assert ops_by_name(result)["biased"] == "FusedConv" and "conv" not in ops_by_name(result)


def test_replace_keeps_the_match_when_an_inner_node_is_read_elsewhere():
    original = conv_bias_mul_graph()
    original.node.append(make_node("Relu", "reads_conv", ["conv"]))

    def drop_conv(match, input_nodes, output_nodes):
        assert output_nodes == {"biased", "conv"}
        return [make_node("FusedConv", "biased", ["input", "weights", "bias"])]

    op_pattern = pattern("BiasAdd", pattern("Conv2D"), pattern("Const"))
    result, replaced = replace_matching_op_types(original, op_pattern, drop_conv)
    assert replaced == 0
    assert ops_by_name(result)["conv"] == "Conv2D" and ops_by_name(result)["biased"] == "BiasAdd"


def test_replace_result_computes_what_the_match_did():
    """Mul of (AddV2 of (any, Const), Const) -> AddV2 of (Mul of (any, Const), Const): x*2 + 6,
    run in TensorFlow against the original (x + 3) * 2."""
    original = graph_of(
        make_node("Placeholder", "x", attrs={"dtype": FLOAT}),
        make_const_node("three", np.float32(3.0)),
        make_const_node("two", np.float32(2.0)),
        make_node("AddV2", "shifted", ["x", "three"], {"T": FLOAT}),
        make_node("Mul", "output", ["shifted", "two"], {"T": FLOAT}),
    )

    def distribute(match, input_nodes, output_nodes):
        add, scale = match.inputs[0], match.inputs[1].node
        x, shift = add.inputs[0].node, add.inputs[1].node
        value = np.float32(shift.attr["value"].tensor.float_val[0] * scale.attr["value"].tensor.float_val[0])
        return [x, scale, make_const_node("output/shift", value),
                make_node("Mul", "output/scaled", [x.name, scale.name], {"T": FLOAT}),
                make_node("AddV2", "output", ["output/scaled", "output/shift"], {"T": FLOAT})]

    op_pattern = pattern("Mul", pattern("AddV2", pattern("*"), pattern("Const")), pattern("Const"))
    result, replaced = replace_matching_op_types(original, op_pattern, distribute)
    assert replaced == 1
    assert ops_by_name(result) == {"x": "Placeholder", "two": "Const", "output/shift": "Const",
                                   "output/scaled": "Mul", "output": "AddV2"}
    feeds = {"x": np.array([-1.5, 0.0, 4.25], np.float32)}
    np.testing.assert_array_equal(run_graph(result, ["output"], feeds)[0], run_graph(original, ["output"], feeds)[0])
