"""Const builders the 8-bit transforms share: Consts whose value is stored as raw
``tensor_content`` bytes, encoded exactly as the C++ tool encoded them, so outputs can be
compared with the old tool's byte for byte."""

from __future__ import annotations

import numpy as np
from tensorflow.core.framework import node_def_pb2, tensor_pb2, types_pb2

from ..graph_utils import control_inputs, make_node


def tensor_content_proto(array: np.ndarray, dtype: int) -> tensor_pb2.TensorProto:
    """A TensorProto holding ``array``'s bytes in ``tensor_content``, as C++ AsProtoTensorContent."""
    proto = tensor_pb2.TensorProto(dtype=dtype)
    proto.tensor_shape.SetInParent()  # scalars too carry an (empty) shape
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    proto.tensor_content = np.ascontiguousarray(array).tobytes()
    return proto


def content_const(
    name: str, array: np.ndarray, dtype: int, template: node_def_pb2.NodeDef | None = None
) -> node_def_pb2.NodeDef:
    """A Const with dtype and a ``tensor_content`` value, encoded byte for byte as the C++ tool's.

    With a ``template`` node, the Const keeps its device and control inputs.
    """
    inputs = control_inputs(template) if template is not None else []
    node = make_node("Const", name, inputs, device=template.device if template is not None else "")
    node.attr["dtype"].type = dtype
    node.attr["value"].tensor.CopyFrom(tensor_content_proto(np.asarray(array), dtype))
    return node


def float_scalar(name: str, value: float) -> node_def_pb2.NodeDef:
    """A float32 scalar Const (the range endpoints of the quantize/requantize nodes)."""
    return content_const(name, np.float32(value), types_pb2.DT_FLOAT)
