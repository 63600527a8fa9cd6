"""fold_batch_norms and fold_old_batch_norms: the old tool's scenarios, TF 2 Keras graphs, and
the C++ engine as oracle."""

import numpy as np
import pytest
import tensorflow as tf
from graph_helpers import (
    assert_same_structure,
    frozen_function_graph,
    nodes_by_name,
    op_counts,
    ops_by_name,
    oracle_transform,
    requires_oracle,
    run_graph,
)
from tensorflow.core.framework import types_pb2

from serving_optimiser.graph_transforms import TransformError, TransformGraph
from serving_optimiser.graph_transforms.graph_utils import canonical_input_name, const_value, make_node

INPUT_VALUES = np.array([1, 4, 2, 5, 3, 6, -1, -4, -2, -5, -3, -6], np.float32)
WEIGHT_VALUES = np.array([1, 2, 3, 4, 0.1, 0.2, 0.3, 0.4], np.float32)


def build(function):
    graph = tf.Graph()
    with graph.as_default():
        function()
    return graph.as_graph_def()


def const(name, values, shape=None, dtype=np.float32):
    values = np.asarray(values, dtype)
    return tf.constant(values if shape is None else values.reshape(shape), name=name)


def conv(op_type, inputs, weights, name="conv_op", **attrs):
    if op_type == "MatMul":
        return tf.raw_ops.MatMul(a=inputs, b=weights, name=name, **attrs)
    layer = getattr(tf.raw_ops, op_type)
    return layer(input=inputs, filter=weights, strides=[1, 1, 1, 1], padding="VALID", name=name, **attrs)


def conv_input_and_weights(op_type):
    if op_type == "MatMul":
        return const("input_op", INPUT_VALUES, (6, 2)), const("weights_op", [1, 2, 0.3, 0.4], (2, 2))
    return const("input_op", INPUT_VALUES, (1, 1, 6, 2)), const("weights_op", WEIGHT_VALUES, (1, 2, 2, 2))


def consts_of(graph_def):
    return {n.name: const_value(n) for n in graph_def.node if n.op == "Const"}


def assert_same_outputs(before, after, outputs, atol, feeds=None, rtol=0.0):
    for expected, actual in zip(run_graph(before, outputs, feeds), run_graph(after, outputs, feeds)):
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def with_const_value(graph_def, name, values):
    """``graph_def`` with Const ``name`` holding ``values`` (shapes TF would refuse to build)."""
    for node in graph_def.node:
        if node.name == name:
            node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.asarray(values, np.float32)))
    return graph_def


def sorted_nodes(graph_def):
    return sorted((n.name, n.op, tuple(n.input)) for n in graph_def.node)


# ---------------------------------------------------------------------------------------------
# fold_batch_norms
# ---------------------------------------------------------------------------------------------

CHANNEL_SCALES = {"Conv2D": [2.0, 3.0], "DepthwiseConv2dNative": [2.0, 3.0, 4.0, 5.0], "MatMul": [2.0, 3.0]}


def mul_after_conv(op_type, scale=None, **conv_attrs):
    def graph():
        inputs, weights = conv_input_and_weights(op_type)
        output = conv(op_type, inputs, weights, **conv_attrs)
        values = CHANNEL_SCALES[op_type] if scale is None else scale
        tf.raw_ops.Mul(x=output, y=const("mul_values", values), name="output")

    return build(graph)


@pytest.mark.parametrize("op_type", ["Conv2D", "DepthwiseConv2dNative", "MatMul"])
def test_fold_batch_norms_bakes_mul_into_weights(op_type):
    graph = mul_after_conv(op_type)
    result = TransformGraph(graph, [], ["output"], ["fold_batch_norms"])
    assert ops_by_name(result) == {"input_op": "Const", "weights_op": "Const", "output": op_type}
    assert list(nodes_by_name(result)["output"].input) == ["input_op", "weights_op"]
    assert_same_outputs(graph, result, ["output"], atol=1e-5)


