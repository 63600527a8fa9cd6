"""How TensorFlow runs in our processes: quiet on every CPU, and, for the stages whose outputs must
be the same bit for bit on any x86-64 machine, pinned kernels and threads.

Measured on an AVX-512 EPYC (see README, "Reproducible on any machine"): the bits of a trained
model depend on the oneDNN kernels TensorFlow picks for the CPU (through its graph rewrites,
``TF_ENABLE_ONEDNN_OPTS``, and through the ISA oneDNN's sgemm dispatches to, which Eigen's
contractions use even with the rewrites off, ``ONEDNN_MAX_CPU_ISA``) and on the number of
threads a reduction is split over. Pinning all three reproduces, on an AVX-512 CPU and on one
core, the weights an AVX2-only machine trains with TensorFlow's defaults. Every AVX2 x86-64 CPU
(x86-64-v3) runs the pinned kernels; latency is measured with TensorFlow's defaults instead,
because that is how TensorFlow would serve on the machine.

Everything here must run before TensorFlow is imported.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

# The kernels every stage that writes a deterministic artefact runs with.
PINNED_ENVIRONMENT = {
    "TF_ENABLE_ONEDNN_OPTS": "0",  # no oneDNN graph rewrites (they are off by default on AVX2-only CPUs)
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # the sgemm Eigen calls dispatches to AVX2 code on any newer CPU
    "TF_DETERMINISTIC_OPS": "1",
}
PINNED_THREADS = 2  # intra-op and inter-op; a 1-core machine still splits work the same way
_QUIET_LEVEL = "3"


_hook_state = {"quiet": False, "pinned": False, "python_log_level": logging.ERROR}


class _TensorFlowImport(importlib.abc.MetaPathFinder):
    """Runs the first ``import tensorflow`` with our settings applied.

    Quiet: TensorFlow's C++ start-up lines (absl's "All log messages before absl::InitializeLog()",
    oneDNN's "custom operations are on", the cpu_feature_guard notice) are written to file
    descriptor 2 while its shared libraries load, and ``TF_CPP_MIN_LOG_LEVEL`` does not reach all
    of them on every CPU; so the import runs under :func:`native_output_silenced`, which attaches
    what was printed to the exception if the import fails, so a broken install still explains
    itself. Pinned: thread counts are set before any op runs.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _SettingsLoader(spec.loader)
        return spec


class _SettingsLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        if _hook_state["quiet"]:
            with native_output_silenced():
                self._loader.exec_module(module)
            for noisy in ("tensorflow", "absl"):
                logging.getLogger(noisy).setLevel(_hook_state["python_log_level"])
        else:
            self._loader.exec_module(module)
        if _hook_state["pinned"]:
            module.config.threading.set_intra_op_parallelism_threads(PINNED_THREADS)
            module.config.threading.set_inter_op_parallelism_threads(PINNED_THREADS)


def _install_hook() -> None:
    if "tensorflow" not in sys.modules and not any(isinstance(f, _TensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _TensorFlowImport())


@contextlib.contextmanager
def native_output_silenced() -> Iterator[None]:
    """Run the block with fds 1 and 2, Python warnings and log records below ERROR swallowed:
    native code (TensorFlow's start-up, its converter, LiteRT's XNNPACK delegate, ONNX Runtime)
    writes straight to the file descriptors, past ``TF_CPP_MIN_LOG_LEVEL`` and Python's logging.

    If the block raises, what it printed is attached to the exception as a note (shown in a
    traceback, never in a one-line user error), so a crash in a converter still explains itself.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    previous_disable = logging.root.manager.disable
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                logging.disable(logging.WARNING)
                yield
        except BaseException as error:
            sink.seek(0)
            captured = sink.read().decode(errors="replace").strip()
            if captured:
                error.add_note(f"output while silenced:\n{captured[-4000:]}")
            raise
        finally:
            logging.disable(previous_disable)
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def quiet_tensorflow() -> None:
    """No TensorFlow, absl or oneDNN start-up line on stderr unless the user set
    ``TF_CPP_MIN_LOG_LEVEL=0`` to see everything. Call before TensorFlow is imported.

    At every level of 1 or more the import runs silenced: absl's "All log messages before
    absl::InitializeLog()" warning and oneDNN's notice ignore the level (both were seen at 1 and
    2, where a one-line error then came after four lines of start-up). What TensorFlow logs
    after its start-up follows the level: Python's ``tensorflow`` and ``absl`` loggers show
    warnings at 1 and errors only at 2 and 3, as TensorFlow's C++ logging does. Unset means 3.
    """
    if not os.environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip():
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = _QUIET_LEVEL  # unset or empty (TensorFlow reads "" as 0)
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    if os.environ["TF_CPP_MIN_LOG_LEVEL"].strip() == "0":
        return
    python_level = tensorflow_python_log_level()
    for noisy in ("tensorflow", "absl", "h5py"):
        logging.getLogger(noisy).setLevel(python_level)
    _hook_state["python_log_level"] = python_level
    _hook_state["quiet"] = True
    _install_hook()


def tensorflow_python_log_level() -> int:
    """The level of Python's ``tensorflow`` and ``absl`` loggers that ``TF_CPP_MIN_LOG_LEVEL``
    asks for: everything at 0, warnings at 1, errors at 2 and 3 (and when unset)."""
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", _QUIET_LEVEL).strip()
    return {"0": logging.INFO, "1": logging.WARNING}.get(level, logging.ERROR)


def pin_kernels(onednn: bool = False) -> None:
    """Pin oneDNN's kernels and TensorFlow's thread counts for this process (and the environment
    of its children) so float results are the same on any x86-64 CPU with AVX2.

    ``onednn`` keeps oneDNN's graph rewrites on, still capped at AVX2: a model holding int8 ops
    that only oneDNN implements (``quantize_matmuls``) has no kernel without them.

    Overrides whatever the environment says: a stage that writes a deterministic artefact must
    not depend on the caller's shell. In a process that already imported TensorFlow (a test
    calling a stage in-process) it only reaches child processes.
    """
    os.environ.update(PINNED_ENVIRONMENT)
    if onednn:
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"
    _hook_state["pinned"] = True
    _install_hook()


def kernel_settings() -> dict[str, str | int | bool]:
    """What decides TensorFlow's kernels in this process, for the record beside a figure."""
    import tensorflow as tf

    return {
        "tensorflow_version": tf.__version__,
        "onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "default"),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
    }
