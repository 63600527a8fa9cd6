"""dvc.yaml cannot drift from the code: every stage depends on exactly the package files its
script imports (found with ``ast``): none missing, none extra (a directory only where every module
in it is imported), and every path a script writes is a declared output of its stage."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvc_deps import PEER_FORMAT, STAGE_RUNTIMES, needed_files, rewritten, runtime_file, stage_needs
from pipeline_helpers import ROOT

from serving_optimiser.peers.formats import FORMATS, PEER_FORMATS

SRC = ROOT / "src"
RUNTIME_FILES = {runtime_file(name) for name in FORMATS}


def stages() -> dict[str, dict]:
    """Each stage (a foreach stage once, with ${key} left in), by name."""
    definitions = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: definition.get("do", definition) for name, definition in definitions.items()}


def declared_paths(entries: list) -> set[str]:
    return {next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries or []}


def covered(path: Path, deps: set[str]) -> bool:
    relative = path.relative_to(ROOT)
    return any(relative == Path(dep) or Path(dep) in relative.parents for dep in deps)


def package_deps(deps: set[str]) -> set[str]:
    return {dep for dep in deps if dep.startswith("src/")}


def resolved(deps: set[str], format_name: str) -> set[str]:
    """``deps`` as DVC resolves them for a peer of ``format_name`` ("" for a stage not templated on it)."""
    return {dep.replace(PEER_FORMAT, format_name) for dep in deps} if format_name else deps


def script_of(stage: dict) -> Path:
    return ROOT / shlex.split(stage["cmd"])[1]


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_depends_on_every_package_file_its_script_imports(name):
    stage = stages()[name]
    deps = declared_paths(stage["deps"])
    assert str(script_of(stage).relative_to(ROOT)) in deps
    for format_name, needed in stage_needs(name, script_of(stage)).items():
        declared = resolved(deps, format_name)
        missing = sorted(str(path.relative_to(ROOT)) for path in needed if not covered(path, declared))
        assert not missing, f"dvc.yaml stage '{name}' ({format_name or 'any'}) misses deps: {missing}"


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_depends_on_no_package_file_its_script_does_not_import(name):
    """An extra dep reruns the stage for nothing (editing a peer runtime must not retrain Iris)."""
    stage = stages()[name]
    extra = []
    needs = stage_needs(name, script_of(stage))
    anywhere = set().union(*needs.values())
    for format_name, needed in needs.items():
        for dep in sorted(package_deps(resolved(declared_paths(stage["deps"]), format_name))):
            path = ROOT / dep
            files = set(path.rglob("*.py")) if path.is_dir() else {path}
            if not files or not files <= anywhere:
                extra.append(dep)
            elif path in RUNTIME_FILES and not files <= needed:
                extra.append(f"{dep} (for a {format_name} peer)")
    assert not extra, f"dvc.yaml stage '{name}' depends on package files its script never imports: {extra}"


def test_the_extra_deps_check_catches_a_directory_wider_than_the_closure():
    """The check above can fail: the peers directory is wider than what the model stage imports."""
    peers = set((SRC / "serving_optimiser/peers").rglob("*.py"))
    assert not peers <= needed_files(script_of(stages()["model"]))


@pytest.mark.parametrize("name", sorted(stages()))
def test_a_stage_depends_on_the_runtimes_of_what_it_loads_only(name):
    """Editing one runtime module (peers/openvino.py) reruns that runtime's peers and nothing else:
    a SavedModel stage depends on peers/tf.py at most, a peer stage on its own format's module
    (and tf.py where it times the export beside it), resolved per peer of params.yaml."""
    stage = stages()[name]
    deps = declared_paths(stage["deps"])
    variants = yaml.safe_load((ROOT / "params.yaml").read_text())["peers"]["variants"]
    runtimes = STAGE_RUNTIMES.get(name, ())
    peers = {variant: entry["format"] for variant, entry in variants.items()} if PEER_FORMAT in runtimes else {"": ""}
    for variant, format_name in peers.items():
        loaded = {ROOT / dep for dep in resolved(deps, format_name)} & RUNTIME_FILES
        # The runtimes it loads by format, and any it imports by name (the optimise stage's gate: tf).
        expected = {runtime_file(r.replace(PEER_FORMAT, format_name)) for r in runtimes}
        expected |= needed_files(script_of(stage)) & RUNTIME_FILES
        assert expected <= {runtime_file("tf"), *({runtime_file(format_name)} if format_name else ())}
        assert loaded == expected, (name, variant, sorted(str(path.relative_to(SRC)) for path in loaded))


def test_loading_an_artefact_imports_the_runtime_of_its_format_only(tmp_path):
    """What STAGE_RUNTIMES says, checked where it is decided: load_predictor on each format's
    file imports that format's runtime module and no other (the load itself fails on an empty
    file: only the imports are checked)."""
    code = """
