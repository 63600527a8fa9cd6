"""Rewrite the generated parts of dvc.yaml: the package deps of every stage, from its script's import
closure (the one source tests/pipeline/test_dvc_yaml.py checks them against), and the ``plots``
section, from the package's one list of charts (``plots.DEFAULT_CHARTS``); every other line of
dvc.yaml is kept.

    python tests/dvc_deps.py          # rewrite dvc.yaml in place
    python tests/dvc_deps.py --check  # exit 1 and name the stages (or plots) that would change

A directory every module of which a stage imports is one dep (graph_transforms/transforms, which
the registry imports whole at run time). A peer stage depends on its own runtime module only,
``src/serving_optimiser/peers/${item.format}.py``, which DVC resolves per peer (see
:data:`STAGE_RUNTIMES`).
"""

from __future__ import annotations

import json
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
sys.path.insert(0, str(SRC))
from serving_optimiser.peers.formats import FORMATS, PEER_FORMATS  # noqa: E402 - the standard library only
from serving_optimiser.pipeline.plots import dvc_plots  # noqa: E402

# Imports ast can't see: the registry imports every module in transforms/ at run time (pkgutil).
DYNAMIC_IMPORTS = {
    SRC / "serving_optimiser/graph_transforms/registry.py": [SRC / "serving_optimiser/graph_transforms/transforms"],
}
WHOLE_DIRECTORIES = (SRC / "serving_optimiser/graph_transforms/transforms",)

# The format table imports a runtime module by its format's name when an artefact is loaded or
# converted (peers/formats.py, Format.runtime), so which runtimes a stage imports depends on what
# it loads, not on its imports: these modules call it.
RUNTIME_LOADERS = {PEERS / "predictor.py", PEERS / "convert.py"}
# The peer a foreach peer stage runs, which DVC fills in per entry of peers.variants.
PEER_FORMAT = "${item.format}"
# The formats each stage that reaches a runtime loader loads: the exported model and the variants
# are SavedModels (tf); a peer stage loads (or converts to) its own peer's format, and the latency
# stage times the export beside it. A stage missing here that reaches a loader stops the rewrite.
STAGE_RUNTIMES = {
    "reference": ("tf",),
    "evaluate": ("tf",),
    "latency": ("tf",),
    "convert_peer": (PEER_FORMAT,),
    "evaluate_peer": (PEER_FORMAT,),
    "latency_peer": ("tf", PEER_FORMAT),
}


def runtime_file(format_name: str) -> Path:
    """The runtime module of ``format_name`` (named after the format, so dvc.yaml can template it)."""
    row = FORMATS[format_name]
    if row.module != row.name:
        raise SystemExit(f"peers/formats.py: format '{row.name}' loads from module '{row.module}': name the module "
                         f"after its format ({row.name}.py), dvc.yaml's peer stages depend on peers/{PEER_FORMAT}.py")
    return PEERS / f"{row.module}.py"


def needed_files(script: Path, runtimes: tuple[str, ...] = ()) -> set[Path]:
    """Every package file a stage running ``script`` imports, loading artefacts of the formats
    ``runtimes`` (names of the format table)."""
    needed = import_closure(script, SRC)
    if needed & RUNTIME_LOADERS:
        for name in runtimes:
            needed |= {runtime_file(name)} | import_closure(runtime_file(name), SRC)
    pending = list(needed)
    while pending:
        path = pending.pop()
        for target in DYNAMIC_IMPORTS.get(path, ()):
            files = set(target.rglob("*.py")) if target.is_dir() else {target}
            for file in files - needed:
                needed |= {file} | import_closure(file, SRC)
                pending.append(file)
    return needed


def stage_needs(stage: str, script: Path) -> dict[str, set[Path]]:
    """The files a stage needs, per peer format for a stage templated on it (else under "")."""
    runtimes = STAGE_RUNTIMES.get(stage)
    if runtimes is None:
        if import_closure(script, SRC) & RUNTIME_LOADERS:
            raise SystemExit(f"stage '{stage}' loads artefacts ({script.name} reaches a runtime loader): "
                             "say which formats in tests/dvc_deps.py STAGE_RUNTIMES")
        return {"": needed_files(script)}
    if PEER_FORMAT not in runtimes:
        return {"": needed_files(script, runtimes)}
    return {name: needed_files(script, tuple(name if r == PEER_FORMAT else r for r in runtimes))
            for name in PEER_FORMATS}


def package_deps(stage: str, script: Path) -> list[str]:
    """The sorted package deps of ``stage`` running ``script``; a stage templated on the peer's
    format depends on ``peers/${item.format}.py`` and on what every peer format needs besides."""
    needs = stage_needs(stage, script)
    needed = set().union(*needs.values())
    deps = set()
    if set(needs) != {""}:
        peer_runtimes = {runtime_file(name) for name in needs}
        needed -= peer_runtimes
        deps.add(f"src/serving_optimiser/peers/{PEER_FORMAT}.py")
    for path in needed:
        directory = next((d for d in WHOLE_DIRECTORIES if d in path.parents), None)
        if directory is not None and set(directory.rglob("*.py")) <= needed:
            deps.add(str(directory.relative_to(ROOT)))
        else:
            deps.add(str(path.relative_to(ROOT)))
    return sorted(deps)


def _scalar(value: str) -> str:
    """``value`` as a YAML scalar: plain where it reads back the same, else double-quoted."""
    plain = str(value)
    try:
        if yaml.safe_load(f"key: {plain}") == {"key": value}:
            return plain
    except yaml.YAMLError:
        pass  # not valid as a plain scalar: quoted below
    return json.dumps(value, ensure_ascii=False)


def plots_section() -> str:
    """dvc.yaml's ``plots:`` section, from the package's list of charts."""
    lines = ["plots:", "  # Written by python tests/dvc_deps.py from serving_optimiser.pipeline.plots.DEFAULT_CHARTS:",
             "  # edit the charts there, not here."]
    for entry in dvc_plots():
        (name, fields), = entry.items()
        lines.append(f"  - {name}:")
        for key, value in fields.items():
            if isinstance(value, dict):
                lines.append(f"      {key}:")
                lines.extend(f"        {_scalar(k)}: {_scalar(v)}" for k, v in value.items())
            else:
                lines.append(f"      {key}: {_scalar(value)}")
    return "\n".join(lines) + "\n"


def rewritten(text: str) -> tuple[str, list[str]]:
    """``text`` with each stage's ``- src/...`` deps and the plots section replaced, and what changed."""
    stages = yaml.safe_load(text)["stages"]
    changed = []
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    stage = None
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("plots:"):
            # The last section: everything after it is generated.
            plots = plots_section()
            if "".join(lines[index:]) != plots:
                changed.append("plots")
            out.append(plots)
            break
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
            wanted = package_deps(stage, script)
            if block != wanted:
                changed.append(stage)
            out.extend(f"{indent}- {path}\n" for path in wanted)
            continue
        out.append(line)
        index += 1
    else:
        raise SystemExit("dvc.yaml: no plots section (it must be the last one, generated from plots.DEFAULT_CHARTS)")
    return "".join(out), changed


def main(argv: list[str]) -> int:
    path = ROOT / "dvc.yaml"
    text, changed = rewritten(path.read_text())
    if "--check" in argv:
        if changed:
            print(f"dvc.yaml: out of date in {', '.join(changed)} (run python tests/dvc_deps.py)")
            return 1
        return 0
    path.write_text(text)
    print(f"dvc.yaml: rewrote {', '.join(changed) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
