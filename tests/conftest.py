import os

import pytest

from serving_optimiser.runtime import quiet_tensorflow

# No TensorFlow start-up lines in the test output, on any CPU: before any test imports it.
quiet_tensorflow()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``onednn`` run oneDNN-only int8 kernels in-process. TensorFlow turns oneDNN on
    by default only on CPUs with AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX, so `make test` runs
    them in a pass of their own with TF_ENABLE_ONEDNN_OPTS=1. Run any other way in a process
    where the kernels do not work, they skip saying why; on a non-x86 or non-oneDNN build they
    cannot run at all."""
    marked = [item for item in items if item.get_closest_marker("onednn")]
    if not marked:
        return
    from serving_optimiser.graph_transforms.transforms._int8 import int8_kernels_available

    if int8_kernels_available():
        return
    setting = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset")
    if setting == "1":
        reason = "no oneDNN int8 kernels in this TensorFlow even with TF_ENABLE_ONEDNN_OPTS=1 (not an x86 oneDNN build)"
    else:
        reason = (f"oneDNN is off in this process (TF_ENABLE_ONEDNN_OPTS={setting}); "
                  "run with TF_ENABLE_ONEDNN_OPTS=1, as `make test` does")
    for item in marked:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _environment_restored():
    """A stage run in-process pins its kernels through os.environ: keep that out of later tests'
    subprocesses (a latency stage must see TensorFlow's defaults)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
