"""File-system helpers of the SavedModel tools: the output-directory check and size accounting
(atomic output itself is ``serving_optimiser.atomic``)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SavedModelError


def check_output_directory(target: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an existing, non-empty ``target`` unless ``overwrite``; return it as a Path."""
    target = Path(target)
    if target.exists() and not overwrite:
        if not target.is_dir():
            raise SavedModelError(f"{target}: exists and is not a directory")
        if any(target.iterdir()):
            raise SavedModelError(f"{target}: output directory already exists and is not empty")
    return target


def directory_size(directory: str | os.PathLike) -> int:
    """Total bytes of the regular files under ``directory`` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path):
                total += os.path.getsize(path)
    return total


def clear_directory(directory: str | os.PathLike) -> None:
    """Remove everything inside ``directory`` (to write another model there)."""
    import shutil

    for entry in Path(directory).iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
