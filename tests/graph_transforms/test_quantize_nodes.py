"""quantize_nodes, stage by stage and end to end: the old tool's scenarios, differential tests
against the C++ oracle and the deliberate differences."""

import numpy as np
import pytest
import tensorflow as tf
from graph_helpers import (
    assert_same_structure,
    build,
    eight_bit_bias_add,
    have_oracle,
    max_error,
    nodes_by_name,
    op_counts,
    ops_by_name,
    oracle_transform,
    quantized_const,
    requires_oracle,
    run_graph,
)
from tensorflow.core.framework import types_pb2

from serving_optimiser.graph_transforms import TransformError, TransformGraph
from serving_optimiser.graph_transforms.transforms._eightbit import (
    fake_quants_to_requantize,
    hoist_fake_quants,
    merge_adjacent_requantizes,
    quantize_placeholders,
    remove_redundant_quantizations,
)
from serving_optimiser.graph_transforms.transforms.weights import quantize_min_first

# Ops the C++ test requires gone after quantize_nodes (Reshape may be added by the rewrite).
QUANTIZABLE_OPS = {"BiasAdd", "Concat", "Conv2D", "MatMul", "Relu", "Relu6", "AvgPool", "MaxPool"}


def const(name, values, shape, dtype=tf.float32):
    return tf.constant(np.reshape(values, shape), dtype=dtype, name=name)


def placeholder(name, shape=None, dtype=tf.float32):
    return tf.raw_ops.Placeholder(dtype=dtype, shape=shape, name=name)


# ---------------------------------------------------------------------------------------------
# The C++ test's single-op scenarios
# ---------------------------------------------------------------------------------------------


def matmul(m, n, k, a_values, b_values):
    return lambda: tf.raw_ops.MatMul(
        a=const("a_op", a_values, (m, k)), b=const("b_op", b_values, (k, n)), name="mat_mul_op"
    )


def conv(width, height, stride, input_values, filter_values):
    return lambda: tf.raw_ops.Conv2D(
        input=const("input_op", input_values, (1, height, width, 1)),
        filter=const("filter_op", filter_values, (3, 3, 1, 1)),
        strides=[1, stride, stride, 1], padding="SAME", name="conv_op",
    )


def pool(op):
    key = "input" if op == "MaxPool" else "value"
    return lambda: getattr(tf.raw_ops, op)(
        **{key: const("constant_op", np.arange(1, 13), (1, 2, 6, 1))},
        ksize=[1, 2, 2, 1], strides=[1, 1, 1, 1], padding="SAME", name="op_under_test",
    )


def relu(op):
    return lambda: getattr(tf.raw_ops, op)(features=const("constant_op", np.arange(1, 13), (1, 2, 6, 1)),
                                           name="op_under_test")


SINGLE_OP_SCENARIOS = {
    "matmul_1x1x1": (matmul(1, 1, 1, [2], [3]), "mat_mul_op"),
    "matmul_1x2x1": (matmul(1, 2, 1, [1], [2, 3]), "mat_mul_op"),
    "matmul_equal_ones": (matmul(1, 1, 2, [1, 1], [1, 1]), "mat_mul_op"),
    "matmul_zeros": (matmul(1, 1, 2, [0, 0], [1, 1]), "mat_mul_op"),
    "matmul_general": (matmul(1, 1, 2, [1, 2], [1, 2]), "mat_mul_op"),
    "matmul_small": (matmul(2, 4, 3, np.arange(1, 7), np.arange(7, 19)), "mat_mul_op"),
    "conv_odd_padding": (conv(4, 4, 2, np.arange(1, 17), np.arange(1, 10)), "conv_op"),
    "conv": (conv(4, 3, 1, np.arange(1, 13), [1, 4, 7, 2, 5, 8, 3, 6, 9]), "conv_op"),
    "bias_add": (
        lambda: tf.raw_ops.BiasAdd(value=const("input_op", np.arange(1, 13), (1, 1, 2, 6)),
                                   bias=const("offset_op", np.arange(1, 7), (6,)), name="bias_add_op"),
        "bias_add_op",
    ),
    "concat": (
        lambda: tf.raw_ops.Concat(
            concat_dim=const("shape_op", 0, (), tf.int32),
            values=[const("a_op", np.arange(1, 13), (2, 2, 3)), const("b_op", np.arange(13, 25), (2, 2, 3))],
            name="concat_op",
        ),
        "concat_op",
    ),
    "relu": (relu("Relu"), "op_under_test"),
    "relu6": (relu("Relu6"), "op_under_test"),
    "max_pool": (pool("MaxPool"), "op_under_test"),
    "avg_pool": (pool("AvgPool"), "op_under_test"),
    "reshape": (
        lambda: tf.raw_ops.Reshape(tensor=const("constant_op", np.arange(1, 21), (4, 5)),
                                   shape=const("shape", [10, 2], (2,), tf.int32), name="reshape_op"),
        "reshape_op",
    ),
}


