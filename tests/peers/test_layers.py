"""Layers point one way: the peers package (and the modules below it) import nothing from the
pipeline, so editing the pipeline's stage logic never reruns a peer conversion, and a peer never
knows the Iris model."""

from pathlib import Path

import pytest
from import_closure import import_closure
from pipeline_helpers import ROOT

SRC = ROOT / "src"
PIPELINE = SRC / "serving_optimiser" / "pipeline"
BELOW_PIPELINE = sorted(
    [*(SRC / "serving_optimiser" / "peers").glob("*.py"), *(SRC / "serving_optimiser" / "saved_model").glob("*.py"),
     SRC / "serving_optimiser" / "params_file.py", SRC / "serving_optimiser" / "timing.py"]
)


@pytest.mark.parametrize("module", BELOW_PIPELINE, ids=lambda path: str(path.relative_to(SRC)))
def test_module_imports_nothing_from_the_pipeline(module):
    reached = sorted(str(path.relative_to(SRC)) for path in import_closure(module, SRC) if PIPELINE in path.parents)
    assert not reached, f"{module.relative_to(SRC)} reaches the pipeline through {reached}"


def test_the_check_sees_a_pipeline_import(tmp_path: Path):
    """The test above can fail: a module importing the pipeline is caught."""
    module = SRC / "serving_optimiser" / "peers" / "predictor.py"
    fake = tmp_path / "fake.py"
    fake.write_text(module.read_text() + "\nfrom serving_optimiser.pipeline.data import FEATURE_NAMES\n")
    assert any(PIPELINE in path.parents for path in import_closure(fake, SRC))
