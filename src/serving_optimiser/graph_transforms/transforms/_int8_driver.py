"""The one driver of the int8 transforms (quantize_matmuls, quantize_convs): guard params and
calibration, candidate layers with a log line for each refusal, the ranges file's names, the
activations left float, the kernel warning and the splice. A transform hands it a matcher (which
layers qualify, and why the others do not) and an emitter (the nodes each layer becomes).

A layer, as the driver reads it, has ``node`` (the MatMul or conv whose name keys ranges, errors
and ``keep_float``), ``float_activation`` (an activation no kernel fuses, left after the layer's
float output, or None), ``float_producer`` (the node that activation reads once the layer is
rewritten) and ``device``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

from tensorflow.core.framework import graph_pb2, node_def_pb2

from ..context import TransformContext
from ..errors import TransformError
from ._activations import float_prelu
from ._int8 import (
    calibration_of,
    check_range_names,
    guard_params,
    guard_refusal,
    int8_kernels_available,
    splice_layers,
)

# What an emitter returns: the nodes that take each replaced node's place, and the nodes that go.
Rewrite = tuple[dict[str, list[node_def_pb2.NodeDef]], set[str]]


@dataclasses.dataclass(frozen=True)
class Int8Transform:
    """One int8 transform as the driver runs it.

    ``match(graph_def, ranges, options)``: every layer the kernels take (logging one line for each
    that stays float); ``emit(graph_def, layers, context, options)``: the nodes of the accepted
    layers, joined as the transform joins them (one log line per layer). ``options`` are the
    transform's own params, read and checked before the driver runs. ``needs_calibration``: the
    error without a ranges file or a caller's calibration (None: per-batch ranges work), and
    then the ranges file's names are checked before matching, else after."""

    name: str
    log: logging.Logger
    match: Callable[[graph_pb2.GraphDef, dict, Any], Iterable[Any]]
    emit: Callable[[graph_pb2.GraphDef, dict[str, Any], TransformContext, Any], Rewrite]
    kernel_warning: str
    needs_calibration: str | None = None


def float_activations(layers: Iterable[Any], replaced: dict, removed: set[str]) -> None:
    """The activations no kernel fuses, in their cheaper float form where there is one
    (:func:`~._activations.float_prelu`: a per-channel PReLU as two ops for Keras' five, one with
    a single alpha as a LeakyRelu), named like their last node, whose other nodes go."""
    for layer in layers:
        found = layer.float_activation
        cheaper = float_prelu(found, layer.float_producer, layer.device) if found else None
        if cheaper is not None and found.end.name not in removed and found.end.name not in replaced:
            replaced[found.end.name] = cheaper
            removed |= set(found.nodes) - {found.end.name}


def run_int8_transform(
    transform: Int8Transform, graph_def: graph_pb2.GraphDef, context: TransformContext, options: Any
) -> graph_pb2.GraphDef:
    """``graph_def`` with every layer ``transform`` matches, and the guard lets through, in int8."""
    name, log = transform.name, transform.log
    bound, keep_float = guard_params(name, context)
    calibration = calibration_of(name, context)
    if calibration is None and transform.needs_calibration:
        raise TransformError(f"{name}: {transform.needs_calibration}")
    ranges = dict(calibration.ranges) if calibration is not None else {}
    if transform.needs_calibration:
        check_range_names(name, ranges, graph_def)
    layers: dict[str, Any] = {}
    for layer in transform.match(graph_def, ranges, options):
        node = layer.node
        reason = guard_refusal(node.name, calibration, bound, keep_float)
        if reason is not None:
            log.info("%s: %s '%s' stays float: %s", name, node.op, node.name, reason)
            continue
        layers[node.name] = layer
        if node.name not in ranges and ranges:
            log.info("%s: %s '%s' is not in ranges_file; its input range is per batch", name, node.op, node.name)
    if not transform.needs_calibration:
        check_range_names(name, ranges, graph_def)
    if not layers:
        return graph_def
    replaced, removed = transform.emit(graph_def, layers, context, options)
    float_activations(layers.values(), replaced, removed)
    if not int8_kernels_available():
        log.warning("%s: %s", name, transform.kernel_warning)
    return splice_layers(graph_def, replaced, removed, context.output_names)

