"""fuse_layer_norms: Keras 3 LayerNormalization rewritten into the form grappler fuses, on real
frozen Keras models: structure, numerics (bit for bit unfused, to float rounding fused), the
fusion itself (an _MklLayerNorm runs), near misses left alone, idempotence."""

import logging

import numpy as np
import pytest
import tensorflow as tf
from graph_helpers import build, frozen_function_graph, nodes_by_name, op_counts, ops_run, run_graph

from serving_optimiser.graph_transforms import TransformGraph
from serving_optimiser.graph_transforms.transforms._int8 import int8_kernels_available

PREPARE = ["remove_nodes(op=Identity)", "fold_constants(ignore_errors=true)"]


def _frozen_keras(shape: tuple[int, ...], **norm_options) -> tf.compat.v1.GraphDef:
    import keras

    keras.utils.set_random_seed(7)
    inputs = keras.Input(shape)
    # A residual add, as in a transformer block: grappler fuses only where it can prove the norm's
    # output has its input's shape (a tensordot's run-time Reshape hides the sequence length).
    hidden = keras.layers.Add()([inputs, keras.layers.Rescaling(0.5, offset=1.0)(inputs)])
    normed = keras.layers.LayerNormalization(name="norm", **norm_options)(hidden)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(normed))
    norm = model.get_layer("norm")
    rng = np.random.default_rng(3)
    norm.set_weights([rng.normal(1.0, 0.3, w.shape).astype(np.float32) for w in norm.get_weights()])
    graph = frozen_function_graph(lambda x: model(x), tf.TensorSpec([None, *shape], tf.float32))
    placeholder = next(n.name for n in graph.node if n.op == "Placeholder")
    output = "Identity"  # the frozen function's return value
    assert output in nodes_by_name(graph)
    return TransformGraph(graph, [placeholder], [output], PREPARE), placeholder, output


@pytest.fixture(scope="module", params=[(8, 16), (16,)], ids=["rank3", "rank2"])
def keras_norm(request):
    graph, placeholder, output = _frozen_keras(request.param)
    fused = TransformGraph(graph, [placeholder], [output], ["fuse_layer_norms"])
    rows = np.random.default_rng(5).normal(0.0, 2.0, (32, *request.param)).astype(np.float32)
    return graph, fused, placeholder, output, rows, len(request.param) + 1


def _norm_output(graph) -> str:
    return next(n.name for n in graph.node if n.op == "AddV2" and n.name.split("/")[-2:-1] == ["norm_1"]
                and any("fuse_layer_norms/shift" in i for i in n.input))


def test_the_keras_layer_norm_takes_the_form_grappler_fuses(keras_norm):
    graph, fused, *_, rank = keras_norm
    before, after = op_counts(graph), op_counts(fused)
    assert before["Neg"] == 1 and before.get("StopGradient", 0) == 1 and "Sub" not in before
    assert "Neg" not in after and "StopGradient" not in after and after["Sub"] == 1
    nodes = nodes_by_name(fused)
    output = nodes[_norm_output(fused)]
    prefix = f"{output.name}/fuse_layer_norms"
    scaled_x, shift = (nodes[name] for name in output.input)
    scale = nodes[scaled_x.input[1]]
    assert shift.name == f"{prefix}/shift" and shift.op == "Sub" and shift.input[0] == f"{prefix}/beta"
    rsqrt = nodes[scale.input[0]]
    assert scale.op == "Mul" and rsqrt.op == "Rsqrt" and scale.input[1] == f"{prefix}/gamma"
    mean = nodes[nodes[shift.input[1]].input[1]]
    assert nodes[shift.input[1]].input[0] == scale.name and mean.op == "Mean"
    assert scaled_x.input[0] == mean.input[0]  # x * scale reads the normalised tensor itself
    variance = nodes[nodes[rsqrt.input[0]].input[0]]
    assert variance.op == "Mean" and nodes[variance.input[0]].op == "SquaredDifference"
    assert list(nodes[variance.input[0]].input) == [mean.input[0], mean.name]
    for name, length in ((f"{prefix}/gamma", 16), (f"{prefix}/beta", 16), (f"{prefix}/axis", 1)):
        assert tf.make_ndarray(nodes[name].attr["value"].tensor).shape == (length,)
    assert tf.make_ndarray(nodes[f"{prefix}/axis"].attr["value"].tensor).tolist() == [rank - 1]
    assert mean.input[1] == variance.input[1] == f"{prefix}/axis"
    # Keras' broadcast gamma and beta Consts ([1, ..., C]) had no other reader: they go.
    assert not [n.name for n in fused.node if n.op == "Const" and "norm_1/Reshape" in n.name]
    assert [n.name for n in graph.node if n.op == "Const" and "norm_1/Reshape" in n.name]


