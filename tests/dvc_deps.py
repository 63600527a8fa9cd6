"""Rewrite the package deps of every dvc.yaml stage from its script's import closure (the one source
tests/pipeline/test_dvc_yaml.py checks them against), keeping every other line of dvc.yaml.

    python tests/dvc_deps.py          # rewrite dvc.yaml in place
    python tests/dvc_deps.py --check  # exit 1 and name the stages whose deps would change

A directory every module of which a stage imports is one dep (graph_transforms/transforms, which
the registry imports whole at run time).
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from import_closure import import_closure

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PEERS = SRC / "serving_optimiser/peers"
# Imports ast can't see: the registry imports every module in transforms/ at run time (pkgutil);
# the peers' format table imports the runtime module a format names on first use (which one
# depends on the params, so every runtime module counts).
DYNAMIC_IMPORTS = {
    SRC / "serving_optimiser/graph_transforms/registry.py": [SRC / "serving_optimiser/graph_transforms/transforms"],
    PEERS / "formats.py": [PEERS / f"{name}.py" for name in ("tf", "litert", "onnx", "openvino")],
}
WHOLE_DIRECTORIES = (SRC / "serving_optimiser/graph_transforms/transforms",)


def needed_files(script: Path) -> set[Path]:
    needed = import_closure(script, SRC)
    pending = list(needed)
    while pending:
        path = pending.pop()
        for target in DYNAMIC_IMPORTS.get(path, ()):
            files = set(target.rglob("*.py")) if target.is_dir() else {target}
            for file in files - needed:
                needed |= {file} | import_closure(file, SRC)
                pending.append(file)
    return needed


def package_deps(script: Path) -> list[str]:
    """The sorted package deps of a stage running ``script``."""
    needed = needed_files(script)
    deps = set()
    for path in needed:
        directory = next((d for d in WHOLE_DIRECTORIES if d in path.parents), None)
        if directory is not None and set(directory.rglob("*.py")) <= needed:
            deps.add(str(directory.relative_to(ROOT)))
        else:
            deps.add(str(path.relative_to(ROOT)))
    return sorted(deps)


def rewritten(text: str) -> tuple[str, list[str]]:
    """``text`` with each stage's ``- src/...`` deps replaced, and the stages that changed."""
    stages = yaml.safe_load(text)["stages"]
    changed = []
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    stage = None
    index = 0
    while index < len(lines):
        line = lines[index]
        match = re.match(r"^  ([A-Za-z0-9_]+):\s*$", line)
        if match:
            stage = match.group(1)
        dep = re.match(r"^(\s+)- src/", line)
        if dep and stage is not None:
            indent = dep.group(1)
            block = []
            while index < len(lines) and re.match(rf"^{indent}- src/", lines[index]):
                block.append(lines[index].strip()[2:])
                index += 1
            definition = stages[stage].get("do", stages[stage])
            script = ROOT / shlex.split(definition["cmd"])[1]
            wanted = package_deps(script)
            if block != wanted:
                changed.append(stage)
            out.extend(f"{indent}- {path}\n" for path in wanted)
            continue
        out.append(line)
        index += 1
    return "".join(out), changed


def main(argv: list[str]) -> int:
    path = ROOT / "dvc.yaml"
    text, changed = rewritten(path.read_text())
    if "--check" in argv:
        if changed:
            print(f"dvc.yaml: package deps out of date in {', '.join(changed)} (run python tests/dvc_deps.py)")
            return 1
        return 0
    path.write_text(text)
    print(f"dvc.yaml: rewrote the package deps of {', '.join(changed) or 'no stage'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
