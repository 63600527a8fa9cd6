"""The activations after an int8 layer that quantize_matmuls and quantize_convs recognise, and which
of them this TensorFlow wheel's fused int8 kernels can apply as a post-op: one table, one matcher.

The matcher does not spell out op patterns (Keras 3 freezes a PReLU to Relu, Neg, Relu, Mul,
AddV2; exact GELU to Mul, Neg, Mul, Erfc, Mul; swish to Mul, Sigmoid, Mul, IdentityN; other
builders write them otherwise). It takes the smallest group of elementwise nodes that reads only
the layer's output and constants and whose result leaves through one node, runs it once on a grid
of values per channel, and names the function it computes from :data:`ACTIVATIONS`.

Which post-ops the kernels take was measured on TF 2.21 (scripts/probe_int8_kernels.py,
docs/differences/int8_fusions.md): ``_QuantizedMatMul`` takes ``[BiasAdd, <act>, Dequantize]``
for Relu, Relu6, LeakyRelu (one scalar alpha), Elu, Sigmoid, Tanh, GeluExact and GeluApproximate;
not swish or hard-swish. The conv kernels (``_FusedQuantizedConv2D``, the depthwise one and the
older named ops) fuse only Relu, and have no float output.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2

from ..graph_utils import control_inputs, make_node, parse_input
from ._int8 import attr_type, const_behind_identity
from .weights import content_const

# Ops that act value by value (with constants that broadcast per channel): what an activation is made of.
ELEMENTWISE_OPS = frozenset({
    "Relu", "Relu6", "LeakyRelu", "Elu", "Selu", "Sigmoid", "Tanh", "Erf", "Erfc", "Neg", "Abs", "Square", "Pow",
    "Mul", "Add", "AddV2", "Sub", "RealDiv", "Maximum", "Minimum", "IdentityN", "Identity", "Softplus", "Exp",
})
MAX_NODES = 12  # the largest activation in the table (tanh GELU) takes 8 nodes


def _gelu_exact(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclasses.dataclass(frozen=True)
class Entry:
    """One activation: its float reference and the post-op name each int8 kernel family knows it by
    on this wheel (None: no kernel fuses it, the layer ends in a dequantize and it stays float)."""

    reference: Callable[[np.ndarray], np.ndarray] | None  # None: identified by slopes (PReLU family)
    matmul_post_op: str | None
    conv_post_op: str | None


# The one table. LeakyRelu and PReLU are told apart from Relu by their slopes, not by a reference.
ACTIVATIONS: dict[str, Entry] = {
    "Relu": Entry(None, "Relu", "Relu"),
    "LeakyRelu": Entry(None, "LeakyRelu", None),  # one alpha for every channel (a shared-alpha PReLU too)
    "PReLU": Entry(None, None, None),  # one alpha per channel: no kernel takes a vector alpha
    "Relu6": Entry(lambda x: np.clip(x, 0.0, 6.0), "Relu6", None),  # convs: the output range caps it at 6
    "Elu": Entry(lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))), "Elu", None),
    "Sigmoid": Entry(_sigmoid, "Sigmoid", None),
    "Tanh": Entry(np.tanh, "Tanh", None),
    "GeluExact": Entry(_gelu_exact, "GeluExact", None),
    "GeluApproximate": Entry(_gelu_tanh, "GeluApproximate", None),
    "Swish": Entry(lambda x: x * _sigmoid(x), None, None),
    "HardSwish": Entry(lambda x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0, None, None),
}
# Values each channel is probed at: both signs, past Relu6's cap and swish's knees.
GRID = np.concatenate([np.linspace(-8.0, 8.0, 161), [-0.37, 0.37, 2.9, 3.1]]).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Activation:
    """An activation found after a layer's output."""

    kind: str  # a key of ACTIVATIONS
    nodes: tuple[str, ...]  # every node that computes it, ``end`` last
    end: node_def_pb2.NodeDef  # the node whose output 0 is the activation's result
    alpha: float | np.ndarray | None = None  # LeakyRelu: a float; PReLU: one per channel


def _data_inputs(node: node_def_pb2.NodeDef) -> list[str]:
    return [i for i in node.input if not i.startswith("^")]


