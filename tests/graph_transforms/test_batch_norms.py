"""fold_batch_norms: the old tool's scenarios, TF 2 Keras graphs, and the C++ engine as oracle."""

import numpy as np
import pytest
import tensorflow as tf
from graph_helpers import (
    INPUT_VALUES,
    WEIGHT_VALUES,
    assert_same_outputs,
    assert_same_structure,
    build,
    const,
    consts_of,
    conv,
    conv_input_and_weights,
    frozen_function_graph,
    nodes_by_name,
    op_counts,
    ops_by_name,
    oracle_transform,
    requires_oracle,
    run_graph,
    sorted_nodes,
)

from serving_optimiser.graph_transforms import TransformError, TransformGraph
from serving_optimiser.graph_transforms.graph_utils import canonical_input_name


def with_const_value(graph_def, name, values):
    """``graph_def`` with Const ``name`` holding ``values`` (shapes TF would refuse to build)."""
    for node in graph_def.node:
        if node.name == name:
            node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.asarray(values, np.float32)))
    return graph_def


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
