"""The notebook's ``describe_graph``: the counts it printed before and after freezing and optimising."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..graph_transforms.op_sets import SUMMARIZED_VARIABLE_OPS

if TYPE_CHECKING:
    from tensorflow.core.framework import graph_pb2


def describe_graph(graph_def: graph_pb2.GraphDef) -> dict:
    nodes = list(graph_def.node)
    return {
        "input_features": sorted(node.name for node in nodes if node.op == "Placeholder"),
        "output_probabilities": sorted(node.name for node in nodes if node.op == "Softmax"),
        "const_count": sum(node.op == "Const" for node in nodes),
        "variable_count": sum(node.op in SUMMARIZED_VARIABLE_OPS for node in nodes),
        "identity_count": sum(node.op == "Identity" for node in nodes),
        "dequantize_count": sum(node.op == "Dequantize" for node in nodes),
        "total_nodes": len(nodes),
        "graph_bytes": graph_def.ByteSize(),
    }


def saved_model_graph_def(saved_model_dir: str) -> graph_pb2.GraphDef:
    """The serving (``serve``-tagged) MetaGraph's GraphDef of a SavedModel, read without loading it."""
    from ..saved_model.reader import read_meta_graph

    return read_meta_graph(saved_model_dir).graph_def

