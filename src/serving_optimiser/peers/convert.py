"""Building one peer artefact: convert the exported SavedModel with the runtime the format table
names, check that the result loads and answers batch-N and batch-1 calls with valid outputs, and
only then move it into place.

Where the SavedModel does not convert, or what it converts to fails the check (a ``tf.Module`` or
Keras 3 export: LiteRT keeps its variables as READ_VARIABLE ops that the interpreter never
initialises, so it answers NaN, and full-integer int8 does not convert), the same peer is
converted again from the frozen model (the freeze stage's ``models/frozen``), written as a
variable-free SavedModel in a temporary directory. A peer converted that way holds
:data:`SOURCE_FILE` saying so; a peer that converts from neither fails with both reasons in one line.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_directory
from ..errors import UserError
from .base import DEFAULT_SIGNATURE, input_rows
from .formats import FORMATS
from .params import PeerSpec
from .predictor import load_predictor

# Written beside the artefact when it was converted from the frozen model, never otherwise (the
# Iris peers' directories hold their model files only).
SOURCE_FILE = "source.txt"


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
    if not (Path(exported) / "saved_model.pb").is_file():
        raise UserError(f"{exported}: not a SavedModel (no saved_model.pb; run the export stage first)")
    rows = None
    if spec.calibrated and spec.calibration_rows and calibration is not None:
        rows = calibration_subset(calibration, spec.calibration_rows)
    return FORMATS[spec.format].runtime().convert(exported, spec.quantization, rows, signature, **spec.options())


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
    files = FORMATS[spec.format].files
    if len(files) > 1:
        raise UserError(f"{spec.name}: a {spec.format} artefact is {len(files)} files (use model_files)")
    return model_files(spec, exported, calibration, signature)[spec.filename]


@contextlib.contextmanager
def frozen_saved_model(frozen: str | Path) -> Iterator[Path]:
    """The frozen model at ``frozen`` (a ``FrozenModel`` directory) written as a SavedModel without
    variables, in a temporary directory that is removed afterwards. Its weights are constants, so
    every converter reads them (no warm-up records, no dequantize-once variables: nothing for a
    converter to initialise)."""
    from ..runtime import native_output_silenced
    from ..saved_model.convert import write_saved_model
    from ..saved_model.model import FrozenModel

    with tempfile.TemporaryDirectory(prefix="peer-frozen-") as scratch:
        directory = Path(scratch) / "saved_model"
        with native_output_silenced():
            write_saved_model(FrozenModel.load(frozen), directory, dequantize_once=False,
                              label=f"{frozen} (as a SavedModel)", warmup_batch_sizes=())
        yield directory


def frozen_source_line(exported: str | Path, frozen: str | Path, reason: str) -> str:
    """What :data:`SOURCE_FILE` says: the source used, and why the SavedModel was not."""
    return f"converted from the frozen model {frozen}, because from {exported}: {one_line(reason)}\n"


def both_reasons(reason: str, frozen: str | Path, frozen_reason: str, scratch: str | Path | None = None) -> str:
    """One line for a peer that converts from neither source (``scratch``: the temporary
    SavedModel's path, replaced by the frozen model's in the second reason)."""
    if scratch is not None:
        frozen_reason = frozen_reason.replace(str(scratch), f"{frozen} (as a SavedModel)")
    return f"{one_line(reason)}; from the frozen model {frozen}: {one_line(frozen_reason)}"


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def convert_peer(
    spec: PeerSpec,
    exported: str | Path,
    out_dir: str | Path,
    inputs: Mapping[str, np.ndarray],
    label_vocabulary: Sequence[str] | None = None,
    signature: str = DEFAULT_SIGNATURE,
    expected: Mapping[str, tuple[str, list[int | None] | None]] | None = None,
    files: Mapping[str, bytes] | None = None,
    frozen: str | Path | None = None,
) -> Path:
    """Write ``out_dir/<spec.name>/model.<ext>`` (an OpenVINO IR: ``model.xml`` and ``model.bin``)
    atomically; return the final path of the file a predictor loads.

    ``inputs`` (calibration rows by the signature's input keys) feed full-integer calibration and
    the check: the new artefact must return valid outputs (see ``validate_outputs``; ``expected``:
    the output keys, dtypes and shapes it must return) on all of them at once and on the first row
    alone, or the stage fails naming the artefact and nothing is written. ``files``: the
    artefact's files when the caller has converted already (:func:`model_files`). ``frozen``: the
    frozen model's directory, converted from where ``exported`` fails to convert or to pass the
    check (the artefact then holds :data:`SOURCE_FILE`); without it, that failure is raised.
    """
    target = Path(out_dir) / spec.name
    check = (target, inputs, label_vocabulary, signature, expected)
    try:
        files = files if files is not None else model_files(spec, exported, inputs, signature)
        return _write_checked(spec, files, *check)
    except UserError as error:
        if frozen is None:
            raise
        reason = str(error)
    with frozen_saved_model(frozen) as source:
        try:
            files = model_files(spec, source, inputs, signature)
            extra = {SOURCE_FILE: frozen_source_line(exported, frozen, reason).encode()}
            return _write_checked(spec, {**files, **extra}, *check)
        except UserError as error:
            raise UserError(both_reasons(reason, frozen, str(error), source)) from None


def _write_checked(
    spec: PeerSpec,
    files: Mapping[str, bytes],
    target: Path,
    inputs: Mapping[str, np.ndarray],
    label_vocabulary: Sequence[str] | None,
    signature: str,
    expected: Mapping[str, tuple[str, list[int | None] | None]] | None,
) -> Path:
    final_file = target / spec.filename
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
