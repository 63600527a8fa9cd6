"""One predictor interface over a SavedModel signature and its peer artefacts: load an artefact,
call it on a dict of input arrays by the signature's input keys, get its outputs back by output
key, whichever runtime serves it. Nothing here knows one model: input and output keys, dtypes and
shapes come from the signature (or the artefact converted from it).

The peers return the signature's numeric outputs (ONNX Runtime and OpenVINO hand strings back as
Python ``str``); given a label vocabulary, a peer without a string ``classes`` output maps
``class_ids`` through it, so a classifier's peers return the ``classes`` TensorFlow would.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar, Self

import numpy as np

from ..errors import UserError, first_line
from ..runtime import native_output_silenced

DEFAULT_THREADS = 2
DEFAULT_SIGNATURE = "serving_default"
# numpy dtypes of the signature dtype names a peer can feed (strings are never fed to a peer).
NUMPY_DTYPES = {
    "float16": np.float16, "float32": np.float32, "float64": np.float64, "int8": np.int8, "int16": np.int16,
    "int32": np.int32, "int64": np.int64, "uint8": np.uint8, "uint16": np.uint16, "bool": np.bool_,
}


class Predictor(abc.ABC):
    """A loaded artefact: ``predictor(inputs) -> {output key: array}``.

    ``artefact`` names the artefact in every error message; ``load_seconds`` is the wall time
    of ``load`` (reading, parsing and preparing the runtime for batch-1 calls); ``input_keys``
    are the keys a call needs.
    """

    format: ClassVar[str]

    def __init__(self, artefact: str, load_seconds: float = 0.0, input_keys: Sequence[str] = ()) -> None:
        self.artefact = artefact
        self.load_seconds = load_seconds
        self.input_keys = tuple(input_keys)

    @classmethod
    @abc.abstractmethod
    def load(
        cls,
        path: str | Path,
        *,
        threads: int = DEFAULT_THREADS,
        label_vocabulary: Sequence[str] | None = None,
        signature: str = DEFAULT_SIGNATURE,
        name: str | None = None,
    ) -> Self:
        """Load ``path``; ``name`` replaces the path in error messages (e.g. a temporary copy)."""

    @abc.abstractmethod
    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs for the rows of ``inputs`` (one array per input key, rows first)."""

    def checked(
        self,
        inputs: Mapping[str, np.ndarray],
        label_vocabulary: Sequence[str] | None = None,
        expected: Mapping[str, tuple[str, list[int | None] | None]] | None = None,
        chunk_bytes: int | None = None,
    ) -> dict[str, np.ndarray]:
        """``self(inputs)``, validated by :func:`validate_outputs`; with ``chunk_bytes``, called on
        at most that many bytes of input rows at a time (:mod:`serving_optimiser.chunks`)."""
        from ..chunks import call_in_chunks

        input_rows(self.artefact, inputs, self.input_keys)
        outputs = call_in_chunks(self, inputs, chunk_bytes, self.artefact)
        validate_outputs(self.artefact, outputs, input_rows(self.artefact, inputs, self.input_keys),
                         label_vocabulary, expected)
        return outputs


def input_rows(artefact: str, inputs: Mapping[str, np.ndarray], keys: Sequence[str] = ()) -> int:
    """The row count of ``inputs``: every key of ``keys`` present, every array non-empty with the
    same first dimension."""
    missing = [key for key in keys if key not in inputs]
    if missing:
        raise UserError(f"{artefact}: missing input(s) {', '.join(missing)}")
    shapes = {key: np.shape(inputs[key]) for key in (keys or inputs)}
    rows = {shape[0] if shape else None for shape in shapes.values()}
    if len(rows) != 1 or None in rows or 0 in rows:
        got = ", ".join(f"{key} {list(shape)}" for key, shape in shapes.items())
        raise UserError(f"{artefact}: inputs must be non-empty arrays with one row count, got {got}")
    return rows.pop()


def input_arrays(
    artefact: str, inputs: Mapping[str, np.ndarray], dtypes: Mapping[str, object]
) -> dict[str, np.ndarray]:
    """The inputs a runtime takes, by key, as contiguous arrays of its dtypes (no copy when they
    already are)."""
    input_rows(artefact, inputs, list(dtypes))
    return {key: np.ascontiguousarray(inputs[key], dtype=dtype) for key, dtype in dtypes.items()}


def saved_model_signature(exported: str | Path, signature: str):
    """The :class:`~serving_optimiser.saved_model.model.SignatureInfo` of ``exported``'s
    ``signature`` (read from its protobuf, nothing run), or a one-line error naming both."""
    from ..saved_model.reader import read_meta_graph, signature_info_from_proto

    meta_graph = read_meta_graph(str(exported))
    if signature not in meta_graph.signature_def:
        raise UserError(f"{exported}: no signature '{signature}' (has {', '.join(sorted(meta_graph.signature_def))})")
    return signature_info_from_proto(signature, meta_graph.signature_def[signature])


def numeric_outputs(exported: str | Path, signature: str) -> list[str]:
    """The output keys of ``signature`` that a peer keeps: every one but the string outputs."""
    info = saved_model_signature(exported, signature)
    return sorted(key for key, tensor in info.outputs.items() if tensor.dtype != "string")


