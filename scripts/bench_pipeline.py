"""Benchmark (not a test): wall time and peak memory of each pipeline stage with the default
params, run in a temporary copy of the repo so the workspace and dvc.lock stay untouched."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def copy_tracked_files(target: Path) -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.split():
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)


def stages_in_order(repo: Path) -> list[tuple[str, str]]:
    """(stage name, resolved command) in an order that respects dependencies."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        import networkx as nx

        graph = dvc_repo.index.graph
        ordered = list(reversed(list(nx.topological_sort(graph))))
        return [(stage.name, stage.cmd) for stage in ordered if getattr(stage, "cmd", None)]


def run_measured(command: str, cwd: Path) -> tuple[float, int, int]:
    """(wall seconds, peak RSS in MiB, exit code) of one stage command."""
    start = time.perf_counter()
    process = subprocess.Popen(command, shell=True, cwd=cwd)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    return elapsed, usage.ru_maxrss // 1024, os.waitstatus_to_exitcode(status)


def main() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as temporary:
        repo = Path(temporary)
        copy_tracked_files(repo)
        # DVCLive needs a repo with a commit; no git identity is assumed on this machine.
        identity = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost"}
        identity |= {"GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}
        for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
            subprocess.run(command, cwd=repo, check=True, env=os.environ | identity)
        rows = []
        for name, command in stages_in_order(repo):
            print(f"bench: running {name} ...", file=sys.stderr, flush=True)
            seconds, peak_mib, code = run_measured(command, repo)
            rows.append((name, seconds, peak_mib))
            if code != 0:
                print(f"bench: stage {name} failed with exit code {code}", file=sys.stderr)
                return 1
    print(f"{'stage':<24} {'wall s':>8} {'peak MiB':>9}")
    for name, seconds, peak_mib in rows:
        print(f"{name:<24} {seconds:>8.1f} {peak_mib:>9}")
    print(f"{'total':<24} {sum(r[1] for r in rows):>8.1f} {max(r[2] for r in rows):>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
