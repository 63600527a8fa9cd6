"""Keras files in: a Keras 3 .keras file and a Keras 2 .h5 (tf-keras) exported as a SavedModel whose
serving_default signature takes the model's own input names and returns its output names, with
the same numbers as the Keras model."""

import re

import numpy as np
import pytest

from serving_optimiser.saved_model.errors import SavedModelError
from serving_optimiser.saved_model.keras_file import export_keras_file, is_keras_file


@pytest.fixture(scope="module")
def keras3_file(tmp_path_factory):
    import keras

    keras.utils.set_random_seed(3)
    image = keras.Input((8, 8, 1), name="image")
    extra = keras.Input((3,), name="extra")
    x = keras.layers.Conv2D(4, 3, activation="relu")(image)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Concatenate()([x, extra])
    scores = keras.layers.Dense(5, activation="softmax", name="scores")(x)
    box = keras.layers.Dense(4, name="box")(x)
    model = keras.Model([image, extra], [scores, box])
    path = tmp_path_factory.mktemp("keras3") / "two_heads.keras"
    model.save(path)
    return path, model


def test_a_keras3_file_exports_with_its_own_names_and_numbers(tmp_path, keras3_file):
    import tensorflow as tf

    path, model = keras3_file
    assert is_keras_file(path) and not is_keras_file(tmp_path)
    described = export_keras_file(path, tmp_path / "exported")
    assert described["source_format"] == "keras3" and described["signature"] == "serving_default"
    assert set(described["inputs"]) == {"image", "extra"} and described["outputs"] == ["scores", "box"]
    loaded = tf.saved_model.load(str(tmp_path / "exported"))
    serve = loaded.signatures["serving_default"]
    assert set(serve.structured_input_signature[1]) == {"image", "extra"}
    assert set(serve.structured_outputs) == {"scores", "box"}
    rng = np.random.default_rng(0)
    feeds = {"image": rng.standard_normal((6, 8, 8, 1)).astype(np.float32),
             "extra": rng.standard_normal((6, 3)).astype(np.float32)}
    got = serve(**{k: tf.constant(v) for k, v in feeds.items()})
    want = model([feeds["image"], feeds["extra"]], training=False)
    np.testing.assert_allclose(got["scores"].numpy(), np.asarray(want[0]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["box"].numpy(), np.asarray(want[1]), rtol=0, atol=1e-5)


def test_a_keras2_h5_file_exports_through_tf_keras(tmp_path):
    import tensorflow as tf
    import tf_keras

    tf_keras.utils.set_random_seed(5)
    model = tf_keras.Sequential([tf_keras.Input((6,), name="features"),
                                 tf_keras.layers.Dense(8, activation="relu"),
                                 tf_keras.layers.Dense(3, activation="softmax", name="emotion")])
    model.save(tmp_path / "old.h5")
    described = export_keras_file(tmp_path / "old.h5", tmp_path / "exported")
    assert described["source_format"] == "keras2_h5"
    assert list(described["inputs"]) == ["features"] and described["outputs"] == ["emotion"]
    serve = tf.saved_model.load(str(tmp_path / "exported")).signatures["serving_default"]
    rows = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    np.testing.assert_allclose(serve(features=tf.constant(rows))["emotion"].numpy(), model(rows).numpy(),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("broken.keras", b"not a zip", "not a Keras model file Keras can read"),
    ("model.onnx", b"x", "not a Keras file (expected .keras, .h5 or .hdf5)"),
], ids=["corrupt", "wrong-suffix"])
def test_a_bad_file_is_one_line_and_writes_nothing(tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SavedModelError, match=re.escape(expected)) as raised:
        export_keras_file(tmp_path / name, tmp_path / "out")
    assert "\n" not in str(raised.value) and not (tmp_path / "out").exists()