def _constant(nodes: dict, input_string: str, depth: int = 4) -> bool:
    """Whether ``input_string`` is known before run time: a Const (behind Identity), or an
    elementwise op of such (a frozen PReLU's Neg of alpha when constants were not folded)."""
    if const_behind_identity(nodes, input_string) is not None:
        return True
    is_control, name, port = parse_input(input_string)
    node = nodes.get(name)
    if depth == 0 or is_control or port != 0 or node is None or node.op not in ELEMENTWISE_OPS:
        return False
    return bool(_data_inputs(node)) and all(_constant(nodes, i, depth - 1) for i in _data_inputs(node))


def _region(producer: str, nodes: dict, consumers: dict) -> list[node_def_pb2.NodeDef]:
    """Elementwise float nodes reading only ``producer``:0, constants and each other, in the order
    they are reached (at most MAX_NODES)."""
    inside: dict[str, node_def_pb2.NodeDef] = {}
    changed = True
    while changed and len(inside) < MAX_NODES:
        changed = False
        for name in [producer, *inside]:
            for reader in consumers.get(name, []):
                if reader.name in inside or reader.op not in ELEMENTWISE_OPS or control_inputs(reader):
                    continue
                if reader.op != "IdentityN" and attr_type(reader) != types_pb2.DT_FLOAT:
                    continue
                ok = True
                for input_string in _data_inputs(reader):
                    _, source, port = parse_input(input_string)
                    if port == 0 and (source == producer or source in inside):
                        continue
                    if not _constant(nodes, input_string):
                        ok = False
                        break
                if ok and len(inside) < MAX_NODES:
                    inside[reader.name] = reader
                    changed = True
    return list(inside.values())


def _closed_group(producer: str, end: node_def_pb2.NodeDef, region: dict, consumers: dict,
                  outputs: set[str]) -> list[str] | None:
    """The nodes ``end`` is computed from inside ``region``, when the producer and each of them
    but ``end`` are read only inside the group (and are not graph outputs), else None."""
    group, stack = {end.name}, [end]
    while stack:
        node = stack.pop()
        for input_string in _data_inputs(node):
            source = parse_input(input_string)[1]
            if source in region and source not in group:
                group.add(source)
                stack.append(region[source])
    if producer in outputs or any(r.name not in group for r in consumers.get(producer, [])):
        return None
    for name in group - {end.name}:
        if name in outputs or any(r.name not in group for r in consumers.get(name, [])):
            return None
    if end.op == "IdentityN":
        # Keras' swish: IdentityN(result, x, beta) for its custom gradient; only output 0 may be read.
        if any(parse_input(i)[2] != 0 for r in consumers.get(end.name, []) for i in r.input
               if parse_input(i)[1] == end.name):
            return None
    return [name for name in region if name in group]


def _evaluate(producer: str, group: list[str], nodes: dict, channels: int) -> np.ndarray | None:
    """The group's output on GRID for every channel ([len(GRID), channels]), or None when it does
    not act value by value per channel (a constant that does not broadcast over channels)."""
    import tensorflow as tf

    graph_def = graph_pb2.GraphDef()
    graph_def.node.append(make_node("Placeholder", producer, [], {"dtype": types_pb2.DT_FLOAT}))
    copied = {producer}

    def copy(name: str) -> None:
        """Copy a constant input and whatever it is computed from."""
        if name in copied:
            return
        copied.add(name)
        node = nodes[name]
        for input_string in _data_inputs(node):
            copy(parse_input(input_string)[1])
        clean = node_def_pb2.NodeDef()
        clean.CopyFrom(node)
        clean.device = ""
        graph_def.node.append(clean)

    for name in group:
        for input_string in _data_inputs(nodes[name]):
            if parse_input(input_string)[1] not in group:
                copy(parse_input(input_string)[1])
        copy(name)
    grid = np.repeat(GRID[:, None], channels, axis=1)
    graph = tf.Graph()
    try:
        with graph.as_default():
            tf.graph_util.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph) as session:
            result = np.asarray(session.run(f"{group[-1]}:0", {f"{producer}:0": grid}), np.float64)
    except (ValueError, tf.errors.OpError):
        return None
    return result.reshape(len(GRID), channels) if result.size == grid.size else None


