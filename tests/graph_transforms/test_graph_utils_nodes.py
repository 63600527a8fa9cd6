"""graph_utils.nodes: Const nodes <-> numpy arrays, NodeDefs with attrs from plain values, and
dtype names as the old tool printed them."""

import numpy as np
import pytest
from graph_helpers import graph_of, run_graph
from tensorflow.core.framework import attr_value_pb2, types_pb2

from serving_optimiser.graph_transforms import TransformError
from serving_optimiser.graph_transforms.graph_utils.nodes import (
    const_value,
    dtype_name,
    make_const_node,
    make_node,
    make_tensor_proto,
    set_attr,
)

FLOAT = types_pb2.DT_FLOAT


@pytest.mark.parametrize(
    ("value", "dtype", "expected_dtype"),
    [
        (np.arange(6, dtype=np.float32).reshape(2, 3) / 7, None, np.float32),
        (np.array([-3, 0, 2**40]), None, np.int64),
        (2.5, types_pb2.DT_HALF, np.float16),
        (np.zeros((0, 4), np.float32), None, np.float32),
    ],
    ids=["float-matrix", "int64", "scalar-as-half", "empty"],
)
def test_const_round_trip(value, dtype, expected_dtype):
    node = make_const_node("weights", value, dtype=dtype, device="/cpu:0")
    assert node.op == "Const" and sorted(node.attr) == ["dtype", "value"] and node.device == "/cpu:0"
    result = const_value(node)
    assert result.dtype == expected_dtype
    np.testing.assert_array_equal(result, np.asarray(value).astype(expected_dtype))


def test_const_value_refuses_a_node_that_is_not_a_const():
    with pytest.raises(TransformError, match="node 'relu' \\(Relu\\) is not a Const with a value"):
        const_value(make_node("Relu", "relu", ["x"]))


def test_make_tensor_proto_keeps_shape_and_values():
    proto = make_tensor_proto(np.array([[1.5, -2.0]], np.float32))
    assert [d.size for d in proto.tensor_shape.dim] == [1, 2] and proto.dtype == FLOAT


@pytest.mark.parametrize(
    ("key", "value", "field", "expected"),
    [
        ("T", FLOAT, "type", FLOAT),
        ("axis", 3, "i", 3),
        ("transpose_a", True, "b", True),
        ("epsilon", 0.001, "f", pytest.approx(0.001)),
        ("padding", "SAME", "s", b"SAME"),
        ("strides", [1, 2, 2, 1], "list.i", [1, 2, 2, 1]),
        ("Tin", [FLOAT, types_pb2.DT_INT32], "list.type", [FLOAT, types_pb2.DT_INT32]),
        ("_class", ["loc:@weights"], "list.s", [b"loc:@weights"]),
        ("shape", attr_value_pb2.AttrValue(i=5), "i", 5),
    ],
    ids=["dtype-key", "int", "bool", "float", "string", "int-list", "dtype-list", "string-list", "attr-value"],
)
def test_set_attr(key, value, field, expected):
    node = make_node("Op", "n", attrs={key: value})
    attr = node.attr[key]
    for part in field.split("."):
        attr = getattr(attr, part)
    assert (list(attr) if field.startswith("list") else attr) == expected


def test_set_attr_names_what_it_cannot_store():
    with pytest.raises(TypeError, match=r"cannot store .* in attr 'odd'"):
        set_attr(make_node("Op", "n"), "odd", object())


def test_built_nodes_run_in_tensorflow():
    graph_def = graph_of(
        make_const_node("a", np.array([1.0, 2.0], np.float32)),
        make_const_node("b", np.array([10.0, 20.0], np.float32)),
        make_node("AddV2", "sum", ["a", "b"], {"T": FLOAT}),
        make_node("Cast", "as_int", ["sum"], {"SrcT": FLOAT, "DstT": types_pb2.DT_INT32, "Truncate": False}),
    )
    [result] = run_graph(graph_def, ["as_int"])
    assert result.dtype == np.int32
    np.testing.assert_array_equal(result, [11, 22])


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(FLOAT, "float32"), (types_pb2.DT_QUINT8, "quint8"), (types_pb2.DT_INVALID, "invalid"), (999, "unknown(999)")],
    ids=["float", "quint8", "invalid", "unknown"],
)
def test_dtype_name(dtype, expected):
    assert dtype_name(dtype) == expected
