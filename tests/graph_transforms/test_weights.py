"""round_weights and quantize_weights: the old tool's scenarios, bit-exact differential tests
against the C++ oracle, per-channel quantisation and the deliberate differences."""

import itertools
import logging

import numpy as np
import pytest
import tensorflow as tf
from graph_helpers import nodes_by_name, ops_by_name, oracle_transform, requires_oracle, run_graph
from tensorflow.core.framework import graph_pb2, types_pb2
from tensorflow.python.framework import tensor_util

from serving_optimiser.graph_transforms import TransformError, TransformGraph
from serving_optimiser.graph_transforms.graph_utils import make_const_node, make_node
from serving_optimiser.graph_transforms.transforms.weights import (
    FLT_MIN,
    channel_axis,
    quantize_min_first,
)

# The C++ tests' Conv2D: input [1, 1, 6, 2], weights [1, 2, 2, 10], VALID, stride 1.
CONV_INPUT = [1.0, 4.0, 2.0, 5.0, 3.0, 6.0, -1.0, -4.0, -2.0, -5.0, -3.0, -6.0]
CONV_WEIGHTS = [1.0, 2.0, 3.0, 4.0, 0.1, 0.2, 0.3, 0.4] * 5


def conv_graph(input_values=CONV_INPUT, input_shape=(1, 1, 6, 2)) -> graph_pb2.GraphDef:
    graph = tf.Graph()
    with graph.as_default():
        input_op = tf.constant(np.reshape(input_values, input_shape), tf.float32, name="input_op")
        weights_op = tf.constant(np.reshape(CONV_WEIGHTS, (1, 2, 2, 10)), tf.float32, name="weights_op")
        tf.raw_ops.Conv2D(input=input_op, filter=weights_op, strides=[1, 1, 1, 1], padding="VALID", name="output")
    return graph.as_graph_def()


def single_const_graph(values, name="weights") -> graph_pb2.GraphDef:
    graph = graph_pb2.GraphDef()
    graph.node.extend([make_const_node(name, np.asarray(values, dtype=np.float32))])
    return graph


def const_array(node) -> np.ndarray:
    return tensor_util.MakeNdarray(node.attr["value"].tensor)


def quint8_codes(node) -> np.ndarray:
    """The raw bytes of a quint8 Const, as uint8."""
    return np.frombuffer(node.attr["value"].tensor.tensor_content, dtype=np.uint8)


RNG = np.random.default_rng(7)
# Value sets for the differential tests, each chosen to reach one branch of the arithmetic.
VALUE_SETS = {
    "normal": RNG.standard_normal(2048).astype(np.float32) * 3,
    "all_positive": (RNG.random(1536) * 7 + 1).astype(np.float32),
    "all_negative": (-RNG.random(1536) * 7 - 1).astype(np.float32),
    "all_equal_positive": np.full(1024, 2.5, np.float32),
    "all_equal_negative": np.full(1024, -2.5, np.float32),
    "tiny": (RNG.standard_normal(1024) * 1e-20).astype(np.float32),
    "exact_halves": (np.arange(2048) / 8 - 100).astype(np.float32),  # rounding ties
    "linspace": np.linspace(-1, 3, 1024).astype(np.float32),
}


# ---------------------------------------------------------------------------------------------
# round_weights
# ---------------------------------------------------------------------------------------------


def test_round_weights_keeps_a_float_const_and_the_conv_result():
    original = conv_graph()
    rounded = TransformGraph(original, [], ["output"], ["round_weights"])
    weights = nodes_by_name(rounded)["weights_op"]
    assert weights.op == "Const"
    assert weights.attr["dtype"].type == types_pb2.DT_FLOAT
    before, after = (run_graph(g, ["output"])[0] for g in (original, rounded))
    np.testing.assert_allclose(after, before, atol=0.5)


def test_round_weights_four_steps_gives_the_bucket_centres():
    rounded = TransformGraph(conv_graph(), [], ["output"], ["round_weights(num_steps=4)"])
    levels = np.unique(const_array(nodes_by_name(rounded)["weights_op"]))
    # min 0.1, max 4.0, width 0.975; the max lands in bucket 4, above the original max.
    np.testing.assert_allclose(levels, [0.5875, 1.5625, 2.5375, 4.4875], atol=1e-6)


