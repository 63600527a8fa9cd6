"""ServingSession: SavedModels loaded through TensorFlow's C++ loader (the C API TF Serving's
loader is), run by their signatures' tensor names, answer as ``tf.saved_model.load`` does; the
one init op it runs reaches every dequantize-once assignment and the model's own tables."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from saved_model.models import LOSSLESS, QUANTISING, iris_inputs, module_inputs

from serving_optimiser.saved_model import SavedModelError, ServingSession, optimise_saved_model
from serving_optimiser.saved_model.compare import within_rounding
from serving_optimiser.saved_model.reader import read_meta_graph


def _loaded_outputs(directory, key: str, inputs: dict) -> dict[str, np.ndarray]:
    signature = tf.saved_model.load(str(directory)).signatures[key]
    return {k: v.numpy() for k, v in signature(**{n: tf.constant(v) for n, v in inputs.items()}).items()}


def _assert_same(expected: dict, actual: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype and actual[name].shape == value.shape, name
        # Two loaders of one graph: TensorFlow's float rounding tolerance at most (one CPU, the same kernels).
        assert within_rounding(value, actual[name]), name


def test_tf1_export_with_a_lookup_table_answers_like_tf_saved_model_load(tf1_iris):
    inputs = iris_inputs(32, seed=3)
    with ServingSession(tf1_iris) as session:
        assert session.signature_keys == ["predict", "serving_default"]
        for key in session.signature_keys:
            actual = session.run(key, inputs)
            _assert_same(_loaded_outputs(tf1_iris, key, inputs), actual)
        assert set(actual["classes"].reshape(-1)) <= {b"setosa", b"virginica", b"versicolor"}


@pytest.fixture(scope="module")
def dequantized_once(tf1_iris, tmp_path_factory):
    """The TF 1 Iris export (its own table init op) with 8-bit weights dequantized once at load."""
    out = tmp_path_factory.mktemp("serving") / "quantised"
    report = optimise_saved_model(tf1_iris, out, QUANTISING, compare=False)
    assert report["dequantized_once"] >= 3
    return out


def test_the_one_init_op_runs_the_dequantize_assignments_and_the_table(dequantized_once):
    meta_graph = read_meta_graph(str(dequantized_once), ("serve",))
    # One init op for every loader: the Builder's main op (also the legacy_init_op slot's choice).
    init_ops = [key for key in ("saved_model_main_op", "legacy_init_op") if key in meta_graph.collection_def]
    assert init_ops == ["saved_model_main_op"]
    inputs = iris_inputs(64, seed=4)
    with ServingSession(dequantized_once) as session:
        for key in ("predict", "serving_default"):
            # A variable the init op had not assigned, or a table it had not filled, fails the call.
            _assert_same(_loaded_outputs(dequantized_once, key, inputs), session.run(key, inputs))


def test_multi_signature_module_with_a_tf2_table_after_the_lossless_list(multi_signature_module, tmp_path):
    out = tmp_path / "lossless"
    optimise_saved_model(multi_signature_module, out, LOSSLESS, compare=False)
    inputs = module_inputs(16, seed=5)
    with ServingSession(out) as session:
        for key in ("classify", "embed", "score"):
            _assert_same(_loaded_outputs(out, key, inputs[key]), session.run(key, inputs[key]))


def test_vocabulary_asset_model(tf1_vocabulary):
    ids = np.array([[0], [2], [1], [7]], np.int64)
    with ServingSession(tf1_vocabulary) as session:
        key = session.signature_keys[0]
        name = next(iter(session.meta_graph.signature_def[key].inputs))
        expected = _loaded_outputs(tf1_vocabulary, key, {name: ids})
        actual = session.run(key, {name: ids})
    _assert_same(expected, actual)
    assert next(iter(actual.values())).dtype == object


def test_errors_are_one_line_and_name_the_problem(tf1_iris, tmp_path):
    with pytest.raises(SavedModelError, match=r"TensorFlow's C\+\+ loader: ") as raised:
        ServingSession(tmp_path)
    assert str(tmp_path) in str(raised.value) and "\n" not in str(raised.value)
    with ServingSession(tf1_iris) as session:
        with pytest.raises(SavedModelError, match="no signature 'nope'"):
            session.run("nope", {})
        with pytest.raises(SavedModelError, match="signature 'predict': no input 'petal_length'"):
            session.run("predict", {})
    with pytest.raises(SavedModelError, match="the session is closed"):
        session.run("predict", iris_inputs(2))
