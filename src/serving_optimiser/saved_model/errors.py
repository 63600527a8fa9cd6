"""The one exception type of the SavedModel tools, so command-line entry points can print any
user-facing failure as one line without a traceback; and the wrapper that turns TensorFlow's
own exceptions into it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..errors import UserError, first_line


class SavedModelError(UserError):
    """A SavedModel, a frozen model, a signature or an option is wrong or unsafe.

    The message is one line naming the file, signature key, op or node concerned.
    """


@contextlib.contextmanager
def tensorflow_errors(where: str, doing: str) -> Iterator[None]:
    """Turn an exception raised inside TensorFlow into a one-line SavedModelError.

    Loading and freezing run TensorFlow on the user's model, and TensorFlow reports a bad
    model with whatever type it likes (ValueError, KeyError, OpError...), so here everything
    counts as the model's fault; keep this around TensorFlow calls only.
    """
    try:
        yield
    except SavedModelError:
        raise
    except Exception as error:
        kind, detail = type(error).__name__, first_line(error)
        described = kind if detail == kind else f"{kind}: {detail}"
        raise SavedModelError(f"{where}: {doing} failed: {described}") from error