def shared_conv():
    inputs, weights = conv_input_and_weights("Conv2D")
    output = conv("Conv2D", inputs, weights)
    scale = const("mul_values", [2.0, 3.0])
    tf.raw_ops.Mul(x=output, y=scale, name="output")
    tf.raw_ops.Mul(x=output, y=scale, name="output_2")


SHARED_CONV = build(shared_conv)


def test_fold_batch_norms_leaves_shared_conv_alone():
    result = TransformGraph(SHARED_CONV, [], ["output", "output_2"], ["fold_batch_norms"])
    assert sorted_nodes(result) == sorted_nodes(SHARED_CONV)
    assert_same_outputs(SHARED_CONV, result, ["output", "output_2"], atol=0)


def test_fold_batch_norms_negative_case_leaves_graph_unchanged():
    def graph():
        inputs, weights = conv_input_and_weights("Conv2D")
        relu = tf.raw_ops.Relu(features=conv("Conv2D", inputs, weights), name="relu")
        tf.raw_ops.Mul(x=relu, y=const("mul_values", [2.0, 3.0]), name="output")

    assert TransformGraph(build(graph), [], ["output"], ["fold_batch_norms"]) == build(graph)


BAD_LENGTH_MUL = with_const_value(mul_after_conv("Conv2D"), "mul_values", [2.0, 3.0, 4.0])


def test_fold_batch_norms_rejects_mul_of_wrong_length():
    with pytest.raises(TransformError, match=r"Mul constant 'mul_values' has shape \[3\], expected \[2\]"):
        TransformGraph(BAD_LENGTH_MUL, [], ["output"], ["fold_batch_norms"])


@pytest.mark.parametrize(
    ("op_type", "scale"),
    [("Conv2D", 1.5), ("Conv2D", [[[[2.0, 3.0]]]]), ("MatMul", [[2.0, 3.0]])],
    ids=["scalar", "conv-broadcast-shape", "matmul-row-shape"],
)
def test_fold_batch_norms_folds_broadcast_shapes(op_type, scale):
    graph = mul_after_conv(op_type, scale=scale)
    result = TransformGraph(graph, [], ["output"], ["fold_batch_norms"])
    assert "Mul" not in op_counts(result)
    assert_same_outputs(graph, result, ["output"], atol=1e-5)


def test_fold_batch_norms_scales_rows_of_transposed_matmul():
    graph = mul_after_conv("MatMul", transpose_b=True)
    result = TransformGraph(graph, [], ["output"], ["fold_batch_norms"])
    assert ops_by_name(result)["output"] == "MatMul"
    np.testing.assert_allclose(consts_of(result)["weights_op"], [[2.0, 4.0], [0.9, 1.2]], rtol=1e-6)
    assert_same_outputs(graph, result, ["output"], atol=1e-5)


def test_fold_batch_norms_leaves_nchw_conv_alone():
    """In NCHW a [5] Mul scales the width, not the channels (CPU cannot run NCHW: structure only)."""

    def nchw():
        output = conv("Conv2D", const("input_op", INPUT_VALUES, (1, 2, 1, 6)),
                      const("weights_op", WEIGHT_VALUES, (1, 2, 2, 2)), data_format="NCHW")
        tf.raw_ops.Mul(x=output, y=const("mul_values", [1.0, 2.0, 3.0, 4.0, 5.0]), name="output")

    graph = build(nchw)
    assert sorted_nodes(TransformGraph(graph, [], ["output"], ["fold_batch_norms"])) == sorted_nodes(graph)


def test_fold_batch_norms_keeps_mul_constant_read_elsewhere():
    graph = build(mul_constant_read_elsewhere)
    result = TransformGraph(graph, [], ["output", "other_reader"], ["fold_batch_norms"])
    assert ops_by_name(result)["output"] == "Conv2D" and "mul_values" in ops_by_name(result)
    assert_same_outputs(graph, result, ["output", "other_reader"], atol=1e-5)


def test_fold_batch_norms_leaves_conv_that_is_an_output():
    graph = mul_after_conv("Conv2D")
    assert sorted_nodes(TransformGraph(graph, [], ["output", "conv_op"], ["fold_batch_norms"])) == sorted_nodes(graph)


