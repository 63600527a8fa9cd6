"""The latency stage's figures as the report reads them back: a batch size's short key and the
flat headline of one model's measured entry. Plain Python, so the report depends on neither the
timing code nor the runtimes it loads (:mod:`serving_optimiser.pipeline.latency`)."""

from __future__ import annotations

from collections.abc import Mapping


def batch_label(rows: int) -> str:
    """A batch size as a short key: 1, 8, 512, 100k, 2.5k."""
    if rows >= 1000 and rows % 100 == 0:
        return f"{rows / 1000:g}k"
    return str(rows)


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
