"""Stage scripts on bad input: one line on stderr naming the key, token or row, a non-zero exit,
and no output written. Run in-process (the scripts are thin wrappers around run_stage)."""

import importlib.util
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import IRIS, ROOT

from serving_optimiser.pipeline.stage import run_stage


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_stage(name, load_script(name).main, argv)
    return exit_info.value.code, capsys.readouterr().err


def write_params(tmp_path: Path, change) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    change(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def single_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda p: p["optimise"].update(notebook=["fold_constant"]), "unknown transform 'fold_constant' (did you mean"),
        (
            lambda p: p["optimise"].update(notebook=["round_weights(steps=4)"]),
            "round_weights: unknown argument 'steps'",
        ),
        (lambda p: p["optimise"].update(notebook=["fold_constants(ignore_errors=true"]), "never closed"),
        (lambda p: p["optimise"].update(notebook="quantize_weights"), "'optimise.notebook' must be list"),
        (lambda p: p["optimise"].pop("notebook"), "missing key 'optimise.notebook'"),
        (lambda p: p["optimise"].update(notebook=[]), "'optimise.notebook' must not be empty"),
        (
            lambda p: p["optimise"].update({"my variant": ["fold_constants"]}),
            "'optimise.my variant' is not a valid variant name",
        ),
    ],
    ids=["unknown-transform", "bad-argument", "malformed-string", "wrong-type", "missing-key", "empty", "bad-name"],
)
def test_optimise_rejects_bad_transform_lists(tmp_path, capsys, change, expected):
    params = write_params(tmp_path, change)
    code, stderr = run_script(
        "optimise",
        ["notebook", "--params", str(params), "--frozen", str(tmp_path / "none"), "--out", str(tmp_path / "notebook")],
        capsys,
    )
    assert code == 1
    line = single_error_line(stderr)
    assert line.startswith("optimise: error: ") and expected in line
    assert not (tmp_path / "notebook").exists()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda p: p["prepare"].pop("seed"), "missing key 'prepare.seed'"),
        (lambda p: p["prepare"].update(eval_fraction="a fifth"), "'prepare.eval_fraction' must be float"),
        (lambda p: p.pop("data"), "missing section 'data'"),
    ],
    ids=["missing-key", "wrong-type", "missing-section"],
)
def test_prepare_rejects_bad_params(tmp_path, capsys, change, expected):
    params = write_params(tmp_path, change)
    out = tmp_path / "prepared"
    code, stderr = run_script("prepare", ["--params", str(params), "--data", str(IRIS), "--out-dir", str(out)], capsys)
    assert code == 1 and expected in single_error_line(stderr)
    assert not out.exists()


def test_prepare_rejects_a_malformed_data_row_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "iris.csv"
    lines = IRIS.read_text().splitlines()
    lines[7] = lines[7].replace("setosa", "rose")
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "prepared"
    code, stderr = run_script("prepare", ["--data", str(data), "--out-dir", str(out)], capsys)
    assert code == 1
    assert f"{data}: row 8: species='rose'" in single_error_line(stderr)
    assert not out.exists() and not list(tmp_path.glob(".prepared*"))


def test_prepare_writes_the_split(tmp_path, capsys):
    out = tmp_path / "prepared"
    run_stage("prepare", load_script("prepare").main, ["--data", str(IRIS), "--out-dir", str(out)])
    assert (out / "train.csv").read_text().count("\n") == 121
    assert (out / "eval.csv").read_text().count("\n") == 31


def test_train_rejects_a_missing_data_file(tmp_path, capsys):
    code, stderr = run_script(
        "train",
        ["--train", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "w.npz"), "--out-live", str(tmp_path)],
        capsys,
    )
    assert code == 1 and "missing.csv: data file not found" in single_error_line(stderr)
    assert not (tmp_path / "w.npz").exists()
