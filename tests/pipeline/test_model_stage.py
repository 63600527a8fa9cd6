"""The model stage: a user's SavedModel and samples checked against its signature and written as
data/samples; bad input in the model section stops with one line naming the key and the value,
writes nothing, and (for what needs no signature) before TensorFlow loads."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from pipeline_helpers import ROOT
from user_model import INPUT, OUTPUT, ROWS, SIGNATURE, save_user_model

from serving_optimiser.pipeline.model import ModelSpec, Samples
from serving_optimiser.pipeline.stage import run_stage


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    return save_user_model(tmp_path_factory.mktemp("user"))


def write_params(tmp_path: Path, **model) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(model)
    path = tmp_path / "my-params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def run_model_stage(params: Path, out: Path, capsys) -> tuple[int, str]:
    spec = importlib.util.spec_from_file_location("stage_model", ROOT / "scripts" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        run_stage("model", module.main, ["--params", str(params), "--out", str(out)])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr()


def user_params(tmp_path, user_model, **changes):
    saved, samples = user_model
    values = {"source": "saved_model", "path": str(saved), "samples": str(samples), "signature": SIGNATURE}
    return write_params(tmp_path, **{**values, **changes})


def test_a_user_model_becomes_the_spec_and_two_disjoint_seeded_parts(tmp_path, user_model, capsys):
    out = tmp_path / "samples"
    code, captured = run_model_stage(user_params(tmp_path, user_model), out, capsys)
    assert code == 0, captured.err
    spec = ModelSpec.load(out)
    assert spec.signature == SIGNATURE and spec.input_order == [INPUT]
    assert spec.inputs == {INPUT: {"dtype": "float32", "shape": [None, 8, 8, 1]}}
    assert spec.outputs == {OUTPUT: {"dtype": "float32", "shape": [None, 4]}}
    assert spec.class_output is None and spec.gate == "relative_diff" and spec.compared == [OUTPUT]
    samples = Samples.load(out)
    assert samples.labels is None
    calibration, evaluation = samples.calibration[INPUT], samples.evaluation[INPUT]
    assert len(calibration) == len(evaluation) == ROWS // 2  # model.eval_fraction 0.5
    with np.load(user_model[1]) as data:
        rows = {row.tobytes() for row in data[INPUT]}
    assert {row.tobytes() for row in calibration} | {row.tobytes() for row in evaluation} == rows
    assert not {row.tobytes() for row in calibration} & {row.tobytes() for row in evaluation}
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    run_model_stage(user_params(tmp_path, user_model), out, capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # seeded: the same bytes again


def test_labels_and_a_class_output(tmp_path, user_model, capsys):
    _, samples = user_model
    with np.load(samples) as data:
        arrays = dict(data)
    labelled = tmp_path / "labelled.npz"
    np.savez(labelled, label=np.arange(ROWS) % 4, **arrays)
    params = user_params(tmp_path, user_model, samples=str(labelled), labels="label", class_output=OUTPUT)
    code, captured = run_model_stage(params, tmp_path / "samples", capsys)
    assert code == 0, captured.err
    loaded = Samples.load(tmp_path / "samples")
    assert loaded.spec.gate == "class_agreement" and loaded.spec.diff_output == OUTPUT
    assert loaded.labels.dtype == np.int64 and len(loaded.labels) == ROWS // 2


def npz(tmp_path, name, **arrays) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


BAD = {
    "missing-path": (lambda tmp, m: {"path": str(tmp / "nowhere")}, "'model.path' = {tmp}/nowhere: no such directory"),
    "not-a-saved-model": (lambda tmp, m: {"path": str(tmp)}, "'model.path' = {tmp}: not a SavedModel directory"),
    "unknown-signature": (lambda tmp, m: {"signature": "serving_default"},
                          "'model.signature' = serving_default: no such signature in"),
    "npz-lacks-input": (lambda tmp, m: {"samples": npz(tmp, "other.npz", pixels=np.zeros((4, 8, 8, 1), np.float32))},
                        "'model.samples' = {tmp}/other.npz: array 'pixels' is no input of signature 'classify'"),
    "npz-without-the-input": (
        lambda tmp, m: {"samples": npz(tmp, "labels-only.npz", label=np.zeros(4, np.int64)), "labels": "label",
                        "class_output": OUTPUT},
        "'model.samples' = {tmp}/labels-only.npz: no array for signature 'classify' input(s) image (has none)",
    ),
    "wrong-dtype": (lambda tmp, m: {"samples": npz(tmp, "f64.npz", image=np.zeros((4, 8, 8, 1)))},
                    "array 'image' is float64, signature 'classify' takes float32"),
    "wrong-shape": (lambda tmp, m: {"samples": npz(tmp, "shape.npz", image=np.zeros((4, 8, 8), np.float32))},
                    "array 'image' has shape [4, 8, 8], signature 'classify' takes ['?', 8, 8, 1]"),
    "unknown-class-output": (
        lambda tmp, m: {"class_output": "logits"},
        "'model.class_output' = logits: no such output of signature 'classify' (has probabilities)",
    ),
    "missing-labels": (lambda tmp, m: {"labels": "label"}, "'model.labels' = label: no such array in"),
    "not-an-npz": (lambda tmp, m: {"samples": str(m[0] / "saved_model.pb")}, "must be an .npz file"),
    "unknown-source": (lambda tmp, m: {"source": "onnx"}, "'model.source' = 'onnx' is not one of iris, saved_model"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_model_section_fails_with_one_line_naming_key_and_value(case, tmp_path, user_model, capsys):
    change, expected = BAD[case]
    params = user_params(tmp_path, user_model, **change(tmp_path, user_model))
    out = tmp_path / "samples"
    code, captured = run_model_stage(params, out, capsys)
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith(f"model: error: {params}: "), lines[0]
    assert expected.format(tmp=tmp_path) in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob(".samples*"))


def test_iris_keys_left_on_a_user_value_are_named(tmp_path, capsys):
    params = write_params(tmp_path, path="/some/model")
    code, captured = run_model_stage(params, tmp_path / "samples", capsys)
    assert code == 1
    assert "'model.path' = /some/model needs model.source=saved_model (with source iris it is models/exported)" in (
        captured.err)


@pytest.mark.parametrize("case", ["missing-path", "not-a-saved-model", "not-an-npz", "unknown-source"])
def test_path_errors_come_before_tensorflow_loads(case, tmp_path, user_model):
    change, expected = BAD[case]
    params = user_params(tmp_path, user_model, **change(tmp_path, user_model))
    code = (
        "import sys\n"
        "from serving_optimiser.errors import UserError\n"
        "from serving_optimiser.pipeline.params import PipelineParams\n"
        f"try:\n    PipelineParams.load({str(params)!r}).model()\nexcept UserError as error:\n    print(error)\n"
        "print('tensorflow' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    message, loaded = result.stdout.splitlines()
    assert expected.format(tmp=tmp_path) in message and loaded == "False"


def test_the_iris_spec_comes_from_the_export_and_keeps_its_figures(tiny_export, tmp_path):
    from serving_optimiser.pipeline.data import FEATURE_NAMES, LABEL_VOCABULARY
    from serving_optimiser.pipeline.model import iris_samples
    from serving_optimiser.pipeline.params import ModelSection

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for name in ("train", "eval"):
        (prepared / f"{name}.csv").write_text((ROOT / "data" / "iris.csv").read_text())
    section = yaml.safe_load((ROOT / "params.yaml").read_text())["model"]
    model = ModelSection.from_section(section)
    model = ModelSection(**{**model.__dict__, "path": tiny_export, "samples": prepared})
    spec, _, evaluation, labels = iris_samples(model, LABEL_VOCABULARY)
    assert spec.signature == "predict" and spec.input_order == FEATURE_NAMES
    assert spec.compared == ["class_ids", "probabilities"] and spec.diff_output == "probabilities"
    assert set(spec.outputs) == {"class_ids", "classes", "logits", "probabilities"}
    assert json.loads(json.dumps(spec.inputs))["sepal_length"] == {"dtype": "float32", "shape": [None]}
    assert len(labels) == len(evaluation["sepal_length"]) == 150
