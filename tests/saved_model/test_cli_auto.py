"""optimise_saved_model --auto and Keras files in: every candidate printed side by side with the one
written, a Keras .keras file optimised like a SavedModel; wrong combinations are one line, exit 1
or 2, nothing written, before TensorFlow loads where they can be."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from saved_model.models import wide_mlp_inputs

from serving_optimiser.cli.optimise_saved_model import main
from serving_optimiser.saved_model.auto import CANDIDATES


@pytest.mark.onednn  # its int8 candidates run on oneDNN's kernels
def test_auto_prints_every_candidate_and_writes_the_winner(wide_mlp, tmp_path, capsys):
    np.savez(tmp_path / "rows.npz", x=wide_mlp_inputs(256, seed=2)["x"])
    np.savez(tmp_path / "calibration.npz", x=wide_mlp_inputs(256, seed=3)["x"])
    code = main([str(wide_mlp), str(tmp_path / "out"), "--auto", "--objective", "latency",
                 "--sample-inputs", str(tmp_path / "rows.npz"),
                 "--calibration-inputs", str(tmp_path / "calibration.npz"),
                 "--serving-batch-size", "64", "--report", str(tmp_path / "auto.json")])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].split() == ["candidate", "size", "time@64", "verdict", "worst", "output"]
    assert [line.split()[0] for line in out[1:-1]] == ["original", *CANDIDATES]
    assert sum("<- written" in line for line in out) == 1 and out[-1].startswith("objective latency: ")
    report = json.loads((tmp_path / "auto.json").read_text())
    assert report["serving_batch_size"] == 64 and report["objective"] == "latency"
    assert all(row["verdict"] == "pass" for row in report["candidates"])  # calibration given: all ran
    assert (tmp_path / "out" / "saved_model.pb").is_file()


def test_a_keras_file_is_optimised_like_a_saved_model(tmp_path, capsys):
    import keras

    keras.utils.set_random_seed(0)
    features = keras.Input((8,), name="features")
    hidden = keras.layers.Dense(64, activation="relu")(features)
    keras.Model(features, keras.layers.Dense(3, activation="softmax", name="species")(hidden)).save(
        tmp_path / "net.keras")
    np.savez(tmp_path / "rows.npz", features=np.random.default_rng(0).standard_normal((128, 8)).astype(np.float32))
    code = main([str(tmp_path / "net.keras"), str(tmp_path / "out"), "--transforms",
                 "fold_constants(ignore_errors=true) quantize_weights(minimum_size=16)",
                 "--sample-inputs", str(tmp_path / "rows.npz"), "--report", str(tmp_path / "report.json")])
    assert code == 0, capsys.readouterr().err
    assert "species  pass  class" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["imported"]["source_format"] == "keras3" and report["imported"]["inputs"] == {
        "features": {"dtype": "float32", "shape": [None, 8]}}


@pytest.mark.parametrize(("argv", "code", "expected"), [
    (["--auto"], 1, "--auto judges every candidate on your data: it needs --sample-inputs"),
    (["--auto", "--transforms", "strip_unused_nodes"], 2, "not allowed with argument"),
    ([], 2, "one of the arguments --transforms --auto is required"),
], ids=["auto-without-samples", "auto-and-transforms", "neither"])
def test_wrong_combinations_are_one_line(wide_mlp, tmp_path, capsys, argv, code, expected):
    with pytest.raises(SystemExit) if code == 2 else contextlib.nullcontext():
        result = main([str(wide_mlp), str(tmp_path / "out"), *argv])
        assert result == code
    err = capsys.readouterr().err.strip().splitlines()
    assert expected in err[-1] and not (tmp_path / "out").exists()


def test_a_missing_keras_file_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing.keras"), str(tmp_path / "out"), "--transforms", "strip_unused_nodes"]) == 1
    missing = tmp_path / "missing.keras"
    assert capsys.readouterr().err.strip() == f"optimise_saved_model: error: {missing}: no such Keras file"

