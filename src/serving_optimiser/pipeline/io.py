"""JSON metrics and report files of the stages, written atomically."""

from __future__ import annotations

import json
import os

from ..atomic import atomic_file


def write_json(target: str | os.PathLike, data) -> None:
    with atomic_file(target) as stream:
        json.dump(data, stream, indent=2, sort_keys=True)
        stream.write("\n")