def test_round_weights_all_equal_negative_values():
    rounded = TransformGraph(single_const_graph([-3.0] * 16), [], ["weights"], ["round_weights"])
    values = const_array(nodes_by_name(rounded)["weights"])
    # max is FLT_MIN, so the width is 3/256 and every value lands in the first bucket's centre.
    assert (values == np.float32(-2.994140625)).all()


@pytest.mark.parametrize(
    "const",
    [
        make_const_node("small_float", np.arange(15, dtype=np.float32)),
        make_const_node("int_weights", np.arange(64, dtype=np.int32)),
    ],
    ids=["15_floats", "int32"],
)
def test_round_weights_leaves_small_and_non_float_consts_alone(const):
    graph = graph_pb2.GraphDef()
    graph.node.extend([const])
    rounded = TransformGraph(graph, [], [const.name], ["round_weights"])
    assert rounded.node[0] == const


@pytest.mark.parametrize("num_steps", ["0", "-3", "abc"])
def test_round_weights_rejects_bad_num_steps(num_steps):
    with pytest.raises(TransformError, match=rf"round_weights: num_steps.*{num_steps}"):
        TransformGraph(conv_graph(), [], ["output"], [f"round_weights(num_steps={num_steps})"])


@requires_oracle
@pytest.mark.parametrize("num_steps", [3, 4, 256, 1000])
@pytest.mark.parametrize("values", list(VALUE_SETS.values()), ids=list(VALUE_SETS))
def test_round_weights_is_bit_identical_to_the_oracle(values, num_steps):
    graph = single_const_graph(values.reshape(-1, 8))
    transform = f"round_weights(num_steps={num_steps})"
    ours = TransformGraph(graph, [], ["weights"], [transform])
    oracle = oracle_transform(graph, [], ["weights"], [transform])
    # Same encoding (tensor_content) and the same float32 bits.
    assert ours.node[0] == oracle.node[0]


# ---------------------------------------------------------------------------------------------
# quantize_weights: the old tool's scenarios
# ---------------------------------------------------------------------------------------------


def test_quantize_weights_replaces_large_consts_by_a_dequantize():
    original = conv_graph()
    quantized = TransformGraph(original, [], ["output"], ["quantize_weights(minimum_size=16)"])
    nodes = nodes_by_name(quantized)
    assert nodes["input_op"].op == "Const"  # 12 elements: below minimum_size
    assert nodes["input_op"].attr["dtype"].type == types_pb2.DT_FLOAT
    dequantize = nodes["weights_op"]
    assert dequantize.op == "Dequantize"
    assert list(dequantize.input) == [
        "weights_op_quantized_const", "weights_op_quantized_min", "weights_op_quantized_max",
    ]
    assert dequantize.attr["T"].type == types_pb2.DT_QUINT8
    assert dequantize.attr["mode"].s == b"MIN_FIRST"
    assert nodes["weights_op_quantized_const"].attr["dtype"].type == types_pb2.DT_QUINT8
    assert list(nodes["weights_op_quantized_const"].attr["value"].tensor.tensor_shape.dim) == list(
        nodes_by_name(original)["weights_op"].attr["value"].tensor.tensor_shape.dim
    )
    before, after = (run_graph(g, ["output"])[0] for g in (original, quantized))
    np.testing.assert_allclose(after, before, atol=0.5)


def test_quantize_weights_ranges_always_include_zero():
    graph = conv_graph([-1.0, -4.0, -2.0, -5.0] * 4, (1, 1, 4, 4))
    quantized = TransformGraph(graph, [], ["output"], ["quantize_weights(minimum_size=16)"])
    nodes = nodes_by_name(quantized)
    assert const_array(nodes["input_op_quantized_min"]) == np.float32(-5.0)
    # An all-negative tensor's max is FLT_MIN: zero plus the C++ loop's starting value.
    assert const_array(nodes["input_op_quantized_max"]) == FLT_MIN
    assert const_array(nodes["weights_op_quantized_min"]) == np.float32(0.0)
    assert const_array(nodes["weights_op_quantized_max"]) == np.float32(4.0)