def chained_muls():
    inputs, weights = conv_input_and_weights("Conv2D")
    first = tf.raw_ops.Mul(x=conv("Conv2D", inputs, weights), y=const("first_scale", [2.0, 3.0]), name="first")
    tf.raw_ops.Mul(x=first, y=const("second_scale", [0.5, 4.0]), name="output")


def mul_constant_read_elsewhere():
    inputs, weights = conv_input_and_weights("Conv2D")
    scale = const("mul_values", [2.0, 3.0])
    tf.raw_ops.Mul(x=conv("Conv2D", inputs, weights), y=scale, name="output")
    tf.raw_ops.Neg(x=scale, name="other_reader")


def test_fold_batch_norms_folds_chained_muls():
    result = TransformGraph(build(chained_muls), [], ["output"], ["fold_batch_norms"])
    assert ops_by_name(result) == {"input_op": "Const", "weights_op": "Const", "output": "Conv2D"}
    assert_same_outputs(build(chained_muls), result, ["output"], atol=1e-5, rtol=1e-6)


def biased_mul(add_op, bias):
    def graph():
        inputs, weights = conv_input_and_weights("Conv2D")
        output = conv("Conv2D", inputs, weights)
        if add_op == "BiasAdd":
            biased = tf.raw_ops.BiasAdd(value=output, bias=const("bias_op", bias), name="biased")
        else:
            biased = tf.raw_ops.AddV2(x=output, y=const("bias_op", bias), name="biased")
        tf.raw_ops.Mul(x=biased, y=const("mul_values", [2.0, 3.0]), name="output")

    return build(graph)


@pytest.mark.parametrize(
    ("add_op", "bias"), [("BiasAdd", [0.5, -1.0]), ("AddV2", 0.25)], ids=["BiasAdd", "AddV2-scalar"]
)
def test_fold_batch_norms_scales_bias_before_mul(add_op, bias):
    graph = biased_mul(add_op, bias)
    result = TransformGraph(graph, [], ["output"], ["fold_batch_norms"])
    assert ops_by_name(result) == {
        "input_op": "Const", "weights_op": "Const", "conv_op": "Conv2D", "bias_op": "Const", "output": add_op
    }
    assert list(nodes_by_name(result)["output"].input) == ["conv_op", "bias_op"]
    assert_same_outputs(graph, result, ["output"], atol=1e-5)


def weights_tied_to_noop():
    """A TF 2 frozen graph's shape: the weights are also read by a NoOp the output waits for."""

    def graph():
        inputs, weights = conv_input_and_weights("Conv2D")
        product = tf.raw_ops.Mul(x=conv("Conv2D", inputs, weights), y=const("mul_values", [2.0, 3.0]), name="mul")
        with tf.control_dependencies([weights]):
            noop = tf.raw_ops.NoOp(name="NoOp")
        with tf.control_dependencies([noop]):
            tf.raw_ops.Identity(input=product, name="Identity")

    return build(graph)


def test_fold_batch_norms_ignores_control_readers():
    graph = weights_tied_to_noop()
    result = TransformGraph(graph, [], ["Identity"], ["fold_batch_norms"])
    assert ops_by_name(result)["mul"] == "Conv2D"
    assert list(nodes_by_name(result)["NoOp"].input) == ["^weights_op"]
    assert_same_outputs(graph, result, ["Identity"], atol=1e-5)


def test_fold_batch_norms_moves_control_edges_to_the_renamed_conv():
    def graph():
        inputs, weights = conv_input_and_weights("Conv2D")
        output = conv("Conv2D", inputs, weights)
        product = tf.raw_ops.Mul(x=output, y=const("mul_values", [2.0, 3.0]), name="output")
        with tf.control_dependencies([output]):
            tf.raw_ops.AddV2(x=product, y=product, name="doubled")

    result = TransformGraph(build(graph), [], ["doubled"], ["fold_batch_norms"])
    assert list(nodes_by_name(result)["doubled"].input) == ["output", "output"]
    assert_same_outputs(build(graph), result, ["doubled"], atol=1e-5, rtol=1e-6)


