"""Test helpers: build small graphs, run them in TensorFlow, and call the old C++ engine
(the private binding TF 2.21 still ships) as an oracle."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.framework import graph_pb2
from tensorflow.python.framework import tensor_util

from serving_optimiser.graph_transforms import TransformGraph
from serving_optimiser.graph_transforms.graph_utils import canonical_input_name, const_value

try:
    from tensorflow.python.util import _pywrap_transform_graph
except ImportError:  # pragma: no cover - depends on the TF build
    _pywrap_transform_graph = None


def graph_from_text(text: str) -> graph_pb2.GraphDef:
    return text_format.Parse(text, graph_pb2.GraphDef())


def graph_of(*nodes) -> graph_pb2.GraphDef:
    """A GraphDef holding ``nodes`` (NodeDefs, e.g. from ``graph_utils.make_node``), in order."""
    result = graph_pb2.GraphDef()
    result.node.extend(nodes)
    return result


def const_text(name: str, values=(1.0, 2.0), dtype: str = "DT_FLOAT", device: str = "") -> str:
    """A 1-D Const node in GraphDef text format, for building graphs with ``graph_from_text``."""
    floats = " ".join(f"float_val: {v}" for v in values)
    return f"""node {{ name: "{name}" op: "Const" device: "{device}"
      attr {{ key: "dtype" value {{ type: {dtype} }} }}
      attr {{ key: "value" value {{ tensor {{ dtype: {dtype}
        tensor_shape {{ dim {{ size: {len(values)} }} }} {floats} }} }} }} }}
    """


def op_text(name: str, op_type: str, *inputs: str, extra: str = "", device: str = "") -> str:
    """A float op node (attr T) in GraphDef text format; ``extra`` holds more attrs."""
    inputs_text = " ".join(f'input: "{i}"' for i in inputs)
    return f"""node {{ name: "{name}" op: "{op_type}" device: "{device}" {inputs_text}
      attr {{ key: "T" value {{ type: DT_FLOAT }} }} {extra} }}
    """


def ops_by_name(graph_def: graph_pb2.GraphDef) -> dict[str, str]:
    return {node.name: node.op for node in graph_def.node}


def nodes_by_name(graph_def: graph_pb2.GraphDef) -> dict:
    return {node.name: node for node in graph_def.node}


def op_counts(graph_def: graph_pb2.GraphDef) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph_def.node:
        counts[node.op] = counts.get(node.op, 0) + 1
    return counts


def run_graph(
    graph_def: graph_pb2.GraphDef,
    fetches: Sequence[str],
    feeds: dict[str, np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Import ``graph_def`` into a fresh graph and run it in a v1 Session.

    Fetch/feed names may omit ``:0``.
    """

    def tensor(name: str) -> str:
        return name if ":" in name else f"{name}:0"

    with tf.compat.v1.Session(graph=_imported(graph_def)) as session:
        feed_dict = {tensor(k): v for k, v in (feeds or {}).items()}
        return session.run([tensor(f) for f in fetches], feed_dict=feed_dict)


def _imported(graph_def: graph_pb2.GraphDef) -> tf.Graph:
    graph = tf.Graph()
    with graph.as_default():
        # import_graph_def adds default attrs to the GraphDef it is given; import a copy so
        # the caller's graph (often a module-level constant) is not changed behind its back.
        tf.compat.v1.import_graph_def(graph_pb2.GraphDef.FromString(graph_def.SerializeToString()), name="")
    return graph


def ops_run(graph_def: graph_pb2.GraphDef, fetch: str, feeds: dict[str, np.ndarray]) -> set[str]:
    """The op types that ran, as the session traced them: after TensorFlow's own rewrites (oneDNN's
    renames its ops, e.g. _MklLayerNorm, _MklQuantizeV2)."""
    metadata = tf.compat.v1.RunMetadata()
    with tf.compat.v1.Session(graph=_imported(graph_def)) as session:
        session.run(f"{fetch}:0", {f"{name}:0": value for name, value in feeds.items()},
                    options=tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE),
                    run_metadata=metadata)
    return {stats.timeline_label.split(" = ")[1].split("(")[0] for device in metadata.step_stats.dev_stats
            for stats in device.node_stats if " = " in stats.timeline_label}


