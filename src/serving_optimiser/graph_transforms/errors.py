"""Exceptions of the transform engine: one type for user-facing errors, so tools can print them
as one line without a traceback and ``ignore_errors`` can tell them from bugs."""

from ..errors import UserError


class TransformError(UserError):
    """A transform, its arguments or the graph it was given is wrong; the message says which."""


class GraphFileError(TransformError):
    """A graph file is missing, unreadable, or does not hold a GraphDef."""
