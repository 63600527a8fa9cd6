"""Small seeded SavedModels for the SavedModel tests (conftest builds each once per session): a
Keras CNN with batch norm, a TF 1 estimator-style Iris export with a lookup table, a tf.Module
with several signatures (one of them reading a TF 2 lookup table), a TF 1 export whose table
reads a vocabulary asset, a model that reads a file, and an MLP wide enough for int8 MatMuls;
plus inputs near their classes."""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import itertools

import tensorflow as tf

IRIS_FEATURES = ["petal_length", "petal_width", "sepal_length", "sepal_width"]
IRIS_CLASSES = [b"setosa", b"virginica", b"versicolor"]
IRIS_HIDDEN = [512, 512, 512]
# Per-class feature means (cm) in IRIS_FEATURES order, for IRIS_CLASSES.
IRIS_CENTRES = np.array([[1.46, 0.25, 5.01, 3.43], [5.55, 2.03, 6.59, 2.97], [4.26, 1.33, 5.94, 2.77]])
MODULE_CLASSES = 10

LOSSLESS = (
    "remove_nodes(op=Identity) fold_constants(ignore_errors=true) fold_batch_norms fold_old_batch_norms "
    "strip_unused_nodes sort_by_execution_order"
)
QUANTISING = (
    "remove_nodes(op=Identity) fold_constants(ignore_errors=true) fold_batch_norms fold_old_batch_norms "
    "round_weights(num_steps=256) quantize_weights strip_unused_nodes sort_by_execution_order"
)

# Two levels per weight tensor: it changes the classes of many rows on any CPU, so the agreement
# gate is tested on a loss no kernel difference can hide (QUANTISING's flips are border cases).
DESTRUCTIVE = "round_weights(num_steps=2) quantize_weights(minimum_size=1)"
# The gate sends every rounded or quantised weight back to float, so DESTRUCTIVE alone ends up
# passing; dropping the ReLUs is a loss no lossy unit explains: the gate cannot make it pass.
BEYOND_THE_GATE = "remove_nodes(op=Relu) " + DESTRUCTIVE


def ridge_head(features: np.ndarray, labels: np.ndarray, classes: int, margin: float = 8.0):
    """A logits layer fitted in closed form (ridge regression onto ``margin`` x one-hot), so the
    untrained random network below it still classifies its clusters with clear margins: 8-bit
    weights then keep the classes, as a trained model's would."""
    targets = margin * (np.eye(classes)[labels] - 1.0 / classes)
    mean = features.mean(axis=0)
    centred = features - mean
    kernel = np.linalg.solve(centred.T @ centred + 1.0 * np.eye(features.shape[1]), centred.T @ targets)
    bias = targets.mean(axis=0) - mean @ kernel
    return kernel.astype(np.float32), bias.astype(np.float32)


def cluster_samples(centres: np.ndarray, rows: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(centres), rows)
    return (centres[labels] + rng.normal(0, spread, (rows, centres.shape[1]))).astype(np.float32), labels


def build_keras_cnn(directory: str) -> None:
    """Conv-BN-ReLU twice, global pooling, softmax over 10 classes; BN statistics randomised so
    folding them changes the weights. Exported with ``model.export`` (signatures serve and
    serving_default)."""
    import keras

    keras.utils.set_random_seed(7)
    inputs = keras.Input((12, 12, 3), name="image")
    x = keras.layers.Conv2D(32, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(64, 3, padding="same", name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="classes")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(7)
    for name in ("bn1", "bn2"):
        layer = model.get_layer(name)
        gamma, beta, mean, variance = layer.get_weights()
        layer.set_weights([
            rng.uniform(0.5, 1.5, gamma.shape).astype(np.float32),
            rng.normal(0, 0.1, beta.shape).astype(np.float32),
            rng.normal(0, 0.2, mean.shape).astype(np.float32),
            rng.uniform(0.5, 2.0, variance.shape).astype(np.float32),
        ])
    dense = model.get_layer("classes")
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel * 20.0, bias])
    model.export(directory, verbose=False)


