"""Training's sums are fixed by the graph, not by the CPU: every contraction of the traced training
step, gradients included, is at most CONTRACTION_DEPTH_BOUND deep, and Grappler does not rewrite
the step into approximate kernels."""

import numpy as np
import pytest
from pipeline_helpers import TINY

from serving_optimiser.pipeline.bounded_contraction import (
    CONTRACTION_DEPTH_BOUND,
    bounded_matmul,
    contraction_depths,
    graph_as_traced,
)
from serving_optimiser.pipeline.params import TrainParams
from serving_optimiser.pipeline.train import build_model, compiled_model, training_step_graph

NOTEBOOK = TrainParams(hidden_units=[512, 512, 512, 512], learning_rate=0.05, batch_size=50, epochs=1, seed=1)


def step_depths(params: TrainParams, rows: int) -> dict[str, int | None]:
    return contraction_depths(training_step_graph(compiled_model(params, n_classes=3), rows))


@pytest.mark.parametrize("rows", [50, 20], ids=["full-batch", "last-batch-of-120-rows"])
def test_notebook_training_step_contracts_at_most_the_bound(rows):
    depths = step_depths(NOTEBOOK, rows)
    # Forward: 1 (4 features deep) + 2 x 3 (512 deep) + 2 (the head); dX: 1 for the head (3 outputs
    # deep) + 2 x 4 (512 outputs; the first layer's dX is computed too); dW: one per layer (rows deep).
    assert len(depths) == 9 + 9 + 5, sorted(depths)
    assert None not in depths.values()
    assert max(depths.values()) <= CONTRACTION_DEPTH_BOUND
    assert sorted(depths.values()).count(256) == 2 * 3 + 2 + 2 * 4
    assert sorted(depths.values()).count(rows) == 5


def test_a_batch_above_the_bound_splits_dw_over_the_rows():
    params = TrainParams(hidden_units=[64], learning_rate=0.05, batch_size=300, epochs=1, seed=1)
    depths = step_depths(params, 300)
    assert max(depths.values()) <= CONTRACTION_DEPTH_BOUND
    assert sorted(d for d in depths.values() if d > 64) == [256, 256]  # dW of both layers: 256 + 44 rows
    assert sorted(depths.values()).count(44) == 2


def test_the_walk_sees_a_plain_dense_layer_too_deep():
    """The check can fail: Keras' own Dense contracts 512 deep forward and in dX."""
    import keras
    import tensorflow as tf

    model = keras.Sequential([keras.Input((512,)), keras.layers.Dense(512), keras.layers.Dense(3)])
    model.compile(optimizer="adagrad", loss="mse")
    model.optimizer.build(model.trainable_variables)
    graph = tf.function(model.train_step).get_concrete_function(
        (tf.TensorSpec([50, 512], tf.float32), tf.TensorSpec([50, 3], tf.float32))
    ).graph
    assert max(contraction_depths(graph).values()) == 512


def test_bounded_matmul_matches_a_plain_matmul_and_its_gradients():
    """Same function: forward and both gradients within float32 rounding of a 512-deep sum."""
    import tensorflow as tf

    rng = np.random.default_rng(3)
    x = tf.constant(rng.standard_normal((50, 512)), tf.float32)
    w = tf.Variable(rng.standard_normal((512, 300)).astype(np.float32))
    upstream = tf.constant(rng.standard_normal((50, 300)), tf.float32)
    results = []
    for product in (lambda a, b: bounded_matmul(a, b, max_rows=50), tf.linalg.matmul):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            y = product(x, w)
            loss = tf.reduce_sum(y * upstream)
        results.append([t.numpy() for t in (y, *tape.gradient(loss, [x, w]))])
    for bounded, plain, name in zip(results[0], results[1], ("y", "dx", "dw")):
        assert bounded.shape == plain.shape, name
        np.testing.assert_allclose(bounded, plain, rtol=0, atol=1e-4 * np.abs(plain).max(), err_msg=name)
    # dW contracts 50 rows deep in both, the same single MatMul: the same bits.
    np.testing.assert_array_equal(results[0][2], results[1][2])


def test_grappler_would_rewrite_adagrads_division_into_an_approximate_rsqrt():
    """Why training runs with Grappler off: inside a tf.function, a / sqrt(b) becomes a * rsqrt(b),
    whose float kernel is the CPU's rsqrtps approximation; with Grappler off it is exact."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    a = rng.standard_normal(10_000).astype(np.float32)
    b = (rng.random(10_000) * 10 + 0.1).astype(np.float32)
    exact = a / np.sqrt(b)
    rewritten = tf.function(lambda a, b: a / tf.sqrt(b))(a, b).numpy()
    assert np.count_nonzero(rewritten != exact) > 100
    with graph_as_traced():
        as_traced = tf.function(lambda a, b: a / tf.sqrt(b))(a, b).numpy()
    np.testing.assert_array_equal(as_traced, exact)
    # Restored afterwards: the rest of the process keeps TensorFlow's defaults.
    assert not tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)


def test_the_models_weights_keep_keras_dense_layout():
    model = build_model(TINY.hidden_units, n_classes=3)
    assert [type(layer).__name__ for layer in model.layers] == ["BoundedDense"] * (len(TINY.hidden_units) + 1)
    assert [tuple(w.shape) for w in model.layers[0].weights] == [(4, TINY.hidden_units[0]), (TINY.hidden_units[0],)]
