"""Weight-shrinking transforms: round_weights (fewer distinct float values, same dtype) and
quantize_weights (eight-bit Consts decoded by a Dequantize at run time).

Both work on whole Consts with numpy, so a frozen model of a million weights takes milliseconds.
The arithmetic reproduces the C++ tool's float32/double steps exactly, so the rounded values
and the quint8 bytes are identical to the old tool's.
"""

from __future__ import annotations

import logging

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2
from tensorflow.python.framework import tensor_util

from ..context import TransformContext
from ..errors import TransformError
from ..graph_utils import make_node, new_graph_like
from ..op_sets import VARIABLE_OPS
from ..registry import register
from ._const_builders import content_const

log = logging.getLogger(__name__)

# The C++ loops start the running max at numeric_limits<float>::min(), the smallest positive
# normal float, so a tensor with no positive value still gets this tiny positive max.
FLT_MIN = np.float32(np.finfo(np.float32).tiny)

# round_weights only touches Consts with at least this many elements (hard-coded upstream):
# small constants tend to be accuracy-sensitive and shrink nothing worth having.
ROUND_WEIGHTS_MIN_ELEMENTS = 16

# Per-channel scales are rounded up to this many significant bits, so that every level
# (q - zero_point) * scale is an exact float32 and the kernel decodes zero to exactly 0.0.
_SCALE_MANTISSA_BITS = 15


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _round_half_away(values: np.ndarray) -> np.ndarray:
    """C's ``round``: halves go away from zero (numpy's ``round`` goes to even)."""
    truncated = np.trunc(values)
    # values - trunc(values) is exact, so comparing it with 0.5 decides ties exactly.
    return truncated + np.where(np.abs(values - truncated) >= 0.5, np.sign(values), 0.0)


def _float_const_values(node: node_def_pb2.NodeDef, transform: str) -> np.ndarray | None:
    """The float32 values of a Const, None for non-float Consts; errors name the node."""
    if "dtype" not in node.attr:
        raise TransformError(f"{transform}: Const '{node.name}' has no 'dtype' attribute")
    if "value" not in node.attr:
        raise TransformError(f"{transform}: Const '{node.name}' has no 'value' attribute")
    if node.attr["dtype"].type != types_pb2.DT_FLOAT:
        return None
    try:
        values = tensor_util.MakeNdarray(node.attr["value"].tensor)
    except (TypeError, ValueError) as error:
        raise TransformError(f"{transform}: cannot decode the value of Const '{node.name}': {error}") from None
    return np.asarray(values, dtype=np.float32)


def _finite_or_warn(values: np.ndarray, node: node_def_pb2.NodeDef, transform: str) -> bool:
    # The C++ loops skip NaN when taking min/max and then cast NaN/inf to integers (undefined
    # behaviour); we leave such a Const exactly as it was instead.
    if np.isfinite(values).all():
        return True
    log.warning("%s: Const '%s' holds inf or NaN values; left unchanged", transform, node.name)
    return False


# ---------------------------------------------------------------------------------------------
# round_weights
# ---------------------------------------------------------------------------------------------


def round_values(values: np.ndarray, num_steps: int) -> np.ndarray:
    """Round float32 ``values`` to ``num_steps`` buckets, in the C++ tool's float32 steps."""
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    low = np.float32(flat.min())
    high = np.float32(max(flat.max(), FLT_MIN))
    if low == high:
        # Only all-equal positive values get here (high >= FLT_MIN > 0 otherwise differs).
        if abs(low) < np.float32(1e-6):
            high = np.float32(low + np.float32(1.0))
        elif low > 0:
            high = np.float32(np.float32(2.0) * low)
        else:
            low = np.float32(np.float32(2.0) * high)
    width = np.float32(np.float32(high - low) / np.float32(num_steps))
    buckets = np.floor((flat - low) / width).astype(np.int32)
    rounded = low + width * (buckets.astype(np.float32) + np.float32(0.5))
    return rounded.astype(np.float32).reshape(np.shape(values))


def _weight_values(node, minimum_size: int, transform: str):
    """The values of a float Const with at least ``minimum_size`` finite elements, else None."""
    values = _float_const_values(node, transform) if node.op == "Const" else None
    if values is None or values.size < minimum_size or not _finite_or_warn(values, node, transform):
        return None
    return values


