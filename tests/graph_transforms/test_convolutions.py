"""flatten_atrous_conv, fuse_pad_and_conv, fuse_resize_and_conv, fuse_resize_pad_and_conv."""

import logging

import numpy as np
import pytest
import tensorflow as tf
from graph_helpers import (
    assert_same_structure,
    nodes_by_name,
    op_counts,
    ops_by_name,
    oracle_transform,
    ours_and_oracle,
    requires_oracle,
    run_graph,
)
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from serving_optimiser.graph_transforms import TransformGraph

# ---------------------------------------------------------------------------------------------
# fuse_* (spec 7.9)
# ---------------------------------------------------------------------------------------------

FUSE_INPUT = np.array([1, 4, 2, 5, 3, 6, -1, -4, -2, -5, -3, -6], np.float32).reshape(1, 2, 3, 2)
FUSE_WEIGHTS = np.array([1, 2, 3, 4, 0.1, 0.2, 0.3, 0.4], np.float32).reshape(1, 2, 2, 2)
FUSE_TOLERANCE = 1e-5


def fuse_graph(
    resize: bool,
    pad: bool,
    half_pixel_centers: bool = False,
    pad_op: str = "MirrorPad",
    conv_op: str = "Conv2D",
    dilations=(1, 1, 1, 1),
    pad_control: bool = False,
    resize_also_read: bool = False,
):
    """The spec's input [1,2,3,2] -> (ResizeBilinear to [12,4]) -> (MirrorPad REFLECT) -> conv 'output'."""
    graph = tf.Graph()
    with graph.as_default():
        tensor = tf.constant(FUSE_INPUT, name="input_op")
        if resize:
            size = tf.constant([12, 4], name="size")
            tensor = tf.raw_ops.ResizeBilinear(
                images=tensor, size=size, align_corners=False, half_pixel_centers=half_pixel_centers,
                name="resize_op",
            )
            if resize_also_read:
                tf.identity(tensor, name="resize_reader")
        if pad:
            pad_dims = tf.constant([[0, 0], [1, 1], [2, 2], [0, 0]], name="pad_dims_op")
            if pad_op == "MirrorPad":
                tensor = tf.raw_ops.MirrorPad(input=tensor, paddings=pad_dims, mode="REFLECT", name="pad_op")
            else:
                tensor = tf.raw_ops.Pad(input=tensor, paddings=pad_dims, name="pad_op")
        weights = tf.constant(FUSE_WEIGHTS, name="weights_op")
        if conv_op == "Conv2D":
            tf.raw_ops.Conv2D(
                input=tensor, filter=weights, strides=[1, 1, 1, 1], padding="VALID", dilations=list(dilations),
                name="output",
            )
        else:
            tf.raw_ops.DepthwiseConv2dNative(
                input=tensor, filter=weights, strides=[1, 1, 1, 1], padding="VALID", name="output"
            )
        if pad_control:
            tf.no_op(name="pad_ready")
    graph_def = graph.as_graph_def()
    if pad_control:
        nodes_by_name(graph_def)["pad_op"].input.append("^pad_ready")
    return graph_def


FUSE_CASES = {
    "resize-pad-conv": (True, True, "fuse_resize_pad_and_conv", "FusedResizeAndPadConv2D"),
    "resize-conv": (True, False, "fuse_resize_and_conv", "FusedResizeAndPadConv2D"),
    "pad-conv": (False, True, "fuse_pad_and_conv", "FusedPadConv2D"),
}


