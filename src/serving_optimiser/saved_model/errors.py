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
        kind, detail = type(error).__name__, tensorflow_detail(error)
        described = kind if detail == kind else f"{kind}: {detail}"
        raise SavedModelError(f"{where}: {doing} failed: {described}") from error


def tensorflow_detail(error: BaseException | str) -> str:
    """The line of a TensorFlow error that says what went wrong, plus the fix where we know it.

    A graph execution error opens with "Graph execution error:" and the stack of the node's
    Python definition; what went wrong is its last line. A model whose int8 ops have no kernel
    here fails at its self-check node (:mod:`.onednn`), whose name carries the fix.
    """
    from .onednn import FIX, SELF_CHECK_SCOPE

    text = str(error).strip()
    detail = first_line(error)
    if detail.rstrip(":").endswith("Graph execution error"):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        detail = lines[-1] if lines else detail
    if SELF_CHECK_SCOPE in text or "Missing 0-th output" in text:
        detail += (
            f" (an op without a kernel in this process: int8 ops that only oneDNN implements need {FIX} "
            "where oneDNN is off, the default on CPUs without AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX)"
        )
    return detail