@register(
    "round_weights",
    params={"num_steps": "256", "keep_float": "(none; repeatable: Const names left as they are)"},
    on_functions=True,
    lossy=True,
)
def round_weights(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Round every large float Const to ``num_steps`` evenly spaced levels, keeping it float.

    Matches: ``Const`` nodes of dtype float with at least 16 elements (fixed, as upstream).
    Produces: a Const of the same name whose values are bucket centres: with low = min(values)
    and high = max(values, FLT_MIN), width = (high - low) / num_steps and every value becomes
    low + width * (floor((v - low) / width) + 0.5), all in float32 (so the maximum lands in
    bucket num_steps, just above the original max, as upstream). All-equal values get
    high = 2 * low (or low + 1 near zero). The file compresses well; its size does not change.
    Params: ``num_steps`` (256), ``keep_float`` (repeatable: Consts of these names are left as
    they are; names that match no Const are ignored).
    Differs from the C++ tool: the Const keeps its device and control inputs (upstream keeps
    only dtype and value); a Const holding inf or NaN is left unchanged with a warning
    (upstream casts NaN to an integer, which is undefined); ``keep_float`` is new (the guard of
    :mod:`serving_optimiser.saved_model.guard` sends tensors back with it).
    """
    num_steps = context.get_int("num_steps", 256)
    keep_float = frozenset(context.get_list("keep_float"))
    if num_steps <= 0:
        raise TransformError(f"round_weights: num_steps={num_steps} must be a positive integer")
    nodes = []
    for node in graph_def.node:
        values = None if node.name in keep_float else _weight_values(node, ROUND_WEIGHTS_MIN_ELEMENTS, "round_weights")
        if values is None:
            nodes.append(node)
            continue
        nodes.append(content_const(node.name, round_values(values, num_steps), types_pb2.DT_FLOAT, node))
    return new_graph_like(graph_def, nodes)


# ---------------------------------------------------------------------------------------------
# quantize_weights
# ---------------------------------------------------------------------------------------------


def quantize_range(values: np.ndarray) -> tuple[np.float32, np.float32]:
    """The C++ range: min(values, 0) and max(values, 0, FLT_MIN), so 0 is always inside.

    A range narrower than 256 * FLT_MIN (an all-zero tensor gets [0, FLT_MIN]) becomes
    [min, min + 1], the fallback the C++ code meant for min == max but never reached: TF's
    Dequantize computes a step of range / 256, which flushes to zero, and returns NaN.
    """
    low = np.float32(min(np.float32(values.min()), np.float32(0.0)))
    high = np.float32(max(np.float32(values.max()), FLT_MIN))
    if np.float32(high - low) < np.float32(256.0) * FLT_MIN:
        high = np.float32(low + np.float32(1.0))
    return low, high


def quantize_min_first(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """quint8 codes of ``values`` for range [low, high], as TF's FloatToQuantized<quint8>.

    scale = 256 / ((high - low) * 256/255), with high - low taken in float32 and the rest in
    double; code = round(v * scale) - round(low * scale), clamped to [0, 255].
    """
    low32, high32 = np.float32(low), np.float32(high)
    if low32 == high32:
        return np.zeros(np.shape(values), dtype=np.uint8)
    value_range = np.float64(np.float32(high32 - low32)) * (256.0 / 255.0)
    scale = 256.0 / value_range
    codes = _round_half_away(np.asarray(values, dtype=np.float64) * scale) - _round_half_away(np.float64(low32) * scale)
    return np.clip(codes, 0, 255).astype(np.uint8)


def channel_axis(shape: tuple[int, ...]) -> int:
    """The output-channel axis of a weight: the last axis with more than one element.

    That is O of a Conv2D filter [H, W, I, O] or of a MatMul weight [in, out], and C of a
    depthwise filter [H, W, C, 1].
    """
    for axis in range(len(shape) - 1, -1, -1):
        if shape[axis] > 1:
            return axis
    return len(shape) - 1


def quantize_per_channel(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quint8 codes plus per-channel float32 (min, max) for Dequantize(mode=MIN_COMBINED, axis).

    The kernel decodes code q of channel c as q * scale_c + min_c with
    scale_c = (max_c - min_c) / 255 in float32. Each channel's range includes zero (as in
    the per-tensor path); scale_c is rounded up to 15 significant bits and min_c is a whole
    number of scales below zero, so every level, zero included, is an exact float32 and
    decodes without rounding error. The error per weight is at most scale_c / 2.
    """
    moved = np.moveaxis(np.asarray(values, dtype=np.float64), axis, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    low = np.minimum(flat.min(axis=0), 0.0)
    high = np.maximum(flat.max(axis=0), 0.0)
    # A channel of zeros gets the range [0, 1]: any scale decodes its zeros exactly.
    spread = np.where(high > low, high - low, 1.0)
    mantissa, exponent = np.frexp(spread / 255.0)
    steps = 2.0**_SCALE_MANTISSA_BITS
    scale = np.ldexp(np.ceil(mantissa * steps) / steps, exponent)
    # Keep scales normal float32 numbers so the products below stay exact.
    scale = np.maximum(scale, np.float64(np.finfo(np.float32).tiny) * 2.0**16)
    zero_point = _round_half_away(-low / scale)
    codes = np.clip(_round_half_away(flat / scale) + zero_point, 0, 255).astype(np.uint8)
    channel_min = (-zero_point * scale).astype(np.float32)
    channel_max = ((255.0 - zero_point) * scale).astype(np.float32)
    codes = np.moveaxis(codes.reshape(moved.shape), -1, axis)
    return codes, channel_min, channel_max


def _check_no_variables(graph_def: graph_pb2.GraphDef) -> None:
    for node in graph_def.node:
        if node.op in VARIABLE_OPS:
            raise TransformError(
                f"quantize_weights: node '{node.name}' is a variable ({node.op}); freeze the graph first "
                "(e.g. convert_variables_to_constants_v2), so weights are Consts"
            )


@register(
    "quantize_weights",
    params={
        "minimum_size": "1024",
        "per_channel": "false",
        "per_channel_for": "(none; repeatable: Const names quantised per channel whatever per_channel says)",
        "keep_float": "(none; repeatable: Const names left float)",
    },
    on_functions=True,
    lossy=True,
)
def quantize_weights(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Store every large float Const as eight-bit codes plus a range, decoded at run time.

    Matches: ``Const`` nodes of dtype float with at least ``minimum_size`` elements.
    Produces, for Const ``<c>``: ``<c>_quantized_const`` (Const quint8, same shape),
    ``<c>_quantized_min`` and ``<c>_quantized_max`` (float Consts) and a ``Dequantize``
    named ``<c>`` (T=quint8) reading those three, so consumers are untouched.
    Per tensor (default): mode MIN_FIRST, scalar range min(values, 0) .. max(values, 0, FLT_MIN),
    codes as TF's FloatToQuantized (bit-identical to the C++ tool).
    With ``per_channel=true``: each slice along the output-channel axis (the last axis with
    more than one element: O of a Conv2D [H,W,I,O] filter, out of a MatMul [in,out] weight,
    C of a depthwise [H,W,C,1] filter) gets its own range, passed as min/max vectors with
    Dequantize's ``axis`` attribute and mode MIN_COMBINED: TF 2.21's CPU Dequantize accepts
    ``axis`` only with MIN_COMBINED or SCALED (MIN_FIRST fails at run time), and MIN_COMBINED
    with quint8 keeps an asymmetric range (SCALED quint8 ignores min, so it cannot hold
    negative weights). Consts of rank < 2 stay per tensor.
    Params: ``minimum_size`` (1024), ``per_channel`` (false), ``per_channel_for`` and
    ``keep_float`` (repeatable Const names: quantised per channel, or left float, whatever the
    other params say; names that match no Const are ignored).
    Errors: a graph that still holds variables (Variable, VariableV2, VarHandleOp...) must
    be frozen first.
    Differs from the C++ tool: new Consts keep the old Const's device and control inputs;
    a Const holding inf or NaN is left float with a warning; ``per_channel``, ``per_channel_for``
    and ``keep_float`` are new (the last two are how :mod:`serving_optimiser.saved_model.guard`
    sends a tensor back).
    """
    minimum_size = context.get_int("minimum_size", 1024)
    per_channel = context.get_bool("per_channel", False)
    per_channel_for = frozenset(context.get_list("per_channel_for"))
    keep_float = frozenset(context.get_list("keep_float"))
    _check_no_variables(graph_def)
    nodes, small_sizes, quantized = [], [], 0
    for node in graph_def.node:
        values = None if node.name in keep_float else _weight_values(node, minimum_size, "quantize_weights")
        if values is None:
            nodes.append(node)
            size = _float_const_size(node)
            if size is not None and size < minimum_size:
                small_sizes.append(size)
            continue
        nodes.extend(_quantized_nodes(node, values, per_channel or node.name in per_channel_for))
        quantized += 1
    if not quantized and small_sizes:
        # Otherwise the engine's "no change" would not say why (tiny models, function bodies).
        log.info(
            "quantize_weights: %d float Const(s) under minimum_size=%d elements (the largest has %d) left float",
            len(small_sizes), minimum_size, max(small_sizes),
        )
    return new_graph_like(graph_def, nodes)


def _float_const_size(node: node_def_pb2.NodeDef) -> int | None:
    """The element count of a float Const (from its recorded shape), None for any other node."""
    if node.op != "Const" or "dtype" not in node.attr or node.attr["dtype"].type != types_pb2.DT_FLOAT:
        return None
    return int(np.prod([dim.size for dim in node.attr["value"].tensor.tensor_shape.dim]))


def _quantized_nodes(node: node_def_pb2.NodeDef, values: np.ndarray, per_channel: bool) -> list:
    dequantize = make_node(
        "Dequantize",
        node.name,
        [f"{node.name}_quantized_const", f"{node.name}_quantized_min", f"{node.name}_quantized_max"],
        {"T": types_pb2.DT_QUINT8},
        device=node.device,
    )
    if per_channel and values.ndim >= 2:
        axis = channel_axis(values.shape)
        codes, low, high = quantize_per_channel(values, axis)
        dequantize.attr["mode"].s = b"MIN_COMBINED"
        dequantize.attr["axis"].i = axis
    else:
        low, high = quantize_range(values)
        codes = quantize_min_first(values, low, high)
        dequantize.attr["mode"].s = b"MIN_FIRST"
    return [
        content_const(f"{node.name}_quantized_const", codes, types_pb2.DT_QUINT8, node),
        content_const(f"{node.name}_quantized_min", np.asarray(low, dtype=np.float32), types_pb2.DT_FLOAT, node),
        content_const(f"{node.name}_quantized_max", np.asarray(high, dtype=np.float32), types_pb2.DT_FLOAT, node),
        dequantize,
    ]
