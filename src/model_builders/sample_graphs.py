"""Frozen sample graphs for tests and benchmarks: the notebook's Iris DNN as a TF 1 style frozen
graph, and a Keras MobileNetV2 frozen the TF 2 way.

Both are built from scratch (seeded, no downloads), so the differential tests and
``scripts/bench_transforms.py`` work on the same graphs without importing each other.
"""

from __future__ import annotations

import itertools

import numpy as np
from tensorflow.core.framework import graph_pb2

IRIS_FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
IRIS_CLASSES = ("setosa", "versicolor", "virginica")
# Per-class mean and standard deviation of the four features in the classic Iris data set
# (computed from data/iris.csv), rows in IRIS_CLASSES order, columns in IRIS_FEATURES order.
IRIS_CLASS_MEANS = np.array(
    [[5.006, 3.418, 1.464, 0.244], [5.936, 2.770, 4.260, 1.326], [6.588, 2.974, 5.552, 2.026]]
)
IRIS_CLASS_STDS = np.array(
    [[0.352, 0.381, 0.174, 0.107], [0.516, 0.314, 0.470, 0.198], [0.636, 0.322, 0.552, 0.275]]
)
IRIS_OUTPUT = "dnn/head/predictions/probabilities"
IRIS_HIDDEN_UNITS = (512, 512, 512, 512)

# The notebook's transform list (its `optimize_graph` call).
NOTEBOOK_TRANSFORMS = (
    "remove_nodes(op=Identity)",
    "fold_constants(ignore_errors=true)",
    "fold_batch_norms",
    "fold_old_batch_norms",
    "round_weights(num_steps=256)",
    "quantize_weights",
    "strip_unused_nodes",
    "sort_by_execution_order",
)

MOBILENET_INPUT = "images"
MOBILENET_OUTPUT = "Identity"


