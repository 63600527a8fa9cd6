"""The foundation every peer runtime builds on: the predictor interface, its one load-options type,
and the helpers that check inputs and outputs. It imports no runtime, so a runtime module imports
only this (and the format table), and nothing here imports a runtime module.

Nothing here knows one model: input and output keys, dtypes and shapes come from the signature
(or the artefact converted from it). The peers return the signature's numeric outputs (ONNX
Runtime and OpenVINO hand strings back as Python ``str``); given a label vocabulary, a peer
without a string ``classes`` output maps ``class_ids`` through it, so a classifier's peers return
the ``classes`` TensorFlow would.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

from ..errors import UserError

DEFAULT_THREADS = 2
DEFAULT_SIGNATURE = "serving_default"
# numpy dtypes of the signature dtype names a peer can feed (strings are never fed to a peer).
NUMPY_DTYPES = {
    "float16": np.float16, "float32": np.float32, "float64": np.float64, "int8": np.int8, "int16": np.int16,
    "int32": np.int32, "int64": np.int64, "uint8": np.uint8, "uint16": np.uint16, "bool": np.bool_,
}


@dataclass(frozen=True)
class LoadOptions:
    """How to load an artefact, whichever runtime serves it.

    ``threads``: the runtime's intra-op threads (TensorFlow's are process-wide, see ``tf``);
    ``label_vocabulary``: the labels a peer without a string ``classes`` output spells
    ``class_ids`` with; ``signature``: the SavedModel / LiteRT signature key; ``name``: what error
    messages call the artefact instead of its path (e.g. a temporary copy's final path).
    """

    threads: int = DEFAULT_THREADS
    label_vocabulary: tuple[str, ...] | None = None
    signature: str = DEFAULT_SIGNATURE
    name: str | None = None

    def __post_init__(self) -> None:
        if self.label_vocabulary is not None and not isinstance(self.label_vocabulary, tuple):
            # A frozen dataclass takes a tuple so that the options are immutable like the rest.
            object.__setattr__(self, "label_vocabulary", tuple(self.label_vocabulary))

    def artefact(self, path: str | Path) -> str:
        """What error messages call the artefact at ``path``."""
        return self.name or str(path)


class Predictor(abc.ABC):
    """A loaded artefact: ``predictor(inputs) -> {output key: array}``.

    ``artefact`` names the artefact in every error message; ``load_seconds`` is the wall time
    of ``load`` (reading, parsing and preparing the runtime for batch-1 calls); ``input_keys``
    are the keys a call needs. A runtime implements :meth:`open` and ``__call__``.
    """

    format: ClassVar[str]

    def __init__(self, artefact: str, load_seconds: float = 0.0, input_keys: Sequence[str] = ()) -> None:
        self.artefact = artefact
        self.load_seconds = load_seconds
        self.input_keys = tuple(input_keys)

    @classmethod
    def load(cls, path: str | Path, options: LoadOptions | None = None, **changes: Any) -> Self:
        """Load ``path`` with ``options``; keywords (the fields of :class:`LoadOptions`:
        ``threads``, ``label_vocabulary``, ``signature``, ``name``) change single options."""
        return cls.open(path, dataclasses.replace(options or LoadOptions(), **changes))

    @classmethod
    @abc.abstractmethod
    def open(cls, path: str | Path, options: LoadOptions) -> Self:
        """The runtime's load of ``path``; errors are one-line UserErrors naming ``options.artefact(path)``."""

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