def test_the_rewritten_graph_computes_the_same_function(keras_norm):
    graph, fused, placeholder, output, rows, _ = keras_norm
    (expected,), (actual,) = (run_graph(g, [output], {placeholder: rows}) for g in (graph, fused))
    if not int8_kernels_available():
        np.testing.assert_array_equal(actual, expected)  # same ops, nothing fused: bit for bit
    # Fused (oneDNN on), the norm sums in another order: measured 5e-7 of the output range.
    assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.onednn
def test_tensorflow_fuses_the_rewritten_norm_into_one_op(keras_norm):
    graph, fused, placeholder, output, rows, _ = keras_norm
    assert "_MklLayerNorm" not in ops_run(graph, output, {placeholder: rows})
    ran = ops_run(fused, output, {placeholder: rows})
    assert "_MklLayerNorm" in ran and "Rsqrt" not in ran and "SquaredDifference" not in ran


def test_running_it_twice_changes_nothing_more(keras_norm):
    _, fused, placeholder, output, *_ = keras_norm
    assert TransformGraph(fused, [placeholder], [output], ["fuse_layer_norms"]) == fused


def test_a_norm_without_beta_stays_as_it_is_with_one_log_line(caplog):
    graph, placeholder, output = _frozen_keras((8, 16), center=False)
    with caplog.at_level(logging.INFO, logger="serving_optimiser"):
        result = TransformGraph(graph, [placeholder], [output], ["fuse_layer_norms"])
    assert result == graph
    lines = [r.getMessage() for r in caplog.records if r.name.endswith(".layer_norms")]
    assert len(lines) == 1 and "stays as it is: no float Const beta" in lines[0]


def test_a_norm_whose_inner_node_is_an_output_stays_as_it_is(keras_norm):
    graph, _, placeholder, output, *_ = keras_norm
    negated_mean = next(n.name for n in graph.node if n.op == "Neg")
    result = TransformGraph(graph, [placeholder], [output, negated_mean], ["fuse_layer_norms"])
    assert result == graph


def _hand_built_norm(gamma_shape: tuple[int, ...]):
    """The Keras 3 spelling on a rank-4 input, gamma and beta of ``gamma_shape`` (not Keras' own:
    its broadcast shape always has the input's rank)."""
    rng = np.random.default_rng(11)
    gamma, beta = (rng.normal(1.0, 0.3, gamma_shape).astype(np.float32) for _ in range(2))

    def make():
        x = tf.compat.v1.placeholder(tf.float32, [None, 2, 3, 8], name="x")
        mean = tf.reduce_mean(x, [-1], keepdims=True)
        variance = tf.reduce_mean(tf.math.squared_difference(x, tf.stop_gradient(mean)), [-1], keepdims=True)
        scale = tf.math.rsqrt(variance + 1e-3) * tf.constant(gamma, name="gamma")
        tf.add(x * scale, -mean * scale + tf.constant(beta, name="beta"), name="out")

    return build(make), rng.normal(0.0, 2.0, (5, 2, 3, 8)).astype(np.float32)


@pytest.mark.parametrize("gamma_shape", [(1, 1, 8), (8,)], ids=["rank3_gamma", "vector_gamma"])
def test_the_axis_is_the_inputs_last_not_gammas(gamma_shape):
    graph, rows = _hand_built_norm(gamma_shape)
    fused = TransformGraph(graph, ["x"], ["out"], ["fuse_layer_norms"])
    assert tf.make_ndarray(nodes_by_name(fused)["out/fuse_layer_norms/axis"].attr["value"].tensor).tolist() == [3]
    (expected,), (actual,) = (run_graph(g, ["out"], {"x": rows}) for g in (graph, fused))
    assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()


def test_a_gamma_with_more_axes_than_the_input_stays_as_it_is(caplog):
    rng = np.random.default_rng(2)

    def make():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8], name="x")
        mean = tf.reduce_mean(x, [-1], keepdims=True)
        variance = tf.reduce_mean(tf.math.squared_difference(x, tf.stop_gradient(mean)), [-1], keepdims=True)
        scale = tf.math.rsqrt(variance + 1e-3) * tf.constant(rng.normal(size=(1, 1, 8)).astype(np.float32))
        tf.add(x * scale, -mean * scale + tf.constant(rng.normal(size=(1, 1, 8)).astype(np.float32)), name="out")

    graph = build(make)
    with caplog.at_level(logging.INFO, logger="serving_optimiser"):
        assert TransformGraph(graph, ["x"], ["out"], ["fuse_layer_norms"]) == graph
    assert "gamma or beta has more axes than its input (rank 2)" in caplog.text
