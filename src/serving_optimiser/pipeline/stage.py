"""What every stage script shares: quiet TensorFlow, stderr logging, and one-line errors with a
non-zero exit instead of a traceback for user mistakes."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable


def quiet_tensorflow() -> None:
    """Silence TensorFlow's C++ and Python logs unless the user asked for them."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)


def _is_user_error(error: BaseException) -> bool:
    """Errors our package raises about bad input: ValueError subclasses defined in serving_optimiser."""
    return isinstance(error, ValueError) and type(error).__module__.startswith("serving_optimiser")


def run_stage(name: str, main: Callable[[list[str]], None], argv: list[str] | None = None) -> None:
    quiet_tensorflow()
    logging.basicConfig(level=logging.INFO, format=f"{name}: %(message)s", stream=sys.stderr)
    for noisy in ("tensorflow", "absl", "h5py", "dvclive", "dvc"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        if not _is_user_error(error):
            raise
        print(f"{name}: error: {error}", file=sys.stderr)
        sys.exit(1)
