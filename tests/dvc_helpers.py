"""What the end-to-end DVC tests share: a copy of the repo's sources to run in, an environment
for git and dvc, running a command with its output kept for the failure message."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline_helpers import ROOT


def dvc_env(**extra: str) -> dict:
    """This environment with the venv first on PATH (stages run `python`), a git identity for
    commits, no DVC analytics and quiet TensorFlow."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
        DVC_NO_ANALYTICS="1",
        TF_CPP_MIN_LOG_LEVEL="3",
        **extra,
    )
    return env


def run(cwd: Path, env: dict, *command: str, expect: int = 0) -> str:
    """stdout + stderr of ``command``; fails the test, showing both, on another exit code."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == expect, f"{' '.join(command)} exited {result.returncode}:\n{output}"
    return output


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def copy_sources(target: Path) -> None:
    """The repo's tracked sources without the committed run's results (dvc.lock, metrics,
    reports, training curves) or the docs."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        if name == "dvc.lock" or name.startswith(("metrics/", "reports/", "dvclive/", "docs/")):
            continue
        if (ROOT / name).exists():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
