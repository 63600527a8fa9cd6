"""The one entry-point runner of the stage scripts and the command-line tools: TensorFlow quiet
(and, for deterministic stages, pinned) before it is imported, progress on stderr, and a user
error as one line with a non-zero exit instead of a traceback.

A user error is a :class:`serving_optimiser.errors.UserError` (every error class about the
user's input derives from it) or an ``OSError`` (a file that can't be read or written). Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from . import runtime
from .errors import UserError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, UserError | OSError)


def _flattened(error: BaseException) -> str:
    """A user error's whole message on one line (an OSError's may hold a newline in a path)."""
    return " ".join(str(error).split()) or type(error).__name__


def configure_logging(prog: str) -> None:
    """The package's INFO lines (progress) go to stderr as ``prog: message``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    package_logger = logging.getLogger("serving_optimiser")
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(logging.INFO)
    package_logger.propagate = False
    for noisy in ("tensorflow", "absl", "h5py", "dvclive", "dvc"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def run(prog: str, main: Callable[[], int | None], *, pinned: bool = False) -> int:
    """Run ``main`` and return the process's exit code.

    ``pinned`` pins oneDNN's kernels and the thread counts (see :mod:`serving_optimiser.runtime`)
    for stages whose outputs must be the same bit for bit on any machine.
    """
    runtime.quiet_tensorflow()
    if pinned:
        runtime.pin_kernels()
    configure_logging(prog)
    try:
        return main() or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if not is_user_error(error):
            raise
        print(f"{prog}: error: {_flattened(error)}", file=sys.stderr)
        return EXIT_ERROR
