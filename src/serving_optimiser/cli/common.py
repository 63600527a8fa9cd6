"""What the command-line tools share: old-style flags (``--in_graph=x``), quiet TensorFlow,
progress logging to stderr, and user errors as one line on stderr with a non-zero exit."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .. import booleans

EXIT_ERROR = 1
EXIT_USAGE = 2


PACKAGE = "serving-optimiser"


class ToolArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``tool: error: ... (see --help)``), with
    ``--version``, and whose ``--help`` ends with the tool's module docstring (its example and
    exit codes) as written, so the docstring is the one place they are kept."""

    def __init__(self, *, prog: str, description: str, docstring: str | None) -> None:
        super().__init__(
            prog=prog,
            description=description,
            epilog=_after_first_paragraph(docstring),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        self.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _after_first_paragraph(docstring: str | None) -> str | None:
    """The docstring without its opening paragraph, which only repeats the description."""
    parts = (docstring or "").strip().split("\n\n", 1)
    return parts[1] if len(parts) == 2 else None


def package_version() -> str:
    """The installed distribution's version (the package's own when run from a source tree)."""
    from importlib import metadata

    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        from .. import __version__

        return __version__


def parse_bool(text: str) -> bool:
    """Bool flag values the old tools accepted: true/false, 1/0 (any case)."""
    value = booleans.parse_bool(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"expected {booleans.EXPECTED}, got '{text}'")
    return value


def quiet_tensorflow() -> None:
    """Silence TensorFlow's C++ and Python logs unless the user set TF_CPP_MIN_LOG_LEVEL.

    Must run before TensorFlow is imported to affect its C++ logging.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3":
        for noisy in ("tensorflow", "absl"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


@contextmanager
def progress_logging(prog: str) -> Iterator[None]:
    """Send the package's INFO log lines (one per transform) to stderr while the tool runs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    package_logger = logging.getLogger("serving_optimiser")
    previous_level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)


def run_tool(prog: str, body: Callable[[], None]) -> int:
    """Run ``body``; a user error becomes ``prog: error: <message>`` on stderr and exit code 1.

    User errors are the ValueErrors our package raises (TransformError, GraphFileError) and
    OSErrors. Anything else is a bug, but still gets one line, naming the exception type.
    """
    try:
        body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:  # noqa: BLE001 - the tools promise one line and no traceback
        message = " ".join(str(error).split())
        print(f"{prog}: internal error: {type(error).__name__}: {message}", file=sys.stderr)
        return EXIT_ERROR
    return 0