@pytest.mark.parametrize("case", list(FUSE_CASES), ids=list(FUSE_CASES))
def test_fuse_spec_scenarios(case):
    resize, pad, transform, fused_op = FUSE_CASES[case]
    graph = fuse_graph(resize, pad)
    result = TransformGraph(graph, [], ["output"], [transform])
    ops = op_counts(result)
    assert not {"Conv2D", "MirrorPad", "ResizeBilinear"} & set(ops)
    output = nodes_by_name(result)["output"]
    assert output.op == fused_op
    expected_inputs = {
        "resize-pad-conv": ["input_op", "size", "pad_dims_op", "weights_op"],
        "resize-conv": ["input_op", "size", "output_dummy_paddings", "weights_op"],
        "pad-conv": ["input_op", "pad_dims_op", "weights_op"],
    }[case]
    assert list(output.input) == expected_inputs
    assert output.attr["padding"].s == b"VALID"
    assert list(output.attr["strides"].list.i) == [1, 1, 1, 1]
    if resize:
        assert output.attr["resize_align_corners"].b is False
    if case == "resize-conv":
        dummy = nodes_by_name(result)["output_dummy_paddings"]
        assert dummy.attr["value"].tensor.dtype == tf.int32.as_datatype_enum
        np.testing.assert_array_equal(tf.make_ndarray(dummy.attr["value"].tensor), np.zeros((4, 2)))
    before, after = (run_graph(g, ["output"])[0] for g in (graph, result))
    np.testing.assert_allclose(after, before, rtol=0, atol=FUSE_TOLERANCE)


@requires_oracle
@pytest.mark.parametrize("case", list(FUSE_CASES), ids=list(FUSE_CASES))
def test_fuse_matches_oracle(case):
    resize, pad, transform, _ = FUSE_CASES[case]
    graph = fuse_graph(resize, pad)
    ours, oracle = ours_and_oracle(graph, [], ["output"], transform)
    assert_same_structure(ours, oracle)
    assert [n.name for n in ours.node] == [n.name for n in oracle.node]
    for ours_node, oracle_node in zip(ours.node, oracle.node, strict=True):
        assert dict(ours_node.attr) == dict(oracle_node.attr), ours_node.name
    ours_out, oracle_out = (run_graph(g, ["output"])[0] for g in (ours, oracle))
    np.testing.assert_allclose(ours_out, oracle_out, rtol=0, atol=FUSE_TOLERANCE)


@pytest.mark.parametrize(
    "transform", ["fuse_resize_and_conv", "fuse_resize_pad_and_conv"], ids=["resize-conv", "resize-pad-conv"]
)
def test_fuse_skips_half_pixel_centers(transform, caplog):
    graph = fuse_graph(True, transform == "fuse_resize_pad_and_conv", half_pixel_centers=True)
    with caplog.at_level(logging.WARNING):
        result = TransformGraph(graph, [], ["output"], [transform])
    assert result == graph
    assert "half_pixel_centers=true" in caplog.text and "'output'" in caplog.text
    np.testing.assert_array_equal(run_graph(result, ["output"])[0], run_graph(graph, ["output"])[0])


@requires_oracle
def test_fuse_half_pixel_centers_oracle_changes_results():
    """The C++ tool fused anyway and silently computed something else; we keep the graph."""
    graph = fuse_graph(True, False, half_pixel_centers=True)
    oracle = oracle_transform(graph, [], ["output"], "fuse_resize_and_conv")
    assert ops_by_name(oracle)["output"] == "FusedResizeAndPadConv2D"
    difference = np.abs(run_graph(oracle, ["output"])[0] - run_graph(graph, ["output"])[0]).max()
    assert difference > 1.0


def test_fuse_skips_dilated_conv(caplog):
    graph = fuse_graph(False, True, dilations=(1, 2, 1, 1))
    with caplog.at_level(logging.WARNING):
        result = TransformGraph(graph, [], ["output"], ["fuse_pad_and_conv"])
    assert result == graph
    assert "dilations=[1, 2, 1, 1]" in caplog.text


@pytest.mark.parametrize(
    ("attr", "value", "reason"),
    [
        ("data_format", b"NCHW", "data_format=NCHW"),
        ("padding", b"EXPLICIT", "padding=EXPLICIT"),
        ("T", tf.int32.as_datatype_enum, "T=DT_INT32"),
    ],
    ids=["nchw", "explicit-padding", "int32"],
)
def test_fuse_skips_conv_the_fused_op_cannot_express(attr, value, reason, caplog):
    graph = fuse_graph(False, True)
    conv = nodes_by_name(graph)["output"]
    if isinstance(value, bytes):
        conv.attr[attr].s = value
    else:
        conv.attr[attr].type = value
    if attr == "padding":
        conv.attr["explicit_paddings"].list.i.extend([0, 0, 1, 1, 1, 1, 0, 0])
    with caplog.at_level(logging.WARNING):
        result = TransformGraph(graph, [], ["output"], ["fuse_pad_and_conv"])
    assert result == graph
    assert reason in caplog.text