@requires_oracle
@pytest.mark.parametrize("op_type", ["Conv2D", "DepthwiseConv2dNative", "MatMul"])
def test_fold_batch_norms_matches_oracle(op_type):
    graph = mul_after_conv(op_type)
    ours = TransformGraph(graph, [], ["output"], ["fold_batch_norms"])
    oracle = oracle_transform(graph, [], ["output"], "fold_batch_norms")
    assert_same_structure(ours, oracle)
    np.testing.assert_array_equal(consts_of(ours)["weights_op"], consts_of(oracle)["weights_op"])


@requires_oracle
def test_fold_batch_norms_shared_and_bad_shape_match_oracle():
    ours = TransformGraph(SHARED_CONV, [], ["output", "output_2"], ["fold_batch_norms"])
    assert_same_structure(ours, oracle_transform(SHARED_CONV, [], ["output", "output_2"], "fold_batch_norms"))
    with pytest.raises(ValueError, match="Mul constant input to batch norm has bad shape"):
        oracle_transform(BAD_LENGTH_MUL, [], ["output"], "fold_batch_norms")


@requires_oracle
@pytest.mark.parametrize(
    ("graph", "outputs"),
    [
        (mul_after_conv("Conv2D", scale=1.5), ["output"]),
        (biased_mul("BiasAdd", [0.5, -1.0]), ["output"]),
        (weights_tied_to_noop(), ["Identity"]),
        (build(chained_muls), ["output"]),
        (build(mul_constant_read_elsewhere), ["output", "other_reader"]),
    ],
    ids=["scalar-oracle-fails", "bias-oracle-keeps-mul", "control-reader-oracle-keeps-mul",
         "chain-oracle-folds-one", "shared-constant-oracle-keeps-mul"],
)
def test_fold_batch_norms_folds_where_oracle_does_not(graph, outputs):
    try:
        oracle = oracle_transform(graph, [], outputs, "fold_batch_norms")
    except ValueError as error:
        assert "bad shape" in str(error)
    else:
        assert "Mul" in op_counts(oracle)
    assert "Mul" not in op_counts(TransformGraph(graph, [], outputs, ["fold_batch_norms"]))


@requires_oracle
def test_fold_batch_norms_transposed_matmul_is_right_where_oracle_is_wrong():
    graph = mul_after_conv("MatMul", transpose_b=True)
    oracle = oracle_transform(graph, [], ["output"], "fold_batch_norms")
    expected = run_graph(graph, ["output"])[0]
    assert not np.allclose(run_graph(oracle, ["output"])[0], expected)
    np.testing.assert_allclose(run_graph(TransformGraph(graph, [], ["output"], ["fold_batch_norms"]), ["output"])[0],
                               expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Keras 3 models frozen the TF 2 way
# ---------------------------------------------------------------------------------------------

LOSSLESS = [
    "remove_nodes(op=Identity)", "fold_constants(ignore_errors=true)", "fold_batch_norms",
    "fold_old_batch_norms", "strip_unused_nodes", "sort_by_execution_order",
]
TF2_RECIPE = ["remove_control_dependencies", "remove_nodes(op=Identity)", "fold_constants", "fold_batch_norms"]
IMAGES = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)


def keras_cnn(use_bias):
    """Conv2D + BN + ReLU, DepthwiseConv2D + BN, Dense: seeded, with non-trivial BN statistics."""
    import keras

    keras.utils.set_random_seed(7)
    inputs = keras.Input((8, 8, 3), name="img")
    x = keras.layers.Conv2D(4, 3, use_bias=use_bias, name="conv")(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(name="conv_bn")(x))
    x = keras.layers.DepthwiseConv2D(3, use_bias=use_bias, name="depthwise")(x)
    x = keras.layers.BatchNormalization(name="depthwise_bn")(x)
    outputs = keras.layers.Dense(5, name="dense")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(3)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            size = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.uniform(-1, 1, size))
            layer.moving_variance.assign(rng.uniform(0.5, 2, size))
            layer.gamma.assign(rng.uniform(0.5, 2, size))
            layer.beta.assign(rng.uniform(-1, 1, size))
    return frozen_function_graph(lambda img: model(img, training=False), tf.TensorSpec([None, 8, 8, 3], tf.float32))


