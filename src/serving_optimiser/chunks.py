"""Rows streamed through a model in calls bounded in bytes, so a real model's inputs fit in memory.

A model's activations grow with the rows of a call: 100,000 Iris rows are 1.6 MB of input and fit
in one call, 100,000 48 x 48 x 3 images are 2.8 GB of input and tens of GB of activations. Every
place that runs a model on many rows (the pipeline's evaluation and gate, calibration) calls it on
at most ``chunk_bytes`` of input at a time and concatenates the outputs; a batch small enough stays
one call, so its figures are the same bytes as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from .errors import UserError

DEFAULT_CHUNK_BYTES = 16 * 2**20  # 16 MiB of input per call: 1,000,000 Iris rows, ~600 48 x 48 x 3 images


def row_bytes(inputs: Mapping[str, np.ndarray]) -> int:
    """Bytes of input per row (at least 1), summed over the inputs."""
    total = 0
    for values in inputs.values():
        array = np.asarray(values)
        rows = array.shape[0] if array.ndim else 1
        total += array.nbytes // max(rows, 1)
    return max(total, 1)


def rows_per_call(inputs: Mapping[str, np.ndarray], chunk_bytes: int) -> int:
    """Rows of ``inputs`` in one call of at most ``chunk_bytes`` (one row at least)."""
    return max(1, chunk_bytes // row_bytes(inputs))


def capped_rows(rows: int, bytes_per_row: int, max_bytes: int) -> int:
    """``rows``, or fewer so that they hold at most ``max_bytes`` (one row at least)."""
    return max(1, min(rows, max_bytes // max(bytes_per_row, 1)))


def call_in_chunks(
    function: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
    inputs: Mapping[str, np.ndarray],
    chunk_bytes: int | None,
    where: str = "model",
) -> dict[str, np.ndarray]:
    """``function(inputs)``, called on consecutive slices of rows of at most ``chunk_bytes``
    (None: one call), outputs concatenated along the rows.

    An output that does not have one row per input row cannot be split: it is a one-line error
    naming it, since a chunked result would silently mean something else.
    """
    total = len(next(iter(inputs.values())))
    step = total if chunk_bytes is None else rows_per_call(inputs, chunk_bytes)
    if step >= total:
        return dict(function(inputs))
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, total, step):
        chunk = {key: values[start : start + step] for key, values in inputs.items()}
        rows = len(next(iter(chunk.values())))
        for key, values in function(chunk).items():
            values = np.asarray(values)
            if values.ndim == 0 or values.shape[0] != rows:
                raise UserError(
                    f"{where}: output '{key}' has shape {list(values.shape)} for {rows} input rows, so its rows "
                    f"cannot be computed in chunks; raise the chunk size to {total * row_bytes(inputs)} bytes"
                )
            parts.setdefault(key, []).append(values)
    return {key: np.concatenate(values) for key, values in parts.items()}


def available_memory_bytes() -> int | None:
    """Bytes this process can still allocate: /proc/meminfo's MemAvailable, or the cgroup's
    limit less its usage where that is lower (a container's limit is what the OOM killer
    enforces). None where neither can be read (not Linux)."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = Path("/sys/fs/cgroup", limit_file).read_text().strip()
            usage = int(Path("/sys/fs/cgroup", usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max", or cgroup v1's "no limit" (~2^63)
            room = max(int(limit) - usage, 0)
            available = room if available is None else min(available, room)
        break
    return available


def _gib(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def check_memory(needed_bytes: int, what: str, advice: str, available: int | None = None) -> None:
    """A one-line UserError when ``needed_bytes`` would not fit in the memory available
    (``available``, default :func:`available_memory_bytes`): ``what`` says what holds them
    (``--sample-inputs holds 200000 rows: the outputs``), ``advice`` what to lower."""
    available = available_memory_bytes() if available is None else available
    if available is not None and needed_bytes > available:
        raise UserError(f"{what} need ~{_gib(needed_bytes)}, {_gib(available)} available; {advice}")


def output_bytes(outputs: Mapping[str, tuple[str, list[int | None] | None]], rows: int) -> int:
    """Estimated bytes of ``rows`` rows of outputs, from each output's (dtype name, shape):
    the first unknown dimension is the rows, other unknown dimensions count as 1 (a lower bound)."""
    total = 0
    for dtype, shape in outputs.values():
        try:
            itemsize = np.dtype(dtype).itemsize
        except TypeError:
            itemsize = 8  # strings and bfloat16: an object pointer or 2 bytes; 8 does not under-count
        size = itemsize
        for index, dim in enumerate(shape or [None]):
            size *= rows if (index == 0 and dim is None) else (dim or 1)
        total += size
    return total