def vocabulary_array(label_vocabulary: Sequence[str]) -> np.ndarray:
    """The vocabulary as an object array of bytes, so ``array[class_ids]`` gives TF's ``classes``."""
    return np.array([label.encode() for label in label_vocabulary], dtype=object)


def with_classes(outputs: dict[str, np.ndarray], vocabulary: np.ndarray | None) -> dict[str, np.ndarray]:
    """``outputs`` plus ``classes`` from ``class_ids`` and the vocabulary, where they have ids, the
    vocabulary is known and they lack the string output."""
    if vocabulary is not None and "class_ids" in outputs and "classes" not in outputs:
        # An out-of-range id is left for validate_outputs to name rather than failing the take here.
        outputs["classes"] = vocabulary.take(outputs["class_ids"], mode="clip")
    return outputs


def _shape_text(shape) -> str:
    return str(["?" if d is None else d for d in shape]) if shape is not None else "of any rank"


def validate_outputs(
    artefact: str,
    outputs: Mapping[str, np.ndarray],
    rows: int,
    label_vocabulary: Sequence[str] | None = None,
    expected: Mapping[str, tuple[str, list[int | None] | None]] | None = None,
) -> None:
    """Raise a one-line UserError naming ``artefact`` unless ``outputs`` are valid for ``rows`` rows.

    Every output: numpy, ``rows`` rows first, float ones finite. ``expected`` (output key ->
    (dtype name, shape with None for any size), the signature's): each present, with that dtype and
    shape, rows in the first dimension where it is None. A classifier head (``class_ids`` beside
    ``logits``, ``classes``): ids in range and the argmax of the logits, classes spelling the
    vocabulary's labels.
    """
    missing = [key for key in expected or () if key not in outputs]
    if missing:
        raise UserError(f"{artefact}: missing output(s) {', '.join(missing)} (has {', '.join(sorted(outputs))})")
    for key, (dtype, shape) in (expected or {}).items():
        value = outputs[key]
        want_dtype = np.dtype(object) if dtype == "string" else np.dtype(NUMPY_DTYPES.get(dtype, dtype))
        want_shape = None if shape is None else [rows if i == 0 and d is None else d for i, d in enumerate(shape)]
        fits = isinstance(value, np.ndarray) and value.dtype == want_dtype and (
            want_shape is None or (value.ndim == len(want_shape)
                                   and all(d is None or d == s for d, s in zip(want_shape, value.shape))))
        if not fits:
            got = f"{value.dtype} {list(value.shape)}" if isinstance(value, np.ndarray) else type(value).__name__
            raise UserError(f"{artefact}: output '{key}' must be {want_dtype} {_shape_text(want_shape)}, got {got}")
    for key, value in outputs.items():
        if not isinstance(value, np.ndarray) or value.ndim == 0 or value.shape[0] != rows:
            got = f"shape {list(value.shape)}" if isinstance(value, np.ndarray) else type(value).__name__
            raise UserError(f"{artefact}: output '{key}' must have {rows} rows first, got {got}")
    for key, value in outputs.items():
        if value.dtype.kind not in "fc":
            continue
        bad = ~np.isfinite(value)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            kind = "NaN" if np.isnan(value).any() else "Inf"
            raise UserError(f"{artefact}: output '{key}' has {int(bad.sum())} {kind} values (first in row {row})")
    if "class_ids" in outputs and "logits" in outputs:
        _check_classifier_head(artefact, outputs, label_vocabulary)


def _check_classifier_head(artefact: str, outputs: Mapping[str, np.ndarray], label_vocabulary) -> None:
    logits = outputs["logits"]
    n_classes = len(label_vocabulary) if label_vocabulary is not None else np.shape(logits)[-1]
    class_ids = outputs["class_ids"].reshape(len(logits), -1)[:, 0]
    if class_ids.min() < 0 or class_ids.max() >= n_classes:
        raise UserError(f"{artefact}: output 'class_ids' holds ids outside [0, {n_classes})")
    # A full-integer model's int8 logits can tie where float ones did not, so class ids are held
    # to the logits they came from rather than to a reference.
    picked = np.take_along_axis(logits, class_ids[:, None], axis=1)[:, 0]
    if (picked < logits.max(axis=1)).any():
        row = int(np.flatnonzero(picked < logits.max(axis=1))[0])
        raise UserError(f"{artefact}: output 'class_ids' is not the argmax of 'logits' (first in row {row})")
    if "classes" not in outputs:
        return
    classes = outputs["classes"].reshape(len(logits), -1)[:, 0]
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
        specs = signature_fn.structured_input_signature[1]
        super().__init__(artefact, load_seconds, sorted(specs))
        self._loaded = loaded  # the signature's variables live as long as the loaded object
        self._signature = signature_fn
        self._constant = constant
        self._dtypes = {key: spec.dtype for key, spec in specs.items()}

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        threads: int = DEFAULT_THREADS,
        label_vocabulary: Sequence[str] | None = None,
        signature: str = DEFAULT_SIGNATURE,
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

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        input_rows(self.artefact, inputs, self.input_keys)
        tensors = {key: self._constant(np.asarray(inputs[key]), dtype=dtype) for key, dtype in self._dtypes.items()}
        outputs = self._signature(**tensors)
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
    signature: str = DEFAULT_SIGNATURE,
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
