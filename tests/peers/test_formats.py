"""The format table and the modules it names: each runtime module serves its row's format, the
peer formats convert, and no runtime module imports the loader or another runtime (no circle)."""

import ast

import pytest
from pipeline_helpers import ROOT

from serving_optimiser.peers import predictor
from serving_optimiser.peers.formats import FORMATS, PEER_FORMATS

PEERS = ROOT / "src" / "serving_optimiser" / "peers"
# What a runtime module may import from the package besides the rest of serving_optimiser.
FOUNDATION = {"base", "formats"}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_the_runtime_module_of_a_row_serves_its_format(name):
    runtime = FORMATS[name].runtime()
    assert runtime.PREDICTOR.format == name
    assert callable(getattr(runtime, "convert", None)) == (name in PEER_FORMATS)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_a_runtime_module_imports_only_the_base_and_the_table(name):
    tree = ast.parse((PEERS / f"{FORMATS[name].module}.py").read_text())
    siblings = {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
    assert siblings <= FOUNDATION, siblings


def test_the_loader_names_every_runtime_module_for_the_import_closure():
    """tests/import_closure.py follows _EXPORTS, so a stage that loads artefacts depends on every
    runtime module; a row whose module is missing there would not rerun that stage."""
    assert {module.lstrip(".") for module in predictor._EXPORTS.values()} == {row.module for row in FORMATS.values()}
