"""The predictor interface: output validation on hand-made outputs (no model needed), input
checks, loading by path, and the TensorFlow predictor against the signature it wraps."""

import numpy as np
import pytest
from peers_helpers import SPECS, first_rows

from serving_optimiser.errors import UserError
from serving_optimiser.peers.litert import LiteRTPredictor
from serving_optimiser.peers.onnx import OnnxPredictor
from serving_optimiser.peers.openvino import OpenVINOPredictor
from serving_optimiser.peers.predictor import TFPredictor, input_arrays, load_predictor, validate_outputs
from serving_optimiser.pipeline.data import FEATURE_NAMES, LABEL_VOCABULARY

# The module shares the session's trained model and artefacts: keep it on one xdist worker.
pytestmark = pytest.mark.xdist_group("peers")

ARTEFACT = "models/peers/litert_fp32/model.tflite"
# The Iris export's predict signature: output key -> (dtype, shape), as the model stage records it.
EXPECTED = {
    "class_ids": ("int64", [None, 1]),
    "classes": ("string", [None, 1]),
    "logits": ("float32", [None, 3]),
    "probabilities": ("float32", [None, 3]),
}


def good_outputs():
    logits = np.array([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0]], np.float32)
    probabilities = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    return {
        "class_ids": np.array([[0], [2]], np.int64),
        "classes": np.array([[b"setosa"], [b"versicolor"]], dtype=object),
        "logits": logits,
        "probabilities": probabilities,
    }


def test_good_outputs_pass():
    validate_outputs(ARTEFACT, good_outputs(), 2, LABEL_VOCABULARY, EXPECTED)
    validate_outputs(ARTEFACT, good_outputs(), 2)
    regression = {"value": np.zeros((2, 5, 5), np.float16)}  # any model: no head, nothing expected
    validate_outputs(ARTEFACT, regression, 2, expected={"value": ("float16", [None, 5, 5])})


def set_item(key, index, value):
    def change(outputs):
        outputs[key][index] = value

    return change


def replace(key, value):
    def change(outputs):
        outputs[key] = value(outputs[key])

    return change


@pytest.mark.parametrize(
    ("change", "rows", "expected"),
    [
        (set_item("probabilities", (1, 2), np.nan), 2, "output 'probabilities' has 1 NaN values (first in row 1)"),
        (set_item("logits", (0, 1), np.inf), 2, "output 'logits' has 1 Inf values (first in row 0)"),
        (replace("class_ids", lambda v: v.astype(np.int32)), 2, "output 'class_ids' must be int64 [2, 1], got int32"),
        (replace("class_ids", lambda v: v[:, 0]), 2, "output 'class_ids' must be int64 [2, 1], got int64 [2]"),
        (replace("probabilities", lambda v: v[:, :2]), 2, "output 'probabilities' must be float32 [2, 3]"),
        (lambda o: o.pop("classes"), 2, "missing output(s) classes (has class_ids, logits, probabilities)"),
        (lambda o: None, 3, "output 'class_ids' must be int64 [3, 1], got int64 [2, 1]"),
        (lambda o: o.update(extra=np.zeros(3)), 2, "output 'extra' must have 2 rows first, got shape [3]"),
        (set_item("class_ids", (1, 0), 1), 2, "output 'class_ids' is not the argmax of 'logits' (first in row 1)"),
        (set_item("class_ids", (1, 0), 7), 2, "output 'class_ids' holds ids outside [0, 3)"),
        (set_item("classes", (0, 0), b"virginica"), 2, "output 'classes' is b'virginica' for class id 0 in row 0"),
        (set_item("classes", (0, 0), "setosa"), 2, "output 'classes' must hold bytes, got str"),
    ],
    ids=[
        "nan",
        "inf",
        "wrong-dtype",
        "wrong-rank",
        "wrong-width",
        "missing-output",
        "wrong-rows",
        "unexpected-output-rows",
        "not-argmax",
        "id-out-of-range",
        "wrong-label",
        "str-label",
    ],
)
def test_bad_outputs_fail_with_one_line_naming_the_artefact(change, rows, expected):
    outputs = good_outputs()
    change(outputs)
    with pytest.raises(UserError) as info:
        validate_outputs(ARTEFACT, outputs, rows, LABEL_VOCABULARY, EXPECTED)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{ARTEFACT}: ") and expected in message, message


DTYPES = {name: np.float32 for name in FEATURE_NAMES}


