"""fold_old_batch_norms: the old tool's scenarios and the C++ engine as oracle."""

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
    nodes_by_name,
    op_counts,
    ops_by_name,
    oracle_transform,
    requires_oracle,
    run_graph,
    sorted_nodes,
)
from tensorflow.core.framework import types_pb2

from serving_optimiser.graph_transforms import TransformError, TransformGraph
from serving_optimiser.graph_transforms.graph_utils import make_node

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


# ---------------------------------------------------------------------------------------------
# A TF 1 / tf.layers batch norm on a 2-D tensor: MatMul -> Reshape[-1,1,1,C] -> FusedBatchNormV3
# -> Reshape[-1,C], frozen the TF 1 way (variables, then convert_variables_to_constants)
# ---------------------------------------------------------------------------------------------

DENSE_FEATURES = np.random.default_rng(3).normal(size=(16, 4)).astype(np.float32)


def frozen_dense_with_2d_batch_norm(to_4d_shape=(-1, 1, 1, 3), to_2d_shape=(-1, 3)):
    graph = tf.Graph()
    rng = np.random.default_rng(7)
    with graph.as_default():
        features = tf.compat.v1.placeholder(tf.float32, [None, 4], name="features")
        kernel = tf.compat.v1.Variable(rng.normal(size=(4, 3)).astype(np.float32), name="dense/kernel")
        stats = {
            name: tf.compat.v1.Variable(value.astype(np.float32), name=f"bn/{name}")
            for name, value in (
                ("gamma", rng.uniform(0.5, 2.0, 3)), ("beta", rng.normal(size=3)),
                ("moving_mean", rng.normal(size=3)), ("moving_variance", rng.uniform(0.1, 3.0, 3)),
            )
        }
        dense = tf.linalg.matmul(features, kernel, name="dense/MatMul")
        as_4d = tf.reshape(dense, to_4d_shape, name="bn/Reshape")
        normalised = tf.raw_ops.FusedBatchNormV3(
            x=as_4d, scale=stats["gamma"], offset=stats["beta"], mean=stats["moving_mean"],
            variance=stats["moving_variance"], epsilon=1e-3, is_training=False, name="bn/FusedBatchNormV3",
        )[0]
        tf.reshape(normalised, to_2d_shape, name="bn/Reshape_1")
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            return tf.compat.v1.graph_util.convert_variables_to_constants(
                session, graph.as_graph_def(), ["bn/Reshape_1"]
            )


def test_fold_old_batch_norms_folds_a_2d_batch_norm_between_reshapes():
    frozen = frozen_dense_with_2d_batch_norm()
    transforms = ["fold_constants(ignore_errors=true)", "fold_old_batch_norms", "strip_unused_nodes"]
    result = TransformGraph(frozen, ["features"], ["bn/Reshape_1"], transforms)
    counts = op_counts(result)
    assert "FusedBatchNormV3" not in counts and "Reshape" not in counts
    assert ops_by_name(result)["bn/Reshape_1"] == "BiasAdd"
    feeds = {"features": DENSE_FEATURES}
    assert_same_outputs(frozen, result, ["bn/Reshape_1"], atol=2e-5, feeds=feeds)


@pytest.mark.parametrize(
    ("to_4d_shape", "to_2d_shape"),
    [((-1, 1, 1, 3), (1, -1)), ((-1, 1, 1, 3), (-1, 1, 3))],
    ids=["rows-flattened", "stays-3d"],
)
def test_fold_old_batch_norms_leaves_other_reshapes_around_a_batch_norm(to_4d_shape, to_2d_shape):
    frozen = frozen_dense_with_2d_batch_norm(to_4d_shape, to_2d_shape)
    folded = TransformGraph(frozen, ["features"], ["bn/Reshape_1"], ["fold_constants(ignore_errors=true)"])
    result = TransformGraph(folded, ["features"], ["bn/Reshape_1"], ["fold_old_batch_norms"])
    # A refused match keeps its nodes (in match order, as C++ did), so compare as a set.
    assert sorted_nodes(result) == sorted_nodes(folded)
    assert consts_of(result).keys() == consts_of(folded).keys()
    assert op_counts(result)["FusedBatchNormV3"] == 1
