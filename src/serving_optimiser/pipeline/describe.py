"""The notebook's ``describe_graph``: the counts it printed before and after freezing and optimising."""

from __future__ import annotations

from tensorflow.core.framework import graph_pb2

VARIABLE_OPS = ("VariableV2", "Variable", "VarHandleOp")


def describe_graph(graph_def: graph_pb2.GraphDef) -> dict:
    nodes = list(graph_def.node)
    return {
        "input_features": sorted(node.name for node in nodes if node.op == "Placeholder"),
        "output_probabilities": sorted(node.name for node in nodes if node.op == "Softmax"),
        "const_count": sum(node.op == "Const" for node in nodes),
        "variable_count": sum(node.op in VARIABLE_OPS for node in nodes),
        "identity_count": sum(node.op == "Identity" for node in nodes),
        "dequantize_count": sum(node.op == "Dequantize" for node in nodes),
        "total_nodes": len(nodes),
        "graph_bytes": graph_def.ByteSize(),
    }


def saved_model_graph_def(saved_model_dir: str) -> graph_pb2.GraphDef:
    """The serving MetaGraph's GraphDef of a SavedModel, read without loading it."""
    from pathlib import Path

    from tensorflow.core.protobuf import saved_model_pb2

    from ..errors import UserError

    path = Path(saved_model_dir) / "saved_model.pb"
    saved_model = saved_model_pb2.SavedModel()
    try:
        saved_model.ParseFromString(path.read_bytes())
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from None
    except Exception:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise UserError(f"{path}: not a SavedModel protobuf") from None
    for meta_graph in saved_model.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags:
            return meta_graph.graph_def
    raise UserError(f"{path}: no MetaGraph tagged 'serve'")
