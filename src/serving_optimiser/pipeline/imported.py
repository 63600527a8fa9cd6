"""The import stage: the model the pipeline optimises as a SavedModel in ``models/imported``, whatever
``model.path`` names: a SavedModel directory (copied, byte for byte) or a Keras file (a Keras 3
``.keras``, or a Keras 2 ``.h5`` through tf-keras), exported with a ``serving_default`` signature
whose input names come from the model (:mod:`serving_optimiser.saved_model.keras_file`).

Every later stage reads ``models/imported``; for a SavedModel the copy has the same content, so
its DVC hash is the source's, and nothing downstream changes (the Iris export among them).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import UserError


def import_stage(model_path: Path, out: Path, out_report: Path) -> str:
    """Write ``out`` (a SavedModel) and ``out_report`` (what was imported, and how); returns the
    stage's line."""
    from ..atomic import atomic_directory
    from ..saved_model.errors import SavedModelError
    from ..saved_model.keras_file import export_keras_file, is_keras_file
    from .io import write_json

    if is_keras_file(model_path):
        with atomic_directory(out) as temporary:
            exported = temporary / "saved_model"
            try:
                described = export_keras_file(model_path, exported)
            except SavedModelError as error:
                raise UserError(str(error)) from None
            for child in exported.iterdir():
                child.rename(temporary / child.name)
            exported.rmdir()
        write_json(out_report, described)
        inputs = ", ".join(described["inputs"])
        return (f"import: {model_path} ({described['source_format']}) exported with signature "
                f"'{described['signature']}' ({inputs} -> {', '.join(described['outputs'])}) -> {out}")
    if not (model_path / "saved_model.pb").is_file() and not (model_path / "saved_model.pbtxt").is_file():
        raise UserError(f"{model_path}: neither a SavedModel directory nor a Keras file (.keras, .h5)")
    with atomic_directory(out) as temporary:
        for child in sorted(model_path.iterdir()):
            target = temporary / child.name
            if child.is_dir():
                shutil.copytree(child, target)
            else:
                shutil.copyfile(child, target)
    write_json(out_report, {"source": str(model_path), "source_format": "saved_model"})
    return f"import: {model_path} (SavedModel, copied) -> {out}"
