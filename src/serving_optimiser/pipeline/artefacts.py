"""A model artefact a stage reads: a SavedModel or a peer's file, loaded through the one predictor
interface, or the one line a peer's directory holds instead where its converter could not convert
the model. Loading imports the runtime of the artefact's format only (the format table,
:mod:`serving_optimiser.peers.formats`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .model import ModelSpec

# A peer's directory holds this file instead of an artefact when its converter cannot convert
# the model (the convert_peer stage's one line, which evaluate, latency and report pass on).
UNSUPPORTED_FILE = "unsupported.txt"


def load_model(name: str, path: Path, spec: ModelSpec, threads: int):
    """A predictor for ``path`` (see :mod:`serving_optimiser.peers.predictor`), named ``name`` in
    its errors."""
    from ..peers.predictor import load_predictor

    if not path.exists():
        raise UserError(f"{name}: {path} not found (run the stage that builds it first)")
    return load_predictor(path, threads=threads, label_vocabulary=spec.label_vocabulary, signature=spec.signature,
                          name=name)


def unsupported(path: Path) -> str | None:
    """Why a peer could not be converted (its stage's one line), or None for a real artefact."""
    marker = path / UNSUPPORTED_FILE
    return marker.read_text().strip() if path.is_dir() and marker.is_file() else None