def have_oracle() -> bool:
    return _pywrap_transform_graph is not None


requires_oracle = pytest.mark.skipif(
    not have_oracle(), reason="this TensorFlow build has no private _pywrap_transform_graph binding"
)


def oracle_transform(
    graph_def: graph_pb2.GraphDef, inputs: Sequence[str], outputs: Sequence[str], transforms: str | Sequence[str]
) -> graph_pb2.GraphDef:
    """Run the old C++ engine (test-only oracle) on ``graph_def``."""
    if isinstance(transforms, str):
        transforms = [transforms]
    result = _pywrap_transform_graph.TransformGraphWithStringInputs(
        graph_def.SerializeToString(), ",".join(inputs), ",".join(outputs), " ".join(transforms).encode()
    )
    out = graph_pb2.GraphDef()
    out.ParseFromString(result)
    return out


def ours_and_oracle(
    graph_def: graph_pb2.GraphDef, inputs: Sequence[str], outputs: Sequence[str], transforms: str | Sequence[str]
) -> tuple[graph_pb2.GraphDef, graph_pb2.GraphDef]:
    if isinstance(transforms, str):
        transforms = [transforms]
    return TransformGraph(graph_def, inputs, outputs, transforms), oracle_transform(
        graph_def, inputs, outputs, transforms
    )


def structure_differences(
    ours: graph_pb2.GraphDef, oracle: graph_pb2.GraphDef, canonical_inputs: bool = False
) -> list[str]:
    """Node names, op types and inputs that differ, as short readable lines, ignoring node order.

    With ``canonical_inputs``, ``ph`` and ``ph:0`` name the same tensor: on whole models some
    of our transforms keep the spelling the C++ engine rewrote (a documented cosmetic difference).
    """
    ours_nodes, oracle_nodes = nodes_by_name(ours), nodes_by_name(oracle)
    differences = [f"only in ours: {name} ({ours_nodes[name].op})" for name in ours_nodes if name not in oracle_nodes]
    differences += [
        f"only in oracle: {name} ({node.op})" for name, node in oracle_nodes.items() if name not in ours_nodes
    ]
    spelling = canonical_input_name if canonical_inputs else str
    for name, node in oracle_nodes.items():
        mine = ours_nodes.get(name)
        if mine is None:
            continue
        if mine.op != node.op:
            differences.append(f"{name}: op {mine.op} (ours) vs {node.op} (oracle)")
            continue
        ours_inputs, oracle_inputs = [spelling(i) for i in mine.input], [spelling(i) for i in node.input]
        if ours_inputs != oracle_inputs:
            differences.append(f"{name}: inputs {ours_inputs} (ours) vs {oracle_inputs} (oracle)")
    return differences


def assert_same_structure(
    ours: graph_pb2.GraphDef, oracle: graph_pb2.GraphDef, canonical_inputs: bool = False
) -> None:
    """Same node names, ops and inputs, ignoring node order (see ``structure_differences``)."""
    differences = structure_differences(ours, oracle, canonical_inputs)
    shown = "\n  ".join(differences[:15])
    assert not differences, f"{len(differences)} structural differences:\n  {shown}"