def iris_samples(count: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Draw ``count`` rows from the Iris data distribution: a class uniformly at random, then
    each feature from that class's Gaussian. Returns ({feature name: float32 [count]}, labels)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(IRIS_CLASSES), size=count)
    values = rng.normal(IRIS_CLASS_MEANS[labels], IRIS_CLASS_STDS[labels]).astype(np.float32)
    return {name: values[:, i] for i, name in enumerate(IRIS_FEATURES)}, labels


def fit_iris_weights(
    seed: int = 0, hidden_units: tuple[int, ...] = IRIS_HIDDEN_UNITS, ridge: float = 1.0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Weights for the notebook's DNN that classify Iris well, in well under a second.

    Hidden layers keep seeded Glorot-uniform kernels (as the Estimator's dense layers were
    initialised) and small random biases; the logits layer is fitted by ridge regression on
    2048 samples of the Iris distribution (targets ±2 one-hot). About 98% accurate, with
    margins like a trained model's, so class agreement after quantisation is a real test:
    a random network's argmax is nearly constant over the data and agrees trivially.
    ``ridge`` bounds the logits weights; 1.0 keeps accuracy while not amplifying weight noise.
    Returns [(kernel, bias)] per layer, logits last; rows of the first kernel follow IRIS_FEATURES.
    """
    rng = np.random.default_rng(seed)
    sizes = (len(IRIS_FEATURES), *hidden_units)
    layers = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        kernel = rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)
        # Small non-zero biases, as training leaves them: all-zero biases would be identical
        # Consts (merge_duplicate_nodes merges them) and degenerate ranges for quantisation.
        bias = rng.normal(0.0, 0.05, size=fan_out).astype(np.float32)
        layers.append((kernel, bias))
    features, labels = iris_samples(2048, seed=seed + 1)
    hidden = np.stack([features[name] for name in IRIS_FEATURES], axis=1)
    for kernel, bias in layers:
        hidden = np.maximum(hidden @ kernel + bias, 0.0)
    design = np.concatenate([hidden, np.ones((len(hidden), 1), np.float32)], axis=1).astype(np.float64)
    targets = np.eye(len(IRIS_CLASSES))[labels] * 4.0 - 2.0
    # The bias column is regularised too; with 2048 rows that is immaterial.
    solution = np.linalg.solve(design.T @ design + ridge * np.eye(design.shape[1]), design.T @ targets)
    layers.append((solution[:-1].astype(np.float32), solution[-1].astype(np.float32)))
    return layers


def iris_dnn_graph(weights: list[tuple[np.ndarray, np.ndarray]]) -> graph_pb2.GraphDef:
    """Freeze the notebook's Iris DNN with ``weights`` the TF 1 way.

    Four float Placeholders of shape [None] (ExpandDims, then concatenated in the Estimator's
    alphabetical feature order), ReLU dense layers ``dnn/hiddenlayer_<i>``, ``dnn/logits`` and
    a Softmax named ``dnn/head/predictions/probabilities``. Variables are ref variables frozen
    with ``convert_variables_to_constants``, so every weight Const is read through an Identity
    ``<variable>/read``, as in the notebook's frozen graph.
    """
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        placeholders = {
            name: tf.compat.v1.placeholder(tf.float32, shape=[None], name=name) for name in IRIS_FEATURES
        }
        with tf.name_scope("dnn/input_from_feature_columns/input_layer"):
            columns = [
                tf.expand_dims(placeholders[name], 1, name=f"{name}/ExpandDims")
                for name in sorted(IRIS_FEATURES)
            ]
            order = [IRIS_FEATURES.index(name) for name in sorted(IRIS_FEATURES)]
            hidden = tf.concat(columns, axis=1, name="concat")
        # The first kernel's rows follow IRIS_FEATURES; reorder them to the concat order.
        weights = [(weights[0][0][order], weights[0][1]), *weights[1:]]
        for i, (kernel, bias) in enumerate(weights):
            scope = f"dnn/hiddenlayer_{i}" if i < len(weights) - 1 else "dnn/logits"
            with tf.name_scope(scope):
                kernel_var = tf.compat.v1.Variable(kernel, name="kernel", use_resource=False)
                bias_var = tf.compat.v1.Variable(bias, name="bias", use_resource=False)
                product = tf.matmul(hidden, kernel_var, name="MatMul")
                hidden = tf.nn.bias_add(product, bias_var, name="BiasAdd")
                if i < len(weights) - 1:
                    hidden = tf.nn.relu(hidden, name="Relu")
        tf.nn.softmax(hidden, name=IRIS_OUTPUT)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            return tf.compat.v1.graph_util.convert_variables_to_constants(
                session, graph.as_graph_def(), [IRIS_OUTPUT]
            )


def frozen_iris_dnn(seed: int = 0, hidden_units: tuple[int, ...] = IRIS_HIDDEN_UNITS) -> graph_pb2.GraphDef:
    """The notebook's Iris DNN with fitted weights, frozen (see ``iris_dnn_graph``)."""
    return iris_dnn_graph(fit_iris_weights(seed, hidden_units))


def frozen_mobilenet_v2(seed: int = 0, alpha: float = 0.35, size: int = 96) -> graph_pb2.GraphDef:
    """A Keras MobileNetV2 (random weights, random batch-norm statistics) frozen the TF 2 way.

    Input Placeholder ``images`` [None, size, size, 3]; output ``Identity`` (softmax over 1000
    classes). The batch-norm moving statistics are randomised (they start at mean 0, variance
    1, which would make every batch norm the identity and hide folding mistakes).
    """
    import keras
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=alpha, weights=None)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape
            layer.gamma.assign(rng.uniform(0.5, 1.5, channels).astype(np.float32))
            layer.beta.assign(rng.normal(0.0, 0.1, channels).astype(np.float32))
            layer.moving_mean.assign(rng.normal(0.0, 0.1, channels).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, channels).astype(np.float32))

    def serve(images):
        return model(images, training=False)

    concrete = tf.function(serve).get_concrete_function(
        tf.TensorSpec([None, size, size, 3], tf.float32, name=MOBILENET_INPUT)
    )
    return convert_variables_to_constants_v2(concrete).graph.as_graph_def()


def mobilenet_logits(graph_def: graph_pb2.GraphDef) -> str:
    """The node the MobileNetV2 graph's Softmax reads (Keras numbers the scope per build)."""
    (softmax,) = [node for node in graph_def.node if node.op == "Softmax"]
    return softmax.input[0]


def mobilenet_images(count: int, seed: int = 0, size: int = 96) -> np.ndarray:
    """Smooth random images in [-1, 1] (8x8-pixel blocks of uniform noise): MobileNetV2's input
    scale, with some of natural images' spatial correlation."""
    blocks = np.random.default_rng(seed).uniform(-1.0, 1.0, (count, size // 8, size // 8, 3))
    return np.repeat(np.repeat(blocks, 8, axis=1), 8, axis=2).astype(np.float32)

