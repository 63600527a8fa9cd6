"""Loading any artefact through the one predictor interface: its format is found by its file
(the format table, :mod:`.formats`), that runtime's module is imported, and it loads.

The interface itself (:class:`~.base.Predictor`, :class:`~.base.LoadOptions`, the input and output
checks) lives in :mod:`.base`; the names other code imports from here stay importable here, the
runtimes' predictor classes on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._lazy import lazy_exports
from ..errors import UserError
from .base import (  # noqa: F401 - re-exported: callers import these from here
    DEFAULT_SIGNATURE,
    DEFAULT_THREADS,
    NUMPY_DTYPES,
    LoadOptions,
    Predictor,
    input_arrays,
    input_rows,
    numeric_outputs,
    saved_model_signature,
    validate_outputs,
    vocabulary_array,
    with_classes,
)
from .formats import FORMATS

# Each runtime's predictor class, imported on first use. This also tells the import-closure check
# (tests/import_closure.py) that loading an artefact may import every runtime module of the table.
_EXPORTS = {
    "TFPredictor": ".tf",
    "LiteRTPredictor": ".litert",
    "OnnxPredictor": ".onnx",
    "OpenVINOPredictor": ".openvino",
}
__getattr__ = lazy_exports(__package__, _EXPORTS)


def _listed(items: list[str]) -> str:
    return ", ".join(items[:-1]) + f" or {items[-1]}" if len(items) > 1 else items[0]


def artefact_file(path: str | Path) -> tuple[str, Path]:
    """(format, file or directory to load) of an artefact given as its file or its directory."""
    path = Path(path)
    if path.is_dir():
        for row in FORMATS.values():
            if (path / row.filename).is_file():
                return row.name, path if row.opens_directory else path / row.filename
        names = _listed([row.filename for row in FORMATS.values()])
        raise UserError(f"{path}: no {names} in the directory")
    for row in FORMATS.values():
        if not row.opens_directory and path.suffix == row.suffix and path.is_file():
            return row.name, path
    described = _listed([row.described for row in FORMATS.values()])
    raise UserError(f"{path}: not found, or not a {described} file")


def load_predictor(path: str | Path, options: LoadOptions | None = None, **changes: Any) -> Predictor:
    """Load any artefact: a SavedModel directory, or a ``model.tflite`` / ``model.onnx`` /
    ``model.xml`` (OpenVINO IR) file or the directory holding it (what ``convert_peer`` writes).
    Keywords change single :class:`~.base.LoadOptions` (``threads``, ``label_vocabulary``,
    ``signature``, ``name``)."""
    format_name, target = artefact_file(path)
    return FORMATS[format_name].runtime().PREDICTOR.load(target, options, **changes)