def frozen_function_graph(function, *input_specs) -> graph_pb2.GraphDef:
    """Freeze a Python function (closing over tf.Variables) the TF 2 way."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    concrete = tf.function(function).get_concrete_function(*input_specs)
    return convert_variables_to_constants_v2(concrete).graph.as_graph_def()


# ---------------------------------------------------------------------------------------------
# Builders and comparisons shared by several test modules
# ---------------------------------------------------------------------------------------------


def build(function) -> graph_pb2.GraphDef:
    """The GraphDef of the ops ``function`` creates in a fresh ``tf.Graph``."""
    graph = tf.Graph()
    with graph.as_default():
        function()
    return graph.as_graph_def()


def consts_of(graph_def: graph_pb2.GraphDef) -> dict[str, np.ndarray]:
    return {n.name: const_value(n) for n in graph_def.node if n.op == "Const"}


def sorted_nodes(graph_def: graph_pb2.GraphDef) -> list[tuple]:
    return sorted((n.name, n.op, tuple(n.input)) for n in graph_def.node)


def assert_same_outputs(before, after, outputs, atol, feeds=None, rtol=0.0):
    for expected, actual in zip(run_graph(before, outputs, feeds), run_graph(after, outputs, feeds)):
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def max_error(graph, transformed, outputs, feeds=None, transformed_feeds=None) -> float:
    expected = run_graph(graph, outputs, feeds)
    actual = run_graph(transformed, outputs, transformed_feeds if transformed_feeds is not None else feeds)
    return max(float(np.abs(a - e).max()) for a, e in zip(actual, expected, strict=True))


# ---------------------------------------------------------------------------------------------
# A convolution and its weights (test_batch_norms, test_old_batch_norms)
# ---------------------------------------------------------------------------------------------

INPUT_VALUES = np.array([1, 4, 2, 5, 3, 6, -1, -4, -2, -5, -3, -6], np.float32)
WEIGHT_VALUES = np.array([1, 2, 3, 4, 0.1, 0.2, 0.3, 0.4], np.float32)


def const(name, values, shape=None, dtype=np.float32):
    values = np.asarray(values, dtype)
    return tf.constant(values if shape is None else values.reshape(shape), name=name)


def conv(op_type, inputs, weights, name="conv_op", **attrs):
    if op_type == "MatMul":
        return tf.raw_ops.MatMul(a=inputs, b=weights, name=name, **attrs)
    layer = getattr(tf.raw_ops, op_type)
    return layer(input=inputs, filter=weights, strides=[1, 1, 1, 1], padding="VALID", name=name, **attrs)


def conv_input_and_weights(op_type):
    if op_type == "MatMul":
        return const("input_op", INPUT_VALUES, (6, 2)), const("weights_op", [1, 2, 0.3, 0.4], (2, 2))
    return const("input_op", INPUT_VALUES, (1, 1, 6, 2)), const("weights_op", WEIGHT_VALUES, (1, 2, 2, 2))


# ---------------------------------------------------------------------------------------------
# An eight-bit BiasAdd (test_quantize_nodes, test_requantization_ranges)
# ---------------------------------------------------------------------------------------------


def quantized_const(name, values, shape=None):
    array = np.asarray(values, np.uint8)
    array = array.reshape(shape) if shape is not None else array
    return tf.raw_ops.Const(value=tensor_util.make_tensor_proto(array, tf.quint8), dtype=tf.quint8, name=name)


def eight_bit_bias_add(make_tail):
    """QuantizedBiasAdd -> RequantizationRange -> Requantize -> Dequantize ``dequantize_op``, then tail."""

    def make_ops():
        bias_add = tf.raw_ops.QuantizedBiasAdd(
            input=quantized_const("quantized_op", [0] * 6, (1, 6)),
            bias=quantized_const("offset_op", range(1, 7)),
            min_input=const("quantized_min_op", 2.0, ()),
            max_input=const("quantized_max_op", 2.0, ()),
            min_bias=const("offset_min_op", 0.0, ()),
            max_bias=const("offset_max_op", 255.0, ()),
            out_type=tf.qint32,
            name="bias_add_op",
        )
        requant_range = tf.raw_ops.RequantizationRange(
            input=bias_add[0], input_min=bias_add[1], input_max=bias_add[2], name="requantization_range_op"
        )
        requantize = tf.raw_ops.Requantize(
            input=bias_add[0],
            input_min=bias_add[1],
            input_max=bias_add[2],
            requested_output_min=requant_range[0],
            requested_output_max=requant_range[1],
            out_type=tf.quint8,
            name="requantize_op",
        )
        dequantize = tf.raw_ops.Dequantize(
            input=requantize[0],
            min_range=requantize[1],
            max_range=requantize[2],
            mode="MIN_FIRST",
            name="dequantize_op",
        )
        make_tail(dequantize)

    return build(make_ops)