@pytest.mark.parametrize(
    ("graph_args", "transform"),
    [
        ({"resize": False, "pad": True, "pad_op": "Pad"}, "fuse_pad_and_conv"),
        ({"resize": False, "pad": True, "conv_op": "DepthwiseConv2dNative"}, "fuse_pad_and_conv"),
        ({"resize": False, "pad": True}, "fuse_resize_and_conv"),
        ({"resize": True, "pad": False}, "fuse_resize_pad_and_conv"),
        ({"resize": True, "pad": False, "resize_also_read": True}, "fuse_resize_and_conv"),
    ],
    ids=["plain-pad", "depthwise", "no-resize", "no-pad", "resize-read-elsewhere"],
)
def test_fuse_negative_cases_leave_graph_unchanged(graph_args, transform):
    graph = fuse_graph(**graph_args)
    outputs = ["output", "resize_reader"] if graph_args.get("resize_also_read") else ["output"]
    result = TransformGraph(graph, [], outputs, [transform])
    assert result == graph


def test_fuse_keeps_control_inputs_of_replaced_nodes():
    graph = fuse_graph(False, True, pad_control=True)
    result = TransformGraph(graph, [], ["output"], ["fuse_pad_and_conv"])
    assert list(nodes_by_name(result)["output"].input) == ["input_op", "pad_dims_op", "weights_op", "^pad_ready"]
    np.testing.assert_allclose(
        run_graph(result, ["output"])[0], run_graph(graph, ["output"])[0], rtol=0, atol=FUSE_TOLERANCE
    )


def test_fuse_inside_cond_branch_function():
    """on_functions: a MirrorPad -> Conv2D inside a tf.cond branch of a TF 2 frozen graph is fused too."""
    weights = tf.Variable(FUSE_WEIGHTS)

    def model(image, flag):
        def padded():
            padded_image = tf.raw_ops.MirrorPad(
                input=image, paddings=[[0, 0], [1, 1], [2, 2], [0, 0]], mode="REFLECT"
            )
            return tf.nn.conv2d(padded_image, weights, 1, "VALID")

        return tf.cond(flag, padded, lambda: tf.nn.conv2d(image, weights, 1, "SAME"))

    concrete = tf.function(model).get_concrete_function(
        tf.TensorSpec([1, 2, 3, 2], tf.float32, name="image"), tf.TensorSpec([], tf.bool, name="flag")
    )
    graph = convert_variables_to_constants_v2(concrete, lower_control_flow=False).graph.as_graph_def()
    result = TransformGraph(graph, ["image", "flag"], ["Identity"], ["fuse_pad_and_conv"])

    def branch_ops(graph_def):
        return sorted(n.op for f in graph_def.library.function for n in f.node_def if "Conv" in n.op)

    assert branch_ops(graph) == ["Conv2D", "Conv2D"]
    assert branch_ops(result) == ["Conv2D", "FusedPadConv2D"]
    feed = {"image": FUSE_INPUT, "flag": np.array(True)}
    np.testing.assert_allclose(
        run_graph(result, ["Identity"], feed)[0], run_graph(graph, ["Identity"], feed)[0], rtol=0, atol=FUSE_TOLERANCE
    )


# ---------------------------------------------------------------------------------------------
# flatten_atrous_conv (spec 7.4)
# ---------------------------------------------------------------------------------------------

ATROUS_INPUT = np.array(
    [.1, .4, .2, .5, .3, .6, -1, -.4, -.2, -.5, -.3, -.6, .1, .4, .2, .5, .3, .6], np.float32
).reshape(1, 3, 3, 2)
ATROUS_FILTER = np.array([.1, .2, .3, .4, .1, .2, .3, .4], np.float32).reshape(2, 2, 2, 1)
ATROUS_TOLERANCE = 1e-6