@pytest.fixture(scope="module", params=[False, True], ids=["no-bias", "bias"])
def cnn(request):
    return request.param, keras_cnn(request.param)


def output_names(graph_def):
    consumed = {canonical_input_name(i).lstrip("^").rsplit(":", 1)[0] for n in graph_def.node for i in n.input}
    return [n.name for n in graph_def.node if n.name not in consumed and n.op not in ("NoOp", "Const")]


def test_lossless_list_folds_every_batch_norm_of_a_keras_cnn(cnn):
    _, graph = cnn
    outputs = output_names(graph)
    assert outputs == ["Identity"]
    result = TransformGraph(graph, ["img"], outputs, LOSSLESS)
    assert not [n.op for n in result.node if n.op.startswith("FusedBatchNorm")]
    producers = {n.name: n.op for n in result.node}
    bias_adds = {n.name for n in result.node if n.op in ("BiasAdd", "Add", "AddV2")}
    leftover = [
        n.name for n in result.node
        if n.op == "Mul" and any(producers.get(i.split(":")[0]) in ("Conv2D", "DepthwiseConv2dNative", "MatMul")
                                 or i.split(":")[0] in bias_adds for i in n.input)
    ]
    assert leftover == []
    assert "Mul" not in op_counts(result)
    assert_same_outputs(graph, result, outputs, atol=1e-5, feeds={"img": IMAGES})


@requires_oracle
def test_tf2_recipe_matches_oracle_on_keras_cnn(cnn):
    use_bias, graph = cnn
    ours = TransformGraph(graph, ["img"], ["Identity"], TF2_RECIPE)
    oracle = oracle_transform(graph, ["img"], ["Identity"], TF2_RECIPE)
    ours_nodes = {n.name: (n.op, [canonical_input_name(i) for i in n.input]) for n in ours.node}
    oracle_nodes = {n.name: (n.op, [canonical_input_name(i) for i in n.input]) for n in oracle.node}
    if use_bias:
        # The oracle leaves Mul(BiasAdd(conv), scale); we fold the scale into weights and bias.
        assert op_counts(oracle)["Mul"] == 2 and "Mul" not in op_counts(ours)
        assert_same_outputs(oracle, ours, ["Identity"], atol=1e-5, feeds={"img": IMAGES})
        return
    assert ours_nodes == oracle_nodes
    ours_consts, oracle_consts = consts_of(ours), consts_of(oracle)
    for name, value in oracle_consts.items():
        np.testing.assert_array_equal(ours_consts[name], value, err_msg=name)
    assert_same_outputs(oracle, ours, ["Identity"], atol=0, feeds={"img": IMAGES})


# ---------------------------------------------------------------------------------------------
# fold_old_batch_norms
# ---------------------------------------------------------------------------------------------

BN_STATS = {
    2: ([10.0, 20.0], [0.25, 0.5], [0.1, 0.6], [1.0, 2.0]),
    4: ([10.0, 20.0, 30.0, 40.0], [0.25, 0.5, 0.75, 1.0], [0.1, 0.6, 1.1, 1.6], [1.0, 2.0, 3.0, 4.0]),
}


def bn_consts(channels):
    mean, variance, beta, gamma = BN_STATS[channels]
    return const("mean_op", mean), const("variance_op", variance), const("beta_op", beta), const("gamma_op", gamma)


def with_batch_norm(graph_body, bn_op, channels, input_name="conv_op", name="output", **attrs):
    """``graph_body`` plus a batch norm of ``bn_op`` type on ``input_name``."""

    def graph():
        graph_body()
        bn_consts(channels)

    graph_def = build(graph)
    if bn_op == "BatchNormWithGlobalNormalization":
        # Deprecated from GraphDef version 9: build the node by hand, as the C++ test does.
        node = make_node(bn_op, name, [input_name, "mean_op", "variance_op", "beta_op", "gamma_op"], {
            "T": types_pb2.DT_FLOAT, "variance_epsilon": 1e-5, "scale_after_normalization": False,
        })
        graph_def.versions.producer = 8
    else:
        node = fused_batch_norm(bn_op, name, input_name, **attrs)
    graph_def.node.append(node)
    return graph_def