@pytest.mark.parametrize(("make_ops", "output"), SINGLE_OP_SCENARIOS.values(), ids=SINGLE_OP_SCENARIOS)
def test_single_op_is_quantized_within_one(make_ops, output):
    graph = build(make_ops)
    quantized = TransformGraph(graph, [], [output], ["quantize_nodes"])
    assert not QUANTIZABLE_OPS & set(ops_by_name(quantized).values())
    assert ops_by_name(quantized)[output] == "Dequantize"
    assert max_error(graph, quantized, [output]) <= 1.0


@requires_oracle
@pytest.mark.parametrize(("make_ops", "output"), SINGLE_OP_SCENARIOS.values(), ids=SINGLE_OP_SCENARIOS)
def test_single_op_matches_the_oracle(make_ops, output):
    graph = build(make_ops)
    ours = TransformGraph(graph, [], [output], ["quantize_nodes"])
    oracle = oracle_transform(graph, [], [output], ["quantize_nodes"])
    assert_same_structure(ours, oracle)
    ours_nodes = nodes_by_name(ours)
    for node in oracle.node:
        assert dict(ours_nodes[node.name].attr) == dict(node.attr), node.name
    np.testing.assert_array_equal(run_graph(ours, [output])[0], run_graph(oracle, [output])[0])


def test_matmul_rewrite_names_every_new_node():
    graph = build(matmul(2, 4, 3, np.arange(1, 7), np.arange(7, 19)))
    nodes = nodes_by_name(TransformGraph(graph, [], ["mat_mul_op"], ["quantize_nodes"]))
    prefix_a, prefix_b = "mat_mul_op_eightbit/a_op", "mat_mul_op_eightbit/b_op"
    for suffix, op in [("reshape_dims", "Const"), ("reduction_dims", "Const"), ("reshape", "Reshape"),
                       ("min", "Min"), ("max", "Max"), ("quantize", "QuantizeV2")]:
        assert nodes[f"{prefix_a}/{suffix}"].op == op
        assert nodes[f"{prefix_b}/{suffix}"].op == op
    assert list(nodes[f"{prefix_a}/reshape_dims"].input) == ["^a_op"]
    assert list(nodes[f"{prefix_a}/quantize"].input) == ["a_op", f"{prefix_a}/min", f"{prefix_a}/max"]
    main = nodes["mat_mul_op/eightbit"]
    assert main.op == "QuantizedMatMul"
    assert list(main.input) == [
        f"{prefix_a}/quantize:0", f"{prefix_b}/quantize:0",
        f"{prefix_a}/quantize:1", f"{prefix_a}/quantize:2", f"{prefix_b}/quantize:1", f"{prefix_b}/quantize:2",
    ]
    assert main.attr["T1"].type == main.attr["T2"].type == types_pb2.DT_QUINT8
    assert main.attr["Toutput"].type == types_pb2.DT_QINT32
    assert nodes["mat_mul_op/eightbit/requant_range"].op == "RequantizationRange"
    assert list(nodes["mat_mul_op/eightbit/requantize"].input) == [
        "mat_mul_op/eightbit:0", "mat_mul_op/eightbit:1", "mat_mul_op/eightbit:2",
        "mat_mul_op/eightbit/requant_range:0", "mat_mul_op/eightbit/requant_range:1",
    ]
    assert list(nodes["mat_mul_op"].input) == [
        "mat_mul_op/eightbit/requantize:0", "mat_mul_op/eightbit/requantize:1", "mat_mul_op/eightbit/requantize:2",
    ]
    assert nodes["mat_mul_op"].attr["mode"].s == b"MIN_FIRST"