def _identify(values: np.ndarray) -> tuple[str, float | np.ndarray | None] | None:
    """(kind, alpha) of the function tabulated on GRID (rows) per channel (columns), or None."""
    x = GRID.astype(np.float64)[:, None]
    positive, negative = (x > 0)[:, 0], (x < 0)[:, 0]
    if np.allclose(values[positive], np.broadcast_to(x, values.shape)[positive], rtol=1e-5, atol=1e-5):
        slopes = values[negative] / x[negative]
        alpha = slopes.mean(axis=0)
        # Trained PReLUs hold negative and above-1 slopes too (mtcnn's do); a slope of 1 everywhere
        # is no activation at all (an Identity).
        if np.allclose(slopes, alpha, rtol=1e-4, atol=1e-5):
            if np.allclose(alpha, 1.0, rtol=1e-6, atol=1e-7):
                return None
            if np.allclose(alpha, 0.0, atol=1e-7):
                return "Relu", None
            if np.allclose(alpha, alpha[0], rtol=1e-6, atol=1e-8):
                return "LeakyRelu", float(alpha[0])
            return "PReLU", alpha.astype(np.float32)
    for kind, entry in ACTIVATIONS.items():
        if entry.reference is not None:
            expected = np.broadcast_to(entry.reference(x), values.shape)
            if np.allclose(values, expected, rtol=1e-5, atol=2e-5):
                return kind, None
    return None


def find_activation(producer: str, nodes: dict, consumers: dict, channels: int,
                    outputs: set[str] = frozenset()) -> Activation | None:
    """The activation that alone reads ``producer`` (a layer's last float node with ``channels``
    output channels), or None: the smallest group that closes, among the elementwise nodes after
    it, and computes a function of :data:`ACTIVATIONS`."""
    region_nodes = _region(producer, nodes, consumers)
    region = {node.name: node for node in region_nodes}
    for end in region_nodes:  # reached first: the smallest groups first
        group = _closed_group(producer, end, region, consumers, outputs)
        if group is None:
            continue
        values = _evaluate(producer, group, nodes, channels)
        found = _identify(values) if values is not None else None
        if found is not None:
            # Keras' IdentityN passes its first input through: the group's value is that node's.
            return Activation(found[0], tuple(group), end, found[1])
    return None


def float_prelu(activation: Activation, producer: str, device: str) -> list[node_def_pb2.NodeDef] | None:
    """A PReLU that no kernel fuses, in fewer float ops than Keras' five (Relu, Neg, Relu, Mul,
    AddV2), named like its last node: per channel, ``Maximum(y, alpha * y)`` when every alpha is at
    most 1, ``Minimum`` when every alpha is at least 1 (the same values: for y < 0 the larger of y
    and alpha * y is alpha * y exactly when alpha <= 1), None when the alphas straddle 1; with one
    alpha for every channel, a LeakyRelu. After an int8 layer the PReLU is where the time goes
    (mtcnn ONet at 64 rows: 15.8 of 23.5 ms, docs/differences/int8_fusions.md)."""
    name = activation.end.name
    if activation.kind == "LeakyRelu" and len(activation.nodes) > 1:
        # A PReLU whose alphas are all equal (Keras' form, five ops): TensorFlow's LeakyRelu.
        node = make_node("LeakyRelu", name, [producer], {"T": types_pb2.DT_FLOAT})
        node.attr["alpha"].f = float(activation.alpha)
        node.device = device
        return [node]
    if activation.kind != "PReLU":
        return None
    alpha = np.asarray(activation.alpha, np.float32)
    if (alpha <= 1.0).all():
        op = "Maximum"
    elif (alpha >= 1.0).all():
        op = "Minimum"
    else:
        return None
    nodes = [content_const(f"{name}/alpha", alpha, types_pb2.DT_FLOAT),
             make_node("Mul", f"{name}/scaled", [producer, f"{name}/alpha"], {"T": types_pb2.DT_FLOAT}),
             make_node(op, name, [producer, f"{name}/scaled"], {"T": types_pb2.DT_FLOAT})]
    for node in nodes:
        node.device = device
    return nodes


def float_form(nodes: list[node_def_pb2.NodeDef] | None) -> str:
    """How :func:`float_prelu`'s nodes compute the PReLU, for log lines ('' for None)."""
    if not nodes:
        return ""
    return " as one LeakyRelu" if nodes[-1].op == "LeakyRelu" else f" as {nodes[-1].op}(y, alpha * y)"