def fused_batch_norm(bn_op, name, input_name, is_training=False):
    node = make_node(bn_op, name, [input_name, "gamma_op", "beta_op", "mean_op", "variance_op"], {
        "T": types_pb2.DT_FLOAT, "epsilon": 1e-5, "is_training": is_training,
    })
    if bn_op != "FusedBatchNorm":
        node.attr["U"].type = types_pb2.DT_FLOAT
    return node


def plain_conv(op_type="Conv2D"):
    def graph():
        inputs, weights = conv_input_and_weights(op_type)
        conv(op_type, inputs, weights)

    return graph


def concat_convs(split):
    def graph():
        shape, weight_shape = ((1, 1, 6, 2), (1, 2, 2, 1)) if split else ((1, 1, 12, 1), (1, 2, 1, 2))
        branches = [
            conv("Conv2D", const(f"input_op{i}", INPUT_VALUES, shape),
                 const(f"weights{i}_op", [1, 2, 3, 4], weight_shape), name=f"conv{i}_op")
            for i in range(2)
        ]
        axis = const("axis_op", 3 if split else 2, dtype=np.int32)
        tf.raw_ops.ConcatV2(values=branches, axis=axis, name="concat_op")

    return graph


def batch_to_space_conv():
    inputs = const("input_op", INPUT_VALUES, (2, 1, 3, 2))
    output = conv("Conv2D", inputs, const("weights_op", WEIGHT_VALUES, (1, 2, 2, 2)))
    tf.raw_ops.BatchToSpaceND(input=output, block_shape=const("block_shape_op", [1, 2], dtype=np.int32),
                              crops=const("crops_op", [[0, 0], [0, 1]], dtype=np.int32), name="batch_to_space_op")


BN_TYPES = ["BatchNormWithGlobalNormalization", "FusedBatchNorm"]
OLD_BN_SCENARIOS = {
    f"{family}-{bn}": args
    for bn in BN_TYPES
    for family, args in {
        "conv": (plain_conv(), bn, 2, "conv_op"),
        "depthwise": (plain_conv("DepthwiseConv2dNative"), bn, 4, "conv_op"),
        "concat-split": (concat_convs(True), bn, 2, "concat_op"),
        "concat-no-split": (concat_convs(False), bn, 2, "concat_op"),
        "batch-to-space": (batch_to_space_conv, bn, 2, "batch_to_space_op"),
    }.items()
}
EXPECTED_OLD_BN_NODES = {
    "conv": {"conv_op", "conv_op_bn_offset", "output"},
    "depthwise": {"conv_op", "conv_op_bn_offset", "output"},
    "concat-split": {"conv0_op", "conv1_op", "conv0_op_bn_offset", "conv1_op_bn_offset", "concat_op_bn_in0",
                     "concat_op_bn_in1", "axis_op", "output"},
    "concat-no-split": {"conv0_op", "conv1_op", "conv0_op_bn_offset", "conv1_op_bn_offset", "concat_op_bn_in0",
                        "concat_op_bn_in1", "axis_op", "output"},
    "batch-to-space": {"conv_op", "conv_op_bn_offset", "conv_op/biasadd", "block_shape_op", "crops_op", "output"},
}


@pytest.mark.parametrize("scenario", list(OLD_BN_SCENARIOS))
def test_fold_old_batch_norms(scenario):
    graph = with_batch_norm(*OLD_BN_SCENARIOS[scenario])
    result = TransformGraph(graph, [], ["output"], ["fold_old_batch_norms"])
    family = scenario.rsplit("-", 1)[0]
    ops = ops_by_name(result)
    assert not [op for op in ops.values() if "BatchNorm" in op]
    assert EXPECTED_OLD_BN_NODES[family] <= set(ops)
    assert not {"mean_op", "variance_op", "beta_op", "gamma_op"} & set(ops)
    assert_same_outputs(graph, result, ["output"], atol=2e-5)