def test_concat_lists_all_mins_then_all_maxes():
    graph = build(SINGLE_OP_SCENARIOS["concat"][0])
    nodes = nodes_by_name(TransformGraph(graph, [], ["concat_op"], ["quantize_nodes"]))
    a, b = "concat_op_eightbit/a_op/quantize", "concat_op_eightbit/b_op/quantize"
    assert list(nodes["concat_op/eightbit"].input) == ["shape_op", f"{a}:0", f"{b}:0", f"{a}:1", f"{b}:1",
                                                      f"{a}:2", f"{b}:2"]


def test_graph_without_quantizable_ops_is_unchanged():
    graph = build(lambda: tf.raw_ops.Tanh(x=tf.raw_ops.Sub(x=const("a", [1.0, 2.0], (2,)),
                                                            y=const("b", [3.0, 4.0], (2,)), name="sub"), name="tanh"))
    assert TransformGraph(graph, [], ["tanh"], ["quantize_nodes"]) == graph


def test_non_float_ops_stay_float():
    def make_ops():
        excluded = tf.raw_ops.Reshape(tensor=const("int_constant", np.arange(1, 21), (4, 5), tf.int32),
                                      shape=const("shape_1", [10, 2], (2,), tf.int32), name="excluded_reshape_op")
        included = tf.raw_ops.Reshape(tensor=const("float_constant", np.arange(2, 22), (4, 5)),
                                      shape=const("shape_2", [10, 2], (2,), tf.int32), name="included_reshape_op")
        excluded_relu = tf.raw_ops.Relu(features=excluded, name="excluded_relu_op")
        tf.raw_ops.Cast(x=excluded_relu, DstT=tf.float32, name="excluded_float_caster")
        tf.raw_ops.Relu(features=included, name="included_relu_op")

    graph = build(make_ops)
    outputs = ["excluded_float_caster", "included_relu_op"]
    quantized = TransformGraph(graph, [], outputs, ["quantize_nodes"])
    assert ops_by_name(quantized)["excluded_reshape_op"] == "Reshape"
    assert ops_by_name(quantized)["excluded_relu_op"] == "Relu"
    assert ops_by_name(quantized)["included_reshape_op"] == "Dequantize"
    assert max_error(graph, quantized, outputs) <= 1.0


@pytest.mark.parametrize(("ignored", "kept"), [("Relu", "Relu"), ("Add", "AddV2")], ids=["relu", "add_covers_addv2"])
def test_ignore_op_leaves_those_ops_float(ignored, kept):
    def make_ops():
        x = placeholder("x", [2, 3])
        relu_op = tf.raw_ops.Relu(features=x, name="relu_op")
        tf.raw_ops.AddV2(x=relu_op, y=const("bias", [1.0, 2.0, 3.0], (3,)), name="add_op")

    quantized = TransformGraph(build(make_ops), ["x"], ["add_op"], [f"quantize_nodes(ignore_op={ignored})"])
    assert kept in ops_by_name(quantized).values()
    assert "QuantizeV2" in ops_by_name(quantized).values()


def test_keep_float_leaves_the_named_nodes_float():
    def make_ops():
        x = placeholder("x", [2, 3])
        relu_op = tf.raw_ops.Relu(features=x, name="relu_expect_quantized")
        tf.raw_ops.AddV2(x=relu_op, y=const("bias", [1.0, 2.0, 3.0], (3,)), name="add_named")

    quantized = ops_by_name(TransformGraph(build(make_ops), ["x"], ["add_named"],
                                           ["quantize_nodes(keep_float=add_named)"]))
    assert quantized["add_named"] == "AddV2" and quantized["relu_expect_quantized"] == "Dequantize"


# ---------------------------------------------------------------------------------------------
# Placeholders, fallback ranges, FakeQuants
# ---------------------------------------------------------------------------------------------


