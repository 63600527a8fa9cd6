"""Silence for native code: TensorFlow's converter, LiteRT and ONNX Runtime write start-up and
progress lines straight to file descriptors 1 and 2 (absl before ``InitializeLog``, the XNNPACK
delegate, the calibrator), past ``TF_CPP_MIN_LOG_LEVEL`` and Python's logging."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def native_output_silenced() -> Iterator[None]:
    """Run the block with fds 1 and 2, Python warnings and log records below ERROR swallowed.

    If the block raises, what it printed is attached to the exception as a note (shown in a
    traceback, never in a one-line user error), so a crash in a converter still explains itself.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    previous_disable = logging.root.manager.disable
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                logging.disable(logging.WARNING)
                yield
        except BaseException as error:
            sink.seek(0)
            captured = sink.read().decode(errors="replace").strip()
            if captured:
                error.add_note(f"output while silenced:\n{captured[-4000:]}")
            raise
        finally:
            logging.disable(previous_disable)
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
