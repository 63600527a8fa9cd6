"""Training: the notebook's ``DNNClassifier`` rebuilt with Keras 3, deterministically.

DNNClassifier's defaults that matter are kept: ReLU hidden layers, Glorot-uniform kernels and
zero biases, Adagrad (learning rate 0.05, initial accumulator 0.1) and a loss summed over the
batch (TF 1.10's ``loss_reduction=SUM``).

The weights are the same bits on Intel and AMD CPUs: every contraction of the training step is
at most 256 deep and Grappler leaves the traced graph as it is (``bounded_contraction``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from .bounded_contraction import CONTRACTION_DEPTH_BOUND, bounded_dense_class, graph_as_traced
from .data import FEATURE_NAMES
from .params import TrainParams
from .weights import load_weights, save_weights

__all__ = ["load_weights", "save_weights"]  # their home was here; callers still import them from train

log = logging.getLogger(__name__)


def stack_features(features: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack([features[name] for name in FEATURE_NAMES], axis=1).astype(np.float32)


def make_deterministic(seed: int) -> None:
    """Same params on the same machine give the same weights: seeds plus deterministic kernels."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def build_model(hidden_units: list[int], n_classes: int, max_batch_rows: int = CONTRACTION_DEPTH_BOUND):
    """The DNN with Dense layers whose contractions stay within the depth bound in training, for
    batches of up to ``max_batch_rows`` rows (the gradient dW contracts over the rows)."""
    import keras

    dense = bounded_dense_class()
    layers = [keras.Input(shape=(len(FEATURE_NAMES),), name="features")]
    for index, units in enumerate(hidden_units):
        layers.append(dense(units, max_rows=max_batch_rows, activation="relu", name=f"hiddenlayer_{index}"))
    layers.append(dense(n_classes, max_rows=max_batch_rows, name="logits"))
    return keras.Sequential(layers, name="dnn")


def compiled_model(params: TrainParams, n_classes: int):
    """The model as training runs it: built for ``params.batch_size`` rows, compiled with
    DNNClassifier's optimiser and summed loss."""
    import keras

    model = build_model(params.hidden_units, n_classes, max_batch_rows=params.batch_size)
    model.compile(
        optimizer=keras.optimizers.Adagrad(learning_rate=params.learning_rate, initial_accumulator_value=0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum"),
        metrics=["accuracy"],
    )
    return model


def training_step_graph(model, rows: int):
    """The graph of one training step (forward, gradients, optimiser update) at ``rows`` rows,
    traced as ``model.fit`` traces it, with every shape known."""
    import tensorflow as tf

    model.optimizer.build(model.trainable_variables)
    features = tf.TensorSpec([rows, len(FEATURE_NAMES)], tf.float32)
    labels = tf.TensorSpec([rows], tf.int64)
    return tf.function(model.train_step).get_concrete_function((features, labels)).graph


def progress_callback(epochs: int, every_fraction: float = 0.1):
    """A Keras callback logging epochs done, loss, accuracy and time left every ~10 % of training,
    so a run outside a terminal (CI, a queued experiment) shows it is alive."""
    import keras

    step = max(1, round(epochs * every_fraction))

    class Progress(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            done = epoch + 1
            if done % step and done != epochs:
                return
            elapsed = time.perf_counter() - self.started
            left = elapsed / done * (epochs - done)
            logs = logs or {}
            log.info(
                "epoch %d/%d (%d%%): loss %.4f, accuracy %.4f, %.0f s elapsed, ~%.0f s left",
                done, epochs, 100 * done // epochs, logs.get("loss", float("nan")),
                logs.get("accuracy", float("nan")), elapsed, left,
            )

    return Progress()


def train_model(
    features: dict[str, np.ndarray], labels: np.ndarray, params: TrainParams, n_classes: int, verbose: int = 0
):
    """Train and return ``(model, history)``; history maps metric name to per-epoch values."""
    make_deterministic(params.seed)
    model = compiled_model(params, n_classes)
    with graph_as_traced():
        history = model.fit(
            stack_features(features),
            labels,
            batch_size=params.batch_size,
            epochs=params.epochs,
            shuffle=True,
            verbose=verbose,
            callbacks=[progress_callback(params.epochs)],
        )
    return model, {name: [float(v) for v in values] for name, values in history.history.items()}


def log_history(history: dict[str, list[float]], live_dir: str | Path) -> None:
    """Write per-epoch curves with DVCLive after training (a DVCLive Keras callback costs ~0.1 s
    per epoch here, which is 100 s over the notebook's 1000 epochs)."""
    from dvclive import Live

    epochs = len(next(iter(history.values()), []))
    with Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        for epoch in range(epochs):
            for name, values in sorted(history.items()):
                live.log_metric(f"train/{name}", values[epoch])
            live.next_step()


def dense_weights(model) -> list[tuple[np.ndarray, np.ndarray]]:
    """(kernel, bias) per Dense layer, input to output: the only state inference needs."""
    return [(layer.kernel.numpy(), layer.bias.numpy()) for layer in model.layers]
