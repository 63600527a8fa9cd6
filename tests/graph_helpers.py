"""Test helpers: build small graphs, run them in TensorFlow, and call the old C++ engine
(the private binding TF 2.21 still ships) as an oracle."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.framework import graph_pb2

from serving_optimiser.graph_transforms import TransformGraph

try:
    from tensorflow.python.util import _pywrap_transform_graph
except ImportError:  # pragma: no cover - depends on the TF build
    _pywrap_transform_graph = None


def graph_from_text(text: str) -> graph_pb2.GraphDef:
    return text_format.Parse(text, graph_pb2.GraphDef())


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

    graph = tf.Graph()
    with graph.as_default():
        # import_graph_def adds default attrs to the GraphDef it is given; import a copy so
        # the caller's graph (often a module-level constant) is not changed behind its back.
        tf.compat.v1.import_graph_def(graph_pb2.GraphDef.FromString(graph_def.SerializeToString()), name="")
    with tf.compat.v1.Session(graph=graph) as session:
        feed_dict = {tensor(k): v for k, v in (feeds or {}).items()}
        return session.run([tensor(f) for f in fetches], feed_dict=feed_dict)


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


def assert_same_structure(ours: graph_pb2.GraphDef, oracle: graph_pb2.GraphDef, check_inputs: bool = True) -> None:
    """Same node names, ops and (optionally) canonical inputs, ignoring node order."""
    assert ops_by_name(ours) == ops_by_name(oracle)
    if check_inputs:
        ours_nodes, oracle_nodes = nodes_by_name(ours), nodes_by_name(oracle)
        for name, node in oracle_nodes.items():
            assert list(ours_nodes[name].input) == list(node.input), name


def frozen_function_graph(function, *input_specs) -> graph_pb2.GraphDef:
    """Freeze a Python function (closing over tf.Variables) the TF 2 way."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    concrete = tf.function(function).get_concrete_function(*input_specs)
    return convert_variables_to_constants_v2(concrete).graph.as_graph_def()
