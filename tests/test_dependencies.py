"""Dependencies that say what they are: every third-party import under src/ is declared in
pyproject.toml, in the core or in the extra of the package that imports it; requirements.txt
pins every declared one at pyproject's version; the Makefile pins nothing itself; and importing
the library's core modules loads none of the extras' runtimes."""

import ast
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
FIRST_PARTY = {path.parent.name for path in SRC.glob("*/__init__.py")}

# Which extras each part of src/ may import beside the core (the longest matching prefix wins).
EXTRAS_BY_PACKAGE = {
    "serving_optimiser": (),
    "serving_optimiser.pipeline": ("pipeline",),
    "serving_optimiser.peers": ("peers",),
    "published_models": ("published-models", "peers"),
    "model_builders": ("dev",),
}
# What the core of the library (transform_graph, summarize_graph, optimise_saved_model) must not
# load: the peers' runtimes and the pipeline's tools (import names).
EXTRA_RUNTIMES = ("openvino", "nncf", "ai_edge_litert", "onnxruntime", "onnx", "tf2onnx", "dvc", "dvclive",
                  "vl_convert")


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_pins(lines: list[str]) -> dict[str, str | None]:
    """Canonical name -> the version after ``==`` (None when unpinned), from requirement strings."""
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^]]*\])?\s*(==\s*([^\s;]+))?.*", line)
        assert match, f"cannot read the requirement {line!r}"
        pins[canonical(match.group(1))] = match.group(4)
    return pins


CORE = requirement_pins(PROJECT["dependencies"])
EXTRAS = {name: requirement_pins(lines) for name, lines in PROJECT["optional-dependencies"].items()}
LOCKED = requirement_pins((REPO / "requirements.txt").read_text().splitlines())
NO_DEPS = requirement_pins((REPO / "requirements-nodeps.txt").read_text().splitlines())


def package_of(path: Path) -> str:
    """The dotted package a source file belongs to (its module name less the module)."""
    return ".".join(path.relative_to(SRC).parent.parts)


def allowed_extras(package: str) -> tuple[str, ...]:
    prefixes = [prefix for prefix in EXTRAS_BY_PACKAGE if package == prefix or package.startswith(f"{prefix}.")]
    assert prefixes, f"{package}: not in EXTRAS_BY_PACKAGE; say which extras it may import"
    return EXTRAS_BY_PACKAGE[max(prefixes, key=len)]


