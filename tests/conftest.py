import os

import pytest

from serving_optimiser.runtime import quiet_tensorflow

# No TensorFlow start-up lines in the test output, on any CPU: before any test imports it.
quiet_tensorflow()


@pytest.fixture(autouse=True)
def _environment_restored():
    """A stage run in-process pins its kernels through os.environ: keep that out of later tests'
    subprocesses (a latency stage must see TensorFlow's defaults)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