def atrous_graph(
    conv_op: str = "Conv2D",
    paddings=((1, 2), (1, 2)),
    crops=((0, 1), (0, 1)),
    strides=(1, 1, 1, 1),
    filter_also_read: bool = False,
):
    """The spec's scenario: input [1,3,3,2], block [2,2], 2x2 filter, VALID conv, BatchToSpaceND 'output'."""
    graph = tf.Graph()
    with graph.as_default():
        image = tf.constant(ATROUS_INPUT, name="input_op")
        to_batch = tf.raw_ops.SpaceToBatchND(
            input=image, block_shape=tf.constant([2, 2], name="block_shape"),
            paddings=tf.constant(paddings, name="paddings"), name="space_to_batch",
        )
        weights = tf.constant(ATROUS_FILTER, name="weights_op")
        conv = getattr(tf.raw_ops, conv_op)(
            input=to_batch, filter=weights, strides=list(strides), padding="VALID", name="conv"
        )
        tf.raw_ops.BatchToSpaceND(
            input=conv, block_shape=tf.constant([2, 2], name="block_shape_out"),
            crops=tf.constant(crops, name="crops"), name="output",
        )
        if filter_also_read:
            tf.identity(weights, name="filter_reader")
    return graph.as_graph_def()


CONV_OPS = ["Conv2D", "DepthwiseConv2dNative"]


@pytest.mark.parametrize("conv_op", CONV_OPS, ids=CONV_OPS)
def test_flatten_atrous_spec_scenario(conv_op):
    graph = atrous_graph(conv_op)
    result = TransformGraph(graph, [], ["output"], ["flatten_atrous_conv"])
    assert [(n.name, n.op) for n in result.node] == [
        ("input_op", "Const"), ("weights_op", "Const"), ("output", conv_op)
    ]
    output = nodes_by_name(result)["output"]
    assert list(output.input) == ["input_op", "weights_op"]
    assert output.attr["padding"].s == b"SAME"
    upsampled = tf.make_ndarray(nodes_by_name(result)["weights_op"].attr["value"].tensor)
    assert upsampled.shape == (3, 3, 2, 1)
    np.testing.assert_array_equal(upsampled[::2, ::2], ATROUS_FILTER)
    assert np.count_nonzero(upsampled[1]) == 0 and np.count_nonzero(upsampled[:, 1]) == 0
    before, after = (run_graph(g, ["output"])[0] for g in (graph, result))
    np.testing.assert_allclose(after, before, rtol=0, atol=ATROUS_TOLERANCE)


@requires_oracle
@pytest.mark.parametrize("conv_op", CONV_OPS, ids=CONV_OPS)
def test_flatten_atrous_matches_oracle(conv_op):
    ours, oracle = ours_and_oracle(atrous_graph(conv_op), [], ["output"], "flatten_atrous_conv")
    assert [n.name for n in ours.node] == [n.name for n in oracle.node]
    assert_same_structure(ours, oracle)
    for ours_node, oracle_node in zip(ours.node, oracle.node, strict=True):
        assert ours_node == oracle_node
    ours_out, oracle_out = (run_graph(g, ["output"])[0] for g in (ours, oracle))
    np.testing.assert_allclose(ours_out, oracle_out, rtol=0, atol=ATROUS_TOLERANCE)


def with_space_to_batch_graph(padding: str, rate: int, filter_size: int):
    """What tf.nn.with_space_to_batch exports for a dilated conv: computed paddings and crops."""
    graph = tf.Graph()
    rng = np.random.RandomState(7)
    with graph.as_default():
        image = tf.constant(rng.randn(2, 7, 8, 3).astype(np.float32), name="image")
        weights = tf.constant(rng.randn(filter_size, filter_size, 3, 4).astype(np.float32), name="weights")
        result = tf.nn.with_space_to_batch(
            image, dilation_rate=[rate, rate], padding=padding, filter_shape=[filter_size, filter_size],
            op=lambda tensor, num_spatial_dims, padding: tf.nn.conv2d(tensor, weights, 1, padding),
        )
        tf.identity(result, name="out")
    return graph.as_graph_def()


