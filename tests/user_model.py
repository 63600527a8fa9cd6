"""A user's own model for the pipeline's saved_model source: a small Keras CNN (8x8 one-channel
images, 4 classes) saved with ``tf.saved_model.save`` under a ``classify`` signature (no
``serving_default``, which OpenVINO's converter needs), and its sample inputs as an .npz; or a
published model (src/published_models) with its sample inputs saved the same way."""

from pathlib import Path

import numpy as np

SIGNATURE = "classify"
INPUT = "image"
OUTPUT = "probabilities"
ROWS = 64


def save_user_model(directory: Path, seed: int = 3) -> tuple[Path, Path]:
    """(SavedModel directory, samples .npz) under ``directory``; random weights, seeded."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(8, 8, 1), name=INPUT)
    x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    outputs = keras.layers.Dense(4, activation="softmax")(x)
    model = keras.Model(inputs, outputs)

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32, name=INPUT)])
    def classify(image):
        return {OUTPUT: model(image)}

    saved = directory / "cnn"
    module = tf.Module()
    module.model = model
    tf.saved_model.save(module, str(saved), signatures={SIGNATURE: classify})
    samples = directory / "samples.npz"
    rng = np.random.default_rng(seed)
    np.savez(samples, **{INPUT: rng.standard_normal((ROWS, 8, 8, 1)).astype(np.float32)})
    return saved, samples


def save_published_samples(name: str, directory: Path, signature: str | None = None) -> tuple[Path, Path]:
    """(SavedModel directory, samples .npz under ``directory``) of the published model ``name``
    (src/published_models): its cached export, or, given ``signature``, the export saved again
    under ``directory`` with its one signature under that name; its sample inputs by input name."""
    from published_models import load

    model = load(name)
    samples = directory / f"{name}-samples.npz"
    np.savez(samples, **model.inputs)
    if signature is None:
        return model.saved_model, samples
    import tensorflow as tf

    loaded = tf.saved_model.load(str(model.saved_model))
    saved = directory / name
    tf.saved_model.save(loaded, str(saved), signatures={signature: loaded.signatures[model.signature]})
    return saved, samples
