"""The comparison's arithmetic (class agreement, max |difference|, equality), generated inputs and
sample-input files, and the time limit on a call."""

from __future__ import annotations

import numpy as np
import pytest

from serving_optimiser.saved_model import (
    SavedModelError,
    SignatureInfo,
    TensorInfo,
    compare_outputs,
    generate_inputs,
    load_sample_inputs,
    min_class_agreement,
)


@pytest.mark.parametrize(
    ("original", "converted", "expected"),
    [
        (
            np.array([[0.1, 0.9], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]], np.float32),
            np.array([[0.1, 0.9], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]], np.float32),
            {"class_agreement": 0.75, "max_abs_diff": 0.2, "equal": False, "within_rounding": False},
        ),
        (
            np.array([[2], [0], [1]], np.int64),
            np.array([[2], [0], [1]], np.int64),
            {"class_agreement": 1.0, "max_abs_diff": 0.0, "equal": True, "within_rounding": True},
        ),
        (
            np.array([[b"setosa"], [b"virginica"]], object),
            np.array([[b"setosa"], [b"versicolor"]], object),
            {"class_agreement": 0.5, "max_abs_diff": None, "equal": False, "within_rounding": False},
        ),
        (
            np.array([1.5, 2.5], np.float32),
            np.array([1.5, 2.0], np.float32),
            {"class_agreement": None, "max_abs_diff": 0.5, "equal": False, "within_rounding": False},
        ),
        (
            np.array([[np.nan, 1.0]], np.float32),
            np.array([[np.nan, 1.0]], np.float32),
            {"class_agreement": 1.0, "max_abs_diff": 0.0, "equal": True, "within_rounding": True},
        ),
    ],
    ids=["probabilities_one_row_flips", "class_ids_equal", "class_names_half_agree", "regression_values", "nan_same"],
)
def test_compare_outputs(original, converted, expected):
    result = compare_outputs(original, converted)
    assert result.keys() == expected.keys()
    assert result["class_agreement"] == expected["class_agreement"]
    assert result["equal"] == expected["equal"]
    assert result["within_rounding"] == expected["within_rounding"]
    if expected["max_abs_diff"] is None:
        assert result["max_abs_diff"] is None
    else:
        assert result["max_abs_diff"] == pytest.approx(expected["max_abs_diff"], abs=1e-6)


def test_compare_outputs_refuses_a_shape_change():
    with pytest.raises(SavedModelError, match=r"shape \[2, 3\] differs from the original's \[2, 2\]"):
        compare_outputs(np.zeros((2, 2)), np.zeros((2, 3)))


SIGNATURE = SignatureInfo(
    "serving_default",
    "tensorflow/serving/predict",
    {
        "image": TensorInfo("image:0", "float32", [None, 4, 4, 3]),
        "ids": TensorInfo("ids:0", "int64", [None]),
        "words": TensorInfo("words:0", "string", [2]),
        "scale": TensorInfo("scale:0", "float32", []),
        "anything": TensorInfo("anything:0", "bool", None),
    },
    {"out": TensorInfo("out:0", "float32", [None])},
)


def test_generated_inputs_follow_dtypes_and_shapes_and_are_seeded():
    inputs = generate_inputs(SIGNATURE, batch_size=5, seed=1)
    assert {k: (v.dtype.kind, v.shape) for k, v in inputs.items()} == {
        "image": ("f", (5, 4, 4, 3)),
        "ids": ("i", (5,)),
        "words": ("O", (2,)),
        "scale": ("f", ()),
        "anything": ("b", (5,)),
    }
    again = generate_inputs(SIGNATURE, batch_size=5, seed=1)
    assert all(np.array_equal(inputs[k], again[k]) for k in inputs)


def test_min_class_agreement_ignores_outputs_without_one():
    report = {
        "a": {"x": {"class_agreement": 0.98}, "y": {"class_agreement": None}},
        "b": {"z": {"class_agreement": 1.0}},
    }
    assert min_class_agreement(report) == 0.98
    assert min_class_agreement({"a": {"y": {"class_agreement": None}}}) is None


