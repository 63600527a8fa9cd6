"""Exceptions of the transform engine: one type for user-facing errors, so tools can print them
as one line without a traceback."""


class TransformError(ValueError):
    """A transform, its arguments or the graph it was given is wrong; the message says which."""
