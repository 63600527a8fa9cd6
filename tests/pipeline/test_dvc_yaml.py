"""dvc.yaml cannot drift from the code: every stage depends on exactly the package files its
script imports (found with ``ast``): none missing, none extra (a directory only where every module
in it is imported), and every path a script writes is a declared output of its stage."""

import re
import shlex
from pathlib import Path

import pytest
import yaml
from dvc_deps import needed_files
from pipeline_helpers import ROOT

SRC = ROOT / "src"


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


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_depends_on_every_package_file_its_script_imports(name):
    stage = stages()[name]
    script = ROOT / shlex.split(stage["cmd"])[1]
    deps = declared_paths(stage["deps"])
    assert str(script.relative_to(ROOT)) in deps
    missing = sorted(str(path.relative_to(ROOT)) for path in needed_files(script) if not covered(path, deps))
    assert not missing, f"dvc.yaml stage '{name}' misses deps: {missing}"


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_depends_on_no_package_file_its_script_does_not_import(name):
    """An extra dep reruns the stage for nothing (editing a peer runtime must not retrain Iris)."""
    stage = stages()[name]
    needed = needed_files(ROOT / shlex.split(stage["cmd"])[1])
    extra = []
    for dep in sorted(package_deps(declared_paths(stage["deps"]))):
        path = ROOT / dep
        files = set(path.rglob("*.py")) if path.is_dir() else {path}
        if not files or not files <= needed:
            extra.append(dep)
    assert not extra, f"dvc.yaml stage '{name}' depends on package files its script never imports: {extra}"


def test_the_extra_deps_check_catches_a_directory_wider_than_the_closure():
    """The check above can fail: the peers directory is wider than what the model stage imports."""
    model_stage = ROOT / shlex.split(stages()["model"]["cmd"])[1]
    peers = set((SRC / "serving_optimiser/peers").rglob("*.py"))
    assert not peers <= needed_files(model_stage)


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
