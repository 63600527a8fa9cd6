"""The model zoo (issue 16): real architectures built from Keras and TensorFlow code, seeded and with
no downloads (``weights=None``), each trained on its own data and exported as a SavedModel, with
held-out inputs from the same data for the comparisons.

Data: the image networks, the tf-keras CNN and the tf.Module (which reads a digit row by row)
learn scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes; a seeded split
keeps 256 for the comparisons). The token, text and id models learn seeded synthetic rules
(scikit-learn bundles no text or id data): a sentence's topic, and a click that depends on a
user-category cross.

A model whose classes are near ties makes class agreement meaningless: any rounding flips them.
So every model has learned its data, and each builder returns its accuracy on the held-out
rows, which the tests require to be well above chance. The Keras models are trained for a few
epochs with Adam; the applications' batch norms are then recalibrated (after so few steps the
moving averages, momentum 0.99-0.999, are still near their initial values and the model in
inference mode is not the one trained). The tf.Module keeps its seeded recurrent weights and
gets a logits layer fitted in closed form (ridge regression onto one-hot targets) on its final
states.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

LOSSLESS = (
    "remove_nodes(op=Identity) fold_constants(ignore_errors=true) fold_batch_norms fold_old_batch_norms "
    "strip_unused_nodes sort_by_execution_order"
)
QUANTIZE_WEIGHTS = (
    "remove_nodes(op=Identity) fold_constants(ignore_errors=true) fold_batch_norms fold_old_batch_norms "
    "quantize_weights strip_unused_nodes sort_by_execution_order"
)
LISTS = {"lossless": LOSSLESS, "quantize_weights": QUANTIZE_WEIGHTS}

# Held-out rows each model is compared on: at 256 rows, 99 % class agreement allows two flips.
SAMPLE_ROWS = 256


@dataclass(frozen=True)
class Built:
    """What a builder returns: held-out inputs (input key -> array, the same for every signature
    that has the key) and the exported model's accuracy on them."""

    inputs: dict[str, np.ndarray]
    accuracy: float


@dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[str], Built]
    heavy: bool  # skipped unless SERVING_OPTIMISER_ZOO=full (make test-zoo)
    summary: str


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

IMAGE_CLASSES = 10
DIGITS_HELD_OUT = 256


def _digits(held_out: bool) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits (1797 8x8 images, 0..16, 10 classes): the
    training rows, or the 256 held-out ones (a seeded split)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(1797).permutation(len(digits.target))
    rows = order[-DIGITS_HELD_OUT:] if held_out else order[:-DIGITS_HELD_OUT]
    return digits.images[rows], digits.target[rows]