def test_placeholders_become_quint8_with_an_input_range():
    graph = build(lambda: tf.raw_ops.Relu(features=placeholder("placeholder_op"), name="relu_op"))
    stage = quantize_placeholders(graph, (-10.0, 10.0))
    nodes = nodes_by_name(stage)
    assert nodes["placeholder_op"].op == "Placeholder"
    assert nodes["placeholder_op"].attr["dtype"].type == types_pb2.DT_QUINT8
    assert list(nodes["relu_op"].input) == ["placeholder_op_eightbit/dequantize"]
    assert list(nodes["placeholder_op_eightbit/dequantize"].input) == [
        "placeholder_op", "placeholder_op_eightbit/min", "placeholder_op_eightbit/max",
    ]
    quantized = TransformGraph(graph, ["placeholder_op"], ["relu_op"], ["quantize_nodes(input_min=-10, input_max=10)"])
    # End to end, the QuantizedRelu reads the eight-bit placeholder and its range directly.
    assert list(nodes_by_name(quantized)["relu_op/eightbit"].input) == [
        "placeholder_op", "placeholder_op_eightbit/min", "placeholder_op_eightbit/max",
    ]


def test_quantized_input_feeds_give_the_float_result():
    def make_ops():
        tf.raw_ops.BiasAdd(value=const("a", np.arange(1, 101), (1, 100)), bias=placeholder("placeholder"),
                           name="bias_add")

    graph = build(make_ops)
    quantized = TransformGraph(graph, ["placeholder"], ["bias_add"], ["quantize_nodes(input_min=0, input_max=100)"])
    values = np.arange(1, 101, dtype=np.float32)
    codes = quantize_min_first(values, 0.0, 100.0)
    assert max_error(graph, quantized, ["bias_add"], {"placeholder": values}, {"placeholder": codes}) <= 1.0


def test_int_placeholders_stay_int():
    def make_ops():
        indices = placeholder("indices", [3], tf.int32)
        tf.raw_ops.Relu(features=tf.raw_ops.Cast(x=indices, DstT=tf.float32, name="cast"), name="relu_op")

    quantized = TransformGraph(build(make_ops), ["indices"], ["relu_op"], ["quantize_nodes(input_min=0, input_max=9)"])
    assert nodes_by_name(quantized)["indices"].attr["dtype"].type == types_pb2.DT_INT32


def fallback_graph():
    def make_ops():
        tf.raw_ops.BiasAdd(value=const("a", np.arange(1, 101), (1, 100)), bias=placeholder("placeholder"),
                           name="bias_add")

    return build(make_ops)


def test_fallback_range_replaces_requantization_ranges():
    graph = fallback_graph()
    quantized = TransformGraph(graph, ["placeholder"], ["bias_add"],
                               ["quantize_nodes(fallback_min=0, fallback_max=200)"])
    nodes = nodes_by_name(quantized)
    assert "RequantizationRange" not in op_counts(quantized)
    assert nodes["bias_add/eightbit/fallback_min"].op == "Const"
    assert list(nodes["bias_add/eightbit/requantize"].input)[3:] == [
        "bias_add/eightbit/fallback_min", "bias_add/eightbit/fallback_max",
    ]
    feeds = {"placeholder": np.arange(1, 101, dtype=np.float32)}
    assert max_error(graph, quantized, ["bias_add"], feeds) <= 2.0


@pytest.mark.parametrize("argument", ["fallback_min=0", "fallback_max=200", "input_min=0", "input_max=1"])
def test_range_arguments_come_in_pairs(argument):
    name = argument.split("_")[0]
    with pytest.raises(TransformError, match=f"quantize_nodes: you must pass both {name}_min and {name}_max"):
        TransformGraph(fallback_graph(), ["placeholder"], ["bias_add"], [f"quantize_nodes({argument})"])


