"""The stage scripts' entry point: :func:`serving_optimiser.runner.run` with the stage's name."""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..runner import run


def run_stage(
    name: str, main: Callable[[list[str]], None], argv: list[str] | None = None, *, pinned: bool = True
) -> None:
    """Run a stage script's ``main``; exit non-zero with one line on a user error.

    Stages are ``pinned`` (same kernels and threads on every machine, so their outputs are the
    same bit for bit) unless they measure time, which must be measured as TensorFlow serves.
    """
    code = run(name, lambda: main(sys.argv[1:] if argv is None else argv), pinned=pinned)
    if code:
        sys.exit(code)
