"""LiteRT peers: the exported SavedModel through TF 2.21's ``tf.lite.TFLiteConverter`` (fp32,
fp16 weights, int8 dynamic range, full-integer int8), served by ai-edge-litert's interpreter.

The converted model keeps every output of the signature, string ones included: LiteRT holds
string tensors (the Iris export's Gather on its vocabulary returns the same bytes as TensorFlow's).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np

from ..errors import UserError, first_line
from ..runtime import native_output_silenced
from .base import DEFAULT_SIGNATURE, LoadOptions, Predictor, input_arrays, input_rows
from .formats import FORMATS

QUANTIZATIONS = FORMATS["litert"].quantizations
FILENAME = FORMATS["litert"].filename


def litert_model_bytes(
    exported: str | Path,
    quantization: str,
    calibration: Mapping[str, np.ndarray] | None = None,
    signature: str = DEFAULT_SIGNATURE,
) -> bytes:
    """The ``.tflite`` flatbuffer of ``exported``'s ``signature``.

    - ``none``: float32 throughout.
    - ``float16``: weights stored as float16, dequantized to float32 when the model is prepared.
    - ``int8_dynamic``: the converter's dynamic range quantization: weight tensors of at least 1024
      elements stored as int8, activations quantized on the fly per call; smaller tensors stay float.
    - ``int8_full``: every op in int8 (``TFLITE_BUILTINS_INT8``, so an op without an int8 kernel
      fails the conversion instead of silently staying float), activation ranges calibrated on the
      rows of ``calibration``, one row per step. Inputs and outputs stay float32, quantized and
      dequantized at the model's boundary, so callers and the four outputs' dtypes do not change.
    """
    if quantization not in QUANTIZATIONS:
        raise UserError(f"LiteRT quantization '{quantization}' is not one of {', '.join(QUANTIZATIONS)}")
    if quantization == "int8_full" and not calibration:
        raise UserError("LiteRT int8_full needs calibration rows")
    with native_output_silenced():
        import tensorflow as tf

        converter = tf.lite.TFLiteConverter.from_saved_model(str(exported), signature_keys=[signature])
        if quantization != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization == "float16":
            converter.target_spec.supported_types = [tf.float16]
        elif quantization == "int8_full":
            converter.representative_dataset = lambda: _calibration_rows(calibration)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # ConverterError is not exported under tf.lite; it derives from Exception only.
        from tensorflow.lite.python.convert_phase import ConverterError

        try:
            return bytes(converter.convert())
        except (ConverterError, ValueError, RuntimeError) as error:
            raise UserError(f"{exported}: LiteRT conversion ({quantization}) failed: {first_line(error)}") from None


def _calibration_rows(calibration: Mapping[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """One row per step, every input of the signature (the converter matches them by key)."""
    rows = input_rows("LiteRT calibration", calibration)
    for index in range(rows):
        yield {key: np.asarray(values[index : index + 1]) for key, values in calibration.items()}


@dataclass
class _Prepared:
    """An interpreter allocated for one batch size, with its tensor indices."""

    interpreter: object
    inputs: dict[str, int]
    outputs: list[tuple[str, int]]


class LiteRTPredictor(Predictor):
    """A ``.tflite`` model through ``ai_edge_litert.interpreter.Interpreter`` (XNNPACK on CPU).

    Resizing an interpreter's inputs reallocates its tensors and re-prepares the delegate, so one
    interpreter is kept per batch size (the last ``max_shapes``): switching between a 100,000-row
    batch and batch-1 calls never reallocates, and a batch-1 call is set_tensor, invoke, get_tensor.
    """

    format = "litert"
    max_shapes = 2

    def __init__(self, artefact: str, content: bytes, threads: int, signature: str) -> None:
        super().__init__(artefact)
        self._content = content
        self._threads = threads
        self._signature = signature
        self._prepared: OrderedDict[int, _Prepared] = OrderedDict()
        self._dtypes: dict[str, object] = {}

    @classmethod
    def open(cls, path: str | Path, options: LoadOptions) -> Self:
        artefact = options.artefact(path)
        start = time.perf_counter()
        try:
            content = Path(path).read_bytes()
        except OSError as error:
            raise UserError(f"{artefact}: cannot read ({error.strerror})") from None
        predictor = cls(artefact, content, options.threads, options.signature)
        predictor._prepare({}, 1)
        predictor.load_seconds = time.perf_counter() - start
        return predictor

    def _prepare(self, inputs: Mapping[str, np.ndarray], rows: int) -> _Prepared:
        """The interpreter for ``rows`` rows; each input resized to its array's shape (to the
        signature's shape with ``rows`` first before the first call: the load's batch-1 set-up)."""
        prepared = self._prepared.get(rows)
        if prepared is not None:
            self._prepared.move_to_end(rows)
            return prepared
        with native_output_silenced():
            from ai_edge_litert.interpreter import Interpreter

            try:
                interpreter = Interpreter(model_content=self._content, num_threads=self._threads)
            except ValueError as error:
                raise UserError(f"{self.artefact}: not a valid LiteRT model ({first_line(error)})") from None
            signatures = interpreter.get_signature_list()
            if self._signature not in signatures:
                raise UserError(
                    f"{self.artefact}: no signature '{self._signature}' (has {', '.join(sorted(signatures)) or 'none'})"
                )
            runner = interpreter.get_signature_runner(self._signature)
            input_details, output_details = runner.get_input_details(), runner.get_output_details()
            # The runner holds the interpreter's internals, and resizing refuses while anything does.
            del runner
            self.input_keys = tuple(sorted(input_details))
            self._dtypes = {key: input_details[key]["dtype"] for key in self.input_keys}
            for key in self.input_keys:
                detail = input_details[key]
                shape = list(np.shape(inputs[key])) if key in inputs else [rows, *detail["shape_signature"][1:]]
                if any(d < 0 for d in shape):
                    shape = [rows, *(max(d, 1) for d in detail["shape"][1:])]
                interpreter.resize_tensor_input(detail["index"], shape, strict=True)
            interpreter.allocate_tensors()
        prepared = _Prepared(interpreter, {key: input_details[key]["index"] for key in self.input_keys},
                             [(key, detail["index"]) for key, detail in output_details.items()])
        self._prepared[rows] = prepared
        if len(self._prepared) > self.max_shapes:
            self._prepared.popitem(last=False)
        return prepared

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = input_rows(self.artefact, inputs, self.input_keys)
        prepared = self._prepare(inputs, rows)
        interpreter = prepared.interpreter
        for key, array in input_arrays(self.artefact, inputs, self._dtypes).items():
            interpreter.set_tensor(prepared.inputs[key], array)
        interpreter.invoke()
        # get_tensor copies: the next call reuses the interpreter's buffers.
        return {key: interpreter.get_tensor(index) for key, index in prepared.outputs}


def convert(
    exported: str | Path, quantization: str, calibration: Mapping[str, np.ndarray] | None, signature: str
) -> dict[str, bytes]:
    """The artefact's one file (the format table's runtime interface; see :func:`litert_model_bytes`)."""
    return {FILENAME: litert_model_bytes(exported, quantization, calibration, signature)}


PREDICTOR = LiteRTPredictor
