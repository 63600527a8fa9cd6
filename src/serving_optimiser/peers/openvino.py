"""OpenVINO peers: the exported SavedModel through ``openvino.convert_model`` (fp32) and NNCF's
post-training quantisation (int8), written as OpenVINO IR (``model.xml`` + ``model.bin``) and
served by OpenVINO's CPU plugin.

``convert_model`` reads a SavedModel's ``serving_default`` signature only (the Iris export defines
it as the same signature as ``predict``), so another signature converts only where
``serving_default`` is the same one. Like the ONNX peers, the IR keeps the numeric outputs but not
the string ones (the Iris export's ``classes``): OpenVINO hands string tensors back as numpy
``str`` arrays, so matching TensorFlow's bytes would re-encode every row on every call; mapping
``class_ids`` through the label vocabulary gives the same bytes with one numpy take.

OpenVINO and NNCF send usage telemetry when ``openvino_telemetry`` imports; every import here
runs with that module blocked, so both fall back to their built-in no-op stubs and nothing is
sent or written to the home directory.
"""

from __future__ import annotations

import contextlib
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Self

import numpy as np

from ..errors import UserError, first_line
from ..runtime import native_output_silenced
from .base import (
    DEFAULT_SIGNATURE,
    LoadOptions,
    Predictor,
    input_arrays,
    input_rows,
    saved_model_signature,
    vocabulary_array,
    with_classes,
)
from .formats import FORMATS

QUANTIZATIONS = FORMATS["openvino"].quantizations
FILES = FORMATS["openvino"].files
# What every OpenVINO peer is compiled with (serving.md's fair settings): latency over
# throughput, a fixed thread count, and float32 for the layers that are float. Without the
# precision hint OpenVINO runs float layers in bf16 wherever the CPU has AVX512_BF16 or AMX, so
# the fp32 peer would not be fp32, and the int8 peer's float layers would differ per CPU.
PRECISION = "f32"


@contextlib.contextmanager
def _openvino_quiet() -> Iterator[None]:
    """Native output silenced and telemetry off (``openvino_telemetry`` unimportable) for the block."""
    blocked = "openvino_telemetry" not in sys.modules
    if blocked:
        sys.modules["openvino_telemetry"] = None  # an import of it now raises ImportError
    try:
        with native_output_silenced():
            yield
    finally:
        if blocked and sys.modules.get("openvino_telemetry", 0) is None:
            del sys.modules["openvino_telemetry"]


