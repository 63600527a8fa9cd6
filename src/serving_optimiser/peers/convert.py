"""Building one peer artefact: convert the exported SavedModel, check that the result loads and
answers batch-N and batch-1 calls with valid outputs, and only then move it into place."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_directory
from ..errors import UserError
from .params import PeerSpec
from .predictor import DEFAULT_SIGNATURE, input_rows, load_predictor


def calibration_subset(inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """``rows`` evenly spaced rows of ``inputs`` (all of them if there are fewer): the Iris splits
    are sorted by the source file's row order, which groups the classes, so a prefix would
    calibrate on one or two classes only."""
    total = input_rows("calibration rows", inputs)
    picks = np.unique(np.linspace(0, total - 1, num=min(rows, total)).round().astype(np.int64))
    return {key: np.asarray(values)[picks] for key, values in inputs.items()}


def model_files(
    spec: PeerSpec,
    exported: str | Path,
    calibration: Mapping[str, np.ndarray] | None = None,
    signature: str = DEFAULT_SIGNATURE,
) -> dict[str, bytes]:
    """Every file of the artefact for ``spec``, by name (``calibration``: the rows the calibrated
    quantisations pick theirs from)."""
    if spec.format == "openvino":
        if not (Path(exported) / "saved_model.pb").is_file():
            raise UserError(f"{exported}: not a SavedModel (no saved_model.pb; run the export stage first)")
        from .openvino import openvino_model_files

        rows = calibration_subset(calibration, spec.calibration_rows) if spec.calibration_rows else None
        return openvino_model_files(exported, spec.quantization, rows, spec.minimum_dim, signature)
    return {spec.filename: model_bytes(spec, exported, calibration, signature)}


def model_bytes(
    spec: PeerSpec,
    exported: str | Path,
    calibration: Mapping[str, np.ndarray] | None = None,
    signature: str = DEFAULT_SIGNATURE,
) -> bytes:
    """The bytes of a single-file artefact (LiteRT, ONNX) for ``spec`` (``calibration``: the rows
    int8_full calibrates on)."""
    if not (Path(exported) / "saved_model.pb").is_file():
        raise UserError(f"{exported}: not a SavedModel (no saved_model.pb; run the export stage first)")
    if spec.format == "openvino":
        raise UserError(f"{spec.name}: an OpenVINO artefact is two files (use model_files)")
    if spec.format == "litert":
        from .litert import litert_model_bytes

        rows = calibration_subset(calibration, spec.calibration_rows) if spec.calibration_rows else None
        return litert_model_bytes(exported, spec.quantization, rows, signature)
    from .onnx_runtime import onnx_model_bytes

    return onnx_model_bytes(exported, spec.quantization, spec.opset, signature)


def convert_peer(
    spec: PeerSpec,
    exported: str | Path,
    out_dir: str | Path,
    inputs: Mapping[str, np.ndarray],
    label_vocabulary: Sequence[str] | None = None,
    signature: str = DEFAULT_SIGNATURE,
    expected: Mapping[str, tuple[str, list[int | None] | None]] | None = None,
    files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write ``out_dir/<spec.name>/model.<ext>`` (an OpenVINO IR: ``model.xml`` and ``model.bin``)
    atomically; return the final path of the file a predictor loads.

    ``inputs`` (calibration rows by the signature's input keys) feed full-integer calibration and
    the check: the new artefact must return valid outputs (see ``validate_outputs``; ``expected``:
    the output keys, dtypes and shapes it must return) on all of them at once and on the first row
    alone, or the stage fails naming the artefact and nothing is written. ``files``: the
    artefact's files when the caller has converted already (:func:`model_files`).
    """
    target = Path(out_dir) / spec.name
    final_file = target / spec.filename
    files = files if files is not None else model_files(spec, exported, inputs, signature)
    with atomic_directory(target) as temporary:
        for filename, content in files.items():
            (temporary / filename).write_bytes(content)
        predictor = load_predictor(
            temporary / spec.filename, threads=1, label_vocabulary=label_vocabulary, signature=signature,
            name=str(final_file),
        )
        predictor.checked(inputs, label_vocabulary, expected)
        predictor.checked({key: np.asarray(values)[:1] for key, values in inputs.items()}, label_vocabulary, expected)
    return final_file
