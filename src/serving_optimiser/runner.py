"""The one entry-point runner of the stage scripts and the command-line tools: TensorFlow quiet
(and, for deterministic stages, pinned) before it is imported, progress on stderr, and a user
error as one line with a non-zero exit instead of a traceback.

A user error is a :class:`serving_optimiser.errors.UserError` (every error class about the
user's input derives from it) or an ``OSError`` (a file that can't be read or written). Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable

from . import runtime
from .errors import UserError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEFAULT_MEMORY_HINT = "use fewer or smaller input rows"


def is_out_of_memory(error: BaseException) -> bool:
    """Python's MemoryError, or TensorFlow's ResourceExhaustedError (matched by name, so that an
    error raised before TensorFlow loads does not import it)."""
    return isinstance(error, MemoryError) or any(
        cls.__name__ == "ResourceExhaustedError" for cls in type(error).__mro__
    )


def killed_by_signal(returncode: int | None, what: str, lower: str) -> str | None:
    """One line for a child process that died by a signal (a negative ``returncode``, as
    subprocess reports it), None for one that exited. SIGKILL is what the kernel's OOM killer
    sends, so it says to lower ``lower`` (the param or flag that sizes the child's work):
    ``the latency worker process was killed (signal 9, most likely out of memory); lower ...``."""
    if returncode is None or returncode >= 0:
        return None
    number = -returncode
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = "an unknown signal"
    if number == signal.SIGKILL:
        return f"the {what} process was killed (signal {number}, most likely out of memory); lower {lower}"
    return f"the {what} process was killed (signal {number}, {name})"


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
    for noisy in ("dvclive", "dvc"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # TensorFlow's own Python warnings follow TF_CPP_MIN_LOG_LEVEL (runtime.quiet_tensorflow).
    for noisy in ("tensorflow", "absl", "h5py"):
        logging.getLogger(noisy).setLevel(runtime.tensorflow_python_log_level())


def run(prog: str, main: Callable[[], int | None], *, pinned: bool = False,
        memory_hint: str = DEFAULT_MEMORY_HINT) -> int:
    """Run ``main`` and return the process's exit code.

    ``pinned`` pins oneDNN's kernels and the thread counts (see :mod:`serving_optimiser.runtime`)
    for stages whose outputs must be the same bit for bit on any machine. Running out of memory
    is one line too, ending with ``memory_hint``: what to lower.
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
        if is_out_of_memory(error):
            detail = _flattened(error).split(" [[")[0][:200]
            print(f"{prog}: error: out of memory ({type(error).__name__}: {detail}); {memory_hint}", file=sys.stderr)
            return EXIT_ERROR
        if not is_user_error(error):
            raise
        print(f"{prog}: error: {_flattened(error)}", file=sys.stderr)
        return EXIT_ERROR