def fake_quant_graph(*chain_ops, input_values=tuple(range(1, 13))):
    """input_op, offset_op -> BiasAdd -> chain_ops... -> FakeQuant(0, 18) named fake_quant_op."""

    def make_ops():
        layer = tf.raw_ops.BiasAdd(value=const("input_op", input_values, (1, 1, 2, 6)),
                                   bias=const("offset_op", np.arange(1, 7), (6,)), name="bias_add_op")
        for op in chain_ops:
            if op == "MaxPool":
                layer = tf.raw_ops.MaxPool(input=layer, ksize=[1, 2, 2, 1], strides=[1, 1, 1, 1], padding="SAME",
                                           name="max_pool_op")
            else:
                layer = getattr(tf.raw_ops, op)(**{"x" if op == "Sigmoid" else "features": layer},
                                                name=f"{op.lower()}_op")
        tf.raw_ops.FakeQuantWithMinMaxVars(inputs=layer, min=const("fake_quant_min_op", 0.0, ()),
                                           max=const("fake_quant_max_op", 18.0, ()), name="fake_quant_op")

    return build(make_ops)


def test_fake_quants_become_requantizes():
    graph = fake_quant_graph()
    converted = fake_quants_to_requantize(graph)
    nodes = nodes_by_name(converted)
    assert "FakeQuantWithMinMaxVars" not in op_counts(converted)
    assert nodes["fake_quant_op_eightbit/quantize"].attr["T"].type == types_pb2.DT_QINT32
    assert list(nodes["fake_quant_op_eightbit/requantize"].input)[3:] == ["fake_quant_min_op", "fake_quant_max_op"]
    assert nodes["fake_quant_op"].op == "Dequantize"
    assert max_error(graph, converted, ["fake_quant_op"]) <= 1.0


@requires_oracle
def test_fake_quant_end_to_end_leaves_one_requantize():
    graph = fake_quant_graph()
    ours = TransformGraph(graph, [], ["fake_quant_op"], ["quantize_nodes"])
    assert op_counts(ours)["Requantize"] == 1
    assert "FakeQuantWithMinMaxVars" not in op_counts(ours)
    assert max_error(graph, ours, ["fake_quant_op"]) <= 1.0
    oracle = oracle_transform(graph, [], ["fake_quant_op"], ["quantize_nodes"])
    assert_same_structure(ours, oracle)
    np.testing.assert_array_equal(run_graph(ours, ["fake_quant_op"])[0], run_graph(oracle, ["fake_quant_op"])[0])


def test_fake_quants_are_hoisted_up_linear_chains():
    graph = fake_quant_graph("Relu", "MaxPool")
    hoisted = hoist_fake_quants(graph)
    nodes = nodes_by_name(hoisted)
    assert nodes["fake_quant_op"].op == "MaxPool"
    assert nodes[nodes["relu_op"].input[0]].op == "FakeQuantWithMinMaxVars"
    assert list(nodes["fake_quant_op_hoisted"].input) == ["bias_add_op", "fake_quant_min_op", "fake_quant_max_op"]
    assert max_error(graph, hoisted, ["fake_quant_op"]) <= 1.0


@requires_oracle
def test_hoisted_fake_quant_end_to_end_matches_the_oracle():
    graph = fake_quant_graph("Relu", "MaxPool")
    ours = TransformGraph(graph, [], ["fake_quant_op"], ["quantize_nodes"])
    oracle = oracle_transform(graph, [], ["fake_quant_op"], ["quantize_nodes"])
    assert_same_structure(ours, oracle)
    assert max_error(graph, ours, ["fake_quant_op"]) <= 1.0
    np.testing.assert_array_equal(run_graph(ours, ["fake_quant_op"])[0], run_graph(oracle, ["fake_quant_op"])[0])


@requires_oracle
def test_fake_quants_are_not_hoisted_through_sigmoid():
    graph = fake_quant_graph("Sigmoid", input_values=np.linspace(-12, 0, 12))
    assert hoist_fake_quants(graph) == graph
    ours = TransformGraph(graph, [], ["fake_quant_op"], ["quantize_nodes"])
    oracle = oracle_transform(graph, [], ["fake_quant_op"], ["quantize_nodes"])
    # Upstream moved the [0, 18] range before the Sigmoid, whose outputs lie in (0, 1).
    assert ops_by_name(oracle)["fake_quant_op"] == "Sigmoid"
    assert ops_by_name(ours)["fake_quant_op"] == "Dequantize"
    assert max_error(graph, ours, ["fake_quant_op"]) < 0.1 < max_error(graph, oracle, ["fake_quant_op"])


