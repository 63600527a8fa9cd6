"""Latency of one model against the exported one, measured side by side in one process, the way
TensorFlow serves on this machine (its default kernels and threads, not the pinned ones), and
the machine it was measured on. These figures change with the machine; the deterministic ones
live in :mod:`serving_optimiser.pipeline.evaluate`.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .params import require, require_positive

log = logging.getLogger(__name__)

Call = Callable[[dict], object]

# CPU flags that decide which kernels oneDNN picks (and so float bits and speed).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class LatencyParams:
    repeats: int
    single_row_calls: int
    load_repeats: int
    seed: int

    @classmethod
    def from_section(cls, section: dict) -> LatencyParams:
        repeats = require_positive(section, "repeats", int, "latency")
        if repeats < 5:
            raise UserError(f"params.yaml: 'latency.repeats' must be at least 5 (median of >= 5), got {repeats}")
        return cls(
            repeats=repeats,
            single_row_calls=require_positive(section, "single_row_calls", int, "latency"),
            load_repeats=require_positive(section, "load_repeats", int, "latency"),
            seed=require(section, "seed", int, "latency"),
        )


@dataclass
class TimedModel:
    name: str
    call: Call
    load_seconds: float
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


def _timed(model: TimedModel, inputs: dict) -> float:
    start = time.perf_counter()
    model.call(inputs)  # a call returns materialised arrays (numpy), so the work is done
    return time.perf_counter() - start


def measure_latency(
    models: list[TimedModel], batch: dict, single: dict, repeats: int, single_row_calls: int, seed: int
) -> dict[str, dict[str, float]]:
    """Batch latency (median) and batch-1 p50/p99 per model, and their ratios to the first model.

    The batch rounds run first, then the batch-1 rounds (a 100,000-row call leaves caches and
    the allocator in a state that slows the next small calls). Each round times every model, in
    a seeded random order. Ratios are medians of per-round ratios against the first model
    measured in the same round, so drift and one-off stalls hit both sides of a ratio alike.
    """
    for model in models:
        model.first_call_seconds = _timed(model, single)
        _timed(model, batch)
        for _ in range(5):
            _timed(model, single)
    batch_times: dict[str, list[float]] = {m.name: [] for m in models}
    single_times: dict[str, list[list[float]]] = {m.name: [] for m in models}
    calls_per_round = max(1, single_row_calls // repeats)
    rng = np.random.default_rng(seed)
    rows = len(next(iter(batch.values())))
    for round_index in range(repeats):
        for index in rng.permutation(len(models)):
            batch_times[models[index].name].append(_timed(models[index], batch))
        log.info("%d-row round %d/%d done", rows, round_index + 1, repeats)
    for _ in range(repeats):
        for index in rng.permutation(len(models)):
            single_times[models[index].name].append([_timed(models[index], single) for _ in range(calls_per_round)])
    log.info("%d batch-1 calls per model done", calls_per_round * repeats)
    reference = models[0].name
    reference_p50 = [float(np.median(calls)) for calls in single_times[reference]]
    result = {}
    for model in models:
        singles = np.concatenate(single_times[model.name]) * 1000
        round_p50 = [float(np.median(calls)) for calls in single_times[model.name]]
        result[model.name] = {
            "batch_ms": statistics.median(batch_times[model.name]) * 1000,
            "batch1_p50_ms": float(np.percentile(singles, 50)),
            "batch1_p99_ms": float(np.percentile(singles, 99)),
            "batch_ratio": statistics.median(a / b for a, b in zip(batch_times[model.name], batch_times[reference])),
            "batch1_p50_ratio": statistics.median(a / b for a, b in zip(round_p50, reference_p50)),
            "load_s": model.load_seconds,
            "first_call_ms": model.first_call_seconds * 1000,
        }
    return result


def _cpuinfo_field(name: str) -> str | None:
    """The first ``name : value`` line of /proc/cpuinfo (None where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def machine_info() -> dict:
    """The machine a timing was measured on: CPU, the ISA features that pick kernels, cores, and
    how TensorFlow ran (version, oneDNN setting, threads)."""
    from ..runtime import kernel_settings

    flags = set((_cpuinfo_field("flags") or "").split())
    return {
        "cpu": _cpuinfo_field("model name") or platform.processor() or platform.machine(),
        "isa": [flag for flag in ISA_FLAGS if flag in flags],
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        **kernel_settings(),
    }