def build_tf1_iris(directory: str) -> None:
    """The notebook's DNNClassifier export rebuilt with tf.compat.v1: one float Placeholder per
    feature (shape [-1]), ref variables read through ``/read`` Identity nodes (a resource
    variable for the logits), string classes from a constant-initialised lookup table run by
    main_op, signatures ``predict`` and ``serving_default``."""
    v1 = tf.compat.v1
    rng = np.random.default_rng(19830610)
    graph = tf.Graph()
    with graph.as_default():
        features = {name: v1.placeholder(tf.float32, [None], name=name) for name in IRIS_FEATURES}
        net = tf.stack([features[name] for name in IRIS_FEATURES], axis=1, name="dnn/input_from_feature_columns/concat")
        sizes = [4, *IRIS_HIDDEN, 3]
        samples, labels = cluster_samples(IRIS_CENTRES, 600, 0.25, 1)
        hidden = samples
        values = []
        for index in range(len(sizes) - 2):
            kernel = rng.normal(0, np.sqrt(2.0 / sizes[index]), (sizes[index], sizes[index + 1])).astype(np.float32)
            bias = rng.normal(0, 0.1, sizes[index + 1]).astype(np.float32)
            values.append((kernel, bias))
            hidden = np.maximum(hidden @ kernel + bias, 0.0)
        values.append(ridge_head(hidden, labels, 3))
        variables = []
        for index, (kernel_value, bias_value) in enumerate(values):
            last = index == len(values) - 1
            scope = "dnn/logits" if last else f"dnn/hiddenlayer_{index}"
            with v1.variable_scope(scope):
                zeros = v1.zeros_initializer()
                kernel = v1.get_variable("kernel", kernel_value.shape, initializer=zeros, use_resource=last)
                bias = v1.get_variable("bias", bias_value.shape, initializer=zeros, use_resource=last)
            variables += [(kernel, kernel_value), (bias, bias_value)]
            net = tf.nn.bias_add(tf.matmul(net, kernel), bias, name=f"{scope}/BiasAdd")
            if not last:
                net = tf.nn.relu(net, name=f"{scope}/Relu")
        logits = tf.identity(net, name="dnn/head/logits")
        with tf.name_scope("dnn/head/predictions"):
            probabilities = tf.nn.softmax(logits, name="probabilities")
            class_ids = tf.expand_dims(tf.argmax(logits, axis=1), -1, name="ExpandDims")
            table = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(
                    tf.constant([0, 1, 2], tf.int64), tf.constant(IRIS_CLASSES)
                ),
                default_value="UNKNOWN",
            )
            classes = tf.identity(table.lookup(class_ids), name="str_classes")
        predict = v1.saved_model.predict_signature_def(
            inputs=features,
            outputs={"class_ids": class_ids, "classes": classes, "logits": logits, "probabilities": probabilities},
        )
        with v1.Session(graph=graph) as session:
            # Feeding each initial value keeps the weights out of the graph (only in the checkpoint).
            for variable, value in variables:
                session.run(variable.initializer, {variable.initializer.inputs[1]: value})
            builder = v1.saved_model.Builder(directory)
            builder.add_meta_graph_and_variables(
                session,
                ["serve"],
                signature_def_map={"predict": predict, "serving_default": predict},
                main_op=v1.tables_initializer(),
            )
            builder.save()


def build_tf1_vocabulary_asset(directory: str, scratch: str) -> None:
    """A TF 1 export whose output maps int64 ids to words through a vocabulary-file asset."""
    v1 = tf.compat.v1
    vocabulary = os.path.join(scratch, "vocab.txt")
    with open(vocabulary, "w") as stream:
        stream.write("zero\none\ntwo\nthree\n")
    graph = tf.Graph()
    with graph.as_default():
        ids = v1.placeholder(tf.int64, [None], name="ids")
        initializer = tf.lookup.TextFileInitializer(
            vocabulary, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE
        )
        table = tf.lookup.StaticHashTable(initializer, default_value="OOV")
        words = tf.identity(table.lookup(ids), name="words")
        signature = v1.saved_model.predict_signature_def({"ids": ids}, {"words": words})
        with v1.Session(graph=graph) as session:
            session.run(v1.tables_initializer())
            builder = v1.saved_model.Builder(directory)
            builder.add_meta_graph_and_variables(
                session,
                ["serve"],
                signature_def_map={"serving_default": signature},
                main_op=v1.tables_initializer(),
                assets_collection=v1.get_collection(v1.GraphKeys.ASSET_FILEPATHS),
            )
            builder.save()