# ---------------------------------------------------------------------------------------------
# Stages 5 and 7 on hand-built eight-bit graphs (the C++ test's graphs)
# ---------------------------------------------------------------------------------------------


def requantize_again(dequantize):
    """Dequantize -> Reshape/Min/Max -> QuantizeV2 -> Dequantize ``final_dequantize``."""
    reshaped = tf.raw_ops.Reshape(tensor=dequantize, shape=const("dequantize_reshape_dims", [-1], (1,), tf.int32),
                                  name="dequantize_reshape")
    dims = const("dequantize_reduction_dims", 0, (), tf.int32)
    low = tf.raw_ops.Min(input=reshaped, axis=dims, keep_dims=False, name="dequantize_min")
    high = tf.raw_ops.Max(input=reshaped, axis=dims, keep_dims=False, name="dequantize_max")
    quantize = tf.raw_ops.QuantizeV2(input=dequantize, min_range=low, max_range=high, T=tf.quint8, mode="MIN_FIRST",
                                     name="quantize_op")
    tf.raw_ops.Dequantize(input=quantize[0], min_range=quantize[1], max_range=quantize[2], mode="MIN_FIRST",
                          name="final_dequantize")


def test_redundant_conversion_is_bypassed():
    graph = eight_bit_bias_add(requantize_again)
    removed = remove_redundant_quantizations(graph, ["final_dequantize"])
    assert nodes_by_name(removed)["final_dequantize"].input[0] == "requantize_op"
    assert max_error(graph, removed, ["final_dequantize"]) <= 1.0


def test_redundant_conversion_keeps_a_float_value_read_elsewhere():
    def tail(dequantize):
        requantize_again(dequantize)
        tf.raw_ops.Relu(features=dequantize, name="relu_op")

    graph = eight_bit_bias_add(tail)
    removed = remove_redundant_quantizations(graph, ["final_dequantize", "relu_op"])
    assert op_counts(removed)["Dequantize"] == 2
    assert nodes_by_name(removed)["final_dequantize"].input[0] == "requantize_op"
    assert max_error(graph, removed, ["final_dequantize", "relu_op"]) <= 1.0


def test_per_channel_dequantize_is_not_bypassed():
    def make_ops():
        dequantize = tf.raw_ops.Dequantize(
            input=quantized_const("codes", [[0, 128], [255, 64]]), min_range=const("lows", [-1.0, -2.0], (2,)),
            max_range=const("highs", [1.0, 2.0], (2,)), mode="MIN_COMBINED", axis=1, name="dequantize_op")
        requantize_again(dequantize)

    graph = build(make_ops)
    result = remove_redundant_quantizations(graph, ["final_dequantize"])
    assert sorted(result.node, key=lambda n: n.name) == sorted(graph.node, key=lambda n: n.name)


def test_adjacent_requantizes_are_merged():
    def tail(dequantize):
        quantize = tf.raw_ops.QuantizeV2(input=dequantize, min_range=const("quantize_min_op", 0.0, ()),
                                         max_range=const("quantize_max_op", 255.0, ()), T=tf.qint32,
                                         mode="MIN_FIRST", name="quantize_op")
        requantize = tf.raw_ops.Requantize(
            input=quantize[0], input_min=quantize[1], input_max=quantize[2],
            requested_output_min=const("fake_requantize_min_op", 0.0, ()),
            requested_output_max=const("fake_requantize_max_op", 255.0, ()), out_type=tf.quint8,
            name="fake_requantize_op")
        tf.raw_ops.Dequantize(input=requantize[0], min_range=requantize[1], max_range=requantize[2],
                              mode="MIN_FIRST", name="fake_dequantize_op")

    graph = eight_bit_bias_add(tail)
    merged = merge_adjacent_requantizes(graph)
    assert op_counts(merged)["Requantize"] == 1
    assert list(nodes_by_name(merged)["fake_requantize_op"].input) == [
        "bias_add_op:0", "bias_add_op:1", "bias_add_op:2", "fake_requantize_min_op", "fake_requantize_max_op",
    ]
    assert max_error(graph, merged, ["fake_dequantize_op"]) <= 1.0


# ---------------------------------------------------------------------------------------------
# End to end on small networks
# ---------------------------------------------------------------------------------------------


