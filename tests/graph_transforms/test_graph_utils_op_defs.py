"""graph_utils.op_defs: a node's OpDef from the graph's function library first, then TF's op
registry, and the dtypes of its arguments (type attrs, number attrs, type lists, refs)."""

import pytest
from tensorflow.core.framework import function_pb2, types_pb2

from serving_optimiser.graph_transforms import TransformError
from serving_optimiser.graph_transforms.graph_utils import make_node
from serving_optimiser.graph_transforms.graph_utils.op_defs import arg_types, lookup_op_def, output_types

FLOAT = types_pb2.DT_FLOAT




def library_with(name: str) -> function_pb2.FunctionDefLibrary:
    library = function_pb2.FunctionDefLibrary()
    function = library.function.add()
    function.signature.name = name
    function.signature.output_arg.add(name="out", type=types_pb2.DT_INT64)
    return library


def test_lookup_op_def_finds_registered_ops_and_library_functions():
    assert lookup_op_def("MatMul").name == "MatMul"
    assert lookup_op_def("my_function", library_with("my_function")).output_arg[0].name == "out"
    assert lookup_op_def("my_function") is None
    assert lookup_op_def("NotAnOp", library_with("my_function")) is None


def test_lookup_op_def_prefers_the_library_as_tensorflow_does():
    library = library_with("Relu")
    assert lookup_op_def("Relu", library).output_arg[0].type == types_pb2.DT_INT64
    signatures = {f.signature.name: f.signature for f in library.function}
    assert lookup_op_def("Relu", signatures) == library.function[0].signature


def test_output_types_resolve_attrs_numbers_lists_and_refs():
    split = make_node("Split", "split", ["axis", "x"], {"T": FLOAT, "num_split": 3})
    assert output_types(split, lookup_op_def("Split")) == [FLOAT] * 3
    identity_n = make_node("IdentityN", "n", ["a", "b"], {"T": [FLOAT, types_pb2.DT_INT32]})
    assert output_types(identity_n, lookup_op_def("IdentityN")) == [FLOAT, types_pb2.DT_INT32]
    variable = make_node("VariableV2", "v", [], {"dtype": FLOAT, "shape": []})
    assert output_types(variable, lookup_op_def("VariableV2")) == [types_pb2.DT_FLOAT_REF]
    matmul = make_node("MatMul", "m", ["a", "b"], {"T": FLOAT})
    assert arg_types(matmul, lookup_op_def("MatMul")) == [("product", [FLOAT])]
    inputs = arg_types(matmul, lookup_op_def("MatMul"), lookup_op_def("MatMul").input_arg)
    assert inputs == [("a", [FLOAT]), ("b", [FLOAT])]


def test_output_types_name_a_missing_attr_unless_only_counting():
    untyped = make_node("Neg", "neg", ["x"])
    with pytest.raises(TransformError, match="node 'neg' \\(Neg\\) has no attr 'T'"):
        output_types(untyped, lookup_op_def("Neg"))
    counted = arg_types(untyped, lookup_op_def("Neg"), unresolved_type=types_pb2.DT_INVALID)
    assert counted == [("y", [types_pb2.DT_INVALID])]