class MultiSignatureModule(tf.Module):
    """Three signatures over one shared 32x256 and one 256x10 weight: probabilities and class
    names (a TF 2 lookup table), the hidden embedding, and a two-input score with a string output."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(3)
        hidden = rng.normal(0, 0.25, (32, 256)).astype(np.float32)
        bias = rng.normal(0, 0.1, (256,)).astype(np.float32)
        samples, labels = cluster_samples(module_centres(), 2000, 0.3, 2)
        head, head_bias = ridge_head(np.maximum(samples @ hidden + bias, 0.0), labels, MODULE_CLASSES)
        self.hidden = tf.Variable(hidden, name="hidden")
        self.bias = tf.Variable(bias, name="bias")
        self.head = tf.Variable(head, name="head")
        self.head_bias = tf.Variable(head_bias, name="head_bias")
        self.names = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.range(10, dtype=tf.int64), tf.constant([f"class_{i}" for i in range(10)])
            ),
            default_value="unknown",
        )

    def _embed(self, x):
        return tf.nn.relu(tf.matmul(x, self.hidden) + self.bias)

    @tf.function(input_signature=[tf.TensorSpec([None, 32], tf.float32, name="x")])
    def classify(self, x):
        logits = tf.matmul(self._embed(x), self.head) + self.head_bias
        ids = tf.argmax(logits, axis=1)
        return {"probabilities": tf.nn.softmax(logits), "class_ids": ids, "class_names": self.names.lookup(ids)}

    @tf.function(input_signature=[tf.TensorSpec([None, 32], tf.float32, name="x")])
    def embed(self, x):
        return {"embedding": self._embed(x)}

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 32], tf.float32, name="x"),
            tf.TensorSpec([], tf.float32, name="temperature"),
        ]
    )
    def score(self, x, temperature):
        logits = (tf.matmul(self._embed(x), self.head) + self.head_bias) / temperature
        best = tf.reduce_max(logits, axis=1)
        return {"best": best, "label": tf.strings.as_string(tf.argmax(logits, axis=1))}


def build_module(directory: str) -> None:
    module = MultiSignatureModule()
    tf.saved_model.save(
        module,
        directory,
        signatures={"classify": module.classify, "embed": module.embed, "score": module.score},
    )


class ReadsAFile(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([], tf.string, name="path")])
    def read(self, path):
        return {"contents": tf.io.read_file(path)}


def build_reads_a_file(directory: str) -> None:
    module = ReadsAFile()
    tf.saved_model.save(module, directory, signatures={"serving_default": module.read})


def module_centres() -> np.ndarray:
    return np.random.default_rng(11).normal(0, 1.0, (MODULE_CLASSES, 32))


def iris_inputs(rows: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
    """Iris-like features (centimetres) close to the class means, where the fitted head is
    confident (as a trained model is on its data), one array per input."""
    samples, _ = cluster_samples(IRIS_CENTRES, rows, 0.15, seed)
    return {name: samples[:, i].copy() for i, name in enumerate(IRIS_FEATURES)}


def module_inputs(rows: int = 256, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Inputs for each signature of the tf.Module, around its clusters."""
    x, _ = cluster_samples(module_centres(), rows, 0.3, seed)
    return {"classify": {"x": x}, "embed": {"x": x}, "score": {"x": x, "temperature": np.float32(2.0)}}


class WideMlp(tf.Module):
    """16 -> 64 -> 64 -> 8 ReLU net, seeded: wide enough for quantize_matmuls to make int8 layers."""

    def __init__(self) -> None:
        rng = np.random.default_rng(23)
        sizes = (16, 64, 64, 8)
        self.layers = [
            (tf.Variable(rng.normal(0, np.sqrt(2 / m), (m, n)).astype(np.float32)),
             tf.Variable(rng.normal(0, 0.1, n).astype(np.float32)))
            for m, n in itertools.pairwise(sizes)
        ]

    @tf.function(input_signature=[tf.TensorSpec([None, 16], tf.float32, name="x")])
    def scores(self, x):
        for index, (weights, bias) in enumerate(self.layers):
            x = tf.nn.bias_add(tf.matmul(x, weights), bias)
            if index < len(self.layers) - 1:
                x = tf.nn.relu(x)
        return {"scores": x}


def build_wide_mlp(directory: str) -> None:
    module = WideMlp()
    tf.saved_model.save(module, directory, signatures={"serving_default": module.scores})


def wide_mlp_inputs(rows: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(0, 1, (rows, 16)).astype(np.float32)}