def test_quantize_weights_default_minimum_size_is_1024():
    graph = single_const_graph(np.linspace(-1, 3, 1024))
    graph.node.extend([make_const_node("just_too_small", np.linspace(-1, 3, 1023).astype(np.float32))])
    quantized = TransformGraph(graph, [], ["weights"], ["quantize_weights"])
    nodes = nodes_by_name(quantized)
    assert const_array(nodes["weights_quantized_min"]) == np.float32(-1.0)
    assert const_array(nodes["weights_quantized_max"]) == np.float32(3.0)
    assert nodes["just_too_small"] == graph.node[1]


def test_quantize_weights_without_large_float_consts_changes_nothing():
    graph = conv_graph()
    graph.node.extend([make_const_node("big_ints", np.arange(4096, dtype=np.int32))])
    assert TransformGraph(graph, [], ["output"], ["quantize_weights"]) == graph


def test_quantize_min_first_rounds_ties_away_from_zero():
    # A range 255 wide gives scale 1, so the codes are round(v) - round(low).
    values = np.array([0.5, 1.5, 2.5, 0.0], np.float32)
    assert list(quantize_min_first(values, 0.0, 255.0)) == [1, 2, 3, 0]
    # round(-0.5) is -1 (numpy's half-to-even would give 0), shifting every code by one.
    assert list(quantize_min_first(values, -0.5, 254.5)) == [2, 3, 4, 1]


@requires_oracle
@pytest.mark.parametrize("values", list(VALUE_SETS.values()), ids=list(VALUE_SETS))
def test_quantize_weights_is_byte_identical_to_the_oracle(values):
    graph = single_const_graph(values.reshape(-1, 16))
    ours = TransformGraph(graph, [], ["weights"], ["quantize_weights"])
    oracle = oracle_transform(graph, [], ["weights"], ["quantize_weights"])
    assert ops_by_name(ours) == ops_by_name(oracle)
    ours_nodes = nodes_by_name(ours)
    for node in oracle.node:
        # Names, inputs, attrs and tensor encodings all equal: the quint8 bytes included.
        assert ours_nodes[node.name] == node, node.name
    np.testing.assert_array_equal(
        quint8_codes(ours_nodes["weights_quantized_const"]),
        quint8_codes(nodes_by_name(oracle)["weights_quantized_const"]),
    )
    np.testing.assert_array_equal(run_graph(ours, ["weights"])[0], run_graph(oracle, ["weights"])[0])


@requires_oracle
def test_quantize_weights_conv_scenario_matches_the_oracle():
    graph = conv_graph()
    ours = TransformGraph(graph, [], ["output"], ["quantize_weights(minimum_size=16)"])
    oracle = oracle_transform(graph, [], ["output"], ["quantize_weights(minimum_size=16)"])
    assert sorted(ours.node, key=lambda n: n.name) == sorted(oracle.node, key=lambda n: n.name)


# ---------------------------------------------------------------------------------------------
# quantize_weights: deliberate differences
# ---------------------------------------------------------------------------------------------


@requires_oracle
def test_all_zero_weights_decode_to_zero_where_the_oracle_gives_nan():
    graph = single_const_graph(np.zeros(1024))
    ours = TransformGraph(graph, [], ["weights"], ["quantize_weights"])
    oracle = oracle_transform(graph, [], ["weights"], ["quantize_weights"])
    # Upstream's range [0, FLT_MIN] makes Dequantize's step flush to zero.
    assert np.isnan(run_graph(oracle, ["weights"])[0]).all()
    assert (run_graph(ours, ["weights"])[0] == 0.0).all()
    assert const_array(nodes_by_name(ours)["weights_quantized_max"]) == np.float32(1.0)


