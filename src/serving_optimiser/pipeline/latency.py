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

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .params import require, require_list, require_positive

log = logging.getLogger(__name__)

Call = Callable[[dict], object]
# timer(batch size, calls) -> seconds of each call
Timer = Callable[[int, int], list[float]]


@dataclass(frozen=True)
class LatencyParams:
    batch_sizes: tuple[int, ...]  # ascending
    repeats: int
    calls_per_round: int
    rows_per_round: int
    load_repeats: int
    seed: int

    @classmethod
    def from_section(cls, section: dict, path: str | Path = "params.yaml") -> LatencyParams:
        repeats = require_positive(section, "repeats", int, "latency", path)
        if repeats < 5:
            raise UserError(f"{path}: 'latency.repeats' must be at least 5 (median of >= 5), got {repeats}")
        sizes = require_list(section, "batch_sizes", int, "latency", path)
        bad = [size for size in sizes if size < 1]
        if bad:
            raise UserError(f"{path}: 'latency.batch_sizes' must be positive row counts, got {bad[0]}")
        if len(set(sizes)) != len(sizes):
            raise UserError(f"{path}: 'latency.batch_sizes' lists a size twice: {sizes}")
        known = {"batch_sizes", "repeats", "calls_per_round", "rows_per_round", "load_repeats", "seed"}
        unknown = sorted(set(section) - known)
        if unknown:
            keys = ", ".join(f"latency.{key}" for key in unknown)
            raise UserError(f"{path}: unknown key(s) {keys} (expected {', '.join(sorted(known))})")
        return cls(
            batch_sizes=tuple(sorted(sizes)),
            repeats=repeats,
            calls_per_round=require_positive(section, "calls_per_round", int, "latency", path),
            rows_per_round=require_positive(section, "rows_per_round", int, "latency", path),
            load_repeats=require_positive(section, "load_repeats", int, "latency", path),
            seed=require(section, "seed", int, "latency", path),
        )

    def calls(self, batch: int) -> int:
        """Calls per model per round at ``batch`` rows: ``calls_per_round``, fewer where that would
        pass ``rows_per_round`` rows, and at least one (a 100,000-row call is timed once a round)."""
        return max(1, min(self.calls_per_round, self.rows_per_round // batch))


def batch_label(rows: int) -> str:
    """A batch size as a short key: 1, 8, 512, 100k, 2.5k."""
    if rows >= 1000 and rows % 100 == 0:
        return f"{rows / 1000:g}k"
    return str(rows)


def batch_inputs(rows: Mapping[str, np.ndarray], sizes: Sequence[int]) -> dict[int, dict[str, np.ndarray]]:
    """The first ``size`` rows of ``rows`` per batch size (contiguous views, no copies)."""
    available = len(next(iter(rows.values())))
    if max(sizes) > available:
        raise UserError(f"latency: batch size {max(sizes)} is larger than the {available} rows drawn")
    return {size: {name: np.ascontiguousarray(values[:size]) for name, values in rows.items()} for size in sizes}


def local_timer(call: Call, inputs: Mapping[int, dict]) -> Timer:
    def timer(batch: int, calls: int) -> list[float]:
        features = inputs[batch]
        seconds = []
        for _ in range(calls):
            start = time.perf_counter()
            call(features)  # a call returns materialised arrays (numpy), so the work is done
            seconds.append(time.perf_counter() - start)
        return seconds

    return timer


@dataclass
class TimedModel:
    name: str
    timer: Timer
    load_seconds: float
    how: str = ""  # how it ran: runtime and oneDNN setting, for the report
    first_call_seconds: float = 0.0


def timed_load(load: Callable[[], Call], repeats: int) -> tuple[Call, float]:
    """Load ``repeats`` times; return the last model's call and the median load time."""
    timings = []
    call = None
    for _ in range(repeats):
        start = time.perf_counter()
        call = load()
        timings.append(time.perf_counter() - start)
    return call, statistics.median(timings)


def measure_latency(models: list[TimedModel], params: LatencyParams) -> dict[str, dict]:
    """Per model and batch size: p50 and p99 per call, p50 per row, and the ratio to the first
    model (the exported one).

    Batch sizes run largest first (a 100,000-row call leaves caches and the allocator in a state
    that slows the next small calls, so the small ones come after). At each size every model gets
    two warm-up calls (oneDNN's first run per shape, LiteRT's re-allocation), then ``repeats``
    rounds; each round times ``params.calls(size)`` calls of every model, in a seeded random
    order. A ratio is the median over rounds of the model's median call over the first model's
    in the same round, so drift and one-off stalls hit both sides alike.
    """
    sizes = params.batch_sizes
    for model in models:
        model.first_call_seconds = model.timer(sizes[0], 1)[0]
    rng = np.random.default_rng(params.seed)
    rounds: dict[str, dict[int, list[list[float]]]] = {m.name: {} for m in models}
    for size in sorted(sizes, reverse=True):
        calls = params.calls(size)
        for model in models:
            model.timer(size, 2)
        for model in models:
            rounds[model.name][size] = []
        for _ in range(params.repeats):
            for index in rng.permutation(len(models)):
                rounds[models[index].name][size].append(models[index].timer(size, calls))
        log.info("batch %d: %d rounds of %d call(s) per model done", size, params.repeats, calls)
    reference = models[0].name
    result = {}
    for model in models:
        batches = {}
        for size in sizes:
            seconds = np.concatenate(rounds[model.name][size]) * 1000
            ratios = (
                float(np.median(mine)) / float(np.median(theirs))
                for mine, theirs in zip(rounds[model.name][size], rounds[reference][size])
            )
            p50 = float(np.percentile(seconds, 50))
            batches[str(size)] = {
                "p50_ms": p50,
                "p99_ms": float(np.percentile(seconds, 99)),
                "per_row_us": p50 * 1000 / size,
                "ratio": statistics.median(ratios),
                "calls": int(seconds.size),
            }
        result[model.name] = {
            "how": model.how,
            "load_s": model.load_seconds,
            "first_call_ms": model.first_call_seconds * 1000,
            "batches": batches,
        }
    return result


def headline_figures(measured: Mapping) -> dict[str, float]:
    """The flat figures of one model's ``measure_latency`` entry that the summary table shows:
    the largest batch's call (``batch_ms``, ``batch_ratio``) and the smallest's (``batch1_*``)."""
    sizes = sorted(measured["batches"], key=int)
    largest, smallest = measured["batches"][sizes[-1]], measured["batches"][sizes[0]]
    return {
        "batch_ms": largest["p50_ms"],
        "batch_ratio": largest["ratio"],
        "batch1_p50_ms": smallest["p50_ms"],
        "batch1_p99_ms": smallest["p99_ms"],
        "batch1_p50_ratio": smallest["ratio"],
        "load_s": measured["load_s"],
        "first_call_ms": measured["first_call_ms"],
    }


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


# ---------------------------------------------------------------------------------------------
# A model timed in a worker process (another oneDNN setting than this process's)
# ---------------------------------------------------------------------------------------------


class WorkerModel:
    """A TensorFlow SavedModel loaded and timed in a child process started with ``environment``.

    The child draws the same rows (``eval_csv``, ``rows``, ``seed``: the parent's
    :func:`~serving_optimiser.pipeline.data.sample_around`), loads the model, and answers each
    request "BATCH CALLS" with the seconds of each call, timed inside the child, so the pipe's
    cost is not in the figures. Its requests are answered one at a time, so it never runs while
    a model in this process does.
    """

    def __init__(self, model_path: Path, eval_csv: Path, vocabulary: Sequence[str], signature: str,
                 rows: int, seed: int, environment: Mapping[str, str]) -> None:
        spec = {"model": str(model_path), "eval": str(eval_csv), "vocabulary": list(vocabulary),
                "signature": signature, "rows": rows, "seed": seed}
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
            self._errors.seek(0)
            error = [text for text in self._errors.read().splitlines() if text.strip()]
            raise UserError(f"latency worker for the exported model exited: {error[-1] if error else 'no output'}")
        return json.loads(line)

    def timer(self, batch: int, calls: int) -> list[float]:
        self._process.stdin.write(f"{batch} {calls}\n")
        self._process.stdin.flush()
        return self._answer()["seconds"]

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()
            self._process.wait(timeout=60)
        self._process.stdout.close()
        self._errors.close()


def _serve(spec: dict) -> None:
    """The worker's loop (see :class:`WorkerModel`)."""
    # Answers go to the original stdout; anything native code prints goes to stderr instead.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    from .data import read_iris_csv, sample_around
    from .evaluate import load_model

    rows = sample_around(read_iris_csv(Path(spec["eval"]), spec["vocabulary"]), spec["rows"], spec["seed"])
    start = time.perf_counter()
    predictor = load_model("exported", Path(spec["model"]), spec["vocabulary"], spec["signature"], 2)
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
