"""Building nodes from plain values: Const nodes <-> numpy arrays, NodeDefs and their attrs, and
dtype names as the old tool printed them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tensorflow.core.framework import attr_value_pb2, node_def_pb2, tensor_pb2, types_pb2
from tensorflow.python.framework import tensor_util

from ..errors import TransformError


def const_value(node: node_def_pb2.NodeDef) -> np.ndarray:
    """The numpy value of a Const node (error naming the node if it has none)."""
    if node.op != "Const" or "value" not in node.attr:
        raise TransformError(f"node '{node.name}' ({node.op}) is not a Const with a value")
    return tensor_util.MakeNdarray(node.attr["value"].tensor)


def make_const_node(
    name: str, value: np.ndarray | float | int, dtype: int | None = None, device: str = ""
) -> node_def_pb2.NodeDef:
    """A Const with only ``dtype`` and ``value`` attrs, as the C++ tool built them."""
    array = np.asarray(value)
    tensor = tensor_util.make_tensor_proto(array, dtype=dtype, shape=array.shape)
    node = node_def_pb2.NodeDef(name=name, op="Const")
    if device:
        node.device = device
    node.attr["dtype"].type = tensor.dtype
    node.attr["value"].tensor.CopyFrom(tensor)
    return node


def make_tensor_proto(value: np.ndarray, dtype: int | None = None) -> tensor_pb2.TensorProto:
    array = np.asarray(value)
    return tensor_util.make_tensor_proto(array, dtype=dtype, shape=array.shape)


def make_node(
    op: str, name: str, inputs: Sequence[str] = (), attrs: dict | None = None, device: str = ""
) -> node_def_pb2.NodeDef:
    """A NodeDef from plain values: attrs given as ints are dtypes only for keys in DTYPE_ATTRS."""
    node = node_def_pb2.NodeDef(op=op, name=name, input=list(inputs), device=device)
    for key, value in (attrs or {}).items():
        set_attr(node, key, value)
    return node


DTYPE_ATTRS = frozenset(
    {
        "T",
        "dtype",
        "DstT",
        "SrcT",
        "Tidx",
        "Tinput",
        "Tfilter",
        "out_type",
        "Toutput",
        "T1",
        "T2",
        "Tpaddings",
        "Tshape",
        "Tblock_shape",
        "Tcrops",
        "U",
        "Tkey",
        "Tval",
        "Tin",
        "Tout",
        "Tactivation",
        "Tindices",
        "Tparams",
        "Taxis",
        "Tmultiples",
        "TI",
    }
)


def set_attr(node: node_def_pb2.NodeDef, key: str, value) -> None:
    """Set an attr from a Python value, a DType enum (for dtype keys) or an AttrValue."""
    attr = node.attr[key]
    if isinstance(value, attr_value_pb2.AttrValue):
        attr.CopyFrom(value)
    elif isinstance(value, bool):
        attr.b = value
    elif isinstance(value, int) and key in DTYPE_ATTRS:
        attr.type = value
    elif isinstance(value, int):
        attr.i = value
    elif isinstance(value, float):
        attr.f = value
    elif isinstance(value, str):
        attr.s = value.encode()
    elif isinstance(value, bytes):
        attr.s = value
    elif isinstance(value, tensor_pb2.TensorProto):
        attr.tensor.CopyFrom(value)
    elif isinstance(value, (list, tuple)):
        if all(isinstance(v, bool) for v in value):
            attr.list.b.extend(value)
        elif all(isinstance(v, int) for v in value) and key in DTYPE_ATTRS | {"U"}:
            attr.list.type.extend(value)
        elif all(isinstance(v, int) for v in value):
            attr.list.i.extend(value)
        elif all(isinstance(v, float) for v in value):
            attr.list.f.extend(value)
        else:
            attr.list.s.extend(v.encode() if isinstance(v, str) else v for v in value)
    else:
        raise TypeError(f"cannot store {value!r} in attr '{key}'")


def dtype_name(dtype_enum: int) -> str:
    """TF's lowercase type name, as the old tool printed it (``float``, ``int32``)."""
    if dtype_enum == types_pb2.DT_INVALID:
        return "invalid"
    from tensorflow.python.framework import dtypes

    try:
        return dtypes.as_dtype(dtype_enum).name
    except TypeError:
        return f"unknown({dtype_enum})"