# Every layer int8 (the MLP's are narrower than quantize_matmuls' default minimum_dim of 32 on one side).
INT8 = "remove_nodes(op=Identity) fold_constants(ignore_errors=true) quantize_matmuls(minimum_dim=1) strip_unused_nodes"


class MixedScaleWideDeep(tf.Module):
    """A wide & deep scorer whose first Dense reads embeddings (|e| < 1) beside raw numeric
    features of very different scales (price in [0, 30], rating in [0, 1]): one 8-bit range
    over [0, 30] resolves the embeddings in steps of 0.12, so that layer in int8 flips classes, the case
    the per-layer guard is for. 34 -> 64 -> 64 -> 4, seeded weights."""

    USERS, ITEMS = 50, 80

    def __init__(self) -> None:
        rng = np.random.default_rng(41)
        self.user_table = tf.Variable(rng.normal(0, 0.3, (self.USERS, 16)).astype(np.float32))
        self.item_table = tf.Variable(rng.normal(0, 0.3, (self.ITEMS, 16)).astype(np.float32))
        first = rng.normal(0, np.sqrt(2 / 34), (34, 64))
        first[32] *= 0.03  # price: moves the scores about as much as an embedding column, at 100x its scale
        self.layers = [
            (tf.Variable(first.astype(np.float32)), tf.Variable(rng.normal(0, 0.1, 64).astype(np.float32))),
            (tf.Variable(rng.normal(0, np.sqrt(2 / 64), (64, 64)).astype(np.float32)),
             tf.Variable(rng.normal(0, 0.1, 64).astype(np.float32))),
            (tf.Variable(rng.normal(0, np.sqrt(2 / 64), (64, 4)).astype(np.float32)),
             tf.Variable(np.zeros(4, np.float32))),
        ]

    @tf.function(input_signature=[
        tf.TensorSpec([None], tf.int64, name="user"), tf.TensorSpec([None], tf.int64, name="item"),
        tf.TensorSpec([None], tf.float32, name="price"), tf.TensorSpec([None], tf.float32, name="rating"),
    ])
    def scores(self, user, item, price, rating):
        x = tf.concat([tf.gather(self.user_table, user), tf.gather(self.item_table, item),
                       price[:, None], rating[:, None]], axis=1)
        for index, (weights, bias) in enumerate(self.layers):
            x = tf.nn.bias_add(tf.matmul(x, weights), bias)
            if index < len(self.layers) - 1:
                x = tf.nn.relu(x)
        return {"scores": x}


def build_mixed_scale_wide_deep(directory: str) -> None:
    module = MixedScaleWideDeep()
    tf.saved_model.save(module, directory, signatures={"serving_default": module.scores})


def mixed_scale_inputs(rows: int = 1024, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "user": rng.integers(0, MixedScaleWideDeep.USERS, rows).astype(np.int64),
        "item": rng.integers(0, MixedScaleWideDeep.ITEMS, rows).astype(np.int64),
        "price": rng.uniform(0, 30, rows).astype(np.float32),
        "rating": rng.uniform(0, 1, rows).astype(np.float32),
    }


# The int8 list of a user who calibrates: the folds, then both int8 transforms, at their defaults.
CALIBRATED_INT8 = (
    "remove_nodes(op=Identity) fold_constants(ignore_errors=true) fold_batch_norms fold_old_batch_norms "
    "quantize_convs quantize_matmuls strip_unused_nodes sort_by_execution_order"
)


class OutputKindsModule(tf.Module):
    """One signature with an output of every kind, most behind shape-only ops, and two that only
    look like a kind (a Softmax scaled, a regression head whose double an ArgMax reads). The
    multi-label head is a nested tf.function, so its Sigmoid is in the function library."""

    def __init__(self) -> None:
        rng = np.random.default_rng(5)
        self.class_head = tf.Variable(rng.normal(0, 1, (8, 4)).astype(np.float32))
        self.tag_head = tf.Variable(rng.normal(0, 1, (8, 6)).astype(np.float32))
        self.box_head = tf.Variable(rng.normal(0, 1, (8, 3)).astype(np.float32))

    @tf.function
    def tag_probabilities(self, x):
        return tf.sigmoid(tf.matmul(x, self.tag_head))

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32, name="x")])
    def predict(self, x):
        logits = tf.matmul(x, self.class_head)
        probabilities = tf.nn.softmax(logits)
        tags = self.tag_probabilities(x)
        box = tf.matmul(x, self.box_head) + 1.0
        return {
            "probabilities": tf.reshape(tf.identity(probabilities), [-1, 4]),
            "logits": tf.identity(logits),
            "class_ids": tf.argmax(logits, axis=1),
            "top_two": probabilities[:, :2],
            "picked": tf.identity_n([box, probabilities])[1],
            "tags": tf.squeeze(tf.expand_dims(tags, 1), 1),
            "tags_float64": tf.cast(tags, tf.float64),
            "tagged": tags > 0.5,
            "box": box,
            "box_rank": tf.argmax(box * 2.0, axis=1),
            "scaled": probabilities * 2.0,
        }