@pytest.mark.parametrize(
    ("bn_op", "offset"),
    [("BatchNormWithGlobalNormalization", [-19.8996, -27.6840]), ("FusedBatchNorm", [-19.8996, -55.9680])],
)
def test_fold_old_batch_norms_offsets(bn_op, offset):
    graph = with_batch_norm(plain_conv(), bn_op, 2, "conv_op")
    result = TransformGraph(graph, [], ["output"], ["fold_old_batch_norms"])
    nodes = nodes_by_name(result)
    assert nodes["output"].op == "BiasAdd" and list(nodes["output"].input) == ["conv_op", "conv_op_bn_offset"]
    assert nodes["output"].attr["data_format"].s == b"NHWC"
    np.testing.assert_allclose(consts_of(result)["conv_op_bn_offset"], offset, atol=1e-4)


def test_fold_old_batch_norms_folds_v3_in_inference_mode():
    graph = with_batch_norm(plain_conv(), "FusedBatchNormV3", 2, "conv_op")
    result = TransformGraph(graph, [], ["output"], ["fold_old_batch_norms"])
    assert ops_by_name(result)["output"] == "BiasAdd"
    assert_same_outputs(graph, result, ["output"], atol=2e-5)


@pytest.mark.parametrize(
    "graph",
    [
        with_batch_norm(plain_conv(), "FusedBatchNormV3", 2, "conv_op", is_training=True),
        with_batch_norm(plain_conv(), "FusedBatchNorm", 2, "conv_op", is_training=True),
    ],
    ids=["v3-training", "v1-training"],
)
def test_fold_old_batch_norms_leaves_training_batch_norms(graph):
    assert sorted_nodes(TransformGraph(graph, [], ["output"], ["fold_old_batch_norms"])) == sorted_nodes(graph)


def test_fold_old_batch_norms_negative_case_leaves_graph_unchanged():
    graph = build(plain_conv())
    assert TransformGraph(graph, [], ["conv_op"], ["fold_old_batch_norms"]) == graph


def test_fold_old_batch_norms_leaves_conv_read_elsewhere():
    graph = with_batch_norm(plain_conv(), "FusedBatchNorm", 2, "conv_op")
    graph.node.append(make_node("Relu", "other_reader", ["conv_op"], {"T": types_pb2.DT_FLOAT}))
    result = TransformGraph(graph, [], ["output", "other_reader"], ["fold_old_batch_norms"])
    assert ops_by_name(result)["output"] == "FusedBatchNorm"
    assert_same_outputs(graph, result, ["output", "other_reader"], atol=0)


def test_fold_old_batch_norms_leaves_batch_norm_whose_statistics_are_read():
    graph = with_batch_norm(plain_conv(), "FusedBatchNorm", 2, "conv_op")
    graph.node.append(make_node("Neg", "batch_mean_reader", ["output:1"], {"T": types_pb2.DT_FLOAT}))
    result = TransformGraph(graph, [], ["output", "batch_mean_reader"], ["fold_old_batch_norms"])
    assert ops_by_name(result)["output"] == "FusedBatchNorm"


def test_fold_old_batch_norms_with_shared_constants_terminates():
    """Two batch norms share their Consts: the C++ loop never ended; both fold here."""

    def second_conv():
        plain_conv()()
        inputs = const("input_op_2", -INPUT_VALUES, (1, 1, 6, 2))
        conv("Conv2D", inputs, const("weights_op_2", WEIGHT_VALUES * 2, (1, 2, 2, 2)), name="conv_op_2")

    graph = with_batch_norm(second_conv, "FusedBatchNorm", 2, "conv_op")
    graph.node.append(fused_batch_norm("FusedBatchNorm", "output_2", "conv_op_2"))
    result = TransformGraph(graph, [], ["output", "output_2"], ["fold_old_batch_norms"])
    assert "FusedBatchNorm" not in op_counts(result)
    assert_same_outputs(graph, result, ["output", "output_2"], atol=2e-5)


