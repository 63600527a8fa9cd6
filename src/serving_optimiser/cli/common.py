"""What the command-line tools share: old-style flags (``--in_graph=x``), quiet TensorFlow,
progress logging to stderr, and user errors as one line on stderr with a non-zero exit."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .. import runner, runtime

EXIT_ERROR = runner.EXIT_ERROR
EXIT_USAGE = runner.EXIT_USAGE


class ToolArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``tool: error: ... (see --help)``)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def parse_bool(text: str) -> bool:
    """Bool flag values the old tools accepted: true/false, 1/0 (any case)."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def quiet_tensorflow() -> None:
    """Kept for callers of the old name: :func:`serving_optimiser.runtime.quiet_tensorflow`."""
    runtime.quiet_tensorflow()


@contextmanager
def progress_logging(prog: str) -> Iterator[None]:
    """Progress lines already go to stderr: :func:`serving_optimiser.runner.run` sends them."""
    yield


def run_tool(prog: str, body: Callable[[], None]) -> int:
    """Run ``body`` through the shared runner: a user error becomes ``prog: error: <message>`` on
    stderr and exit code 1; a bug keeps its traceback."""
    return runner.run(prog, body)
