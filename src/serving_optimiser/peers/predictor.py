"""One predictor interface over the exported model and its peer artefacts: load an artefact, call
it on a feature dict, get the TF signature's four outputs back with the TF model's shapes and
dtypes, whichever runtime serves it.

The four outputs, for N rows and C classes, as the exported ``predict`` signature returns them:
``class_ids`` int64 [N, 1], ``classes`` object array of bytes [N, 1], ``logits`` float32
[N, C], ``probabilities`` float32 [N, C].
"""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar, Self

import numpy as np

from ..errors import UserError, first_line
from ..pipeline.data import FEATURE_NAMES
from ..runtime import native_output_silenced

OUTPUT_NAMES = ("class_ids", "classes", "logits", "probabilities")
DEFAULT_THREADS = 2


class Predictor(abc.ABC):
    """A loaded artefact: ``predictor(features) -> {output name: array}``.

    ``artefact`` names the artefact in every error message; ``load_seconds`` is the wall time
    of ``load`` (reading, parsing and preparing the runtime for batch-1 calls).
    """

    format: ClassVar[str]

    def __init__(self, artefact: str, load_seconds: float = 0.0) -> None:
        self.artefact = artefact
        self.load_seconds = load_seconds

    @classmethod
    @abc.abstractmethod
    def load(
        cls,
        path: str | Path,
        *,
        threads: int = DEFAULT_THREADS,
        label_vocabulary: Sequence[str] | None = None,
        signature: str = "predict",
        name: str | None = None,
    ) -> Self:
        """Load ``path``; ``name`` replaces the path in error messages (e.g. a temporary copy)."""

    @abc.abstractmethod
    def __call__(self, features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The four outputs for the rows of ``features`` (one 1-D float32 array per feature)."""

    def checked(
        self, features: Mapping[str, np.ndarray], label_vocabulary: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """``self(features)``, validated by :func:`validate_outputs`."""
        outputs = self(features)
        validate_outputs(self.artefact, outputs, feature_rows(self.artefact, features), label_vocabulary)
        return outputs


def feature_rows(artefact: str, features: Mapping[str, np.ndarray]) -> int:
    missing = [name for name in FEATURE_NAMES if name not in features]
    if missing:
        raise UserError(f"{artefact}: missing input feature(s) {', '.join(missing)}")
    rows = {np.shape(features[name]) for name in FEATURE_NAMES}
    if len(rows) != 1 or len(next(iter(rows))) != 1 or next(iter(rows))[0] == 0:
        raise UserError(f"{artefact}: input features must be non-empty 1-D arrays of one length, got shapes {rows}")
    return next(iter(rows))[0]


def feature_arrays(artefact: str, features: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The features in ``FEATURE_NAMES`` order as contiguous float32 (no copy when they already are)."""
    feature_rows(artefact, features)
    return [np.ascontiguousarray(features[name], dtype=np.float32) for name in FEATURE_NAMES]


def vocabulary_array(label_vocabulary: Sequence[str]) -> np.ndarray:
    """The vocabulary as an object array of bytes, so ``array[class_ids]`` gives TF's ``classes``."""
    return np.array([label.encode() for label in label_vocabulary], dtype=object)


def validate_outputs(
    artefact: str,
    outputs: Mapping[str, np.ndarray],
    rows: int,
    label_vocabulary: Sequence[str] | None = None,
) -> None:
    """Raise a one-line UserError naming ``artefact`` unless ``outputs`` are the four outputs for
    ``rows`` rows with the TF model's shapes and dtypes, finite, and consistent with each other
    (class ids in range and the argmax of the logits; classes spelling the vocabulary's labels)."""
    missing = [name for name in OUTPUT_NAMES if name not in outputs]
    if missing:
        raise UserError(f"{artefact}: missing output(s) {', '.join(missing)} (has {', '.join(sorted(outputs))})")
    logits = outputs["logits"]
    n_classes = len(label_vocabulary) if label_vocabulary is not None else np.shape(logits)[-1]
    expected = {
        "class_ids": (np.dtype(np.int64), (rows, 1)),
        "classes": (np.dtype(object), (rows, 1)),
        "logits": (np.dtype(np.float32), (rows, n_classes)),
        "probabilities": (np.dtype(np.float32), (rows, n_classes)),
    }
    for name, (dtype, shape) in expected.items():
        value = outputs[name]
        if not isinstance(value, np.ndarray) or value.dtype != dtype or value.shape != shape:
            got = f"{value.dtype} {list(value.shape)}" if isinstance(value, np.ndarray) else type(value).__name__
            raise UserError(f"{artefact}: output '{name}' must be {dtype} {list(shape)}, got {got}")
    for name in ("logits", "probabilities"):
        bad = ~np.isfinite(outputs[name])
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            kind = "NaN" if np.isnan(outputs[name]).any() else "Inf"
            raise UserError(f"{artefact}: output '{name}' has {int(bad.sum())} {kind} values (first in row {row})")
    class_ids = outputs["class_ids"][:, 0]
    if class_ids.min() < 0 or class_ids.max() >= n_classes:
        raise UserError(f"{artefact}: output 'class_ids' holds ids outside [0, {n_classes})")
    # A full-integer model's int8 logits can tie where float ones did not, so class ids are held
    # to the logits they came from rather than to a reference.
    picked = np.take_along_axis(logits, class_ids[:, None], axis=1)[:, 0]
    if (picked < logits.max(axis=1)).any():
        row = int(np.flatnonzero(picked < logits.max(axis=1))[0])
        raise UserError(f"{artefact}: output 'class_ids' is not the argmax of 'logits' (first in row {row})")
    classes = outputs["classes"][:, 0]
    if not all(isinstance(label, bytes) for label in classes[:1]):
        raise UserError(f"{artefact}: output 'classes' must hold bytes, got {type(classes[0]).__name__}")
    if label_vocabulary is not None:
        wrong = classes != vocabulary_array(label_vocabulary)[class_ids]
        if wrong.any():
            row = int(np.flatnonzero(wrong)[0])
            raise UserError(
                f"{artefact}: output 'classes' is {classes[row]!r} for class id {class_ids[row]} in row {row}, "
                f"expected {label_vocabulary[class_ids[row]]!r} (label vocabulary {list(label_vocabulary)})"
            )


class TFPredictor(Predictor):
    """A SavedModel signature through ``tf.saved_model.load``.

    TensorFlow's thread pools are process-wide and fixed at start-up, so ``threads`` is not applied
    here: set ``tf.config.threading`` before the first TensorFlow op (see ``scripts/bench_peers.py``).
    """

    format = "tf"

    def __init__(self, artefact: str, loaded, signature_fn, constant, load_seconds: float) -> None:
        super().__init__(artefact, load_seconds)
        self._loaded = loaded  # the signature's variables live as long as the loaded object
        self._signature = signature_fn
        self._constant = constant

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        threads: int = DEFAULT_THREADS,
        label_vocabulary: Sequence[str] | None = None,
        signature: str = "predict",
        name: str | None = None,
    ) -> Self:
        artefact = name or str(path)
        if not (Path(path) / "saved_model.pb").is_file():
            raise UserError(f"{artefact}: not a SavedModel (no saved_model.pb)")
        with native_output_silenced():
            import tensorflow as tf

            start = time.perf_counter()
            try:
                loaded = tf.saved_model.load(str(path), tags=["serve"])
            except (OSError, ValueError, tf.errors.OpError) as error:
                raise UserError(f"{artefact}: cannot load SavedModel ({first_line(error)})") from None
            seconds = time.perf_counter() - start
        if signature not in loaded.signatures:
            raise UserError(f"{artefact}: no signature '{signature}' (has {', '.join(sorted(loaded.signatures))})")
        return cls(artefact, loaded, loaded.signatures[signature], tf.constant, seconds)

    def __call__(self, features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = feature_arrays(self.artefact, features)
        outputs = self._signature(**{name: self._constant(a) for name, a in zip(FEATURE_NAMES, arrays)})
        return {name: value.numpy() for name, value in outputs.items()}


ARTEFACT_FILES = (("litert", "model.tflite"), ("onnx", "model.onnx"), ("openvino", "model.xml"))


def artefact_file(path: str | Path) -> tuple[str, Path]:
    """(format, file or directory to load) of an artefact given as its file or its directory."""
    path = Path(path)
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "tf", path
        for format_name, filename in ARTEFACT_FILES:
            if (path / filename).is_file():
                return format_name, path / filename
        raise UserError(f"{path}: no saved_model.pb, model.tflite, model.onnx or model.xml in the directory")
    suffixes = {".tflite": "litert", ".onnx": "onnx", ".xml": "openvino"}
    if path.suffix in suffixes and path.is_file():
        return suffixes[path.suffix], path
    raise UserError(f"{path}: not found, or not a SavedModel directory, .tflite, .onnx or OpenVINO .xml file")


def load_predictor(
    path: str | Path,
    *,
    threads: int = DEFAULT_THREADS,
    label_vocabulary: Sequence[str] | None = None,
    signature: str = "predict",
    name: str | None = None,
) -> Predictor:
    """Load any artefact: a SavedModel directory, or a ``model.tflite`` / ``model.onnx`` /
    ``model.xml`` (OpenVINO IR) file or the directory holding it (what ``convert_peer`` writes)."""
    format_name, target = artefact_file(path)
    kind: type[Predictor] = TFPredictor
    if format_name == "litert":
        from .litert import LiteRTPredictor

        kind = LiteRTPredictor
    elif format_name == "onnx":
        from .onnx_runtime import OnnxPredictor

        kind = OnnxPredictor
    elif format_name == "openvino":
        from .openvino import OpenVINOPredictor

        kind = OpenVINOPredictor
    return kind.load(target, threads=threads, label_vocabulary=label_vocabulary, signature=signature, name=name)
