import os
import re
from functools import cache
from pathlib import Path

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


# --------------------------------------------------------------------------------------------
# Scheduling under xdist: `--dist loadgroup` as it is meant to work
# --------------------------------------------------------------------------------------------
# pytest-xdist 3.8's loadgroup tags each test's node id with its xdist_group by setting
# ``item._nodeid``, which pytest 9 no longer reads (Node.nodeid is ``str(self._id)``): every group
# was silently split across the workers, and each worker built the groups' module fixtures (the
# DVC end-to-end repos) again. This scheduler replaces it: a test file is one unit of work, files
# whose module-level ``pytestmark`` names the same xdist_group are one unit (tests/peers' session
# fixtures are built once), and the units marked slow start first, the biggest first, so the
# longest one (the Iris DVC run) is not left for the end.

_GROUP = re.compile(r"""xdist_group\(\s*(?:name=)?["']([^"']+)["']""")


@cache
def _module_marks(path: Path) -> tuple[str | None, bool]:
    """(the module-level xdist_group, whether the module is marked slow) from its source."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None, False
    marks = "\n".join(line for line in text.splitlines() if line.startswith("pytestmark"))
    group = _GROUP.search(marks)
    return (group.group(1) if group else None), "mark.slow" in marks


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    root = Path(config.rootpath)

    class FileGroupScheduling(LoadScopeScheduling):
        ordered = False

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            group, _ = _module_marks(root / path)
            return f"group:{group}" if group else path

        def _scope_is_slow(self, scope: str, nodeids) -> bool:
            return any(_module_marks(root / nodeid.split("::", 1)[0])[1] for nodeid in nodeids)

        def _assign_work_unit(self, node) -> None:
            if not self.ordered:
                units = sorted(self.workqueue.items(),
                               key=lambda item: (not self._scope_is_slow(*item), -len(item[1])))
                self.workqueue.clear()
                self.workqueue.update(units)
                self.ordered = True
            super()._assign_work_unit(node)

    return FileGroupScheduling(config, log)
