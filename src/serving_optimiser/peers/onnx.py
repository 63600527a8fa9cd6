"""ONNX peers: the exported SavedModel through tf2onnx (fp32) and onnxruntime's
``quantize_dynamic`` (int8 weights, activations quantized per call), served by an ONNX Runtime
session.

The ONNX model keeps the signature's numeric outputs but not its string ones (the Iris export's
``classes``): ONNX Runtime hands string tensors back as Python ``str`` objects, so matching
TensorFlow's bytes would re-encode every row on every call; mapping ``class_ids`` through the
label vocabulary gives the same bytes at the cost of one numpy take.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Self

import numpy as np

from ..errors import UserError, first_line
from ..runtime import native_output_silenced
from .base import (
    DEFAULT_SIGNATURE,
    NUMPY_DTYPES,
    LoadOptions,
    Predictor,
    input_arrays,
    numeric_outputs,
    vocabulary_array,
    with_classes,
)
from .formats import FORMATS

QUANTIZATIONS = FORMATS["onnx"].quantizations
FILENAME = FORMATS["onnx"].filename
# ONNX Runtime's input type names -> numpy dtypes
ONNX_TYPES = {f"tensor({name.replace('float32', 'float').replace('float64', 'double')})": dtype
              for name, dtype in NUMPY_DTYPES.items()}


def onnx_model_bytes(exported: str | Path, quantization: str, opset: int, signature: str = DEFAULT_SIGNATURE) -> bytes:
    """The ``.onnx`` protobuf of ``exported``'s ``signature``, inputs and outputs named as the signature's.

    - ``none``: tf2onnx's float32 conversion of the frozen signature.
    - ``int8_dynamic``: that model through ``onnxruntime.quantization.quantize_dynamic`` with
      signed int8 weights, one scale per tensor (its defaults): MatMul becomes
      DynamicQuantizeLinear + MatMulInteger, whatever the weight's size.
    """
    if quantization not in QUANTIZATIONS:
        raise UserError(f"ONNX quantization '{quantization}' is not one of {', '.join(QUANTIZATIONS)}")
    with native_output_silenced():
        from tf2onnx import convert, tf_loader, utils

        # tf2onnx numbers the names it makes from a module-level counter; restart it so a second
        # conversion in one process names (and so serialises) its nodes as a fresh process does.
        utils.INTERNAL_NAME = 1
        graph_def, inputs, outputs, renames = tf_loader.from_saved_model(
            str(exported), None, None, tag=["serve"], signatures=[signature], return_tensors_to_rename=True
        )
        numeric = numeric_outputs(exported, signature)
        kept = [tensor for tensor in outputs if renames.get(tensor) in numeric]
        if not kept:
            raise UserError(f"{exported}: signature '{signature}' has no numeric output for ONNX")
        try:
            model, _ = convert.from_graph_def(
                graph_def, name=signature, input_names=inputs, output_names=kept, opset=opset, tensors_to_rename=renames
            )
        except (ValueError, NotImplementedError, RuntimeError) as error:
            raise UserError(f"{exported}: tf2onnx conversion (opset {opset}) failed: {first_line(error)}") from None
        _stable_initializer_names(model)
        if quantization == "none":
            return model.SerializeToString()
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory(prefix="onnx-int8-") as scratch:
            target = Path(scratch) / "model.onnx"
            quantize_dynamic(model, target, weight_type=QuantType.QInt8, per_channel=False)
            return target.read_bytes()


def _stable_initializer_names(model) -> None:
    """Rename the graph's initializers to ``<base>__<k>`` by order of first use, in place.

    tf2onnx merges identical constants and keeps whichever one a set yields first, so the
    survivor's counter suffix (``const_axes__12`` or ``__16``) follows PYTHONHASHSEED and the same
    conversion gives different bytes in different processes. Node order and every other name are
    stable; the model has no subgraphs (If/Loop bodies) whose inputs would need renaming too.
    """
    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    first_use = []
    for node in graph.node:
        first_use += [name for name in node.input if name in initializers and name not in first_use]
    first_use += [tensor.name for tensor in graph.initializer if tensor.name not in first_use]
    taken = {name for node in graph.node for name in (*node.input, *node.output)} - initializers
    taken |= {value.name for value in (*graph.input, *graph.output)}
    counts: dict[str, int] = {}
    renames = {}
    for name in first_use:
        base = re.sub(r"__\d+$", "", name)
        counts[base] = counts.get(base, -1) + 1
        renames[name] = f"{base}__{counts[base]}"
        if renames[name] in taken:
            raise RuntimeError(f"ONNX initializer rename {name!r} -> {renames[name]!r} collides with a tensor name")
    for tensor in graph.initializer:
        tensor.name = renames[tensor.name]
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
    for value in graph.value_info:
        value.name = renames.get(value.name, value.name)


class OnnxPredictor(Predictor):
    """A ``.onnx`` model through an ONNX Runtime CPU session: ``threads`` intra-op threads, one
    inter-op thread, sequential execution, all graph optimisations. Given ``label_vocabulary``,
    ``classes`` comes from ``class_ids`` (see :func:`~serving_optimiser.peers.base.with_classes`)."""

    format = "onnx"

    def __init__(self, artefact: str, session, vocabulary: np.ndarray | None, load_seconds: float) -> None:
        self._dtypes = {node.name: ONNX_TYPES.get(node.type, np.float32) for node in session.get_inputs()}
        super().__init__(artefact, load_seconds, sorted(self._dtypes))
        self._session = session
        self._outputs = [node.name for node in session.get_outputs()]
        self._vocabulary = vocabulary

    @classmethod
    def open(cls, path: str | Path, options: LoadOptions) -> Self:
        artefact = options.artefact(path)
        with native_output_silenced():
            import onnxruntime as ort
            from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

            session_options = ort.SessionOptions()
            session_options.intra_op_num_threads = options.threads
            session_options.inter_op_num_threads = 1
            session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            session_options.log_severity_level = 3
            start = time.perf_counter()
            try:
                session = ort.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
            except (
                ort_errors.InvalidProtobuf,
                ort_errors.InvalidGraph,
                ort_errors.Fail,
                ort_errors.NoSuchFile,
                ort_errors.InvalidArgument,
                ort_errors.NotImplemented,
            ) as error:
                raise UserError(f"{artefact}: not a valid ONNX model ({first_line(error)})") from None
            seconds = time.perf_counter() - start
        vocabulary = vocabulary_array(options.label_vocabulary) if options.label_vocabulary else None
        return cls(artefact, session, vocabulary, seconds)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._session.run(self._outputs, input_arrays(self.artefact, inputs, self._dtypes))
        return with_classes(dict(zip(self._outputs, values)), self._vocabulary)


def convert(
    exported: str | Path, quantization: str, calibration: Mapping[str, np.ndarray] | None, signature: str,
    opset: int,
) -> dict[str, bytes]:
    """The artefact's one file (the format table's runtime interface; see :func:`onnx_model_bytes`;
    nothing is calibrated)."""
    return {FILENAME: onnx_model_bytes(exported, quantization, opset, signature)}


PREDICTOR = OnnxPredictor
