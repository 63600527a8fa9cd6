"""What calibration hands the int8 transforms (quantize_matmuls, quantize_convs): activation
ranges by node name, each candidate layer's measured int8 output error, and the layers to keep
float; with its file format (the ``ranges_file``) and the per-layer error measure.

A layer's int8 output error is measured in isolation, on the float activations that reach it:
its input is quantised to 8 bits over its range, its weights as the transform quantises them,
and the result (ReLU and 8-bit output range included for convs) is compared with the float
layer's output. The figure is the relative RMS error ``sqrt(sum (y8 - y)^2 / sum y^2)`` over the
calibration rows: 0.01 is one percent of the output's typical magnitude. A layer over the
transform's ``max_layer_error`` stays float.

:func:`calibrate_ranges` runs the float graph to measure the ranges (the transforms never run
TensorFlow to calibrate).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from .errors import TransformError

if TYPE_CHECKING:  # TensorFlow loads only when calibrate_ranges runs
    from tensorflow.core.framework import graph_pb2

# The default guard. Measured (docs/differences/quantize_matmuls.md): 512-wide ReLU layers of the
# Iris DNN 0.4-0.9 %, ResNet50 convs 0.5-4 %; layers reading raw features of mixed scales 10 % and
# more (the wide & deep model's first Dense, whose int8 run cost 1.25 % of its labels).
DEFAULT_MAX_LAYER_ERROR = 0.05
FORMAT = "serving_optimiser.calibration"


@dataclasses.dataclass(frozen=True)
class Calibration:
    """``ranges``: node name -> (min, max) as the transforms read them (a MatMul's or conv's
    input range under its name, a conv layer's output range under its last node's).
    ``layer_errors``: MatMul/conv name -> relative RMS int8 output error (see the module).
    ``keep_float``: layers that stay float whatever their error (the agreement fallback's picks).
    ``rows``: how many calibration rows were run.
    ``layer_time_ratios``: layer -> its int8 time over its float time at ``timed_batch_size``
    rows, each layer alone, on the machine that calibrated (the speed guard's order: see
    :mod:`serving_optimiser.saved_model.speed_guard`)."""

    ranges: Mapping[str, tuple[float, float]]
    layer_errors: Mapping[str, float] = dataclasses.field(default_factory=dict)
    keep_float: frozenset[str] = frozenset()
    rows: int = 0
    layer_time_ratios: Mapping[str, float] = dataclasses.field(default_factory=dict)
    timed_batch_size: int | None = None

    def with_keep_float(self, names) -> Calibration:
        return dataclasses.replace(self, keep_float=frozenset(self.keep_float) | frozenset(names))

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "rows": self.rows,
            "ranges": {name: [low, high] for name, (low, high) in sorted(self.ranges.items())},
            "layer_errors": {name: error for name, error in sorted(self.layer_errors.items())},
            "keep_float": sorted(self.keep_float),
        } | ({} if self.timed_batch_size is None else {
            "timed_batch_size": self.timed_batch_size,
            "layer_time_ratios": {name: ratio for name, ratio in sorted(self.layer_time_ratios.items())},
        })


def _pair(transform: str, path: str, name: str, pair) -> tuple[float, float]:
    ok = isinstance(pair, list) and len(pair) == 2 and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in pair
    )
    if not ok or not pair[0] <= pair[1]:
        raise TransformError(f"{transform}: ranges_file '{path}': '{name}' needs [min, max] with "
                             f"min <= max, found {pair!r}")
    return float(pair[0]), float(pair[1])


def read_calibration_file(transform: str, path: str) -> Calibration:
    """A ``ranges_file``: either ``{"<node name>": [min, max], ...}`` or what
    :meth:`Calibration.to_json` writes; errors name the file and the entry."""
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except OSError as error:
        raise TransformError(f"{transform}: cannot read ranges_file '{path}': {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise TransformError(f"{transform}: ranges_file '{path}' is not JSON: {error.msg}") from None
    if not isinstance(raw, dict):
        raise TransformError(f"{transform}: ranges_file '{path}' must hold an object of name: [min, max]")
    if raw.get("format") != FORMAT:
        return Calibration({name: _pair(transform, path, name, pair) for name, pair in raw.items()})
    ranges, errors, keep = raw.get("ranges"), raw.get("layer_errors", {}), raw.get("keep_float", [])
    if not isinstance(ranges, dict) or not isinstance(errors, dict) or not isinstance(keep, list):
        raise TransformError(f"{transform}: ranges_file '{path}': 'ranges' and 'layer_errors' must be objects, "
                             "'keep_float' a list")
    for name, error in errors.items():
        if isinstance(error, bool) or not isinstance(error, int | float) or not error >= 0:
            raise TransformError(f"{transform}: ranges_file '{path}': layer error of '{name}' must be a "
                                 f"number >= 0, found {error!r}")
    if not all(isinstance(name, str) for name in keep):
        raise TransformError(f"{transform}: ranges_file '{path}': 'keep_float' must list node names")
    timed_batch_size, time_ratios = raw.get("timed_batch_size"), raw.get("layer_time_ratios", {})
    if timed_batch_size is not None and (isinstance(timed_batch_size, bool) or not isinstance(timed_batch_size, int)
                                         or timed_batch_size < 1):
        raise TransformError(f"{transform}: ranges_file '{path}': 'timed_batch_size' must be an integer >= 1, "
                             f"found {timed_batch_size!r}")
    if not isinstance(time_ratios, dict) or not all(
        isinstance(ratio, int | float) and not isinstance(ratio, bool) and ratio > 0 for ratio in time_ratios.values()
    ):
        raise TransformError(f"{transform}: ranges_file '{path}': 'layer_time_ratios' must map names to "
                             "positive numbers")
    return Calibration(
        {name: _pair(transform, path, name, pair) for name, pair in ranges.items()},
        {name: float(error) for name, error in errors.items()},
        frozenset(keep),
        int(raw.get("rows", 0)),
        {name: float(ratio) for name, ratio in time_ratios.items()},
        timed_batch_size,
    )


@dataclasses.dataclass(frozen=True)
class LayerProbe:
    """One candidate int8 layer, as calibration measures it: ``int8_output(x)`` computes what the
    int8 layer would return for the float input ``x`` of tensor ``input_tensor``; the float
    layer's answer is tensor ``output_tensor``."""

    layer: str
    input_tensor: str
    output_tensor: str
    int8_output: Callable[[np.ndarray], np.ndarray]


def fake_quantize(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``values`` through 8 bits over [low, high] (QuantizeV2 MIN_FIRST: 255 steps, clipped) and back."""
    if not high > low:
        return np.full_like(values, low)
    step = (high - low) / 255.0
    return (np.round((np.clip(values, low, high) - low) / step) * step + low).astype(np.float32)


class ErrorMeter:
    """Accumulates ``sum (y8 - y)^2`` and ``sum y^2`` per layer over batches."""

    def __init__(self) -> None:
        self._squared_error: dict[str, float] = {}
        self._squared_reference: dict[str, float] = {}

    def add(self, layer: str, reference: np.ndarray, int8: np.ndarray) -> None:
        reference, int8 = np.asarray(reference, np.float64), np.asarray(int8, np.float64)
        self._squared_error[layer] = self._squared_error.get(layer, 0.0) + float(np.sum((int8 - reference) ** 2))
        self._squared_reference[layer] = self._squared_reference.get(layer, 0.0) + float(np.sum(reference ** 2))

    def errors(self) -> dict[str, float]:
        result = {}
        for layer, error in self._squared_error.items():
            reference = self._squared_reference[layer]
            result[layer] = float(np.sqrt(error / reference)) if reference > 0 else (0.0 if error == 0 else np.inf)
        return result


def calibrate_ranges(
    graph_def: graph_pb2.GraphDef, feeds: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, tuple[float, float]]:
    """The ranges quantize_matmuls and quantize_convs read, over ``feeds`` (batches of {input
    tensor: array}): each float MatMul's and conv's input range (under its name), and the output
    range of each conv's bias add and Relu/Relu6 (under theirs).

    Runs the float graph once per batch; the result, written as JSON, is a ``ranges_file``.
    """
    import tensorflow as tf

    # Which tensors to measure is graph matching, the transforms' business (and they import this
    # module, hence the import here).
    from .transforms._int8 import _calibrated_tensors

    tensors = _calibrated_tensors(graph_def)
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    fetches = {}
    for name, (node, index) in tensors.items():
        operation = graph.get_operation_by_name(node)
        fetches[name] = operation.outputs[0] if index < 0 else operation.inputs[index]
    low = {name: np.inf for name in tensors}
    high = {name: -np.inf for name in tensors}
    with tf.compat.v1.Session(graph=graph) as session:
        for feed in feeds:
            values = session.run(fetches, {(k if ":" in k else f"{k}:0"): v for k, v in feed.items()})
            for name, array in values.items():
                low[name] = min(low[name], float(array.min()))
                high[name] = max(high[name], float(array.max()))
    return {name: (low[name], high[name]) for name in tensors if np.isfinite(low[name])}