def test_fold_old_batch_norms_rejects_mismatched_vectors():
    graph = with_batch_norm(plain_conv(), "FusedBatchNorm", 2, "conv_op")
    for node in graph.node:
        if node.name == "variance_op":
            node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.ones(3, np.float32)))
    expected = r"variance Const 'variance_op' of 'output' has shape \[3\], expected \[2\]"
    with pytest.raises(TransformError, match=expected):
        TransformGraph(graph, [], ["output"], ["fold_old_batch_norms"])


@requires_oracle
@pytest.mark.parametrize("scenario", list(OLD_BN_SCENARIOS))
def test_fold_old_batch_norms_matches_oracle(scenario):
    graph = with_batch_norm(*OLD_BN_SCENARIOS[scenario])
    ours = TransformGraph(graph, [], ["output"], ["fold_old_batch_norms"])
    oracle = oracle_transform(graph, [], ["output"], "fold_old_batch_norms")
    assert_same_structure(ours, oracle)
    ours_consts, oracle_consts = consts_of(ours), consts_of(oracle)
    for name, value in oracle_consts.items():
        np.testing.assert_array_equal(ours_consts[name], value, err_msg=name)
    assert_same_outputs(oracle, ours, ["output"], atol=1e-5)


@requires_oracle
def test_fold_old_batch_norms_folds_v3_unlike_oracle():
    graph = with_batch_norm(plain_conv(), "FusedBatchNormV3", 2, "conv_op")
    oracle = oracle_transform(graph, [], ["output"], "fold_old_batch_norms")
    assert ops_by_name(oracle)["output"] == "FusedBatchNormV3"
    ours = TransformGraph(graph, [], ["output"], ["fold_old_batch_norms"])
    v1_oracle = oracle_transform(with_batch_norm(plain_conv(), "FusedBatchNorm", 2, "conv_op"), [], ["output"],
                                 "fold_old_batch_norms")
    # V3 in inference mode folds into exactly what the oracle makes of the same V1 node.
    assert_same_structure(ours, v1_oracle)
    assert_same_outputs(v1_oracle, ours, ["output"], atol=1e-6)


@requires_oracle
def test_fold_old_batch_norms_keeps_conv_read_elsewhere_where_oracle_breaks_it():
    graph = with_batch_norm(plain_conv(), "FusedBatchNorm", 2, "conv_op")
    graph.node.append(make_node("Relu", "other_reader", ["conv_op"], {"T": types_pb2.DT_FLOAT}))
    oracle = oracle_transform(graph, [], ["output", "other_reader"], "fold_old_batch_norms")
    expected = run_graph(graph, ["other_reader"])[0]
    assert not np.allclose(run_graph(oracle, ["other_reader"])[0], expected)
    ours = TransformGraph(graph, [], ["output", "other_reader"], ["fold_old_batch_norms"])
    np.testing.assert_array_equal(run_graph(ours, ["other_reader"])[0], expected)


@requires_oracle
def test_fold_old_batch_norms_leaves_training_v1_where_oracle_folds_it():
    graph = with_batch_norm(plain_conv(), "FusedBatchNorm", 2, "conv_op", is_training=True)
    assert "FusedBatchNorm" not in op_counts(oracle_transform(graph, [], ["output"], "fold_old_batch_norms"))
    assert ops_by_name(TransformGraph(graph, [], ["output"], ["fold_old_batch_norms"]))["output"] == "FusedBatchNorm"


def test_fold_old_batch_norms_splits_concat_on_axis_minus_one():
    def graph():
        concat_convs(True)()

    graph_def = with_batch_norm(graph, "FusedBatchNorm", 2, "concat_op")
    for node in graph_def.node:
        if node.name == "axis_op":
            node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.int32(-1)))
    result = TransformGraph(graph_def, [], ["output"], ["fold_old_batch_norms"])
    assert {"concat_op_bn_in0", "concat_op_bn_in1"} <= set(ops_by_name(result))
    assert consts_of(result)["conv0_op_bn_offset"].shape == (1,)
    assert_same_outputs(graph_def, result, ["output"], atol=2e-5)