@requires_oracle
def test_quantized_consts_keep_device_and_control_inputs():
    graph = graph_from_nodes(
        make_node("NoOp", "init"),
        make_const_node("weights", np.linspace(-1, 1, 1024).astype(np.float32), device="/device:CPU:0"),
    )
    graph.node[1].input.append("^init")
    ours = nodes_by_name(TransformGraph(graph, [], ["weights"], ["quantize_weights"]))
    oracle = nodes_by_name(oracle_transform(graph, [], ["weights"], ["quantize_weights"]))
    for name in ("weights_quantized_const", "weights_quantized_min", "weights_quantized_max"):
        assert list(ours[name].input) == ["^init"] and ours[name].device == "/device:CPU:0"
        assert list(oracle[name].input) == [] and oracle[name].device == ""
    assert ours["weights"].device == "/device:CPU:0"


def graph_from_nodes(*nodes) -> graph_pb2.GraphDef:
    graph = graph_pb2.GraphDef()
    graph.node.extend(nodes)
    return graph


@pytest.mark.parametrize("transform", ["quantize_weights(minimum_size=16)", "round_weights"])
def test_non_finite_weights_are_left_unchanged_with_a_warning(transform, caplog):
    values = np.linspace(-1, 1, 32).astype(np.float32)
    values[3] = np.nan
    graph = single_const_graph(values)
    with caplog.at_level(logging.WARNING):
        result = TransformGraph(graph, [], ["weights"], [transform])
    assert result.node[0] == graph.node[0]
    assert "'weights' holds inf or NaN" in caplog.text


@pytest.mark.parametrize("op", ["VariableV2", "VarHandleOp", "Variable"])
def test_quantize_weights_refuses_unfrozen_graphs(op):
    graph = conv_graph()
    graph.node.extend([make_node(op, "dense/kernel", attrs={"dtype": types_pb2.DT_FLOAT})])
    with pytest.raises(TransformError, match=rf"'dense/kernel' is a variable \({op}\); freeze the graph first"):
        TransformGraph(graph, [], ["output"], ["quantize_weights"])


def test_quantize_weights_errors_name_a_const_without_value():
    graph = graph_from_nodes(make_node("Const", "broken_const", attrs={"dtype": types_pb2.DT_FLOAT}))
    with pytest.raises(TransformError, match="quantize_weights: Const 'broken_const' has no 'value'"):
        TransformGraph(graph, [], ["broken_const"], ["quantize_weights"])


@pytest.mark.parametrize("argument", ["minimum_size=big", "per_channel=yes"])
def test_quantize_weights_rejects_bad_arguments(argument):
    with pytest.raises(TransformError, match=argument.replace("=", "='") + "'"):
        TransformGraph(conv_graph(), [], ["output"], [f"quantize_weights({argument})"])


# ---------------------------------------------------------------------------------------------
# quantize_weights(per_channel=true)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "runs"),
    [("MIN_COMBINED", True), ("SCALED", True), ("MIN_FIRST", False)],
    ids=["min_combined", "scaled", "min_first"],
)
def test_tf_dequantize_accepts_axis_only_without_min_first(mode, runs):
    """Why per_channel uses MIN_COMBINED: TF 2.21's CPU kernel rejects MIN_FIRST with axis."""
    graph = graph_from_nodes(
        make_const_node("codes", np.array([[0, 10, 100], [5, 6, 255]], np.uint8), types_pb2.DT_QUINT8),
        make_const_node("low", np.array([-1.0, -2.0, 0.0], np.float32)),
        make_const_node("high", np.array([1.0, 2.0, 3.0], np.float32)),
        make_node("Dequantize", "decoded", ["codes", "low", "high"],
                  {"T": types_pb2.DT_QUINT8, "mode": mode, "axis": 1}),
    )
    if runs:
        assert run_graph(graph, ["decoded"])[0].shape == (2, 3)
    else:
        with pytest.raises(tf.errors.OpError):
            run_graph(graph, ["decoded"])


