"""scripts/bench_real.py's table on one small published model (mtcnn RNet, 24 x 24 x 3 patches):
the lossless list and one peer, one timing round, written into a copy of a results section that
it replaces and nothing else (marker real; the whole run is make bench-real)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.real, pytest.mark.xdist_group("published_models")]

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_real.py"
HEADER = "| candidate | from | size × | outputs: metric value verdict | batch 1 × | batch 64 × | note |"


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_bench_real_table_on_mtcnn_rnet(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\nkept above\n\n## Results: make bench-real\n\nan old run\n\n## After\n\nkept below\n")
    command = [sys.executable, str(SCRIPT), "--models", "mtcnn_rnet", "--candidates", "lossless",
               "--peers", "onnx_fp32", "--rounds", "1", "--doc", str(doc)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("CPU: ") and "cores" in lines[0] and "oneDNN" in lines[0]
    assert "### mtcnn_rnet" in lines and HEADER in lines
    rows = {_cells(line)[0]: _cells(line) for line in lines[lines.index(HEADER) + 2:] if line.startswith("| ")}
    assert set(rows) == {"saved_model", "lossless", "onnx_fp32"}
    assert rows["saved_model"][2:7] == ["1.000", "–", "1.00", "1.00", "the yardstick"]
    lossless = rows["lossless"]
    assert 0.5 < float(lossless[2]) < 1.0  # the frozen graph drops the variables' checkpoint
    # Both RNet outputs judged by their kind; lossless is the same function within float rounding.
    assert lossless[3] == "box rms_diff_of_range 0.0000 pass; face_prob class_agreement 1.0000 pass"
    for row in ("lossless", "onnx_fp32"):
        assert all(0.01 < float(rows[row][i]) < 100 for i in (4, 5)), rows[row]  # measured ratios, not blanks
    text = doc.read_text()
    assert text.startswith("# Title\n\nkept above\n\n## Results: make bench-real\n\nCPU: ")
    assert "an old run" not in text and text.endswith("\n## After\n\nkept below\n")
    assert text.count("### mtcnn_rnet") == 1 and HEADER in text