import json, sys
from pathlib import Path
from serving_optimiser.peers.formats import FORMATS
from serving_optimiser.peers.predictor import load_predictor
imported = {}
for name, row in FORMATS.items():
    before = set(sys.modules)
    directory = Path(sys.argv[1]) / name
    directory.mkdir()
    (directory / row.filename).write_bytes(b"")
    try:
        load_predictor(directory)
    except Exception:
        pass  # an empty artefact cannot load: what counts is which runtime modules got imported trying
    imported[name] = sorted(m for m in set(sys.modules) - before if m.startswith("serving_optimiser.peers."))
print(json.dumps(imported))
"""
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True,
                            env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": ""})
    imported = json.loads(result.stdout.splitlines()[-1])
    for name, row in FORMATS.items():
        runtimes = [m for m in imported[name] if m.rsplit(".", 1)[1] in FORMATS]
        assert runtimes == [f"serving_optimiser.peers.{row.module}"], (name, imported[name])


def test_every_runtime_module_is_named_after_its_format():
    """dvc.yaml's peer stages depend on peers/${item.format}.py: that file must be the runtime."""
    for name in FORMATS:
        assert runtime_file(name).is_file()
    assert set(PEER_FORMATS) < set(FORMATS)


def test_the_plots_section_is_generated_from_the_packages_charts():
    """dvc.yaml lists the charts of plots.DEFAULT_CHARTS, and the --check notices a hand edit."""
    from serving_optimiser.pipeline.plots import DEFAULT_CHARTS

    text = (ROOT / "dvc.yaml").read_text()
    assert rewritten(text)[1] == []
    plots = yaml.safe_load(text)["plots"]
    assert [next(iter(entry)) for entry in plots] == [chart.name for chart in DEFAULT_CHARTS]
    edited = text.replace(f"title: {DEFAULT_CHARTS[0].title}\n", "title: another title\n", 1)
    assert edited != text and rewritten(edited)[1] == ["plots"]
    assert rewritten(text + "  - extra_chart:\n      template: linear\n")[1] == ["plots"]


def test_the_check_names_a_stage_whose_deps_were_edited_by_hand():
    text = (ROOT / "dvc.yaml").read_text()
    edited = text.replace("      - src/serving_optimiser/pipeline/report.py\n", "", 1)
    assert edited != text and rewritten(edited)[1] == ["report"]


@pytest.mark.parametrize("name", sorted(stages()))
def test_every_path_a_script_writes_is_a_declared_output(name):
    stage = stages()[name]
    arguments = shlex.split(stage["cmd"])
    written = {arguments[i + 1] for i, arg in enumerate(arguments) if arg.startswith("--out")}
    declared = set().union(*(declared_paths(stage.get(kind)) for kind in ("outs", "metrics", "plots")))
    # A directory the script writes may be declared as the files in it (DVCLive's directory).
    undeclared = {path for path in written if not any(d == path or d.startswith(path + "/") for d in declared)}
    unwritten = {d for d in declared if not any(d == path or d.startswith(path + "/") for path in written)}
    assert not undeclared, f"stage '{name}': cmd writes {sorted(undeclared)}, not declared in dvc.yaml"
    assert not unwritten, f"stage '{name}': dvc.yaml declares {sorted(unwritten)}, which no --out argument writes"


def test_scripts_take_their_paths_from_dvc_yaml_only():
    """No default output paths in the scripts: a path lives in dvc.yaml's cmd, next to its outs."""
    for name, stage in stages().items():
        script = ROOT / shlex.split(stage["cmd"])[1]
        source = script.read_text()
        for flag in {arg for arg in shlex.split(stage["cmd"]) if arg.startswith("--out")}:
            assert f'"{flag}", default' not in source, f"{script.name}: {flag} has a default path ({name})"
            assert f'"{flag}"' in source, f"{script.name}: no {flag} argument ({name})"


def test_every_file_a_transform_list_reads_is_an_optimise_dep():
    """A ranges_file named in params.yaml must be a dep, or a new calibration would not rerun optimise."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    named = {
        argument.split("=", 1)[1].rstrip(")")
        for transforms in params["optimise"].values()
        for transform in transforms
        for argument in re.split(r"[(,]\s*", transform)
        if argument.startswith("ranges_file=")
    }
    assert named, "no variant calibrates: the int8 variant should name the calibrate stage's output"
    assert named <= declared_paths(stages()["optimise"]["deps"])
    assert named <= declared_paths(stages()["calibrate"]["outs"])


def test_the_calibrate_stage_depends_on_exactly_the_variants_that_read_its_file():
    """It calibrates after the transforms those variants run first: their params, and no other
    variant's (editing the lossless list must not rerun it)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    out = next(iter(declared_paths(stages()["calibrate"]["outs"])))
    reading = {f"optimise.{variant}" for variant, transforms in params["optimise"].items()
               if any(f"ranges_file={out}" in transform for transform in transforms)}
    assert reading and set(stages()["calibrate"]["params"]) == reading
