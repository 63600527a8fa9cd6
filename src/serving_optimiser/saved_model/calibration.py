"""Calibrating quantize_matmuls and quantize_convs on a frozen model, through the model's own call
path: the graph as it is at that point of the transform list is written as a SavedModel whose one
signature returns the tensors to measure, loaded with ``tf.saved_model.load`` and called like the
comparison calls a model (so functional While loops, lookup tables and string inputs work).

Two passes over the calibration rows: the first records each candidate tensor's min and max (the
ranges), the second feeds every layer the transform would take its float input and compares the
int8 layer's answer with the float one (each layer's int8 output error, see
:mod:`serving_optimiser.graph_transforms.calibration`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from tensorflow.core.framework import graph_pb2

from ..chunks import DEFAULT_CHUNK_BYTES, rows_per_call
from ..graph_transforms.calibration import Calibration, ErrorMeter
from ..graph_transforms.graph_utils import canonical_input_name, lowered_control_flow_nodes, parse_input
from .compare import DEFAULT_TIMEOUT_S, _as_tensor, call_with_time_limit
from .errors import SavedModelError, tensorflow_errors
from .model import FrozenModel, SignatureInfo, TensorInfo

log = logging.getLogger(__name__)

CALIBRATED_TRANSFORMS = ("quantize_matmuls", "quantize_convs")
DEFAULT_BATCH_ROWS = 64
_SIGNATURE = "calibration"

Inputs = Mapping[str, Mapping[str, np.ndarray]]


def _probe_builder(transform: str):
    from ..graph_transforms.transforms import quantize_convs, quantize_matmuls

    builders = {"quantize_matmuls": quantize_matmuls.layer_probes, "quantize_convs": quantize_convs.layer_probes}
    if transform not in builders:
        raise SavedModelError(f"cannot calibrate '{transform}': only {', '.join(CALIBRATED_TRANSFORMS)} are calibrated")
    return builders[transform]


def _placeholder_ancestors(graph_def: graph_pb2.GraphDef) -> dict[str, frozenset[str]]:
    """Node -> the Placeholders it depends on (through data and control inputs; forward from each
    Placeholder, so the cycles of lowered loops need no special case)."""
    readers: dict[str, list[str]] = {}
    for node in graph_def.node:
        for input_string in node.input:
            readers.setdefault(parse_input(input_string)[1], []).append(node.name)
    found: dict[str, set[str]] = {}
    for placeholder in (node.name for node in graph_def.node if node.op == "Placeholder"):
        stack, seen = [placeholder], {placeholder}
        while stack:
            name = stack.pop()
            found.setdefault(name, set()).add(placeholder)
            for reader in readers.get(name, []):
                if reader not in seen:
                    seen.add(reader)
                    stack.append(reader)
    return {name: frozenset(sources) for name, sources in found.items()}


class _Runner:
    """Calls the frozen graph, per signature of the calibration inputs, for a set of tensors."""

    def __init__(self, frozen: FrozenModel, inputs: Inputs, batch_rows: int, timeout_s: float,
                 chunk_bytes: int | None = DEFAULT_CHUNK_BYTES) -> None:
        self.frozen, self.inputs, self.batch_rows, self.timeout_s = frozen, inputs, batch_rows, timeout_s
        self.chunk_bytes = chunk_bytes
        self.ancestors = _placeholder_ancestors(frozen.graph_def)

    def batches(self, tensors: list[str]):
        """Yields ``{tensor: array}`` per batch of calibration rows (``batch_rows``, fewer where
        they would hold more than ``chunk_bytes`` of input), each tensor from the signatures whose
        inputs compute it."""
        import tensorflow as tf

        for key, feeds in sorted(self.inputs.items()):
            signature = self.frozen.signatures[key]
            fed = {info.name: name for name, info in signature.inputs.items()}
            fed.update({canonical_input_name(info.name): name for name, info in signature.inputs.items()})
            reachable = {info.node_name for info in signature.inputs.values()}
            wanted = [t for t in tensors if t in fed or self.ancestors.get(parse_input(t)[1], frozenset()) <= reachable]
            fetched = [t for t in wanted if t not in fed]
            if not wanted:
                continue
            with tempfile.TemporaryDirectory(prefix="calibration-") as directory:
                model = self._model(signature, fetched)
                if fetched:
                    from .convert import write_saved_model

                    write_saved_model(model, Path(directory) / "model", dequantize_once=False, warmup_batch_sizes=())
                    with tensorflow_errors("calibration model", "loading"):
                        function = tf.saved_model.load(str(Path(directory) / "model")).signatures[_SIGNATURE]
                rows = _rows(key, feeds)
                step = self.batch_rows
                if self.chunk_bytes is not None:
                    step = min(step, rows_per_call({n: np.asarray(a) for n, a in feeds.items()}, self.chunk_bytes))
                for start in range(0, rows, step):
                    batch = {name: np.asarray(array)[start:start + step] for name, array in feeds.items()}
                    values = {}
                    if fetched:
                        tensors_in = {name: _as_tensor(signature, name, value) for name, value in batch.items()}
                        with tensorflow_errors(f"signature '{key}'", "calibrating"):
                            result = call_with_time_limit(function, tensors_in, self.timeout_s, "calibration", key)
                        values = {tensor: result[f"t{index}"] for index, tensor in enumerate(fetched)}
                    values.update({t: np.asarray(batch[fed[t]], np.float32) for t in wanted if t in fed})
                    yield min(step, rows - start), values

    def _model(self, signature: SignatureInfo, tensors: list[str]) -> FrozenModel:
        outputs = {f"t{index}": TensorInfo(tensor, "float32", None) for index, tensor in enumerate(tensors)}
        calibration = SignatureInfo(_SIGNATURE, signature.method_name, dict(signature.inputs), outputs)
        return dataclasses.replace(self.frozen, signatures={_SIGNATURE: calibration})


def _rows(key: str, feeds: Mapping[str, np.ndarray]) -> int:
    counts = {name: int(np.shape(array)[0]) if np.ndim(array) else 1 for name, array in feeds.items()}
    if len(set(counts.values())) != 1:
        raise SavedModelError(f"calibration inputs of signature '{key}' have different row counts: {counts}")
    return next(iter(counts.values()))


def calibrate_frozen_model(
    frozen: FrozenModel,
    inputs: Inputs,
    transform: str = "quantize_matmuls",
    minimum_dim: int | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    serving_batch_size: int | None = None,
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
) -> Calibration:
    """Ranges and per-layer int8 errors for ``transform`` (quantize_matmuls or quantize_convs) on
    ``frozen`` as it is, over ``inputs`` (signature key -> input key -> rows), ``batch_rows`` rows
    per call (fewer where they would hold more than ``chunk_bytes`` of input). ``minimum_dim``
    is the transform's (None: its default): the layers it would leave float get no error.
    Tensors inside function bodies (loop bodies) cannot be fetched: their
    MatMuls get no range, which quantize_matmuls reports. With ``serving_batch_size``, each
    layer is also timed alone in int8 against float at that many rows, here, where this process
    runs the int8 kernels (``layer_time_ratios``; :mod:`~serving_optimiser.saved_model.speed_guard`)."""
    from ..graph_transforms.transforms._int8 import _calibrated_tensors

    probe_builder = _probe_builder(transform)
    unknown = sorted(set(inputs) - set(frozen.signatures))
    if unknown:
        raise SavedModelError(f"calibration inputs name signature '{unknown[0]}', which the model does not have")
    if not inputs:
        raise SavedModelError("calibration needs inputs for at least one signature")
    runner = _Runner(frozen, inputs, batch_rows, timeout_s, chunk_bytes)
    graph_def = frozen.graph_def
    targets = _calibrated_tensors(graph_def)
    nodes = {node.name: node for node in graph_def.node}
    tensor_of = {
        name: f"{node}:0" if index < 0 else canonical_input_name(nodes[node].input[index])
        for name, (node, index) in targets.items()
    }
    inside = lowered_control_flow_nodes(graph_def)
    unreachable = {name for name, tensor in tensor_of.items() if parse_input(tensor)[1] in inside}
    if unreachable:
        log.info("calibrating %s: %d tensor(s) inside loops or conditional branches are not measured",
                 transform, len(unreachable))
        tensor_of = {name: tensor for name, tensor in tensor_of.items() if name not in unreachable}
    low: dict[str, float] = {}
    high: dict[str, float] = {}
    rows = 0
    log.info("calibrating %s: ranges of %d tensors", transform, len(set(tensor_of.values())))
    for count, values in runner.batches(sorted(set(tensor_of.values()))):
        rows += count
        for name, tensor in tensor_of.items():
            if tensor in values and values[tensor].size:
                low[name] = min(low.get(name, np.inf), float(np.min(values[tensor])))
                high[name] = max(high.get(name, -np.inf), float(np.max(values[tensor])))
    ranges = {name: (low[name], high[name]) for name in low if np.isfinite(low[name]) and np.isfinite(high[name])}
    kwargs = {} if minimum_dim is None else {"minimum_dim": minimum_dim}
    probes = [
        probe for probe in probe_builder(graph_def, ranges, **kwargs)
        if not {parse_input(probe.input_tensor)[1], parse_input(probe.output_tensor)[1]} & inside
    ]
    meter = ErrorMeter()
    input_shapes: dict[str, tuple[int, ...]] = {}
    if probes:
        log.info("calibrating %s: int8 error of %d layers", transform, len(probes))
        wanted = sorted({t for probe in probes for t in (probe.input_tensor, probe.output_tensor)})
        for _, values in runner.batches(wanted):
            for probe in probes:
                if probe.input_tensor in values and probe.output_tensor in values:
                    input_shapes.setdefault(probe.input_tensor, tuple(np.shape(values[probe.input_tensor])))
                    meter.add(probe.layer, values[probe.output_tensor], probe.int8_output(values[probe.input_tensor]))
    errors = meter.errors()
    for name, error in sorted(errors.items(), key=lambda item: -item[1]):
        log.info("calibrating %s: '%s' int8 output error %.4f", transform, name, error)
    calibration = Calibration(ranges, errors, frozenset(), rows // max(1, len(inputs)))
    if serving_batch_size is None or not probes:
        return calibration
    return _timed(calibration, graph_def, transform, minimum_dim, probes, input_shapes, serving_batch_size)


def _timed(calibration: Calibration, graph_def, transform: str, minimum_dim: int | None, probes, input_shapes,
           batch_size: int) -> Calibration:
    from ..graph_transforms.parser import ParsedTransform
    from ..graph_transforms.transforms._int8 import int8_kernels_available
    from .speed_guard import time_layers

    if batch_size < 1:
        raise SavedModelError(f"serving batch size must be at least 1, found {batch_size}")
    if not int8_kernels_available():
        log.warning("calibrating %s: the int8 kernels do not run in this process (oneDNN off), so no layer is "
                    "timed at batch %d", transform, batch_size)
        return calibration
    log.info("calibrating %s: timing %d layers in int8 and float at batch %d", transform, len(probes), batch_size)
    step = ParsedTransform(transform, {} if minimum_dim is None else {"minimum_dim": [str(minimum_dim)]})
    ratios = time_layers(graph_def, step, Calibration(calibration.ranges), probes, input_shapes, batch_size)
    return dataclasses.replace(calibration, layer_time_ratios=ratios, timed_batch_size=batch_size)


def load_calibration_inputs(path: str | os.PathLike, signatures: Mapping[str, SignatureInfo]) -> dict:
    """Rows from an ``.npz``, as --sample-inputs names them (``<input>`` or ``<signature>/<input>``),
    for every signature they feed completely; at least one must be."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError) as error:
        raise SavedModelError(f"{path}: cannot read calibration inputs ({error})") from None
    result, used, first_missing = {}, set(), None
    for key, signature in sorted(signatures.items()):
        feeds = {}
        for name in signature.inputs:
            for array_name in (f"{key}/{name}", name):
                if array_name in arrays:
                    feeds[name] = (array_name, arrays[array_name])
                    break
        missing = sorted(set(signature.inputs) - set(feeds))
        if missing:
            first_missing = first_missing or (key, missing[0])
            continue
        result[key] = {name: array for name, (_, array) in feeds.items()}
        used |= {array_name for array_name, _ in feeds.values()}
    if not result:
        key, name = first_missing if first_missing else ("", "")
        raise SavedModelError(f"{path}: no array for signature '{key}' input '{name}' (calibration inputs feed no "
                              "signature completely)")
    unused = sorted(set(arrays) - used)
    if unused:
        raise SavedModelError(f"{path}: array '{unused[0]}' feeds no calibrated signature input")
    return result
