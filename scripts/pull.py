"""`make pull`: fetch the committed artefacts from the default DVC remote, or say in one line why
not (the remote is missing, or lacks some of them) and that `make all` reproduces them exactly."""

import subprocess
import sys
from pathlib import Path

PROG = "make pull"
REPRODUCE = "run `make all` to reproduce them bit for bit instead (pinned kernels, any x86-64 CPU)"


def dvc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], capture_output=True, text=True)


def default_remote() -> tuple[str, str]:
    name = dvc("remote", "default").stdout.strip()
    if not name:
        raise SystemExit(f"{PROG}: error: no default DVC remote is configured; {REPRODUCE}")
    return name, dvc("config", f"remote.{name}.url").stdout.strip()


def missing_outputs() -> int:
    """How many outputs dvc.lock records are not in the workspace after the pull (counted here:
    DVC's own messages about it change wording from version to version)."""
    import yaml

    lock = Path("dvc.lock")
    if not lock.is_file():
        return 0
    stages = yaml.safe_load(lock.read_text()).get("stages", {})
    paths = [out["path"] for stage in stages.values() for out in stage.get("outs", [])]
    return sum(not Path(path).exists() for path in paths)


def main() -> int:
    name, url = default_remote()
    if "://" not in url:
        # A local remote: a directory beside the clone, shared by the clones on one machine.
        path = (Path(".dvc") / url).resolve() if not Path(url).is_absolute() else Path(url)
        if not path.is_dir():
            print(f"{PROG}: error: the default DVC remote '{name}' ({path}) does not exist on this machine "
                  f"(it is a directory beside the clone, filled by `make push`); {REPRODUCE}", file=sys.stderr)
            return 1
    result = dvc("pull")
    if result.returncode != 0:
        missing = missing_outputs()
        detail = f"{missing} committed artefacts missing there" if missing else "dvc pull failed"
        print(f"{PROG}: error: the default DVC remote '{name}' ({url}): {detail}; {REPRODUCE}", file=sys.stderr)
        return 1
    sys.stdout.write(result.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
