"""The import_model stage: a SavedModel directory copied byte for byte (the Iris export's hash does
not move), a Keras file exported with a serving_default signature named after the model's inputs,
which the model stage then describes, each output with its kind."""

import dataclasses
import filecmp
import json

import numpy as np
import pytest

from serving_optimiser.errors import UserError
from serving_optimiser.pipeline.imported import import_stage
from serving_optimiser.pipeline.params import ModelSection


def test_a_saved_model_is_copied_unchanged(tmp_path, tiny_export):
    line = import_stage(tiny_export, tmp_path / "imported", tmp_path / "imported.json")
    assert line.endswith(f"(SavedModel, copied) -> {tmp_path / 'imported'}")
    comparison = filecmp.dircmp(tiny_export, tmp_path / "imported")
    assert not comparison.diff_files and not comparison.left_only and not comparison.right_only
    assert json.loads((tmp_path / "imported.json").read_text())["source_format"] == "saved_model"


def test_a_keras_file_becomes_the_models_saved_model(tmp_path):
    import keras

    from serving_optimiser.pipeline.model import write_samples

    keras.utils.set_random_seed(1)
    image = keras.Input((6, 6, 1), name="face")
    x = keras.layers.Flatten()(keras.layers.Conv2D(2, 3)(image))
    model = keras.Model(image, [keras.layers.Dense(3, activation="softmax", name="emotion")(x),
                                keras.layers.Dense(4, name="box")(x)])
    model.save(tmp_path / "net.keras")
    line = import_stage(tmp_path / "net.keras", tmp_path / "imported", tmp_path / "imported.json")
    assert "(keras3) exported with signature 'serving_default' (face -> emotion, box)" in line
    described = json.loads((tmp_path / "imported.json").read_text())
    assert described["inputs"] == {"face": {"dtype": "float32", "shape": [None, 6, 6, 1]}}
    rows = np.random.default_rng(0).standard_normal((10, 6, 6, 1)).astype(np.float32)
    np.savez(tmp_path / "samples.npz", face=rows)
    section = ModelSection.from_section(
        {"source": "saved_model", "path": str(tmp_path / "net.keras"), "signature": None,
         "samples": str(tmp_path / "samples.npz"), "labels": None, "class_output": None, "outputs": {},
         "eval_fraction": 0.5, "seed": 7},
        tmp_path / "params.yaml",
    )
    spec = write_samples(dataclasses.replace(section, path=tmp_path / "imported"), [], tmp_path / "samples")
    assert spec.signature == "serving_default" and spec.input_order == ["face"]
    assert spec.kinds() == {"emotion": "class", "box": "regression"}


def test_neither_a_saved_model_nor_a_keras_file_is_one_line(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(UserError, match="neither a SavedModel directory nor a Keras file"):
        import_stage(tmp_path / "model.onnx", tmp_path / "imported", tmp_path / "imported.json")
    assert not (tmp_path / "imported").exists() and not (tmp_path / "imported.json").exists()