# Output channels whose ranges differ by four orders of magnitude, plus an exact-zero weight.
CHANNEL_SCALES = np.array([0.01, 0.1, 1.0, 10.0, 100.0, 3.0], np.float32)
MIXED_WEIGHTS = (np.random.default_rng(3).standard_normal((3, 3, 4, 6)) * CHANNEL_SCALES).astype(np.float32)
MIXED_WEIGHTS[0, 0, 0, :] = 0.0
MIXED_WEIGHTS[..., 5] = np.abs(MIXED_WEIGHTS[..., 5]) + 2.0  # an all-positive channel


def quantize_mixed(per_channel: bool) -> tuple[graph_pb2.GraphDef, np.ndarray]:
    graph = single_const_graph(MIXED_WEIGHTS)
    result = TransformGraph(
        graph, [], ["weights"], [f"quantize_weights(minimum_size=16, per_channel={str(per_channel).lower()})"]
    )
    return result, run_graph(result, ["weights"])[0]


def test_per_channel_beats_per_tensor_on_channels_of_different_ranges():
    _, per_tensor = quantize_mixed(False)
    _, per_channel = quantize_mixed(True)
    tensor_error = np.abs(per_tensor - MIXED_WEIGHTS).max(axis=(0, 1, 2))
    channel_error = np.abs(per_channel - MIXED_WEIGHTS).max(axis=(0, 1, 2))
    assert channel_error.max() < tensor_error.max()
    # Small channels gain the most: the per-tensor step is set by the 100x channel.
    assert channel_error[0] < tensor_error[0] / 100
    assert (channel_error <= tensor_error + 1e-7).all()


def test_per_channel_error_is_at_most_half_a_step_and_zero_is_exact():
    result, decoded = quantize_mixed(True)
    nodes = nodes_by_name(result)
    low = const_array(nodes["weights_quantized_min"])
    high = const_array(nodes["weights_quantized_max"])
    step = (high - low) / 255
    error = np.abs(decoded - MIXED_WEIGHTS).max(axis=(0, 1, 2))
    assert (error <= step / 2 * (1 + 1e-5)).all()
    assert (decoded[0, 0, 0, :5] == 0.0).all()


def test_per_channel_dequantize_attrs_and_names():
    result, _ = quantize_mixed(True)
    nodes = nodes_by_name(result)
    dequantize = nodes["weights"]
    assert dequantize.op == "Dequantize"
    assert dequantize.attr["mode"].s == b"MIN_COMBINED"
    assert dequantize.attr["axis"].i == 3
    assert dequantize.attr["T"].type == types_pb2.DT_QUINT8
    assert const_array(nodes["weights_quantized_min"]).shape == (6,)
    assert const_array(nodes["weights_quantized_max"]).shape == (6,)
    assert const_array(nodes["weights_quantized_const"]).shape == (3, 3, 4, 6)


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((3, 3, 8, 16), 3), ((64, 32), 1), ((3, 3, 8, 1), 2), ((5, 1), 0)],
    ids=["conv_hwio", "matmul_in_out", "depthwise_hwc1", "single_output"],
)
def test_channel_axis_is_the_last_axis_with_more_than_one_element(shape, axis):
    assert channel_axis(shape) == axis


def test_per_channel_keeps_vectors_per_tensor():
    graph = single_const_graph(np.linspace(-1, 1, 32))
    result = TransformGraph(graph, [], ["weights"], ["quantize_weights(minimum_size=16, per_channel=true)"])
    nodes = nodes_by_name(result)
    assert nodes["weights"].attr["mode"].s == b"MIN_FIRST"
    assert "axis" not in nodes["weights"].attr
    assert const_array(nodes["weights_quantized_min"]).shape == ()


# ---------------------------------------------------------------------------------------------
# Function bodies and speed
# ---------------------------------------------------------------------------------------------