# What each output of OutputKindsModule is, and the op or dtype that says so.
OUTPUT_KINDS = {
    "probabilities": ("class", "Softmax"),
    "logits": ("class", "MatMul read by ArgMax"),
    "class_ids": ("label", "dtype int64"),
    "top_two": ("class", "Softmax"),
    "picked": ("class", "Softmax"),
    "tags": ("multi_label", "Sigmoid"),
    "tags_float64": ("multi_label", "Sigmoid"),
    "tagged": ("label", "dtype bool"),
    "box": ("regression", "AddV2"),
    "box_rank": ("label", "dtype int64"),
    "scaled": ("regression", "Mul"),
}


def build_output_kinds_module(directory: str) -> None:
    module = OutputKindsModule()
    tf.saved_model.save(module, directory, signatures={"serving_default": module.predict})


def output_kinds_inputs(rows: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(0, 1, (rows, 8)).astype(np.float32)}


class EmbeddingWideDeep(tf.Module):
    """Issue 27's wide & deep: two 5,000 x 32 id embeddings (Keras' uniform(-0.05, 0.05) init
    scale) beside 13 N(0, 1) numeric features -> Dense 512 -> Dense 256 (ReLU) -> one sigmoid
    click probability. The first Dense reads inputs of two scales 20x apart, so one 8-bit range
    resolves the embeddings coarsely; seeded weights, the last layer scaled so the logits spread
    (sd ~2) and the labels at 0.5 mean something."""

    IDS, WIDTH, NUMERIC = 5000, 32, 13

    def __init__(self) -> None:
        rng = np.random.default_rng(27)
        self.user_table = tf.Variable(rng.uniform(-0.05, 0.05, (self.IDS, self.WIDTH)).astype(np.float32))
        self.item_table = tf.Variable(rng.uniform(-0.05, 0.05, (self.IDS, self.WIDTH)).astype(np.float32))
        features = 2 * self.WIDTH + self.NUMERIC
        first = rng.normal(0, np.sqrt(2 / features), (features, 512))
        self.layers = [
            (tf.Variable(first.astype(np.float32)), tf.Variable(rng.normal(0, 0.1, 512).astype(np.float32))),
            (tf.Variable(rng.normal(0, np.sqrt(2 / 512), (512, 256)).astype(np.float32)),
             tf.Variable(rng.normal(0, 0.1, 256).astype(np.float32))),
        ]
        self.head = tf.Variable(rng.normal(0, 2.0 / np.sqrt(256), (256, 1)).astype(np.float32))
        self.head_bias = tf.Variable(np.asarray([-1.0], np.float32))

    @tf.function(input_signature=[
        tf.TensorSpec([None], tf.int64, name="user"), tf.TensorSpec([None], tf.int64, name="item"),
        tf.TensorSpec([None, NUMERIC], tf.float32, name="numeric"),
    ])
    def click(self, user, item, numeric):
        x = tf.concat([tf.gather(self.user_table, user), tf.gather(self.item_table, item), numeric], axis=1)
        for weights, bias in self.layers:
            x = tf.nn.relu(tf.nn.bias_add(tf.matmul(x, weights), bias))
        return {"probability": tf.sigmoid(tf.matmul(x, self.head) + self.head_bias)}


def build_embedding_wide_deep(directory: str) -> None:
    module = EmbeddingWideDeep()
    tf.saved_model.save(module, directory, signatures={"serving_default": module.click})


def embedding_wide_deep_inputs(rows: int = 2048, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "user": rng.integers(0, EmbeddingWideDeep.IDS, rows).astype(np.int64),
        "item": rng.integers(0, EmbeddingWideDeep.IDS, rows).astype(np.int64),
        "numeric": rng.normal(0, 1, (rows, EmbeddingWideDeep.NUMERIC)).astype(np.float32),
    }
