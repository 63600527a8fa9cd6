"""Training: the notebook's ``DNNClassifier`` rebuilt with Keras 3, deterministically.

DNNClassifier's defaults that matter are kept: ReLU hidden layers, Glorot-uniform kernels and
zero biases, Adagrad (learning rate 0.05, initial accumulator 0.1) and a loss summed over the
batch (TF 1.10's ``loss_reduction=SUM``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from .data import FEATURE_NAMES
from .params import TrainParams

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


def build_model(hidden_units: list[int], n_classes: int):
    import keras

    layers = [keras.Input(shape=(len(FEATURE_NAMES),), name="features")]
    for index, units in enumerate(hidden_units):
        layers.append(keras.layers.Dense(units, activation="relu", name=f"hiddenlayer_{index}"))
    layers.append(keras.layers.Dense(n_classes, name="logits"))
    return keras.Sequential(layers, name="dnn")


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
    import keras

    model = build_model(params.hidden_units, n_classes)
    model.compile(
        optimizer=keras.optimizers.Adagrad(learning_rate=params.learning_rate, initial_accumulator_value=0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum"),
        metrics=["accuracy"],
    )
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


def save_weights(weights: list[tuple[np.ndarray, np.ndarray]], path: str | Path) -> None:
    """Save the inference weights as an .npz (no optimiser slots)."""
    from ..atomic import atomic_file

    arrays = {}
    for index, (kernel, bias) in enumerate(weights):
        arrays[f"layer{index}_kernel"] = kernel
        arrays[f"layer{index}_bias"] = bias
    with atomic_file(path, "wb") as stream:
        np.savez(stream, **arrays)


def load_weights(path: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found (run the train stage first)")
    with np.load(path) as data:
        count = len(data.files) // 2
        return [(data[f"layer{i}_kernel"], data[f"layer{i}_bias"]) for i in range(count)]