def test_quantize_weights_reaches_consts_inside_function_bodies():
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    kernel = np.linspace(-1, 1, 64 * 8).reshape(64, 8).astype(np.float32)

    @tf.function
    def branchy(x):
        return tf.cond(
            tf.reduce_sum(x) > 0, lambda: tf.matmul(x, tf.constant(kernel)), lambda: tf.matmul(x, -tf.constant(kernel))
        )

    concrete = branchy.get_concrete_function(tf.TensorSpec([2, 64], tf.float32))
    graph = convert_variables_to_constants_v2(concrete, lower_control_flow=False).graph.as_graph_def()
    assert any(n.op == "Const" and n.attr["value"].tensor.tensor_shape.dim for f in graph.library.function
               for n in f.node_def)
    result = TransformGraph(graph, ["x"], ["Identity"], ["quantize_weights(minimum_size=16)"])
    for function in result.library.function:
        body_ops = {node.op for node in function.node_def}
        assert "Dequantize" in body_ops, function.signature.name
    x = np.linspace(-1, 1, 128).reshape(2, 64).astype(np.float32)
    for feed in (x, -x):  # both branches
        before, after = (run_graph(g, ["Identity"], {"x": feed})[0] for g in (graph, result))
        np.testing.assert_allclose(after, before, atol=0.5)


def iris_dnn_graph() -> graph_pb2.GraphDef:
    """A frozen Iris DNN as the notebook trains it: 4 -> 4 x 512 Dense (relu) -> 3 (~800k floats)."""
    rng = np.random.default_rng(0)
    sizes = [4, 512, 512, 512, 512, 3]
    graph = tf.Graph()
    with graph.as_default():
        layer = tf.raw_ops.Placeholder(dtype=tf.float32, shape=[None, 4], name="features")
        for index, (rows, cols) in enumerate(itertools.pairwise(sizes)):
            kernel_values = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
            kernel = tf.constant(kernel_values, name=f"dense_{index}/kernel")
            bias = tf.constant(rng.standard_normal(cols).astype(np.float32) * 0.05, name=f"dense_{index}/bias")
            layer = tf.raw_ops.BiasAdd(value=tf.raw_ops.MatMul(a=layer, b=kernel), bias=bias, name=f"dense_{index}")
            if cols != 3:
                layer = tf.raw_ops.Relu(features=layer, name=f"dense_{index}/relu")
    return graph.as_graph_def()


@pytest.mark.parametrize("transform", ["quantize_weights", "quantize_weights(per_channel=true)", "round_weights"])
def test_iris_dnn_keeps_its_outputs(transform):
    # Timing belongs to scripts/bench_transforms.py: a limit here would be flaky on a shared machine.
    graph = iris_dnn_graph()
    result = TransformGraph(graph, ["features"], ["dense_4"], [transform])
    features = np.random.default_rng(1).random((8, 4)).astype(np.float32) * 7
    before, after = (run_graph(g, ["dense_4"], {"features": features})[0] for g in (graph, result))
    np.testing.assert_allclose(after, before, atol=0.05)


def _two_weights() -> graph_pb2.GraphDef:
    graph = graph_pb2.GraphDef()
    rng = np.random.default_rng(11)
    graph.node.extend([make_const_node("weight_expect_quantized", rng.normal(0, 1, (32, 64)).astype(np.float32)),
                       make_const_node("weight_named", rng.normal(0, 1, (32, 64)).astype(np.float32))])
    return graph


@pytest.mark.parametrize("transform", ["round_weights", "quantize_weights"])
def test_keep_float_leaves_the_named_consts_as_they_are(transform):
    graph = _two_weights()
    result = TransformGraph(graph, [], ["weight_expect_quantized", "weight_named"],
                            f"{transform}(keep_float=weight_named, keep_float=no_such_const)")
    after = nodes_by_name(result)
    assert after["weight_named"] == nodes_by_name(graph)["weight_named"]
    assert after["weight_expect_quantized"] != nodes_by_name(graph)["weight_expect_quantized"]


def test_per_channel_for_quantises_only_the_named_consts_per_channel():
    result = nodes_by_name(TransformGraph(_two_weights(), [], ["weight_expect_quantized", "weight_named"],
                                          "quantize_weights(per_channel_for=weight_named)"))
    assert result["weight_named"].attr["axis"].i == 1 and result["weight_named"].attr["mode"].s == b"MIN_COMBINED"
    assert "axis" not in result["weight_expect_quantized"].attr
    assert result["weight_expect_quantized"].attr["mode"].s == b"MIN_FIRST"
