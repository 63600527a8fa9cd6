"""Output helpers of the stages: atomic files and directories, and JSON metrics files."""

from __future__ import annotations

import json
import os

from ..atomic import atomic_directory, atomic_file

__all__ = ["atomic_directory", "atomic_file", "write_json"]


def write_json(target: str | os.PathLike, data) -> None:
    with atomic_file(target) as stream:
        json.dump(data, stream, indent=2, sort_keys=True)
        stream.write("\n")
