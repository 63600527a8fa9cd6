"""Latency of one model against the exported one at several batch sizes, measured side by side
the way TensorFlow serves on this machine (its default kernels and threads, not the pinned ones),
and how each model ran. These figures change with the machine; the deterministic ones live in
:mod:`serving_optimiser.pipeline.evaluate`, and the machine's description in
:mod:`serving_optimiser.pipeline.machine`.

A model is timed in this process, or, where it must run under another oneDNN setting than this
process's (TensorFlow reads TF_ENABLE_ONEDNN_OPTS once per process), in a worker process that
times its own calls on request (``python -m serving_optimiser.pipeline.latency``), so the rounds
still interleave it with the others one call block at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..chunks import row_bytes
from ..errors import UserError
from ..runner import killed_by_signal
from ..timing import TimedModel, local_timer, measure_side_by_side, timed_load
from .latency_figures import batch_label
from .params import LatencyParams

__all__ = ["LatencyParams", "TimedModel", "latency_stage", "local_timer", "measure_latency", "timed_load"]

log = logging.getLogger(__name__)

RUNTIMES = {"tf": "TensorFlow", "litert": "LiteRT (XNNPACK)", "onnx": "ONNX Runtime", "openvino": "OpenVINO CPU"}


def batch_inputs(rows: Mapping[str, np.ndarray], sizes: Sequence[int]) -> dict[int, dict[str, np.ndarray]]:
    """The first ``size`` rows of ``rows`` per batch size (contiguous views, no copies)."""
    available = len(next(iter(rows.values())))
    if max(sizes) > available:
        raise UserError(f"latency: batch size {max(sizes)} is larger than the {available} rows drawn")
    return {size: {name: np.ascontiguousarray(values[:size]) for name, values in rows.items()} for size in sizes}


def measure_latency(models: list[TimedModel], params: LatencyParams) -> dict[str, dict]:
    """:func:`serving_optimiser.timing.measure_side_by_side` with the latency section's settings:
    the first model (the exported one) is the yardstick of every ratio."""
    return measure_side_by_side(models, params.batch_sizes, params.repeats, params.calls, params.seed)


def sizes_within_budget(models: list[TimedModel], params: LatencyParams) -> tuple[tuple[int, ...], list[int]]:
    """The batch sizes whose rounds fit in ``latency.max_stage_seconds``, estimated from the second
    of two calls of every model at each size (smallest first; the smallest is always kept), and the ones
    dropped. A model that takes seconds per call (an audio model on 512 windows) would otherwise
    hold a stage for many minutes; Iris's rounds take seconds and lose nothing."""
    kept: list[int] = []
    spent = 0.0
    for size in sorted(params.batch_sizes):
        # The second call: the first at a new shape pays for tracing and oneDNN's primitives.
        per_call = sum(model.timer(size, 2)[1] for model in models)
        cost = per_call * (params.repeats * params.calls(size) + 2)  # the rounds and two warm-up calls
        if kept and spent + cost > params.max_stage_seconds:
            break
        kept.append(size)
        spent += cost
    return tuple(kept), [size for size in params.batch_sizes if size not in kept]