def dense_graph():
    """x -> MatMul -> BiasAdd -> Relu -> MatMul -> output, weights big enough for quantize_weights."""
    rng = np.random.default_rng(5)

    def make_ops():
        x = placeholder("x", [4, 8])
        hidden = tf.raw_ops.MatMul(a=x, b=const("w1", rng.standard_normal((8, 16)) * 0.5, (8, 16)), name="mm1")
        hidden = tf.raw_ops.BiasAdd(value=hidden, bias=const("b1", rng.standard_normal(16) * 0.1, (16,)), name="ba1")
        hidden = tf.raw_ops.Relu(features=hidden, name="relu1")
        tf.raw_ops.MatMul(a=hidden, b=const("w2", rng.standard_normal((16, 3)) * 0.5, (16, 3)), name="output")

    return build(make_ops), {"x": rng.standard_normal((4, 8)).astype(np.float32)}


@pytest.mark.parametrize("per_channel", ["false", "true"])
def test_weights_then_nodes_then_strip_keeps_eight_bit_paths(per_channel):
    graph, feeds = dense_graph()
    transforms = [f"quantize_weights(minimum_size=16, per_channel={per_channel})", "quantize_nodes",
                  "strip_unused_nodes"]
    quantized = TransformGraph(graph, ["x"], ["output"], transforms)
    nodes = nodes_by_name(quantized)
    # Adjacent eight-bit ops now talk directly, without float in between.
    assert nodes["relu1/eightbit"].input[0] == "ba1/eightbit/requantize:0"
    assert nodes["ba1/eightbit"].input[0] == "mm1/eightbit/requantize:0"
    assert not {"MatMul", "BiasAdd", "Relu"} & set(ops_by_name(quantized).values())
    assert max_error(graph, quantized, ["output"], feeds) <= 0.5


def test_addv2_is_quantized_like_add():
    def make_ops():
        tf.raw_ops.AddV2(x=placeholder("x", [2, 3, 3, 4]), y=const("bias", [0.5, -1, 2, 3], (4,)), name="add_op")

    graph = build(make_ops)
    quantized = TransformGraph(graph, ["x"], ["add_op"], ["quantize_nodes"])
    nodes = nodes_by_name(quantized)
    assert nodes["add_op/eightbit"].op == "QuantizedAdd"
    feeds = {"x": np.linspace(-3, 3, 72).reshape(2, 3, 3, 4).astype(np.float32)}
    assert max_error(graph, quantized, ["add_op"], feeds) <= 1.0
    if have_oracle():
        oracle = oracle_transform(graph, ["x"], ["add_op"], ["quantize_nodes"])
        assert ops_by_name(oracle)["add_op"] == "AddV2"


# ---------------------------------------------------------------------------------------------
# Nodes left float on purpose, and other deliberate differences
# ---------------------------------------------------------------------------------------------


def transposed_conv():
    tf.raw_ops.Conv2DBackpropInput(
        input_sizes=const("output_size", [1, 8, 8, 3], (4,), tf.int32),
        filter=const("filter_op", np.linspace(-1, 1, 54), (3, 3, 3, 2)), out_backprop=placeholder("x", [1, 4, 4, 2]),
        strides=[1, 2, 2, 1], padding="SAME", name="op_under_test")


def dilated_conv():
    tf.raw_ops.Conv2D(input=placeholder("x", [1, 6, 6, 1]), filter=const("filter_op", np.arange(1, 10), (3, 3, 1, 1)),
                      strides=[1, 1, 1, 1], dilations=[1, 2, 2, 1], padding="VALID", name="op_under_test")


def relu_with_control_input():
    x = placeholder("x", [1, 6, 6, 1])
    no_op = tf.raw_ops.NoOp(name="ctrl")
    with tf.control_dependencies([no_op]):
        tf.raw_ops.Relu(features=x, name="op_under_test")


def feeds_for(shape):
    return {"x": np.linspace(-3, 3, int(np.prod(shape))).reshape(shape).astype(np.float32)}


