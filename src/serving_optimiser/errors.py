"""User-facing errors of the pipeline and tools: each carries a one-line message naming the bad
file, key, token, row or node. Command-line entry points print them without a traceback."""


class UserError(ValueError):
    """Bad input from the user (params, data, files); the message says what and where."""
