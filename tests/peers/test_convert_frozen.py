"""A peer converts from the frozen model where the SavedModel fails: a Keras model saved from a
tf.Module converts to LiteRT only that way (from the SavedModel its variables stay READ_VARIABLE
ops and it answers NaN, and int8_full does not convert), agrees with the SavedModel, and says
where it came from; a peer that converts from the SavedModel never reads the frozen model; one
that converts from neither fails with both reasons in one line and writes nothing."""

import numpy as np
import pytest
from peers_helpers import SPECS
from user_model import OUTPUT, SIGNATURE, save_user_model

from serving_optimiser.errors import UserError
from serving_optimiser.peers.convert import SOURCE_FILE, convert_peer, model_files
from serving_optimiser.peers.params import PeerSpec
from serving_optimiser.peers.predictor import load_predictor
from serving_optimiser.pipeline.data import LABEL_VOCABULARY

pytestmark = pytest.mark.xdist_group("peers")

INT8_FULL = PeerSpec("litert_int8_full", "litert", "int8_full", calibration_rows=32)


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """(tf.Module SavedModel, its frozen model's directory, the sample rows)."""
    from serving_optimiser.saved_model.freeze import freeze_saved_model

    base = tmp_path_factory.mktemp("user")
    saved, samples = save_user_model(base)
    frozen = base / "frozen"
    freeze_saved_model(saved, [SIGNATURE]).save(frozen)
    return saved, frozen, dict(np.load(samples))


def test_without_the_frozen_model_litert_answers_nan_and_nothing_is_written(user_model, tmp_path):
    saved, _, rows = user_model
    with pytest.raises(UserError, match=f"output '{OUTPUT}' has .* NaN values"):
        convert_peer(SPECS["litert_fp32"], saved, tmp_path, rows, signature=SIGNATURE)
    assert list(tmp_path.iterdir()) == []


def test_litert_fp32_converts_from_the_frozen_model_and_agrees_with_the_saved_model(user_model, tmp_path):
    saved, frozen, rows = user_model
    written = convert_peer(SPECS["litert_fp32"], saved, tmp_path, rows, signature=SIGNATURE, frozen=frozen)
    assert sorted(path.name for path in written.parent.iterdir()) == ["model.tflite", SOURCE_FILE]
    source = (written.parent / SOURCE_FILE).read_text()
    assert source.startswith(f"converted from the frozen model {frozen}, because from {saved}: ")
    assert "NaN values" in source and source.count("\n") == 1
    peer = load_predictor(written.parent, signature=SIGNATURE)(rows)[OUTPUT]
    reference = load_predictor(saved, signature=SIGNATURE)(rows)[OUTPUT]
    # The same float32 weights and ops; only the kernels' summation order differs.
    np.testing.assert_allclose(peer, reference, rtol=0, atol=1e-6)


def test_litert_int8_full_converts_from_the_frozen_model(user_model, tmp_path):
    saved, frozen, rows = user_model
    with pytest.raises(UserError, match="READ_VARIABLE"):
        model_files(INT8_FULL, saved, rows, SIGNATURE)
    written = convert_peer(INT8_FULL, saved, tmp_path, rows, signature=SIGNATURE, frozen=frozen)
    assert "LiteRT conversion (int8_full) failed" in (written.parent / SOURCE_FILE).read_text()
    peer = load_predictor(written, signature=SIGNATURE)(rows)[OUTPUT]
    reference = load_predictor(saved, signature=SIGNATURE)(rows)[OUTPUT]
    # Softmax probabilities through int8 activations: measured max |Δ| 0.006 on these rows.
    assert np.abs(peer - reference).max() < 0.05


def test_a_peer_that_converts_from_the_saved_model_never_reads_the_frozen_model(
    peer_export, train_features, tmp_path
):
    """Iris: the frozen model named is not even a directory, and the bytes are the SavedModel's."""
    spec = SPECS["litert_fp32"]
    written = convert_peer(spec, peer_export, tmp_path, train_features, LABEL_VOCABULARY, frozen=tmp_path / "none")
    assert [path.name for path in written.parent.iterdir()] == ["model.tflite"]
    assert written.read_bytes() == model_files(spec, peer_export, train_features)["model.tflite"]


def test_a_peer_that_converts_from_neither_fails_with_both_reasons(user_model, tmp_path):
    saved, frozen, rows = user_model
    with pytest.raises(UserError) as info:
        convert_peer(SPECS["openvino_fp32"], saved, tmp_path / "peers", rows, signature=SIGNATURE, frozen=frozen)
    message = str(info.value)
    assert "\n" not in message and "peer-frozen-" not in message, message  # the scratch copy is not named
    first, second = message.split(f"; from the frozen model {frozen}: ")
    assert first.startswith(f"{saved}: OpenVINO converts only the 'serving_default' signature")
    assert second.startswith(f"{frozen} (as a SavedModel): OpenVINO converts only the 'serving_default'")
    assert not (tmp_path / "peers").exists()