def guarded_by_import_error(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether an import sits in the body of a ``try`` whose handlers catch ImportError."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.Try) and child in parent.body:
            caught = [ast.unparse(handler.type) for handler in parent.handlers if handler.type is not None]
            if any("ImportError" in text or "ModuleNotFoundError" in text for text in caught):
                return True
        child, parent = parent, parents.get(parent)
    return False


def third_party_imports() -> list[tuple[str, str, bool]]:
    """(file relative to the repo, top-level import name, guarded by ImportError) for every
    absolute import under src/ that is neither the standard library nor first-party."""
    found = []
    for path in sorted(SRC.glob("*/**/*.py")):
        if path.relative_to(SRC).parts[0] not in FIRST_PARTY:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in FIRST_PARTY or top == "__future__":
                    continue
                found.append((str(path.relative_to(REPO)), top, guarded_by_import_error(node, parents)))
    return found


IMPORTS = third_party_imports()
DISTRIBUTIONS = metadata.packages_distributions()


def imports_outside_src() -> list[tuple[str, str]]:
    """(file, top-level import name) for the third-party imports of tests/ and scripts/; their own
    modules (graph_helpers, saved_model.models, ...) are local."""
    local = {path.stem for root in ("tests", "scripts") for path in (REPO / root).rglob("*.py")}
    local |= {path.name for path in (REPO / "tests").rglob("*") if path.is_dir()}
    found = set()
    for root in ("tests", "scripts"):
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in FIRST_PARTY | local or top == "__future__":
                        continue
                    found.add((str(path.relative_to(REPO)), top))
    return sorted(found)


def test_the_scan_sees_the_librarys_known_imports():
    names = {(path, top) for path, top, _ in IMPORTS}
    assert ("src/serving_optimiser/params_file.py", "yaml") in names
    assert ("src/serving_optimiser/peers/openvino.py", "openvino") in names
    assert ("src/serving_optimiser/saved_model/keras_file.py", "tf_keras") in names
    assert len({top for _, top, _ in IMPORTS}) >= 10


@pytest.mark.parametrize("path,top", sorted({(path, top) for path, top, _ in IMPORTS}),
                         ids=lambda value: value.removeprefix("src/") if "/" in value else value)
def test_every_third_party_import_is_declared_where_it_is_used(path, top):
    providers = {canonical(name) for name in DISTRIBUTIONS.get(top, [])}
    assert providers, f"{path}: imports {top}, which no installed distribution provides"
    package = package_of(REPO / path)
    declared = set(CORE) | set(NO_DEPS)
    for extra in allowed_extras(package):
        declared |= set(EXTRAS[extra])
    assert providers & declared, (
        f"{path}: imports {top} ({', '.join(sorted(providers))}), declared neither in pyproject's core "
        f"dependencies nor in the extras {package} may use ({', '.join(allowed_extras(package)) or 'none'})"
    )


def test_tests_and_scripts_import_only_declared_dependencies():
    """The test suite and the benchmarks run in the full install: any declared distribution will do."""
    found = imports_outside_src()
    assert {top for _, top in found} >= {"numpy", "pytest", "tensorflow"}, "the scan of tests/ and scripts/ is empty"
    declared = set(CORE) | set(NO_DEPS)
    for pins in EXTRAS.values():
        declared |= set(pins)
    undeclared = sorted(f"{path}: {top}" for path, top in found
                        if not {canonical(name) for name in DISTRIBUTIONS.get(top, [])} & declared)
    assert not undeclared, f"imports of distributions pyproject.toml does not declare: {undeclared}"


def test_no_deps_pins_are_optional_in_the_library():
    """A requirements-nodeps.txt package is not a pip dependency, so `pip install .` lacks it: the
    library imports it only where an ImportError becomes a message saying how to install it."""
    no_deps_imports = [(path, top, guarded) for path, top, guarded in IMPORTS
                       if path.startswith("src/serving_optimiser/")
                       and {canonical(name) for name in DISTRIBUTIONS.get(top, [])} & set(NO_DEPS)]
    assert no_deps_imports, "the scan found no tf_keras import in the library: the check would be empty"
    unguarded = [f"{path}: {top}" for path, top, guarded in no_deps_imports if not guarded]
    assert not unguarded, f"imported without an ImportError guard: {unguarded}"


def test_requirements_pin_every_declared_dependency_at_pyprojects_version():
    declared = dict(CORE)
    for pins in EXTRAS.values():
        declared.update(pins)
    missing = sorted(set(declared) - set(LOCKED))
    assert not missing, f"declared in pyproject.toml but not pinned in requirements.txt: {missing}"
    unpinned = sorted(name for name, version in LOCKED.items() if version is None)
    assert not unpinned, f"requirements.txt lines without ==: {unpinned}"
    differ = {name: (version, LOCKED[name]) for name, version in declared.items()
              if version is not None and version != LOCKED[name]}
    assert not differ, f"pyproject.toml and requirements.txt pin different versions: {differ}"


def test_no_deps_pins_stay_out_of_requirements_and_the_makefile():
    assert NO_DEPS and all(version for version in NO_DEPS.values())
    assert not set(NO_DEPS) & set(LOCKED), "a --no-deps package in requirements.txt would pull its dependencies"
    makefile = (REPO / "Makefile").read_text()
    assert not re.findall(r"[A-Za-z0-9_.-]+==[0-9]", makefile), "a version pinned inside the Makefile"
    assert "--no-deps -r requirements-nodeps.txt" in makefile


def test_the_core_modules_load_no_extra_runtime():
    """Import every module of the library outside pipeline/ and peers/ (what the three CLIs run)
    in a fresh interpreter that has every extra installed, and list the extras' runtimes loaded."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import serving_optimiser\n"
        "names = [info.name for info in pkgutil.walk_packages(serving_optimiser.__path__, 'serving_optimiser.')]\n"
        "core = [name for name in names if not name.startswith(('serving_optimiser.pipeline.', "
        "'serving_optimiser.peers.'))]\n"
        "for name in core:\n"
        "    importlib.import_module(name)\n"
        f"print(len(core), sorted({{name.split('.')[0] for name in sys.modules}} & {set(EXTRA_RUNTIMES)!r}))\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                               check=False, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert completed.returncode == 0, completed.stderr[-2000:]
    count, loaded = completed.stdout.split(maxsplit=1)
    assert int(count) >= 50, f"only {count} core modules imported"
    assert loaded.strip() == "[]", f"the core loaded extras' runtimes: {loaded.strip()}"