def rounded(value):
    """``value`` with every float in it rounded to 6 decimals (the details files' precision)."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    return value


def process_settings() -> dict[str, str | int]:
    """How TensorFlow runs in this process (imports it): version, oneDNN variables, threads."""
    from ..runtime import kernel_settings

    return kernel_settings()


def latency_stage(entry, exported: Path, model_path: Path, samples_dir: Path, machine_file: Path,
                  timing: LatencyParams, out_metrics: Path, out_details: Path) -> str:
    """The latency stage for one model (a variant or a peer, ``entry``): its calls at every batch
    size against the exported model's, side by side, how each ran, the machine, and its fidelity
    as this machine's kernels compute it; returns the line the stage prints.

    A variant whose int8 ops need oneDNN runs with TF_ENABLE_ONEDNN_OPTS=1 where oneDNN would be
    off; then the exported model is timed twice: under the caller's setting, in a worker process,
    as the yardstick of every ratio, and with oneDNN on in this process (exported_onednn).
    """
    from .artefacts import load_model, unsupported
    from .entries import REFERENCE
    from .figures import fidelity as fidelity_of
    from .io import write_json
    from .machine import onednn_setting
    from .model import Samples, rows_around

    reason = unsupported(model_path) if entry.kind == "peer" else None
    if reason is not None:
        write_json(out_details, {"unsupported": reason})
        write_json(out_metrics, {"unsupported": True})
        return f"latency: {entry.name}: not converted ({reason})"
    try:
        machine = json.loads(machine_file.read_text())
        default = bool(machine["onednn_default"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"--machine {machine_file}: not the machine stage's description (run it first)") from None
    caller = dict(os.environ)
    onednn_on, why = onednn_setting(caller.get("TF_ENABLE_ONEDNN_OPTS"), default)
    forced = entry.needs_onednn and not onednn_on
    if forced:
        # The variant's int8 ops have no kernel without oneDNN's rewrites, which TensorFlow turns
        # on by default only on CPUs with AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX.
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"

    samples = Samples.load(samples_dir)
    fitting = timing.sizes_that_fit(row_bytes(samples.evaluation))
    dropped = [size for size in timing.batch_sizes if size not in fitting]
    if dropped:
        log.info("latency: batch sizes %s not timed: their input is over latency.max_call_bytes=%d",
                 dropped, timing.max_call_bytes)
        timing = dataclasses.replace(timing, batch_sizes=fitting)
    largest_size = max(timing.batch_sizes)
    inputs = batch_inputs(rows_around(samples.evaluation, largest_size, timing.seed), timing.batch_sizes)
    predictors = {}
    for name, path in ((REFERENCE, exported), (entry.name, model_path)):
        predictors[name] = timed_load(
            lambda name=name, path=path: load_model(name, path, samples.spec, entry.threads),
            timing.load_repeats,
        )
    tensorflow = f"TensorFlow, oneDNN {why}"
    forced_how = "TensorFlow, oneDNN on (TF_ENABLE_ONEDNN_OPTS=1"
    runtime = RUNTIMES[predictors[entry.name][0].format]
    if entry.kind == "peer":
        how = f"{runtime}, {entry.threads} threads"
    else:
        how = f"{forced_how}: its int8 ops need it)" if forced else tensorflow
    models = [TimedModel(name, local_timer(call, inputs), seconds) for name, (call, seconds) in predictors.items()]
    models[0].how, models[1].how = (f"{forced_how})" if forced else tensorflow), how
    worker = None
    dropped_for_time: list[int] = []
    try:
        if forced:
            worker = WorkerModel(exported, samples_dir, largest_size, timing.seed, caller)
            models[0].name = "exported_onednn"
            models.insert(0, TimedModel(REFERENCE, worker.timer, worker.load_seconds, tensorflow))
        fitting_in_time, over_time = sizes_within_budget(models, timing)
        if over_time:
            log.info("latency: batch sizes %s not timed: their rounds would pass latency.max_stage_seconds=%g",
                     over_time, timing.max_stage_seconds)
            timing = dataclasses.replace(timing, batch_sizes=fitting_in_time)
            dropped_for_time = over_time
        # Fidelity as this machine's kernels compute it (the evaluate stage's is pinned, the same
        # everywhere); they differ where kernels round differently per ISA (int8, the peer runtimes).
        largest = inputs[max(timing.batch_sizes)]
        here = fidelity_of(predictors[REFERENCE][0](largest), predictors[entry.name][0](largest), samples.spec)
        measured = measure_latency(models, timing)
    finally:
        if worker is not None:
            worker.close()
    figures = {name: rounded(values) for name, values in measured.items()}
    fidelity = {f"{key}_this_machine": round(value, 6) for key, value in here.items()}
    process = process_settings() | {"peer_runtime_threads": entry.threads}
    details = {"machine": machine, "process": process, "measured": figures, "fidelity": fidelity}
    if dropped or dropped_for_time:
        details["batch_sizes_not_timed"] = {"over_max_call_bytes": dropped, "over_max_stage_seconds": dropped_for_time,
                                            "max_call_bytes": timing.max_call_bytes,
                                            "max_stage_seconds": timing.max_stage_seconds}
    write_json(out_details, details)
    mine = figures[entry.name]["batches"]
    smallest = min(timing.batch_sizes)
    # Short names and 3 decimals keep `dvc metrics show` within 120 columns (README has the legend);
    # the whole curve is in the details file and the report.
    largest_size = max(timing.batch_sizes)
    write_json(out_metrics, {f"t{batch_label(size)}_x": round(mine[str(size)]["ratio"], 3)
                             for size in (smallest, largest_size)})
    curve = ", ".join(f"{batch_label(size)}: {mine[str(size)]['ratio']:.3f}x" for size in timing.batch_sizes)
    return f"latency: {entry.name} ({how}): {curve} the export's time"


# ---------------------------------------------------------------------------------------------
# A model timed in a worker process (another oneDNN setting than this process's)
# ---------------------------------------------------------------------------------------------


# What sizes a latency worker's memory: the rows it holds and the largest batch it is called on.
WORKER_MEMORY_PARAMS = "latency.max_call_bytes or latency.batch_sizes"


class WorkerModel:
    """A TensorFlow SavedModel loaded and timed in a child process started with ``environment``.

    The child draws the same rows (``samples_dir``, ``rows``, ``seed``: the parent's
    :func:`~serving_optimiser.pipeline.model.rows_around`), loads the model, and answers each
    request "BATCH CALLS" with the seconds of each call, timed inside the child, so the pipe's
    cost is not in the figures. Its requests are answered one at a time, so it never runs while
    a model in this process does.
    """

    def __init__(self, model_path: Path, samples_dir: Path, rows: int, seed: int,
                 environment: Mapping[str, str]) -> None:
        spec = {"model": str(model_path), "samples": str(samples_dir), "rows": rows, "seed": seed}
        # stderr to a file, not a pipe: a chatty child could fill a pipe and block.
        self._errors = tempfile.TemporaryFile(mode="w+")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "serving_optimiser.pipeline.latency", json.dumps(spec)], env=dict(environment),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._errors, text=True,
        )
        ready = self._answer()
        self.load_seconds = float(ready["load_s"])
        self.settings = ready["settings"]

    def _answer(self) -> dict:
        line = self._process.stdout.readline()
        if not line:
            self._process.wait(timeout=60)
            killed = killed_by_signal(self._process.returncode, "latency worker (the exported model, timed apart)",
                                      WORKER_MEMORY_PARAMS)
            if killed:
                raise UserError(killed)
            self._errors.seek(0)
            error = [text for text in self._errors.read().splitlines() if text.strip()]
            raise UserError(f"latency worker for the exported model exited: {error[-1] if error else 'no output'}")
        return json.loads(line)

    def timer(self, batch: int, calls: int) -> list[float]:
        try:
            self._process.stdin.write(f"{batch} {calls}\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            pass  # the worker is gone: _answer says how it ended
        return self._answer()["seconds"]

    def close(self) -> None:
        if self._process.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                self._process.stdin.close()
            self._process.wait(timeout=60)
        self._process.stdout.close()
        self._errors.close()


def _serve(spec: dict) -> None:
    """The worker's loop (see :class:`WorkerModel`)."""
    # Answers go to the original stdout; anything native code prints goes to stderr instead.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    from .artefacts import load_model
    from .model import Samples, rows_around

    samples = Samples.load(spec["samples"])
    rows = rows_around(samples.evaluation, spec["rows"], spec["seed"])
    start = time.perf_counter()
    predictor = load_model("exported", Path(spec["model"]), samples.spec, 2)
    load_seconds = time.perf_counter() - start
    cache: dict[int, dict] = {}

    def inputs(size: int) -> dict:
        if size not in cache:
            cache[size] = batch_inputs(rows, [size])[size]
        return cache[size]

    print(json.dumps({"load_s": load_seconds, "settings": process_settings()}), file=answers, flush=True)
    for request in sys.stdin:
        size, calls = (int(field) for field in request.split())
        timer = local_timer(predictor, {size: inputs(size)})
        print(json.dumps({"seconds": timer(size, calls)}), file=answers, flush=True)


if __name__ == "__main__":
    from ..runner import run

    sys.exit(run("latency worker", lambda: _serve(json.loads(sys.argv[1]))))
