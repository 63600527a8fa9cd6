"""scripts/convert_peer.py: a fresh process converts quietly (nothing on stderr, one line on
stdout) to the same bytes as a conversion in this process; bad params fail with one line on
stderr, a non-zero exit, and nothing written."""

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import yaml
from peers_helpers import SECTION, SPECS
from pipeline_helpers import ROOT

from serving_optimiser.pipeline.data import LABEL_VOCABULARY
from serving_optimiser.pipeline.stage import run_stage

# The module shares the session's trained model and artefacts: keep it on one xdist worker.
pytestmark = pytest.mark.xdist_group("peers")

SCRIPT = ROOT / "scripts" / "convert_peer.py"


def write_params(tmp_path, change=lambda params: None):
    params = {"data": {"label_vocabulary": list(LABEL_VOCABULARY)}, "peers": copy.deepcopy(SECTION)}
    change(params)
    params_path = tmp_path / "my-params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    return params_path


@pytest.mark.parametrize("name", ["litert_int8_full", "onnx_int8_dynamic", "openvino_int8"])
def test_fresh_process_converts_quietly_to_the_same_bytes(name, tmp_path, peer_export, peer_samples):
    from serving_optimiser.peers.convert import model_files
    from serving_optimiser.pipeline.model import Samples

    params = write_params(tmp_path)
    out = tmp_path / "peers"
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    # Another hash seed than this process's: tf2onnx's constant merging follows set order.
    env["PYTHONHASHSEED"] = "12345"
    # OpenVINO's telemetry would keep a consent file and an id under the home directory.
    home = tmp_path / "home"
    home.mkdir()
    env["HOME"] = str(home)
    argv = [name, "--exported", str(peer_export), "--samples", str(peer_samples), "--out", str(out / name)]
    argv += ["--params", str(params)]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    written = out / name / SPECS[name].filename
    spec = SPECS[name]
    files = sorted(written.parent.iterdir())
    size = sum(path.stat().st_size for path in files)
    assert result.stdout.splitlines() == [
        f"convert_peer: {name} ({spec.format}, {spec.quantization}) -> {written} ({size} bytes)"
    ]
    # The pipeline converts the signature the model stage names (the export's predict).
    expected = model_files(spec, peer_export, Samples.load(peer_samples).calibration, "predict")
    assert {path.name: path.read_bytes() for path in files} == expected
    assert sorted(path.name for path in out.iterdir()) == [name]
    assert not (home / "intel").exists()  # where openvino_telemetry keeps its consent file and id


def load_script():
    spec = importlib.util.spec_from_file_location("stage_convert_peer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "change", "expected"),
    [
        ("onnx_fp16", lambda p: None, "no peer 'onnx_fp16' in 'peers.variants'"),
        ("litert_fp32", lambda p: p.pop("peers"), "missing section 'peers'"),
        (
            "litert_fp32",
            lambda p: p["peers"]["variants"]["litert_fp32"].update(quantization="int4"),
            "'peers.variants.litert_fp32.quantization' for litert must be one of",
        ),
    ],
    ids=["unknown-peer", "no-section", "bad-quantization"],
)
def test_bad_params_fail_with_one_line_naming_the_file(name, change, expected, tmp_path, peer_samples, capsys):
    params = write_params(tmp_path, change)
    out = tmp_path / "peers"
    argv = [name, "--exported", str(tmp_path / "none"), "--samples", str(peer_samples), "--out", str(out / name)]
    with pytest.raises(SystemExit) as exit_info:
        run_stage("convert_peer", load_script().main, [*argv, "--params", str(params)])
    assert exit_info.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"convert_peer: error: {params}: ") and expected in lines[0], lines
    assert not out.exists()


def test_missing_exported_model_fails_with_one_line(tmp_path, peer_samples, capsys):
    params = write_params(tmp_path)
    out = tmp_path / "peers"
    argv = ["litert_fp32", "--exported", str(tmp_path / "none"), "--samples", str(peer_samples)]
    argv += ["--out", str(out / "litert_fp32")]
    with pytest.raises(SystemExit) as exit_info:
        run_stage("convert_peer", load_script().main, [*argv, "--params", str(params)])
    assert exit_info.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"convert_peer: error: {tmp_path / 'none'}: "), lines
    assert not out.exists()


@pytest.fixture(scope="module")
def user_stage_inputs(tmp_path_factory):
    """A tf.Module-saved Keras CNN (tests/user_model.py), its frozen model and the model stage's
    directory for it, as the pipeline's model and freeze stages write them."""
    from user_model import SIGNATURE, save_user_model

    from serving_optimiser.pipeline.model import write_samples
    from serving_optimiser.pipeline.params import ModelSection
    from serving_optimiser.saved_model.freeze import freeze_saved_model

    base = tmp_path_factory.mktemp("user-stage")
    saved, samples = save_user_model(base)
    freeze_saved_model(saved, [SIGNATURE]).save(base / "frozen")
    model = ModelSection("saved_model", saved, SIGNATURE, samples, None, None, 0.5, 7, base / "params.yaml")
    write_samples(model, [], base / "samples")
    return saved, base / "frozen", base / "samples"


@pytest.mark.parametrize(
    ("name", "converts"), [("litert_fp32", True), ("openvino_fp32", False)], ids=["litert-via-frozen", "neither"]
)
def test_frozen_model_converts_where_the_saved_model_fails(name, converts, user_stage_inputs, tmp_path, capsys):
    """LiteRT answers NaN from the tf.Module's SavedModel and converts from the frozen model;
    OpenVINO (no serving_default) converts from neither and keeps its one line, naming both."""
    from serving_optimiser.peers.convert import SOURCE_FILE
    from serving_optimiser.pipeline.artefacts import UNSUPPORTED_FILE

    saved, frozen, samples = user_stage_inputs
    out = tmp_path / "peers" / name
    argv = [name, "--exported", str(saved), "--frozen", str(frozen), "--samples", str(samples), "--out", str(out)]
    run_stage("convert_peer", load_script().main, [*argv, "--params", str(write_params(tmp_path))])
    line = capsys.readouterr().out.strip()
    if converts:
        assert sorted(path.name for path in out.iterdir()) == ["model.tflite", SOURCE_FILE]
        assert line.startswith(f"convert_peer: {name} (litert, none) -> {out / 'model.tflite'} (")
        assert line.endswith(f", from the frozen model {frozen}")
        assert "NaN values" in (out / SOURCE_FILE).read_text()
    else:
        assert [path.name for path in out.iterdir()] == [UNSUPPORTED_FILE]
        reason = (out / UNSUPPORTED_FILE).read_text()
        assert reason.count("OpenVINO converts only the 'serving_default' signature") == 2, reason
        assert f"; from the frozen model {frozen}: {frozen} (as a SavedModel): " in reason
        assert "peer-frozen-" not in reason and line.endswith(reason.strip())
    assert sorted(path.name for path in out.parent.iterdir()) == [name]