@pytest.mark.parametrize(
    ("padding", "rate", "filter_size"),
    [("SAME", 2, 3), ("SAME", 3, 2), ("VALID", 2, 3), ("VALID", 3, 2)],
    ids=["same-rate2-3x3", "same-rate3-2x2", "valid-rate2-3x3", "valid-rate3-2x2"],
)
def test_flatten_atrous_tensorflow_exports_exactly(padding, rate, filter_size):
    graph = with_space_to_batch_graph(padding, rate, filter_size)
    result = TransformGraph(graph, [], ["out"], ["flatten_atrous_conv"])
    assert op_counts(result).get("SpaceToBatchND", 0) == 0 and op_counts(result).get("BatchToSpaceND", 0) == 0
    flattened = nodes_by_name(result)["BatchToSpaceND"]
    assert flattened.op == "Conv2D"
    assert flattened.attr["padding"].s == padding.encode()
    before, after = (run_graph(g, ["out"])[0] for g in (graph, result))
    assert after.shape == before.shape
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5)


@requires_oracle
def test_flatten_atrous_valid_export_oracle_changes_shape():
    """The C++ tool made a VALID atrous conv SAME, so the output grew; ours stays VALID."""
    graph = with_space_to_batch_graph("VALID", 2, 3)
    ours, oracle = ours_and_oracle(graph, [], ["out"], "flatten_atrous_conv")
    assert nodes_by_name(oracle)["BatchToSpaceND"].attr["padding"].s == b"SAME"
    assert nodes_by_name(ours)["BatchToSpaceND"].attr["padding"].s == b"VALID"
    original, ours_out, oracle_out = (run_graph(g, ["out"])[0] for g in (graph, ours, oracle))
    assert ours_out.shape == original.shape
    assert oracle_out.shape != original.shape


@pytest.mark.parametrize(
    ("graph_args", "reason"),
    [
        ({"paddings": ((2, 3), (2, 3)), "crops": ((0, 1), (0, 1))}, "match neither a SAME nor a VALID"),
        ({"strides": (1, 2, 2, 1)}, "strides=[1, 2, 2, 1]"),
        ({"filter_also_read": True}, "also read by 'filter_reader'"),
    ],
    ids=["inexact-paddings", "strided", "shared-filter"],
)
def test_flatten_atrous_skips_inexact_matches(graph_args, reason, caplog):
    graph = atrous_graph(**graph_args)
    outputs = ["output", "filter_reader"] if graph_args.get("filter_also_read") else ["output"]
    with caplog.at_level(logging.WARNING):
        result = TransformGraph(graph, [], outputs, ["flatten_atrous_conv"])
    assert result == graph
    assert reason in caplog.text


@requires_oracle
def test_flatten_atrous_inexact_paddings_oracle_changes_results():
    graph = atrous_graph(paddings=((2, 3), (2, 3)), crops=((0, 1), (0, 1)))
    oracle = oracle_transform(graph, [], ["output"], "flatten_atrous_conv")
    assert ops_by_name(oracle)["output"] == "Conv2D"
    assert run_graph(oracle, ["output"])[0].shape != run_graph(graph, ["output"])[0].shape


def test_flatten_atrous_negative_case_leaves_graph_unchanged():
    graph = fuse_graph(False, True)
    assert TransformGraph(graph, [], ["output"], ["flatten_atrous_conv"]) == graph


def test_flatten_atrous_skips_computed_block_shape(caplog):
    graph = atrous_graph()
    block = nodes_by_name(graph)["block_shape"]
    block.op = "Identity"
    block.ClearField("attr")
    block.attr["T"].type = tf.int32.as_datatype_enum
    block.input.append("block_shape_out")
    with caplog.at_level(logging.WARNING):
        result = TransformGraph(graph, [], ["output"], ["flatten_atrous_conv"])
    assert result == graph
    assert "block_shape 'block_shape' is a Identity, not a Const" in caplog.text
