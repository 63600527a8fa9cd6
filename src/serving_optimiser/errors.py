"""The one error boundary of the package: every error about the user's input (params, data,
files, graphs, transform strings, SavedModels) derives from ``UserError``, so entry points print
it as one line, and ``ignore_errors=true`` skips it, while anything else is a bug that keeps
its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (params, data, files); the message says what and where."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message, or the exception's type name.

    TensorFlow errors carry multi-line messages (a stack of ``{{node ...}}`` frames); tools
    print one line, and ``OpError.message`` is the message without TF's own prefixes.
    """
    text = (getattr(error, "message", None) or str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__
