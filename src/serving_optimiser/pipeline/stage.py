"""The stage scripts' entry point: :func:`serving_optimiser.runner.run` with the stage's name."""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..runner import run

MEMORY_HINT = (
    "lower evaluate.chunk_bytes (input bytes per model call) or evaluate.max_batch_bytes / latency.max_call_bytes "
    "in params.yaml"
)


def run_stage(
    name: str, main: Callable[[list[str]], None], argv: list[str] | None = None, *, pinned: bool = True
) -> None:
    """Run a stage script's ``main``; exit non-zero with one line on a user error.

    Stages are ``pinned`` (same kernels and threads on every machine, so their outputs are the
    same bit for bit) unless they measure time, which must be measured as TensorFlow serves.
    """
    code = run(name, lambda: main(sys.argv[1:] if argv is None else argv), pinned=pinned, memory_hint=MEMORY_HINT)
    if code:
        sys.exit(code)
