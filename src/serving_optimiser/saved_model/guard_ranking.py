"""The gate's ranking pass (:mod:`.guard`): every lossy unit of a transform list (a weight
Const, a calibrated int8 layer, an eight-bit node) with the error it causes alone, measured in one
run of one probe graph on the decision inputs, most harmful first."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2

from ..chunks import DEFAULT_CHUNK_BYTES
from ..graph_transforms import TransformError
from ..graph_transforms.calibration import ErrorMeter
from ..graph_transforms.engine import apply_transform
from ..graph_transforms.graph_utils import copy_graph, lowered_control_flow_nodes, make_node, parse_input
from ..graph_transforms.parser import ParsedTransform
from .calibration import _Runner
from .compare import DEFAULT_TIMEOUT_S
from .errors import SavedModelError
from .model import FrozenModel

if TYPE_CHECKING:
    from .guard import TransformSteps

log = logging.getLogger(__name__)

Inputs = Mapping[str, Mapping[str, np.ndarray]]
WEIGHT_TRANSFORMS = ("round_weights", "quantize_weights")
_PROBE = "guard_probe"
_RANK_BATCH_ROWS = 64


@dataclasses.dataclass(frozen=True)
class Unit:
    """One thing the gate can send back: a weight Const (``kind="weight"``), an int8 layer
    (``"layer"``) or an eight-bit node (``"node"``), with the steps that made it lossy, its
    measured error and how it was measured, whether it has a per-channel rung, and its float
    weight bytes."""

    name: str
    kind: str
    steps: tuple[int, ...]
    error: float
    measured: str
    per_channel: bool = False
    weight_bytes: int = 0
    # False for a weight only rounded (round_weights keeps float32: the file is no smaller).
    saves_bytes: bool = True

    def describe(self, parsed: Sequence[ParsedTransform]) -> str:
        transforms = "+".join(dict.fromkeys(parsed[index].name for index in self.steps))
        what = {"weight": "tensor", "layer": "layer", "node": "node"}[self.kind]
        return f"{transforms} {what} '{self.name}' ({self.measured} {self.error:.4f})"


def float_consts(graph_def: graph_pb2.GraphDef) -> dict[str, node_def_pb2.NodeDef]:
    return {node.name: node for node in graph_def.node
            if node.op == "Const" and node.attr["dtype"].type == types_pb2.DT_FLOAT}


def bytes_of(node: node_def_pb2.NodeDef) -> int:
    shape = node.attr["value"].tensor.tensor_shape.dim
    return 4 * int(np.prod([dim.size for dim in shape]))


def _constant_values(graph_def: graph_pb2.GraphDef, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The values of nodes ``names`` of ``graph_def`` that only Consts feed (a Dequantize of its
    codes, a rounded Const), by running just their constant subgraphs: no model input is read."""
    import tensorflow as tf

    nodes = {node.name: node for node in graph_def.node}
    keep, stack = set(), [name for name in names if name in nodes]
    while stack:
        name = stack.pop()
        if name in keep:
            continue
        keep.add(name)
        stack.extend(parse_input(i)[1] for i in nodes[name].input if parse_input(i)[1] in nodes)
    if any(nodes[name].op == "Placeholder" for name in keep):
        raise SavedModelError("guard: a lossy weight depends on a model input")
    sub = graph_pb2.GraphDef()
    sub.versions.CopyFrom(graph_def.versions)
    sub.node.extend(node for node in graph_def.node if node.name in keep)
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(sub, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        values = session.run([f"{name}:0" for name in names if name in nodes])
    return dict(zip([name for name in names if name in nodes], (np.asarray(v, np.float32) for v in values)))


def _relative_error(original: np.ndarray, changed: np.ndarray) -> float:
    original, changed = np.asarray(original, np.float64), np.asarray(changed, np.float64)
    reference = float(np.sum(original ** 2))
    error = float(np.sum((changed - original) ** 2))
    return math.sqrt(error / reference) if reference > 0 else (0.0 if error == 0 else math.inf)


def _float_output(node: node_def_pb2.NodeDef) -> bool:
    from ..graph_transforms.graph_utils import lookup_op_def, output_types

    try:
        types = output_types(node, lookup_op_def(node.op))
    except (TransformError, KeyError, ValueError):
        return False
    return bool(types) and types[0] == types_pb2.DT_FLOAT


def _channel_sums_of_squares(name: str, tensor: str, nodes: list) -> str:
    """Append nodes computing ``sum(tensor^2)`` over every axis but the last (one sum per channel;
    a scalar for a scalar) as ``name``; return its tensor."""
    from ..graph_transforms.graph_utils import make_const_node

    int32 = {"T": types_pb2.DT_INT32}
    nodes.append(make_node("Square", f"{name}/square", [tensor], {"T": types_pb2.DT_FLOAT}))
    nodes.append(make_node("Rank", f"{name}/rank", [tensor], {"T": types_pb2.DT_FLOAT}))
    nodes.append(make_const_node(f"{name}/zero", np.asarray(0, np.int32)))
    nodes.append(make_const_node(f"{name}/one", np.asarray(1, np.int32)))
    nodes.append(make_node("Sub", f"{name}/last", [f"{name}/rank", f"{name}/one"], int32))
    nodes.append(make_node("Maximum", f"{name}/leading", [f"{name}/last", f"{name}/zero"], int32))
    nodes.append(make_node("Range", f"{name}/axes", [f"{name}/zero", f"{name}/leading", f"{name}/one"],
                           {"Tidx": types_pb2.DT_INT32}))
    nodes.append(make_node("Sum", name, [f"{name}/square", f"{name}/axes"],
                           {"T": types_pb2.DT_FLOAT, "Tidx": types_pb2.DT_INT32, "keep_dims": False}))
    return f"{name}:0"


def channel_error(error_sums: np.ndarray, reference_sums: np.ndarray) -> float:
    """The worst channel's relative RMS error ``sqrt(sum dy^2 / sum y^2)``. Channels whose output
    is a millionth of the largest channel's energy or less (dead ones) are left out: their
    ratio says nothing. Per channel, not over the whole tensor, because a quiet channel read
    through a log or a normalisation downstream matters as much as a loud one."""
    error, reference = np.atleast_1d(np.asarray(error_sums, np.float64)), np.atleast_1d(reference_sums)
    reference = np.asarray(reference, np.float64)
    if not reference.size or reference.max() <= 0:
        return 0.0 if not error.size or error.max() == 0 else math.inf
    live = reference > 1e-6 * reference.max()
    return float(np.sqrt(np.max(error[live] / reference[live])))


def weight_probe_graph(
    graph_def: graph_pb2.GraphDef, changed: Mapping[str, np.ndarray]
) -> tuple[graph_pb2.GraphDef, dict[str, list[tuple[str, str]]]]:
    """``graph_def`` plus, for each weight in ``changed`` (name -> the values the list gives it),
    a copy of each of its fetchable consumers reading those values instead, and scalars
    ``sum (copy - consumer)^2`` and ``sum consumer^2``. Returns the graph and, per weight, its
    ``(error tensor, reference tensor)`` pairs (none: no consumer can be fetched)."""
    from ..graph_transforms.graph_utils import make_const_node

    inside = lowered_control_flow_nodes(graph_def)
    consumers: dict[str, list[node_def_pb2.NodeDef]] = {}
    for node in graph_def.node:
        for input_string in node.input:
            control, name, _ = parse_input(input_string)
            if not control and name in changed:
                consumers.setdefault(name, []).append(node)
    result = copy_graph(graph_def)
    extra: list = []
    pairs: dict[str, list[tuple[str, str]]] = {}
    for index, (weight, values) in enumerate(sorted(changed.items())):
        pairs[weight] = []
        readers = [n for n in dict.fromkeys(n.name for n in consumers.get(weight, []))]
        by_name = {n.name: n for n in consumers.get(weight, [])}
        if not readers or any(name in inside for name in readers):
            continue  # one reader that cannot be fetched makes the figure partial: the weight's own error instead
        readers_nodes = [by_name[name] for name in readers]
        if not all(_float_output(reader) for reader in readers_nodes):
            continue
        prefix = f"{_PROBE}/{index}"
        extra.append(make_const_node(f"{prefix}/weight", np.asarray(values, np.float32)))
        for position, reader in enumerate(readers_nodes):
            copy = node_def_pb2.NodeDef()
            copy.CopyFrom(reader)
            copy.name = f"{prefix}/{position}/reader"
            del copy.input[:]
            for input_string in reader.input:
                control, name, _ = parse_input(input_string)
                if control:
                    continue
                copy.input.append(f"{prefix}/weight" if name == weight else input_string)
            if "_class" in copy.attr:
                del copy.attr["_class"]
            extra.append(copy)
            extra.append(make_node("Sub", f"{prefix}/{position}/diff", [f"{copy.name}:0", f"{reader.name}:0"],
                                   {"T": types_pb2.DT_FLOAT}))
            error = _channel_sums_of_squares(f"{prefix}/{position}/error", f"{prefix}/{position}/diff:0", extra)
            reference = _channel_sums_of_squares(f"{prefix}/{position}/reference", f"{reader.name}:0", extra)
            pairs[weight].append((error, reference))
    result.node.extend(extra)
    return result, pairs


def _decision_inputs(frozen: FrozenModel, inputs: Inputs | None) -> dict:
    from .compare import generate_inputs

    if inputs:
        return {key: dict(feeds) for key, feeds in inputs.items() if key in frozen.signatures}
    return {key: generate_inputs(signature) for key, signature in sorted(frozen.signatures.items())}


def _batched(inputs: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    """The signatures whose inputs all have the same number of rows (the probe runs them in
    batches of rows; a signature with a scalar input beside its rows is left out of the ranking)."""
    result = {}
    for key, feeds in inputs.items():
        rows = {int(np.shape(array)[0]) if np.ndim(array) else -1 for array in feeds.values()}
        if len(rows) == 1 and -1 not in rows:
            result[key] = feeds
        else:
            log.info("guard: signature '%s' has inputs of different row counts: left out of the ranking", key)
    return result


def rank_units(frozen: FrozenModel, steps: TransformSteps, unguarded: graph_pb2.GraphDef,
               decision_inputs: Inputs | None, timeout_s: float = DEFAULT_TIMEOUT_S,
               chunk_bytes: int | None = DEFAULT_CHUNK_BYTES) -> tuple[list[Unit], int]:
    """Every lossy unit of the list with its measured error, most harmful first, and how many
    model runs that took (see the module docstring)."""
    before = steps.before_lossy if steps.before_lossy is not None else frozen.graph_def
    inputs = _decision_inputs(frozen, decision_inputs)
    parsed = steps.parsed
    weight_steps = tuple(i for i in steps.lossy_steps if parsed[i].name in WEIGHT_TRANSFORMS)
    per_tensor_steps = [i for i in weight_steps if parsed[i].name == "quantize_weights"
                        and str(parsed[i].params.get("per_channel", ["false"])[0]).lower() not in ("true", "1")]
    units: list[Unit] = []
    runs = 0
    floats = float_consts(before)
    if weight_steps:
        # What the weight steps alone make of each weight, whatever later steps do with it (an int8
        # layer absorbs its rounded weight, and sending the layer back brings the rounding back).
        weighted = before
        names_in, names_out = frozen.input_node_names(), frozen.output_node_names()
        for index in weight_steps:
            weighted = apply_transform(weighted, parsed[index], names_in, names_out)
        weighted_nodes = {node.name: node for node in weighted.node}
        changed_names = [name for name, node in floats.items() if weighted_nodes.get(name, node) != node
                         and weighted_nodes[name].op in ("Const", "Dequantize")]
        changed = _constant_values(weighted, changed_names)
        from tensorflow.python.framework import tensor_util

        originals = {name: np.asarray(tensor_util.MakeNdarray(floats[name].attr["value"].tensor), np.float32)
                     for name in changed}
        probe, pairs = weight_probe_graph(before, changed)
        fetched = sorted({t for tensors in pairs.values() for pair in tensors for t in pair})
        sums: dict[str, np.ndarray] = {}
        batched = _batched(inputs)
        if fetched and batched:
            runner = _Runner(frozen.with_graph_def(probe), batched, _RANK_BATCH_ROWS, timeout_s, chunk_bytes)
            for _, values in runner.batches(fetched):
                for tensor, value in values.items():
                    sums[tensor] = sums.get(tensor, 0.0) + np.asarray(value, np.float64)
            runs += 1
        for name in changed:
            measured = [(sums[e], sums[r]) for e, r in pairs.get(name, []) if e in sums and r in sums]
            if measured:
                error = max(channel_error(e, r) for e, r in measured)
                how = "consumer output error"
            else:
                error, how = _relative_error(originals[name], changed[name]), "weight error"
            # A per-channel rung only for what a per-tensor quantize_weights quantised (rank >= 2).
            quantised = weighted_nodes[name].op == "Dequantize"
            channel = bool(per_tensor_steps) and originals[name].ndim >= 2 and quantised
            units.append(Unit(name, "weight", weight_steps, error, how, channel, bytes_of(floats[name]), quantised))
    for index, layer, error in steps.int8_layers():
        layer_node = next((n for n in before.node if n.name == layer), None)
        weight_bytes = 0 if layer_node is None else sum(
            bytes_of(floats[parse_input(i)[1]]) for i in layer_node.input if parse_input(i)[1] in floats)
        units.append(Unit(layer, "layer", (index,), error, "int8 output error", False, weight_bytes))
    node_steps = tuple(i for i in steps.lossy_steps if parsed[i].name == "quantize_nodes")
    if node_steps:
        node_units = _rank_nodes(frozen, before, unguarded, inputs, node_steps, timeout_s, chunk_bytes)
        units.extend(node_units)
        runs += 2
    # Units that save no bytes go first: sending them back costs nothing the list was for.
    units.sort(key=lambda unit: (unit.saves_bytes, -unit.error, unit.name))
    return units, runs


def _rank_nodes(frozen: FrozenModel, before: graph_pb2.GraphDef, unguarded: graph_pb2.GraphDef, inputs,
                node_steps: tuple[int, ...], timeout_s: float,
                chunk_bytes: int | None = DEFAULT_CHUNK_BYTES) -> list[Unit]:
    """quantize_nodes' nodes: each output's relative error in the quantised graph minus the
    largest of its inputs' (one run of each graph, the tensors compared by name)."""
    from ..graph_transforms.transforms.quantize_nodes import QUANTIZED_OPS

    after = {node.name: node for node in unguarded.node}
    inside = lowered_control_flow_nodes(before) | lowered_control_flow_nodes(unguarded)
    quantised = [node for node in before.node
                 if node.op in QUANTIZED_OPS and after.get(node.name) is not None
                 and after[node.name].op == "Dequantize" and node.name not in inside]
    tensors = {f"{node.name}:0" for node in quantised}
    for node in quantised:
        for input_string in node.input:
            control, name, port = parse_input(input_string)
            if not control and name in after and name not in inside:
                tensors.add(f"{name}:{port}")
    fetched = sorted(tensors)
    meter = ErrorMeter()
    inputs = _batched(inputs)
    float_runner = _Runner(frozen.with_graph_def(before), inputs, _RANK_BATCH_ROWS, timeout_s, chunk_bytes)
    quantised_runner = _Runner(frozen.with_graph_def(unguarded), inputs, _RANK_BATCH_ROWS, timeout_s, chunk_bytes)
    for (_, expected), (_, actual) in zip(float_runner.batches(fetched), quantised_runner.batches(fetched)):
        for tensor in fetched:
            if tensor in expected and tensor in actual:
                meter.add(tensor, expected[tensor], actual[tensor])
    errors = meter.errors()
    units = []
    for node in quantised:
        own = errors.get(f"{node.name}:0")
        if own is None:
            continue
        upstream = [errors.get(f"{name}:{port}", 0.0) for control, name, port in map(parse_input, node.input)
                    if not control]
        units.append(Unit(node.name, "node", node_steps, max(0.0, own - max(upstream, default=0.0)),
                          "added output error"))
    return units
