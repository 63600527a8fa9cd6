"""A latency worker killed by the kernel (SIGKILL, what the OOM killer sends) is reported by its
parent in one line naming the params to lower, with a non-zero exit and no traceback: the worker
is the real child process (python -m serving_optimiser.pipeline.latency) on a real Iris export."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from serving_optimiser.errors import UserError
from serving_optimiser.pipeline import latency
from serving_optimiser.runner import killed_by_signal

KILLED = ("the latency worker (the exported model, timed apart) process was killed (signal 9, most likely out of "
          "memory); lower latency.max_call_bytes or latency.batch_sizes")


def _environment(tmp_path, kill_at_start: bool) -> dict:
    environment = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}
    if kill_at_start:
        # The child kills itself with SIGKILL as Python starts it (sitecustomize runs first), as
        # the OOM killer would end it while it loads the model.
        site = tmp_path / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text("import os\nos.kill(os.getpid(), 9)\n")
        environment["PYTHONPATH"] = os.pathsep.join([str(site), environment.get("PYTHONPATH", "")])
    return environment


def test_a_worker_killed_while_timing_is_one_line(tiny_export, tiny_samples, tmp_path):
    worker = latency.WorkerModel(tiny_export, tiny_samples, 64, 7, _environment(tmp_path, False))
    try:
        assert len(worker.timer(8, 2)) == 2  # alive and timing
        os.kill(worker._process.pid, signal.SIGKILL)
        with pytest.raises(UserError) as raised:
            worker.timer(64, 3)
        assert str(raised.value) == KILLED
    finally:
        worker.close()


def test_a_worker_that_kills_itself_fails_the_stage_in_one_line(tiny_export, tiny_samples, tmp_path):
    """Through the stages' runner in a process of its own: exit 1, stderr one line."""
    script = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from serving_optimiser.runner import run
        from serving_optimiser.pipeline.latency import WorkerModel

        site = Path({str(tmp_path / "site")!r})
        site.mkdir()
        (site / "sitecustomize.py").write_text("import os\\nos.kill(os.getpid(), 9)\\n")
        environment = {{**os.environ, "PYTHONPATH": str(site)}}
        sys.exit(run("latency", lambda: WorkerModel(Path({str(tiny_export)!r}), Path({str(tiny_samples)!r}),
                                                    64, 7, environment)))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr
    assert lines == [f"latency: error: {KILLED}"], done.stderr


def test_a_worker_killed_at_start_is_one_line(tiny_export, tiny_samples, tmp_path):
    with pytest.raises(UserError) as raised:
        latency.WorkerModel(tiny_export, tiny_samples, 64, 7, _environment(tmp_path, True))
    assert str(raised.value) == KILLED


def test_other_signals_and_exits():
    assert killed_by_signal(1, "x", "y") is None and killed_by_signal(0, "x", "y") is None
    assert killed_by_signal(None, "x", "y") is None
    assert killed_by_signal(-signal.SIGSEGV, "peer", "p") == "the peer process was killed (signal 11, SIGSEGV)"
    assert killed_by_signal(-9, "peer", "--chunk-bytes") == \
        "the peer process was killed (signal 9, most likely out of memory); lower --chunk-bytes"
