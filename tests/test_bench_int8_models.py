"""scripts/bench_int8_models.py end to end on the two small models at --quick size: a real run in a
subprocess (build, train, export, optimise_saved_model: the float list, int8 with and without the speed guard at
batch 1,
LiteRT and OpenVINO int8, timing), and
the table it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.onednn]

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_int8_models.py"
MODELS = ("wide_mlp", "encoder")
CANDIDATES = ("float", "float_optimised", "int8", "int8_b1", "litert_int8", "openvino_int8")
BATCH_SIZES = (1, 16)
HEADER = ("| model | candidate | x float @1 | x float @16 | ms @1 | ms @16 | top-1 agreement "
          "| max abs diff / range |")


@pytest.fixture(scope="module")
def run() -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "--quick", "--models", ",".join(MODELS), "--batch-sizes",
               ",".join(map(str, BATCH_SIZES)), "--rounds", "2", "--serving-batch-size", "1"]
    # The subprocess inherits TF_ENABLE_ONEDNN_OPTS from the onednn pass of make test.
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def table_rows(stdout: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in MODELS:
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def test_cpu_line_comes_first(run):
    first = run.stdout.splitlines()[0]
    assert first.startswith("CPU: ")
    assert "oneDNN" in first and "cores" in first


def test_table_has_every_model_and_candidate(run):
    assert HEADER in run.stdout
    rows = table_rows(run.stdout)
    assert sorted(rows) == sorted((model, candidate) for model in MODELS for candidate in CANDIDATES)


def test_ratios_and_times_are_positive_numbers(run):
    for (model, candidate), cells in table_rows(run.stdout).items():
        figures = [float(cell) for cell in cells[: 2 * len(BATCH_SIZES)]]
        assert all(figure > 0 for figure in figures), (model, candidate, cells)
        if candidate == "float":
            assert figures[: len(BATCH_SIZES)] == [1.0] * len(BATCH_SIZES)


def test_agreement_with_float_on_held_out_rows(run):
    for (model, candidate), cells in table_rows(run.stdout).items():
        match = re.fullmatch(r"([\d.]+) % of (\d+)", cells[-2])
        assert match, cells[-2]
        agreement, rows = float(match.group(1)), int(match.group(2))
        assert 0.0 <= agreement <= 100.0 and rows >= 16
        relative_diff = float(cells[-1])
        if candidate == "float":
            assert agreement == 100.0 and relative_diff == 0.0
        else:
            assert 0.0 <= relative_diff < 1.0, (model, candidate, relative_diff)


def test_notes_say_how_each_model_answers(run):
    for model in MODELS:
        assert re.search(rf"^{model} \(.*\): trained 2 epochs", run.stdout, re.MULTILINE)
    assert re.search(r"^  float on the held-out rows: accuracy [\d.]+", run.stdout, re.MULTILINE)
    assert re.search(r"^  int8: .*QuantizedMatMulWithBias", run.stdout, re.MULTILINE)
    guard_notes = re.findall(r"^  int8_b1: .*; sent back to float by the speed guard at batch 1: (\d+) layer\(s\)$",
                             run.stdout, re.MULTILINE)
    assert len(guard_notes) == len(MODELS)


def test_progress_goes_to_stderr(run):
    for model in MODELS:
        assert f"{model}: done in" in run.stderr
        assert f"{model}: done in" not in run.stdout
