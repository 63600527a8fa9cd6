"""What the command-line tools' parsers share: old-style flags (``--in_graph=x``), one-line usage
errors, ``--version``, and ``--help`` ending with the tool's example and exit codes. Running them
(quiet TensorFlow, progress on stderr, one-line errors) is :func:`serving_optimiser.runner.run`."""

from __future__ import annotations

import argparse

from .. import booleans, runner

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
        self.exit(runner.EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


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