@pytest.mark.parametrize(
    ("features", "expected"),
    [
        ({"sepal_length": np.ones(2, np.float32)}, "missing input(s) sepal_width, petal_length, petal_width"),
        ({name: np.ones(2 + (name == "petal_width")) for name in FEATURE_NAMES}, "with one row count"),
        ({name: np.float32(1) for name in FEATURE_NAMES}, "non-empty arrays"),
        ({name: np.ones(0) for name in FEATURE_NAMES}, "non-empty"),
    ],
    ids=["missing", "ragged", "scalar", "empty"],
)
def test_bad_inputs_fail_naming_the_artefact(features, expected):
    with pytest.raises(UserError, match="^" + ARTEFACT) as info:
        input_arrays(ARTEFACT, features, DTYPES)
    assert expected in str(info.value)


def test_input_arrays_take_the_runtimes_dtypes_by_key():
    arrays = input_arrays(ARTEFACT, {name: np.arange(3) + i for i, name in enumerate(reversed(FEATURE_NAMES))}, DTYPES)
    assert list(arrays) == FEATURE_NAMES and {a.dtype for a in arrays.values()} == {np.dtype(np.float32)}
    np.testing.assert_array_equal(arrays["sepal_length"], [3, 4, 5])
    images = {"image": np.zeros((2, 8, 8, 1))}  # any rank: rows first
    assert input_arrays(ARTEFACT, images, {"image": np.float16})["image"].dtype == np.float16


def test_load_predictor_picks_the_runtime_by_artefact(peer_artefacts, peer_export):
    kinds = {
        name: type(load_predictor(path.parent, label_vocabulary=LABEL_VOCABULARY))
        for name, path in peer_artefacts.items()
    }
    runtimes = {"litert": LiteRTPredictor, "onnx": OnnxPredictor, "openvino": OpenVINOPredictor}
    expected = {name: runtimes[spec.format] for name, spec in SPECS.items()}
    assert kinds == expected
    assert isinstance(load_predictor(peer_export), TFPredictor)
    assert isinstance(load_predictor(peer_artefacts["onnx_fp32"], label_vocabulary=LABEL_VOCABULARY), OnnxPredictor)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda tmp: tmp, "no saved_model.pb, model.tflite, model.onnx or model.xml in the directory"),
        (lambda tmp: tmp / "missing.tflite", "not found, or not a SavedModel directory, .tflite, .onnx or OpenVINO"),
    ],
    ids=["empty-directory", "missing-file"],
)
def test_load_predictor_rejects_what_is_not_an_artefact(make, expected, tmp_path):
    path = make(tmp_path)
    with pytest.raises(UserError, match=f"^{path}: ") as info:
        load_predictor(path)
    assert expected in str(info.value)


def test_onnx_predictor_spells_classes_only_with_a_vocabulary(peer_artefacts, compare_rows):
    path = peer_artefacts["onnx_fp32"]
    assert sorted(load_predictor(path)(compare_rows)) == ["class_ids", "logits", "probabilities"]
    with_vocabulary = load_predictor(path, label_vocabulary=LABEL_VOCABULARY)(compare_rows)
    assert with_vocabulary["classes"][0, 0] in {label.encode() for label in LABEL_VOCABULARY}


def test_tf_predictor_returns_the_signatures_outputs(tf_predictor, compare_rows):
    import tensorflow as tf

    outputs = tf_predictor(compare_rows)
    expected = tf_predictor._signature(**{name: tf.constant(compare_rows[name]) for name in FEATURE_NAMES})
    assert set(outputs) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(outputs[key], value.numpy())
    validate_outputs("exported", outputs, len(compare_rows["sepal_length"]), LABEL_VOCABULARY, EXPECTED)
    validate_outputs("exported", tf_predictor(first_rows(compare_rows, 1)), 1, LABEL_VOCABULARY, EXPECTED)
    assert tf_predictor.load_seconds > 0


def test_tf_predictor_names_a_missing_signature(peer_export):
    with pytest.raises(UserError, match=f"^{peer_export}: no signature 'classify' \\(has predict, serving_default\\)"):
        TFPredictor.load(peer_export, signature="classify")


def test_litert_predictor_keeps_one_interpreter_per_batch_size(peer_artefacts, compare_rows):
    predictor = load_predictor(peer_artefacts["litert_fp32"], label_vocabulary=LABEL_VOCABULARY)
    single = first_rows(compare_rows, 1)
    predictor(compare_rows)
    interpreters = {rows: prepared.interpreter for rows, prepared in predictor._prepared.items()}
    assert sorted(interpreters) == [1, 300]
    for _ in range(3):
        predictor(single)
        predictor(compare_rows)
    assert {rows: prepared.interpreter for rows, prepared in predictor._prepared.items()} == interpreters
    predictor(first_rows(compare_rows, 7))  # a third size evicts the least recently used
    assert sorted(predictor._prepared) == [7, 300]
