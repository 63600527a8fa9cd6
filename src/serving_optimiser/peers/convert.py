"""Building one peer artefact: convert the exported SavedModel, check that the result loads and
answers batch-N and batch-1 calls with valid outputs, and only then move it into place."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_directory
from ..errors import UserError
from ..pipeline.data import FEATURE_NAMES
from .params import PeerSpec
from .predictor import load_predictor


def calibration_subset(features: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """``rows`` evenly spaced rows of ``features`` (all of them if there are fewer): the prepared
    splits are sorted by the source file's row order, which groups the classes, so a prefix would
    calibrate on one or two classes only."""
    total = len(features[FEATURE_NAMES[0]])
    picks = np.unique(np.linspace(0, total - 1, num=min(rows, total)).round().astype(np.int64))
    return {name: np.asarray(features[name], dtype=np.float32)[picks] for name in FEATURE_NAMES}


def model_files(
    spec: PeerSpec, exported: str | Path, calibration: Mapping[str, np.ndarray] | None = None
) -> dict[str, bytes]:
    """Every file of the artefact for ``spec``, by name (``calibration``: the rows the calibrated
    quantisations pick theirs from)."""
    if spec.format == "openvino":
        if not (Path(exported) / "saved_model.pb").is_file():
            raise UserError(f"{exported}: not a SavedModel (no saved_model.pb; run the export stage first)")
        from .openvino import openvino_model_files

        rows = calibration_subset(calibration, spec.calibration_rows) if spec.calibration_rows else None
        return openvino_model_files(exported, spec.quantization, rows, spec.minimum_dim)
    return {spec.filename: model_bytes(spec, exported, calibration)}


def model_bytes(spec: PeerSpec, exported: str | Path, calibration: Mapping[str, np.ndarray] | None = None) -> bytes:
    """The bytes of a single-file artefact (LiteRT, ONNX) for ``spec`` (``calibration``: the rows
    int8_full calibrates on)."""
    if not (Path(exported) / "saved_model.pb").is_file():
        raise UserError(f"{exported}: not a SavedModel (no saved_model.pb; run the export stage first)")
    if spec.format == "openvino":
        raise UserError(f"{spec.name}: an OpenVINO artefact is two files (use model_files)")
    if spec.format == "litert":
        from .litert import litert_model_bytes

        rows = calibration_subset(calibration, spec.calibration_rows) if spec.calibration_rows else None
        return litert_model_bytes(exported, spec.quantization, rows)
    from .onnx_runtime import onnx_model_bytes

    return onnx_model_bytes(exported, spec.quantization, spec.opset)


def convert_peer(
    spec: PeerSpec,
    exported: str | Path,
    out_dir: str | Path,
    features: Mapping[str, np.ndarray],
    label_vocabulary: Sequence[str],
) -> Path:
    """Write ``out_dir/<spec.name>/model.<ext>`` (an OpenVINO IR: ``model.xml`` and ``model.bin``)
    atomically; return the final path of the file a predictor loads.

    ``features`` (the train split) feed full-integer calibration and the check: the new artefact
    must return valid outputs (see ``validate_outputs``) on all of them at once and on the first
    row alone, or the stage fails naming the artefact and nothing is written.
    """
    target = Path(out_dir) / spec.name
    final_file = target / spec.filename
    files = model_files(spec, exported, features)
    with atomic_directory(target) as temporary:
        for filename, content in files.items():
            (temporary / filename).write_bytes(content)
        predictor = load_predictor(
            temporary / spec.filename, threads=1, label_vocabulary=label_vocabulary, name=str(final_file)
        )
        predictor.checked(features, label_vocabulary)
        predictor.checked({name: np.asarray(features[name])[:1] for name in FEATURE_NAMES}, label_vocabulary)
    return final_file
