"""Timing models side by side, the one way the pipeline's latency stages and the benchmarks do it:
every model gets the same calls in the same process, round by round in a seeded random order, and
a model's figure against a yardstick is the median over rounds of its median call over the
yardstick's in the same round, so drift and one-off stalls hit both sides alike. No TensorFlow.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

Call = Callable[[dict], object]
# timer(batch size, calls) -> seconds of each call
Timer = Callable[[int, int], list[float]]


def local_timer(call: Call, inputs: Mapping[int, dict]) -> Timer:
    """A timer of ``call`` in this process on ``inputs[batch size]``."""

    def timer(batch: int, calls: int) -> list[float]:
        features = inputs[batch]
        seconds = []
        for _ in range(calls):
            start = time.perf_counter()
            call(features)  # a call returns materialised arrays (numpy), so the work is done
            seconds.append(time.perf_counter() - start)
        return seconds

    return timer


def call_timer(call: Callable[[], object]) -> Timer:
    """A timer of a call that holds its own inputs (the batch size is the caller's label only)."""

    def timer(batch: int, calls: int) -> list[float]:
        seconds = []
        for _ in range(calls):
            start = time.perf_counter()
            call()
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


def interleaved_rounds(
    models: Sequence[TimedModel], batch: int, calls: int, rounds: int, rng: np.random.Generator
) -> dict[str, list[list[float]]]:
    """``rounds`` rounds at ``batch`` rows; each round times ``calls`` calls of every model, the
    models in a random order drawn from ``rng``. Per model: per round, the seconds of each call."""
    times: dict[str, list[list[float]]] = {model.name: [] for model in models}
    for _ in range(rounds):
        for index in rng.permutation(len(models)):
            times[models[index].name].append(models[index].timer(batch, calls))
    return times


def round_ratio(mine: Sequence[Sequence[float]], theirs: Sequence[Sequence[float]]) -> float:
    """The median over rounds of (my median call / their median call in the same round)."""
    return statistics.median(
        float(np.median(a)) / float(np.median(b)) for a, b in zip(mine, theirs, strict=True)
    )


def measure_side_by_side(
    models: list[TimedModel], batch_sizes: Sequence[int], repeats: int, calls: Callable[[int], int], seed: int
) -> dict[str, dict]:
    """Per model and batch size: p50 and p99 per call, p50 per row, and the ratio to the first
    model (the yardstick).

    Batch sizes run largest first (a large call leaves caches and the allocator in a state that
    slows the next small calls, so the small ones come after). At each size every model gets two
    warm-up calls (oneDNN's first run per shape, LiteRT's re-allocation), then ``repeats`` rounds
    of ``calls(size)`` calls each (:func:`interleaved_rounds`).
    """
    sizes = sorted(batch_sizes)
    for model in models:
        model.first_call_seconds = model.timer(sizes[0], 1)[0]
    rng = np.random.default_rng(seed)
    rounds: dict[str, dict[int, list[list[float]]]] = {m.name: {} for m in models}
    for size in sorted(sizes, reverse=True):
        count = calls(size)
        for model in models:
            model.timer(size, 2)
        for name, times in interleaved_rounds(models, size, count, repeats, rng).items():
            rounds[name][size] = times
        log.info("batch %d: %d rounds of %d call(s) per model done", size, repeats, count)
    reference = models[0].name
    result = {}
    for model in models:
        batches = {}
        for size in sizes:
            seconds = np.concatenate(rounds[model.name][size]) * 1000
            p50 = float(np.percentile(seconds, 50))
            batches[str(size)] = {
                "p50_ms": p50,
                "p99_ms": float(np.percentile(seconds, 99)),
                "per_row_us": p50 * 1000 / size,
                "ratio": round_ratio(rounds[model.name][size], rounds[reference][size]),
                "calls": int(seconds.size),
            }
        result[model.name] = {
            "how": model.how,
            "load_s": model.load_seconds,
            "first_call_ms": model.first_call_seconds * 1000,
            "batches": batches,
        }
    return result