def test_sample_inputs_by_input_name_or_signature_and_input(tmp_path):
    other = SignatureInfo("other", "m", {"ids": TensorInfo("o:0", "int64", [None])}, SIGNATURE.outputs)
    arrays = generate_inputs(SIGNATURE)
    np.savez(tmp_path / "inputs.npz", **{k: v for k, v in arrays.items() if k != "words"},
             **{"serving_default/words": np.array([b"a", b"b"])})
    loaded = load_sample_inputs(tmp_path / "inputs.npz", [SIGNATURE, other])
    assert sorted(loaded) == ["other", "serving_default"]
    np.testing.assert_array_equal(loaded["other"]["ids"], arrays["ids"])
    assert list(loaded["serving_default"]["words"]) == [b"a", b"b"]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"ids": np.zeros(2, np.int64)}, r"no array for signature 'other' input 'x'"),
        ({"ids": np.zeros(2, np.int64), "x": np.zeros(2), "typo": np.zeros(1)}, r"array 'typo' matches no"),
    ],
    ids=["missing_input", "unused_array"],
)
def test_sample_inputs_errors_name_the_array(arrays, message, tmp_path):
    other = SignatureInfo(
        "other", "m", {"ids": TensorInfo("o:0", "int64", [None]), "x": TensorInfo("x:0", "float32", [None])}, {}
    )
    np.savez(tmp_path / "inputs.npz", **arrays)
    with pytest.raises(SavedModelError, match=message):
        load_sample_inputs(tmp_path / "inputs.npz", [other])


def test_unreadable_sample_inputs_file(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(SavedModelError, match=r"bad.npz: cannot read sample inputs"):
        load_sample_inputs(tmp_path / "bad.npz", [SIGNATURE])


@pytest.mark.parametrize(
    ("converted", "within"),
    [
        (np.array([[-9.79255485, 0.89355946], [-11.1277361, 5.0]]), True),  # AVX-512 vs AVX2 oneDNN, as measured
        (np.array([[-9.79, 0.89355946], [-11.1277361, 5.0]]), False),  # an 8-bit weight's error
        (np.array([[-9.79255581, np.nan], [-11.1277370, 5.0]]), False),
    ],
    ids=["kernel_rounding", "quantisation_error", "nan_appears"],
)
def test_within_rounding_separates_kernel_rounding_from_real_change(converted, within):
    original = np.array([[-9.79255581, 0.89354992], [-11.1277370, 5.0]])
    result = compare_outputs(original, converted)
    assert result["within_rounding"] is within and result["equal"] is False


def _save_counting_loop(directory) -> None:
    """A While loop that runs ``steps`` times: a huge ``steps`` is a call that does not return."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([], tf.int64, name="steps")])
    def count(steps):
        body = lambda i, total: (i + 1, total + tf.sin(tf.cast(i, tf.float32)))  # noqa: E731
        _, total = tf.while_loop(lambda i, _: i < steps, body, [tf.constant(0, tf.int64), tf.constant(0.0)])
        return {"total": total}

    module = tf.Module()
    module.count = count
    tf.saved_model.save(module, str(directory), signatures={"serving_default": count})


def test_a_call_that_does_not_return_is_cancelled_and_named(tmp_path):
    import threading
    import time

    from serving_optimiser.saved_model import compare_saved_models

    _save_counting_loop(tmp_path / "loop")
    quick = compare_saved_models(tmp_path / "loop", tmp_path / "loop", {"serving_default": {"steps": np.int64(10)}})
    assert quick["serving_default"]["total"]["equal"]
    start = time.perf_counter()
    with pytest.raises(SavedModelError, match=r"signature 'serving_default' did not return within 1 s") as raised:
        compare_saved_models(
            tmp_path / "loop", tmp_path / "loop", {"serving_default": {"steps": np.int64(2**62)}}, timeout_s=1.0
        )
    assert str(tmp_path / "loop") in str(raised.value) and time.perf_counter() - start < 30
    # Cancelled, not left spinning: the worker thread has ended.
    assert not [t for t in threading.enumerate() if t.name == "call serving_default"]
