"""graph_utils directly: input-name parsing, the pattern matcher and its replace helper, input
renames (chains, wildcards, cycles), reachability, op-definition lookup and output typing."""

import pytest
from graph_helpers import ops_by_name
from tensorflow.core.framework import function_pb2, graph_pb2, types_pb2

from serving_optimiser.graph_transforms import TransformError
from serving_optimiser.graph_transforms.graph_utils import (
    GraphMatcher,
    arg_types,
    canonical_input_name,
    lookup_op_def,
    make_node,
    node_map,
    output_types,
    parse_input,
    pattern,
    reachable_names,
    rename_node_inputs,
    replace_matching_op_types,
)

FLOAT = types_pb2.DT_FLOAT


def graph(*nodes) -> graph_pb2.GraphDef:
    result = graph_pb2.GraphDef()
    result.node.extend(nodes)
    return result


def conv_bias_mul_graph() -> graph_pb2.GraphDef:
    """input -> Conv2D(weights) -> BiasAdd(bias) -> Mul(scale) `output`, plus an unrelated Relu."""
    return graph(
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
    ("text", "expected"),
    [
        ("x", (False, "x", 0)),
        ("x:2", (False, "x", 2)),
        ("^x", (True, "x", 0)),
        ("^x:1", (True, "x", 1)),
        ("scope/a:b", (False, "scope/a:b", 0)),
        ("scope/a:b:3", (False, "scope/a:b", 3)),
    ],
    ids=["bare", "port", "control", "control-port", "colon-in-name", "colon-in-name-and-port"],
)
def test_parse_input(text, expected):
    assert parse_input(text) == expected


def test_canonical_input_name():
    assert [canonical_input_name(t) for t in ("x", "^x", "x:1")] == ["x:0", "^x:0", "x:1"]


def test_node_map_refuses_duplicate_names():
    with pytest.raises(TransformError, match="graph has two nodes named 'a'"):
        node_map(graph(make_node("Const", "a"), make_node("Const", "a")))


# ---------------------------------------------------------------------------------------------
# Matcher
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Renames
# ---------------------------------------------------------------------------------------------


def reader_inputs(renames: dict[str, str], inputs: list[str]) -> list[str]:
    nodes = [make_node("Const", name) for name in ("a", "b", "c")] + [make_node("AddN", "reader", inputs)]
    return list(node_map(rename_node_inputs(graph(*nodes), renames))["reader"].input)


@pytest.mark.parametrize(
    ("renames", "inputs", "expected"),
    [
        ({"a": "b"}, ["a", "a:1", "^a"], ["b", "a:1", "^a"]),
        ({"a:1": "c"}, ["a", "a:1"], ["a", "c"]),
        ({"a:*": "b"}, ["a", "a:1", "^a"], ["b", "b:1", "^b"]),
        ({"a": "b", "b": "c"}, ["a"], ["c"]),
        ({"a": "a"}, ["a"], ["a"]),
    ],
    ids=["port-0-only", "one-port", "wildcard-keeps-port-and-control", "chain-followed", "self-rename-is-no-op"],
)
def test_rename_node_inputs(renames, inputs, expected):
    assert reader_inputs(renames, inputs) == expected


@pytest.mark.parametrize(
    "renames", [{"a": "b", "b": "a"}, {"a:*": "b", "b:*": "c", "c:*": "a"}], ids=["two-cycle", "wildcard-three-cycle"]
)
def test_rename_cycles_are_errors(renames):
    with pytest.raises(TransformError, match="RenameNodeInputs argument contains a cycle for"):
        reader_inputs(renames, ["a"])


def test_rename_leaves_ignored_nodes_alone():
    nodes = [make_node("Const", "a"), make_node("Identity", "keep", ["a"]), make_node("Identity", "move", ["a"])]
    result = node_map(rename_node_inputs(graph(*nodes), {"a": "b"}, nodes_to_ignore=["keep"]))
    assert list(result["keep"].input) == ["a"] and list(result["move"].input) == ["b"]


# ---------------------------------------------------------------------------------------------
# Reachability
# ---------------------------------------------------------------------------------------------


def test_reachable_names_follows_data_and_control_inputs():
    nodes = node_map(graph(make_node("Const", "c"), make_node("NoOp", "init"),
                           make_node("Identity", "i", ["c", "^init"]), make_node("Const", "unused")))
    assert reachable_names(nodes, ["i:0"]) == {"i", "c", "init"}


def test_reachable_names_stops_at_inputs_but_includes_them():
    nodes = node_map(conv_bias_mul_graph())
    assert reachable_names(nodes, ["output"], stop_at=["biased"]) == {"output", "biased", "scale"}


def test_reachable_names_reports_missing_names_in_the_order_met():
    nodes = node_map(graph(make_node("AddN", "sum", ["ghost", "a"]), make_node("Identity", "a", ["phantom"])))
    missing: list[str] = []
    assert reachable_names(nodes, ["sum"], missing=missing) == {"sum", "a"}
    assert missing == ["phantom", "ghost"]


# ---------------------------------------------------------------------------------------------
# Op definitions and output types
# ---------------------------------------------------------------------------------------------


def library_with(name: str) -> function_pb2.FunctionDefLibrary:
    library = function_pb2.FunctionDefLibrary()
    function = library.function.add()
    function.signature.name = name
    function.signature.output_arg.add(name="out", type=types_pb2.DT_INT64)
    return library


def test_lookup_op_def_finds_registered_ops_and_library_functions():
    assert lookup_op_def("MatMul").name == "MatMul"
    assert lookup_op_def("my_function", library_with("my_function")).output_arg[0].name == "out"
    assert lookup_op_def("my_function") is None
    assert lookup_op_def("NotAnOp", library_with("my_function")) is None


def test_lookup_op_def_prefers_the_library_as_tensorflow_does():
    library = library_with("Relu")
    assert lookup_op_def("Relu", library).output_arg[0].type == types_pb2.DT_INT64
    signatures = {f.signature.name: f.signature for f in library.function}
    assert lookup_op_def("Relu", signatures) == library.function[0].signature


def test_output_types_resolve_attrs_numbers_lists_and_refs():
    split = make_node("Split", "split", ["axis", "x"], {"T": FLOAT, "num_split": 3})
    assert output_types(split, lookup_op_def("Split")) == [FLOAT] * 3
    identity_n = make_node("IdentityN", "n", ["a", "b"], {"T": [FLOAT, types_pb2.DT_INT32]})
    assert output_types(identity_n, lookup_op_def("IdentityN")) == [FLOAT, types_pb2.DT_INT32]
    variable = make_node("VariableV2", "v", [], {"dtype": FLOAT, "shape": []})
    assert output_types(variable, lookup_op_def("VariableV2")) == [types_pb2.DT_FLOAT_REF]
    matmul = make_node("MatMul", "m", ["a", "b"], {"T": FLOAT})
    assert arg_types(matmul, lookup_op_def("MatMul")) == [("product", [FLOAT])]
    inputs = arg_types(matmul, lookup_op_def("MatMul"), lookup_op_def("MatMul").input_arg)
    assert inputs == [("a", [FLOAT]), ("b", [FLOAT])]


def test_output_types_name_a_missing_attr_unless_only_counting():
    untyped = make_node("Neg", "neg", ["x"])
    with pytest.raises(TransformError, match="node 'neg' \\(Neg\\) has no attr 'T'"):
        output_types(untyped, lookup_op_def("Neg"))
    counted = arg_types(untyped, lookup_op_def("Neg"), unresolved_type=types_pb2.DT_INVALID)
    assert counted == [("y", [types_pb2.DT_INVALID])]
