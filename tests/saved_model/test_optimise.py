"""The round trip on each kind of SavedModel with the notebook's lists: the lossless list keeps
outputs within 1e-5, the quantising one shrinks the model to at most 0.3x with at least 99%
class agreement; two runs give identical graphs; the agreement gate keeps a failing result out."""

from __future__ import annotations

import numpy as np
import pytest
from graph_helpers import op_counts
from saved_model.models import BEYOND_THE_GATE, LOSSLESS, QUANTISING, iris_inputs, module_inputs

from serving_optimiser.saved_model import AgreementError, FrozenModel, SavedModelError, optimise_saved_model
from serving_optimiser.saved_model.reader import read_saved_model

BATCH_NORM_OPS = {"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3", "Rsqrt", "Mul"}


def sample_inputs(fixture: str):
    if fixture == "tf1_iris":
        return {key: iris_inputs() for key in ("predict", "serving_default")}
    if fixture == "multi_signature_module":
        return module_inputs()
    return None  # the CNN is compared on generated N(0, 1) images


# Outputs whose argmax is not a class (an embedding): their closeness is checked by max |diff|.
NOT_CLASSES = {("embed", "embedding")}
MODELS = ["keras_cnn", "tf1_iris", "multi_signature_module"]


def optimise(request, tmp_path, fixture: str, transforms: str, **options) -> tuple[dict, FrozenModel]:
    report = optimise_saved_model(
        request.getfixturevalue(fixture),
        tmp_path / "out",
        transforms,
        sample_inputs=sample_inputs(fixture),
        frozen_dir=tmp_path / "frozen",
        **options,
    )
    return report, FrozenModel.load(tmp_path / "frozen")


@pytest.mark.parametrize("fixture", MODELS)
def test_lossless_list_keeps_outputs(fixture, request, tmp_path):
    report, _ = optimise(request, tmp_path, fixture, LOSSLESS)
    assert report["nodes"]["optimised"] < report["nodes"]["frozen"]
    for key, outputs in report["comparison"].items():
        for name, result in outputs.items():
            assert result["within_rounding"], f"{key}/{name}: max |diff| {result['max_abs_diff']}"
            assert result["class_agreement"] in (None, 1.0), f"{key}/{name}"


def test_lossless_list_folds_keras_batch_norm(keras_cnn, tmp_path):
    optimise_saved_model(keras_cnn, tmp_path / "out", LOSSLESS)
    counts = op_counts(read_saved_model(tmp_path / "out").meta_graphs[0].graph_def)
    assert not BATCH_NORM_OPS & set(counts), counts
    assert counts["Conv2D"] == 2


@pytest.mark.parametrize("fixture", MODELS)
def test_quantising_list_shrinks_and_agrees(fixture, request, tmp_path):
    report, _ = optimise(request, tmp_path, fixture, QUANTISING)
    assert report["size_ratio"] <= 0.3, report["size_bytes"]
    assert report["dequantized_once"] >= 1
    for key, outputs in report["comparison"].items():
        for name, result in outputs.items():
            if (key, name) in NOT_CLASSES:
                assert result["max_abs_diff"] < 0.1, f"{key}/{name}"
            elif result["class_agreement"] is not None:
                assert result["class_agreement"] >= 0.99, f"{key}/{name}"


def test_the_converted_model_serves_every_signature(multi_signature_module, tmp_path):
    import tensorflow as tf

    optimise_saved_model(multi_signature_module, tmp_path / "out", QUANTISING, sample_inputs=module_inputs())
    loaded = tf.saved_model.load(str(tmp_path / "out"))
    assert sorted(loaded.signatures) == ["classify", "embed", "score"]
    feeds = module_inputs(8)
    result = loaded.signatures["score"](**{k: tf.constant(v) for k, v in feeds["score"].items()})
    assert result["label"].dtype == tf.string and result["best"].shape == (8,)


@pytest.mark.parametrize("fixture", ["tf1_iris", "keras_cnn"])
def test_two_runs_give_identical_graphs(fixture, request, tmp_path):
    results = []
    for run in ("first", "second"):
        optimise_saved_model(
            request.getfixturevalue(fixture), tmp_path / run, QUANTISING, frozen_dir=tmp_path / f"{run}_frozen",
            compare=False,
        )
        results.append(
            (
                (tmp_path / f"{run}_frozen" / "frozen_graph.pb").read_bytes(),
                read_saved_model(tmp_path / run).meta_graphs[0].graph_def,
                (tmp_path / run / "saved_model.pb").read_bytes(),
            )
        )
    (frozen_a, graph_a, bytes_a), (frozen_b, graph_b, bytes_b) = results
    assert frozen_a == frozen_b
    assert graph_a == graph_b
    assert bytes_a == bytes_b


def test_agreement_under_the_minimum_writes_nothing(multi_signature_module, tmp_path):
    with pytest.raises(AgreementError, match=r"class agreement 0\.\d+ is under the minimum 0\.9900") as raised:
        optimise_saved_model(multi_signature_module, tmp_path / "out", BEYOND_THE_GATE, min_agreement=0.99)
    assert raised.value.report["min_class_agreement"] < 0.99
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"transforms": "fold_constants("}, r"transforms: malformed transform string"),
        ({"transforms": "fold_konstants"}, r"transforms: unknown transform 'fold_konstants'"),
        ({"min_agreement": 1.5}, r"min_agreement must be between 0 and 1"),
        ({"allow_ops": ["NotAnOp"]}, r"allowed op 'NotAnOp' is not an op TensorFlow knows"),
        ({"signature_keys": ["nope"]}, r"unknown signature key 'nope'"),
        ({"sample_inputs": "missing.npz"}, r"missing.npz: no such sample inputs file"),
    ],
    ids=["malformed_transforms", "unknown_transform", "bad_min_agreement", "unknown_allowed_op", "unknown_signature",
         "missing_sample_file"],
)
def test_bad_options_fail_before_anything_is_written(options, message, tf1_iris, tmp_path):
    arguments = {"transforms": LOSSLESS, **options}
    with pytest.raises(SavedModelError, match=message):
        optimise_saved_model(tf1_iris, tmp_path / "out", **arguments)
    assert list(tmp_path.iterdir()) == []


def test_sample_inputs_from_an_npz_file(tf1_iris, tmp_path):
    np.savez(tmp_path / "inputs.npz", **iris_inputs(32))
    report = optimise_saved_model(tf1_iris, tmp_path / "out", LOSSLESS, sample_inputs=tmp_path / "inputs.npz")
    assert report["comparison"]["predict"]["probabilities"]["within_rounding"]
