"""The ``optimise_saved_model`` command: a report on stdout and progress on stderr when it works;
one or two lines on stderr, a non-zero exit, no traceback and no OUT_DIR when it does not."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from saved_model.models import BEYOND_THE_GATE, LOSSLESS, QUANTISING, iris_inputs

from serving_optimiser.cli.optimise_saved_model import main


def run_command(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from serving_optimiser.cli.optimise_saved_model import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.slow
def test_command_optimises_and_reports(tf1_iris, tmp_path):
    np.savez(tmp_path / "inputs.npz", **iris_inputs(64))
    result = run_command(
        tf1_iris, tmp_path / "out", "--transforms", QUANTISING, "--sample-inputs", tmp_path / "inputs.npz",
        "--min-agreement", "0.99", "--report", tmp_path / "report.json",
    )
    assert result.returncode == 0, result.stderr
    assert "signature 'predict'" in result.stdout and "signature 'serving_default'" in result.stdout
    assert "classes        pass  label        label agreement 100.00% (>= 99.00%)" in result.stdout
    assert "probabilities  pass  class        class agreement 100.00% (>= 99.00%)" in result.stdout
    assert "optimise_saved_model: quantize_weights:" in result.stderr  # progress, one line per transform
    assert "Traceback" not in result.stderr and "WARNING" not in result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["size_ratio"] <= 0.3 and report["min_class_agreement"] >= 0.99
    assert report["verdict"] == "pass" and report["generated_inputs"] == []
    assert (tmp_path / "out" / "saved_model.pb").is_file()


@pytest.mark.slow
def test_command_refuses_a_model_that_reads_files(reads_a_file, tmp_path):
    result = run_command(reads_a_file, tmp_path / "out", "--transforms", LOSSLESS)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "refusing unsafe op ReadFile" in lines[0] and "--allow-ops ReadFile" in lines[0]
    assert not (tmp_path / "out").exists()


def _truncated_copy(source, tmp_path):
    target = tmp_path / "truncated"
    shutil.copytree(source, target)
    data = (target / "saved_model.pb").read_bytes()
    (target / "saved_model.pb").write_bytes(data[: len(data) // 3])
    return target


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("truncated_saved_model", "saved_model.pb: malformed or truncated SavedModel protobuf"),
        ("missing_directory", "no such directory"),
        ("malformed_transforms", "transforms: malformed transform string"),
        ("unknown_signature", "unknown signature key 'classify'"),
        ("agreement_gate", "class agreement 0."),
    ],
)
def test_command_errors_are_short_and_leave_no_output(case, expected, tf1_iris, multi_signature_module, tmp_path,
                                                       capsys):
    out = tmp_path / "out"
    argv = {
        "truncated_saved_model": [_truncated_copy(tf1_iris, tmp_path), out, "--transforms", LOSSLESS],
        "missing_directory": [tmp_path / "missing", out, "--transforms", LOSSLESS],
        "malformed_transforms": [tf1_iris, out, "--transforms", "remove_nodes(op=Identity"],
        "unknown_signature": [tf1_iris, out, "--transforms", LOSSLESS, "--signature", "classify"],
        "agreement_gate": [multi_signature_module, out, "--transforms", BEYOND_THE_GATE,
                           "--min-agreement", "0.99"],
    }[case]
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if ": error: " in line]
    assert code == (3 if case == "agreement_gate" else 1)
    assert len(errors) == 1 and expected in errors[0], captured.err
    assert "Traceback" not in captured.err
    assert not out.exists()
    if case != "agreement_gate":
        assert len(captured.err.strip().splitlines()) <= 2


def test_command_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["only_one_directory"])
    assert raised.value.code == 2
    assert "the following arguments are required" in capsys.readouterr().err


@pytest.mark.onednn
@pytest.mark.slow
def test_command_calibrates_int8_and_times_it_at_the_serving_batch(mixed_scale_wide_deep, tmp_path):
    from saved_model.models import CALIBRATED_INT8, mixed_scale_inputs

    np.savez(tmp_path / "calibration.npz", **mixed_scale_inputs(512, seed=1))
    np.savez(tmp_path / "held_out.npz", **mixed_scale_inputs(1024, seed=2))
    result = run_command(
        mixed_scale_wide_deep, tmp_path / "out", "--transforms", CALIBRATED_INT8,
        "--calibration-inputs", tmp_path / "calibration.npz", "--sample-inputs", tmp_path / "held_out.npz",
        "--serving-batch-size", "64", "--min-agreement", "0.99", "--report", tmp_path / "report.json",
        "--output-kind", "scores=class",  # a class per row (argmax), as the model is read; inferred: regression
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    step = next(s for s in report["calibration"] if s["transform"] == "quantize_matmuls")
    # The mixed-scale first layer stays float by the error guard (0.140 > 0.05): the figure and the line.
    assert step["rows"] == 512 and step["float_by_guard"] == ["StatefulPartitionedCall/MatMul"]
    assert (f"calibrated step {step['step']} quantize_matmuls on 512 rows: 2 layer(s) measured (largest int8 output "
            "error 0.1") in result.stdout
    tries = " -> ".join(f"{ratio:.2f} x" for ratio in report["serving_batch"]["time_ratios"])
    assert f"at batch 64: the optimised model's time over the original's: {tries}" in result.stdout
    assert report["min_class_agreement"] >= 0.99 and (tmp_path / "out" / "saved_model.pb").is_file()
    assert "Traceback" not in result.stderr


def test_a_serving_batch_size_without_calibration_inputs_is_one_line(tf1_iris, tmp_path, capsys):
    code = main([str(tf1_iris), str(tmp_path / "out"), "--transforms", LOSSLESS, "--serving-batch-size", "8"])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.strip() == ("optimise_saved_model: error: --serving-batch-size times the calibrated layers: "
                                    "it needs --calibration-inputs")
    with pytest.raises(SystemExit) as raised:
        main([str(tf1_iris), str(tmp_path / "out"), "--transforms", LOSSLESS, "--serving-batch-size", "0"])
    assert raised.value.code == 2 and "expected an integer >= 1, got '0'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