@requires_oracle
def test_conv2d_backprop_input_stays_float():
    # Its QuantizedConv2DTranspose is not registered in TF 2.21; the oracle leaves it too.
    graph = build(transposed_conv)
    assert TransformGraph(graph, ["x"], ["op_under_test"], ["quantize_nodes"]) == graph
    assert ops_by_name(oracle_transform(graph, ["x"], ["op_under_test"], ["quantize_nodes"]))["op_under_test"] == (
        "Conv2DBackpropInput")
    assert run_graph(graph, ["op_under_test"], feeds_for((1, 4, 4, 2)))[0].shape == (1, 8, 8, 3)


@requires_oracle
def test_control_inputs_keep_a_node_float():
    graph = build(relu_with_control_input)
    assert TransformGraph(graph, ["x"], ["op_under_test"], ["quantize_nodes"]) == graph
    oracle = oracle_transform(graph, ["x"], ["op_under_test"], ["quantize_nodes"])
    # Upstream quantises ^ctrl as if it were data: the graph does not load.
    assert "op_under_test_eightbit/__hat__ctrl/quantize" in nodes_by_name(oracle)
    with pytest.raises((tf.errors.OpError, ValueError)):
        run_graph(oracle, ["op_under_test"], feeds_for((1, 6, 6, 1)))


@requires_oracle
def test_dilated_conv2d_stays_float():
    graph = build(dilated_conv)
    assert TransformGraph(graph, ["x"], ["op_under_test"], ["quantize_nodes"]) == graph
    oracle = oracle_transform(graph, ["x"], ["op_under_test"], ["quantize_nodes"])
    # Upstream drops the dilations: a plain 3x3 convolution with another output shape.
    assert ops_by_name(oracle)["op_under_test"] == "Dequantize"
    feeds = feeds_for((1, 6, 6, 1))
    assert run_graph(graph, ["op_under_test"], feeds)[0].shape == (1, 2, 2, 1)
    assert run_graph(oracle, ["op_under_test"], feeds)[0].shape == (1, 4, 4, 1)


@requires_oracle
def test_square_gets_one_quantized_input_where_the_oracle_fails():
    def make_ops():
        x = const("x", np.linspace(-3, 3, 12), (3, 4))
        tf.raw_ops.Mul(x=x, y=x, name="square")

    graph = build(make_ops)
    ours = TransformGraph(graph, [], ["square"], ["quantize_nodes"])
    assert list(nodes_by_name(ours)["square/eightbit"].input)[:2] == ["square_eightbit/x/quantize:0"] * 2
    assert max_error(graph, ours, ["square"]) <= 1.0
    with pytest.raises(ValueError, match="cycle"):
        oracle_transform(graph, [], ["square"], ["quantize_nodes"])


@requires_oracle
def test_resize_bilinear_keeps_half_pixel_centers():
    def make_ops():
        tf.raw_ops.ResizeBilinear(images=const("image", np.linspace(0, 10, 32), (1, 4, 4, 2)),
                                  size=const("size", [7, 7], (2,), tf.int32), half_pixel_centers=True, name="resize")

    graph = build(make_ops)
    ours = TransformGraph(graph, [], ["resize"], ["quantize_nodes"])
    assert nodes_by_name(ours)["resize/eightbit"].attr["half_pixel_centers"].b
    oracle = oracle_transform(graph, [], ["resize"], ["quantize_nodes"])
    assert max_error(graph, ours, ["resize"]) < 0.1 < max_error(graph, oracle, ["resize"])


@requires_oracle
def test_reshape_keeps_an_int64_shape_type():
    def make_ops():
        tf.raw_ops.Reshape(tensor=const("values", np.arange(20), (4, 5)), shape=const("shape", [10, 2], (2,), tf.int64),
                           name="reshape_op")

    graph = build(make_ops)
    ours = TransformGraph(graph, [], ["reshape_op"], ["quantize_nodes"])
    assert nodes_by_name(ours)["reshape_op/eightbit"].attr["Tshape"].type == types_pb2.DT_INT64
    assert max_error(graph, ours, ["reshape_op"]) <= 1.0
    oracle = oracle_transform(graph, [], ["reshape_op"], ["quantize_nodes"])
    with pytest.raises((tf.errors.OpError, ValueError)):
        run_graph(oracle, ["reshape_op"])