def compile_config(threads: int) -> dict[str, object]:
    return {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": PRECISION}


def _numeric_model(exported: str | Path, signature: str):
    """``exported`` as an ``openvino.Model`` with the numeric outputs of ``signature`` only."""
    import openvino as ov

    wanted = saved_model_signature(exported, signature)
    if signature != DEFAULT_SIGNATURE:
        default = saved_model_signature(exported, DEFAULT_SIGNATURE) if _has_signature(exported) else None
        if default is None or (default.inputs, default.outputs) != (wanted.inputs, wanted.outputs):
            raise UserError(
                f"{exported}: OpenVINO converts only the '{DEFAULT_SIGNATURE}' signature, which is not '{signature}'"
            )
    try:
        model = ov.convert_model(str(exported))
    except (RuntimeError, ValueError, OSError) as error:
        raise UserError(f"{exported}: OpenVINO conversion failed: {first_line(error)}") from None
    outputs = {name: output for output in model.outputs for name in output.get_names()}
    numeric = sorted(key for key, tensor in wanted.outputs.items() if tensor.dtype != "string")
    missing = [name for name in numeric if name not in outputs]
    if missing:
        raise UserError(
            f"{exported}: serving_default lacks output(s) {', '.join(missing)} (has {', '.join(sorted(outputs))})"
        )
    inputs = {name for parameter in model.get_parameters() for name in parameter.output(0).get_names()}
    if not set(wanted.inputs) <= inputs:
        raise UserError(
            f"{exported}: serving_default inputs are {', '.join(sorted(inputs))}, expected {', '.join(wanted.inputs)}"
        )
    numeric_model = ov.Model([outputs[name] for name in numeric], model.get_parameters(), signature)
    stable_names(numeric_model)
    return numeric_model


def _has_signature(exported: str | Path) -> bool:
    from ..saved_model.reader import read_meta_graph

    return DEFAULT_SIGNATURE in read_meta_graph(str(exported)).signature_def


_AUTOMATIC_NAME = re.compile(r"([A-Za-z][A-Za-z0-9]*)_\d+")


def stable_names(model) -> None:
    """Renumber the names OpenVINO made up (``Constant_3026``, ``Unsqueeze_17``), in place, by
    order in the graph: it numbers them from a process-wide counter, so a second conversion in
    one process would name (and so serialise) its nodes differently from the first. Names that
    came from the SavedModel (``dnn/hiddenlayer_0/MatMul``, the features) have no such shape."""
    ops = model.get_ordered_ops()
    kept = {op.get_friendly_name() for op in ops if not _AUTOMATIC_NAME.fullmatch(op.get_friendly_name())}
    counters: dict[str, int] = {}
    for op in ops:
        match = _AUTOMATIC_NAME.fullmatch(op.get_friendly_name())
        if match is None:
            continue
        prefix = match.group(1)
        while True:
            counters[prefix] = counters.get(prefix, -1) + 1
            name = f"{prefix}_{counters[prefix]}"
            if name not in kept:
                break
        op.set_friendly_name(name)


def narrow_matmuls(model, minimum_dim: int) -> list[str]:
    """Names of the MatMuls whose constant weight has a dimension under ``minimum_dim``.

    The same rule as ``quantize_matmuls(minimum_dim=32)``: the 4-feature input layer and the
    3-class logits layer stay float, because int8 does not pay there and (measured on the Iris
    export) the input layer causes most of the 8-bit error.
    """
    names = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        weight = op.input_value(1).get_node()
        if weight.get_type_name() == "Constant" and min(weight.get_output_shape(0)) < minimum_dim:
            names.append(op.get_friendly_name())
    return names


def _quantised(model, calibration: Mapping[str, np.ndarray], minimum_dim: int):
    """``model`` through ``nncf.quantize``: one calibration item per row, activation ranges the
    min and max over all rows (NNCF's default takes the mean of per-item extremes, which clips
    every row beyond the average and, measured here, flips 2.4 % of 100,000 classes; the
    calibrate stage and LiteRT's int8_full use the full range too), narrow layers float."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    rows = input_rows("OpenVINO calibration", calibration)
    items = [{key: np.asarray(values[i : i + 1]) for key, values in calibration.items()} for i in range(rows)]
    ignored = narrow_matmuls(model, minimum_dim)
    return nncf.quantize(
        model,
        nncf.Dataset(items),
        subset_size=rows,
        ignored_scope=nncf.IgnoredScope(names=ignored) if ignored else None,
        advanced_parameters=AdvancedQuantizationParameters(
            activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX
        ),
    )


def openvino_model_files(
    exported: str | Path,
    quantization: str,
    calibration: Mapping[str, np.ndarray] | None = None,
    minimum_dim: int | None = None,
    signature: str = DEFAULT_SIGNATURE,
) -> dict[str, bytes]:
    """The IR files (``model.xml``, ``model.bin``) of ``exported``.

    - ``none``: ``convert_model`` in float32 (weights kept float32 on disk: ``save_model``
      would otherwise compress them to float16).
    - ``int8``: that model through NNCF's post-training quantisation (``nncf.quantize``,
      FakeQuantize on the weights and inputs of every MatMul whose weight is at least
      ``minimum_dim`` wide, symmetric int8 weights per output channel, activation ranges the
      min/max of the ``calibration`` rows); the CPU plugin runs those MatMuls in int8.
    """
    if quantization not in QUANTIZATIONS:
        raise UserError(f"OpenVINO quantization '{quantization}' is not one of {', '.join(QUANTIZATIONS)}")
    if quantization == "int8" and (not calibration or minimum_dim is None):
        raise UserError("OpenVINO int8 needs calibration rows and minimum_dim")
    with _openvino_quiet():
        import openvino as ov

        model = _numeric_model(exported, signature)
        if quantization == "int8":
            model = _quantised(model, calibration, minimum_dim)
            stable_names(model)
        with tempfile.TemporaryDirectory(prefix="openvino-") as scratch:
            target = Path(scratch) / FILES[0]
            ov.save_model(model, str(target), compress_to_fp16=False)
            return {name: (Path(scratch) / name).read_bytes() for name in FILES}


def _tensor_key(names: set[str]) -> str:
    """The key of an IR input or output among its tensor names: the signature's key (no ``:`` or
    ``/``, unlike the graph tensor names OpenVINO keeps beside it)."""
    plain = sorted(name for name in names if ":" not in name and "/" not in name)
    return (plain or sorted(names))[0]


class OpenVINOPredictor(Predictor):
    """An OpenVINO IR (``model.xml`` with ``model.bin`` beside it) compiled for the CPU plugin with
    :func:`compile_config`, one infer request reused for every call. Given ``label_vocabulary``,
    ``classes`` comes from ``class_ids`` (see :func:`~serving_optimiser.peers.base.with_classes`)."""

    format = "openvino"

    def __init__(self, artefact: str, compiled, vocabulary: np.ndarray | None, load_seconds: float) -> None:
        self._dtypes = {_tensor_key(node.get_names()): node.get_element_type().to_dtype() for node in compiled.inputs}
        super().__init__(artefact, load_seconds, sorted(self._dtypes))
        self.compiled = compiled
        self._request = compiled.create_infer_request()
        self._outputs = [(_tensor_key(node.get_names()), node) for node in compiled.outputs]
        self._vocabulary = vocabulary

    @classmethod
    def open(cls, path: str | Path, options: LoadOptions) -> Self:
        artefact = options.artefact(path)
        weights = Path(path).with_suffix(".bin")
        if not weights.is_file():
            raise UserError(f"{artefact}: no {weights.name} beside it (an OpenVINO IR is model.xml + model.bin)")
        with _openvino_quiet():
            import openvino as ov

            start = time.perf_counter()
            try:
                core = ov.Core()
                compiled = core.compile_model(core.read_model(str(path), str(weights)), "CPU",
                                              compile_config(options.threads))
            except RuntimeError as error:
                raise UserError(f"{artefact}: not a valid OpenVINO model ({first_line(error)})") from None
            seconds = time.perf_counter() - start
        vocabulary = vocabulary_array(options.label_vocabulary) if options.label_vocabulary else None
        return cls(artefact, compiled, vocabulary, seconds)

    def runtime_precisions(self) -> dict[str, set[str]]:
        """What the CPU plugin runs each kind of layer in (its runtime model: ``FullyConnected``:
        {'f32'} or {'i8', 'u8'}, ...), for checking what the precision hint and NNCF did."""
        precisions: dict[str, set[str]] = {}
        for op in self.compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            precisions.setdefault(info["layerType"].astype(str), set()).add(info["runtimePrecision"].astype(str))
        return precisions

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # share_inputs: no copy of the rows; the outputs are copied, the next call reuses the buffers.
        results = self._request.infer(input_arrays(self.artefact, inputs, self._dtypes), share_inputs=True)
        return with_classes({key: results[output] for key, output in self._outputs}, self._vocabulary)


def convert(
    exported: str | Path, quantization: str, calibration: Mapping[str, np.ndarray] | None, signature: str,
    minimum_dim: int | None = None,
) -> dict[str, bytes]:
    """The artefact's files (the format table's runtime interface; see :func:`openvino_model_files`)."""
    return openvino_model_files(exported, quantization, calibration, minimum_dim, signature)


PREDICTOR = OpenVINOPredictor
