"""Bytes of a model on disk, raw and gzipped, read from its files: no TensorFlow, so the report
and the benchmarks can size artefacts without loading a runtime."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

from ..errors import UserError


def gzip_size(path: Path) -> int:
    """Bytes of a file or directory as a gzip-compressed tar with fixed metadata (reproducible)."""
    buffer = io.BytesIO()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as compressed:
        with tarfile.open(fileobj=compressed, mode="w") as archive:
            for file in files:
                info = tarfile.TarInfo(file.name if file == path else str(file.relative_to(path)))
                info.size = file.stat().st_size
                with file.open("rb") as stream:
                    archive.addfile(info, stream)
    return len(buffer.getvalue())


def model_size(path: Path) -> dict[str, int]:
    """Bytes on disk of a model (a SavedModel directory or a single-file artefact) and gzipped."""
    if path.is_dir():
        total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    elif path.is_file():
        total = path.stat().st_size
    else:
        raise UserError(f"{path}: model not found (run the stage that builds it first)")
    return {"size_bytes": total, "size_gzip_bytes": gzip_size(path)}