def digit_images(size: int, held_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The digits scaled to 0..255, resized bilinearly to ``size`` x ``size``, over 3 channels."""
    images, labels = _digits(held_out)
    resized = tf.image.resize(images[..., None] * (255.0 / 16.0), (size, size), method="bilinear").numpy()
    return np.repeat(resized.astype(np.float32), 3, axis=-1), labels


def digit_sequences(held_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The digits read row by row: sequences of 8 steps of 8 pixels (0..1)."""
    images, labels = _digits(held_out)
    return (images / 16.0).astype(np.float32), labels


TOKEN_CLASSES = 3
VOCABULARY_SIZE = 64  # id 0 is never drawn (padding), 1..63 are words
SEQUENCE_LENGTH = 16
# Words 1..45 are three topics of 15 words; 46..63 are fillers any sentence may hold.
TOPIC_WORDS = [np.arange(1 + 15 * k, 16 + 15 * k) for k in range(TOKEN_CLASSES)]
FILLER_WORDS = np.arange(46, VOCABULARY_SIZE)


def topic_tokens(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of 16 word ids whose class is their topic: each word is from the topic with
    probability 0.45, from another topic with 0.15, a filler otherwise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, TOKEN_CLASSES, rows)
    tokens = np.empty((rows, SEQUENCE_LENGTH), np.int32)
    for index, label in enumerate(labels):
        kind = rng.choice(3, SEQUENCE_LENGTH, p=[0.45, 0.15, 0.40])
        other = (label + rng.integers(1, TOKEN_CLASSES, SEQUENCE_LENGTH)) % TOKEN_CLASSES
        words = np.where(
            kind == 0,
            rng.choice(TOPIC_WORDS[label], SEQUENCE_LENGTH),
            np.where(kind == 1, np.array(TOPIC_WORDS)[other, rng.integers(0, 15, SEQUENCE_LENGTH)],
                     rng.choice(FILLER_WORDS, SEQUENCE_LENGTH)),
        )
        tokens[index] = words
    return tokens, labels


WORDS = [f"w{i:02d}" for i in range(VOCABULARY_SIZE)]


def topic_sentences(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The topic rule as text: words ``w01``..``w63``, some capitalised, with punctuation that
    TextVectorization's standardisation strips."""
    tokens, labels = topic_tokens(rows, seed)
    rng = np.random.default_rng(seed + 1)
    sentences = []
    for row in tokens:
        words = [WORDS[t].upper() if rng.random() < 0.2 else WORDS[t] for t in row]
        sentences.append((" ".join(words) + rng.choice([".", "!", "?", ""])).encode())
    return np.array(sentences, dtype=object).reshape(-1, 1), labels


USERS, ITEMS, CATEGORIES = 200, 300, 12


def click_rows(rows: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """int64 ids (user, item, category) whose label (click or not) is a cross: users of group
    ``user % 4`` click categories of the same residue, and items under 60 flip the outcome."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, USERS, rows)
    item = rng.integers(0, ITEMS, rows)
    category = rng.integers(0, CATEGORIES, rows)
    labels = ((user % 4 == category % 4) ^ (item < 60)).astype(np.int64)
    features = {"user": user, "item": item, "category": category}
    return {k: v.astype(np.int64).reshape(-1, 1) for k, v in features.items()}, labels


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def ridge_head(features: np.ndarray, labels: np.ndarray, classes: int, margin: float = 8.0, penalty: float = 0.1):
    """Kernel and bias mapping ``features`` onto ``margin`` x centred one-hot targets (ridge
    regression, the penalty scaled to the features' own variance so that any scale works)."""
    targets = margin * (np.eye(classes)[labels] - 1.0 / classes)
    features = features.astype(np.float64)
    mean = features.mean(axis=0)
    centred = features - mean
    gram = centred.T @ centred
    ridge = penalty * np.trace(gram) / len(gram)
    kernel = np.linalg.solve(gram + ridge * np.eye(len(gram)), centred.T @ targets)
    bias = targets.mean(axis=0) - mean @ kernel
    return kernel.astype(np.float32), bias.astype(np.float32)


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(probabilities, axis=-1) == labels))


def recalibrate_batch_norms(model, x: np.ndarray) -> None:
    """Set every BatchNormalization layer's moving statistics to those of ``x`` in training mode
    (dropout off): after a few training steps the moving averages (momentum 0.99-0.999) are still
    near their initial values, and the model in inference mode would not be the one trained."""
    import keras

    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    dropouts = [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    saved = [layer.momentum for layer in norms], [layer.rate for layer in dropouts]
    for layer in norms:
        layer.momentum = 0.0
    for layer in dropouts:
        layer.rate = 0.0
    model(x, training=True)
    for layer, momentum in zip(norms, saved[0]):
        layer.momentum = momentum
    for layer, rate in zip(dropouts, saved[1]):
        layer.rate = rate


def _train(model, x, y, epochs: int, batch_size: int = 64, learning_rate: float = 1e-2) -> None:
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=True)


# ---------------------------------------------------------------------------------------------
# Keras 3 applications on the digits
# ---------------------------------------------------------------------------------------------

IMAGE_SIZE = 32
IMAGE_CALIBRATION_ROWS = 256


def _application(
    directory: str, constructor, preprocess, seed: int, epochs: int, learning_rate: float = 1e-2, **kwargs
) -> Built:
    """The application with a named input, trained ``epochs`` epochs on the digits, batch
    norms recalibrated; exported with ``model.export``. (Keras keeps ``input_tensor`` models'
    inputs as a one-element list, hence the lists below.)"""
    import keras

    keras.utils.set_random_seed(seed)
    image = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name="image")
    model = constructor(input_tensor=image, weights=None, classes=IMAGE_CLASSES, **kwargs)
    images, labels = digit_images(IMAGE_SIZE)
    images = preprocess(images)
    _train(model, [images], labels, epochs=epochs, learning_rate=learning_rate)
    recalibrate_batch_norms(model, [images[:IMAGE_CALIBRATION_ROWS]])
    held_out, held_out_labels = digit_images(IMAGE_SIZE, held_out=True)
    held_out = preprocess(held_out)
    model.export(directory, verbose=False)
    probabilities = model.predict([held_out], verbose=0)
    return Built({"image": held_out}, accuracy(probabilities, held_out_labels))


def build_resnet50(directory: str) -> Built:
    """keras.applications.ResNet50 at 32x32, 10 classes (23.6 M weights), 6 epochs at a learning
    rate of 1e-3 (1e-2 leaves it at 65 % after 4)."""
    import keras

    return _application(
        directory, keras.applications.ResNet50, keras.applications.resnet50.preprocess_input, 50, 6, 1e-3
    )


def build_efficientnet_b0(directory: str) -> Built:
    """keras.applications.EfficientNetB0 at 32x32, 10 classes (4.1 M weights; its Rescaling and
    Normalization layers are inside, so inputs are 0..255), 10 epochs."""
    import keras

    return _application(directory, keras.applications.EfficientNetB0, lambda x: x, 0, 10)


def build_mobilenet_v2(directory: str) -> Built:
    """keras.applications.MobileNetV2, alpha 0.35, at 32x32, 10 classes (0.4 M weights), 8 epochs."""
    import keras

    return _application(
        directory, keras.applications.MobileNetV2, keras.applications.mobilenet_v2.preprocess_input, 2, 8, alpha=0.35
    )


# ---------------------------------------------------------------------------------------------
# Keras 3 sequence, text and tabular models: trained for a few epochs
# ---------------------------------------------------------------------------------------------

TOKEN_TRAIN_ROWS = 1024


def _token_model(directory: str, seed: int, body) -> Built:
    import keras

    keras.utils.set_random_seed(seed)
    tokens = keras.Input((SEQUENCE_LENGTH,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(VOCABULARY_SIZE, 24, name="embedding")(tokens)
    outputs = keras.layers.Dense(TOKEN_CLASSES, activation="softmax", name="classes")(body(x))
    model = keras.Model(tokens, outputs)
    x_train, y_train = topic_tokens(TOKEN_TRAIN_ROWS, seed)
    _train(model, x_train, y_train, epochs=4)
    held_out, labels = topic_tokens(SAMPLE_ROWS, seed + 1)
    model.export(directory, verbose=False)
    return Built({"tokens": held_out}, accuracy(model.predict(held_out, verbose=0), labels))


def build_lstm(directory: str) -> Built:
    """Embedding(64, 24) -> LSTM(32) -> softmax over 3 topics, on int32 token ids."""
    import keras

    return _token_model(directory, 31, lambda x: keras.layers.LSTM(32, name="lstm")(x))


def build_bidirectional_gru(directory: str) -> Built:
    """Embedding(64, 24) -> Bidirectional(GRU(24)) -> softmax over 3 topics."""
    import keras

    return _token_model(directory, 32, lambda x: keras.layers.Bidirectional(keras.layers.GRU(24), name="bigru")(x))


def build_text_vectorization(directory: str) -> Built:
    """Strings -> TextVectorization (lower case, punctuation stripped, a fixed 64-word
    vocabulary: a lookup table in the graph) -> Embedding(65, 24) -> average -> Dense(32) ->
    softmax over 3 topics. The layers after the vectorizer are trained on its ids."""
    import keras

    keras.utils.set_random_seed(33)
    vectorizer = keras.layers.TextVectorization(
        vocabulary=WORDS[1:], output_sequence_length=SEQUENCE_LENGTH, name="vectorizer"
    )
    core = keras.Sequential([
        keras.Input((SEQUENCE_LENGTH,), dtype="int64"),
        keras.layers.Embedding(vectorizer.vocabulary_size(), 24),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(TOKEN_CLASSES, activation="softmax"),
    ], name="classifier")
    sentences, labels = topic_sentences(TOKEN_TRAIN_ROWS, 33)
    _train(core, np.asarray(vectorizer(tf.constant(sentences[:, 0].astype(bytes)))), labels, epochs=6)
    text = keras.Input((1,), dtype="string", name="text")
    model = keras.Model(text, core(vectorizer(text)))
    held_out, held_out_labels = topic_sentences(SAMPLE_ROWS, 34)
    model.export(directory, verbose=False)
    probabilities = model.predict(tf.constant(held_out.astype(bytes)), verbose=0)
    return Built({"text": held_out}, accuracy(probabilities, held_out_labels))


def build_wide_and_deep(directory: str) -> Built:
    """Three int64 id inputs (user, item, category). Wide: per-id logit weights (Embedding(n, 2))
    and a (user % 4, category) cross computed in the graph. Deep: Embedding(200, 8),
    Embedding(300, 8), Embedding(12, 4) -> Dense(64) -> Dense(32) -> 2 logits. Their sum ->
    softmax (click or not)."""
    import keras
    from keras import layers, ops

    keras.utils.set_random_seed(34)
    ids = {name: keras.Input((1,), dtype="int64", name=name) for name in ("user", "item", "category")}
    sizes = {"user": USERS, "item": ITEMS, "category": CATEGORIES}
    cross = layers.Lambda(lambda t: ops.mod(t[0], 4) * CATEGORIES + t[1], name="user_group_x_category")(
        [ids["user"], ids["category"]]
    )
    wide = [layers.Flatten()(layers.Embedding(sizes[k], 2, name=f"wide_{k}")(ids[k])) for k in ids]
    wide.append(layers.Flatten()(layers.Embedding(4 * CATEGORIES, 2, name="wide_cross")(cross)))
    deep = layers.Concatenate()([
        layers.Flatten()(layers.Embedding(sizes[k], dim, name=f"deep_{k}")(ids[k]))
        for k, dim in (("user", 8), ("item", 8), ("category", 4))
    ])
    deep = layers.Dense(64, activation="relu")(deep)
    deep = layers.Dense(32, activation="relu")(deep)
    deep = layers.Dense(2, name="deep_logits")(deep)
    outputs = layers.Softmax(name="click")(layers.Add()([*wide, deep]))
    model = keras.Model(ids, outputs)
    x_train, y_train = click_rows(8192, 34)
    _train(model, x_train, y_train, epochs=6, batch_size=128)
    held_out, labels = click_rows(SAMPLE_ROWS, 35)
    model.export(directory, verbose=False)
    return Built(held_out, accuracy(model.predict(held_out, verbose=0), labels))


def build_attention_encoder(directory: str) -> Built:
    """A transformer encoder block on token ids: Embedding(64, 32) + learned positions ->
    MultiHeadAttention(4 heads of 8) -> Add -> LayerNormalization -> Dense(64) -> Dense(32) ->
    Add -> LayerNormalization -> average -> softmax over 3 topics."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(35)

    class PositionEmbedding(layers.Layer):
        def build(self, input_shape):
            self.positions = self.add_weight(shape=input_shape[1:], initializer="random_normal", name="positions")

        def call(self, x):
            return x + self.positions

    tokens = keras.Input((SEQUENCE_LENGTH,), dtype="int32", name="tokens")
    x = PositionEmbedding(name="positions")(layers.Embedding(VOCABULARY_SIZE, 32, name="embedding")(tokens))
    attended = layers.MultiHeadAttention(num_heads=4, key_dim=8, name="attention")(x, x)
    x = layers.LayerNormalization(name="norm1")(layers.Add()([x, attended]))
    forward = layers.Dense(32)(layers.Dense(64, activation="relu")(x))
    x = layers.LayerNormalization(name="norm2")(layers.Add()([x, forward]))
    outputs = layers.Dense(TOKEN_CLASSES, activation="softmax", name="classes")(layers.GlobalAveragePooling1D()(x))
    model = keras.Model(tokens, outputs)
    x_train, y_train = topic_tokens(TOKEN_TRAIN_ROWS, 35)
    _train(model, x_train, y_train, epochs=4, learning_rate=3e-3)
    held_out, labels = topic_tokens(SAMPLE_ROWS, 36)
    model.export(directory, verbose=False)
    return Built({"tokens": held_out}, accuracy(model.predict(held_out, verbose=0), labels))


# ---------------------------------------------------------------------------------------------
# tf-keras 2.x and tf.Module
# ---------------------------------------------------------------------------------------------

TF_KERAS_SIZE = 16


def build_tf_keras_cnn(directory: str) -> Built:
    """A tf-keras 2.x CNN (Conv-BN-ReLU, max pooling, Conv-BN-ReLU, global pooling, dropout,
    softmax over 10 digits) on 16x16 digit images, trained, saved with ``model.save(dir,
    save_format="tf")``. Batch-norm momentum 0.5 so a few epochs settle the moving statistics;
    tf-keras' inference batch norm is FusedBatchNormV3, which fold_old_batch_norms folds."""
    import tf_keras

    tf_keras.utils.set_random_seed(36)
    layers = tf_keras.layers
    model = tf_keras.Sequential([
        tf_keras.Input((TF_KERAS_SIZE, TF_KERAS_SIZE, 3), name="image"),
        layers.Rescaling(1 / 127.5, offset=-1),
        layers.Conv2D(16, 3, padding="same", use_bias=False),
        layers.BatchNormalization(momentum=0.5),
        layers.ReLU(),
        layers.MaxPooling2D(),
        layers.Conv2D(32, 3, padding="same", use_bias=False),
        layers.BatchNormalization(momentum=0.5),
        layers.ReLU(),
        layers.GlobalAveragePooling2D(),
        layers.Dropout(0.2),
        layers.Dense(IMAGE_CLASSES, activation="softmax"),
    ])
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    images, labels = digit_images(TF_KERAS_SIZE)
    model.fit(images, labels, epochs=15, batch_size=64, verbose=0)
    held_out, held_out_labels = digit_images(TF_KERAS_SIZE, held_out=True)
    model.save(directory, save_format="tf")
    probabilities = model.predict(held_out, verbose=0)
    return Built({"image": held_out}, accuracy(probabilities, held_out_labels))


SEQUENCE_FEATURES = 8  # a digit's row
MODULE_HIDDEN, MODULE_CLASSES = 128, 10


class RecurrentClassifier(tf.Module):
    """``h = tanh(x_t @ wx + h @ wh + b)`` over the time steps of a tf.while_loop, inside a tf.cond
    that skips it for empty sequences, then logits fitted in closed form; outputs probabilities
    and class ids."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(404)
        self.wx = tf.Variable(rng.normal(0, 1 / np.sqrt(SEQUENCE_FEATURES), (SEQUENCE_FEATURES, MODULE_HIDDEN)),
                              dtype=tf.float32, name="wx")
        self.wh = tf.Variable(rng.normal(0, 0.9 / np.sqrt(MODULE_HIDDEN), (MODULE_HIDDEN, MODULE_HIDDEN)),
                              dtype=tf.float32, name="wh")
        self.b = tf.Variable(rng.normal(0, 0.1, MODULE_HIDDEN), dtype=tf.float32, name="b")
        self.head = tf.Variable(tf.zeros([MODULE_HIDDEN, MODULE_CLASSES]), name="head")
        self.head_bias = tf.Variable(tf.zeros([MODULE_CLASSES]), name="head_bias")

    def state(self, x):
        steps = tf.shape(x)[1]
        initial = tf.zeros([tf.shape(x)[0], MODULE_HIDDEN])

        def run():
            def body(t, h):
                return t + 1, tf.tanh(x[:, t] @ self.wx + h @ self.wh + self.b)

            return tf.while_loop(lambda t, h: t < steps, body, [tf.constant(0), initial])[1]

        return tf.cond(steps > 0, run, lambda: initial)

    @tf.function(input_signature=[tf.TensorSpec([None, None, SEQUENCE_FEATURES], tf.float32, name="sequence")])
    def classify(self, sequence):
        logits = self.state(sequence) @ self.head + self.head_bias
        return {"probabilities": tf.nn.softmax(logits), "class_ids": tf.argmax(logits, axis=1)}


def build_while_cond_module(directory: str) -> Built:
    module = RecurrentClassifier()
    sequences, labels = digit_sequences()
    kernel, bias = ridge_head(module.state(tf.constant(sequences)).numpy(), labels, MODULE_CLASSES)
    module.head.assign(kernel)
    module.head_bias.assign(bias)
    tf.saved_model.save(module, directory, signatures={"serving_default": module.classify})
    held_out, held_out_labels = digit_sequences(held_out=True)
    probabilities = module.classify(tf.constant(held_out))["probabilities"].numpy()
    return Built({"sequence": held_out}, accuracy(probabilities, held_out_labels))


MODELS = {
    model.name: model
    for model in [
        ZooModel("resnet50", build_resnet50, True, "keras.applications.ResNet50, 32x32 digits"),
        ZooModel("efficientnet_b0", build_efficientnet_b0, True, "keras.applications.EfficientNetB0, 32x32 digits"),
        ZooModel("mobilenet_v2", build_mobilenet_v2, True, "keras.applications.MobileNetV2 alpha 0.35, 32x32 digits"),
        ZooModel("lstm", build_lstm, False, "Embedding + LSTM on int32 tokens"),
        ZooModel("bidirectional_gru", build_bidirectional_gru, False, "Embedding + Bidirectional(GRU) on tokens"),
        ZooModel("text_vectorization", build_text_vectorization, False, "TextVectorization + Embedding on strings"),
        ZooModel("wide_and_deep", build_wide_and_deep, False, "wide & deep, Embeddings on int64 ids"),
        ZooModel("attention_encoder", build_attention_encoder, False, "MultiHeadAttention + LayerNormalization"),
        ZooModel("tf_keras_cnn", build_tf_keras_cnn, False, "tf-keras 2.x CNN, batch norm, 16x16 digits"),
        ZooModel("while_cond_module", build_while_cond_module, False, "tf.Module, while_loop in a cond, digit rows"),
    ]
}


def signature_inputs(directory, arrays: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """``arrays`` (input key -> array) for every serving signature of the SavedModel, as
    ``optimise_saved_model``'s ``sample_inputs`` take them."""
    from serving_optimiser.saved_model.reader import read_meta_graph, serving_signature_keys

    meta_graph = read_meta_graph(str(directory), ("serve",))
    return {
        key: {name: arrays[name] for name in meta_graph.signature_def[key].inputs}
        for key in serving_signature_keys(meta_graph)
    }
