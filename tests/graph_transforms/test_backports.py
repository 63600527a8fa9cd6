"""backport_concatv2 and backport_tensor_array_v3."""

import numpy as np
import pytest
import tensorflow as tf
from graph_helpers import (
    assert_same_structure,
    graph_from_text,
    nodes_by_name,
    op_counts,
    ours_and_oracle,
    requires_oracle,
    run_graph,
)
from tensorflow.python.framework import op_def_registry

from serving_optimiser.graph_transforms import TransformGraph


def float_const(name: str, values) -> str:
    floats = " ".join(f"float_val: {v}" for v in values)
    return f"""node {{ name: "{name}" op: "Const" attr {{ key: "dtype" value {{ type: DT_FLOAT }} }}
      attr {{ key: "value" value {{ tensor {{ dtype: DT_FLOAT tensor_shape {{ dim {{ size: {len(values)} }} }}
        {floats} }} }} }} }}
    """


AXIS_CONST = """node { name: "const_node3" op: "Const" attr { key: "dtype" value { type: DT_INT32 } }
  attr { key: "value" value { tensor { dtype: DT_INT32 tensor_shape { } int_val: 0 } } } }
"""


def concat_graph(extra_inputs: str = "", extra_nodes: str = "") -> tf.compat.v1.GraphDef:
    return graph_from_text(
        float_const("const_node1", (1.0, 2.0)) + float_const("const_node2", (3.0, 4.0, 5.0)) + AXIS_CONST
        + extra_nodes
        + f"""node {{ name: "concat_node" op: "ConcatV2" input: "const_node1" input: "const_node2"
            input: "const_node3" {extra_inputs}
            attr {{ key: "N" value {{ i: 2 }} }} attr {{ key: "T" value {{ type: DT_FLOAT }} }}
            attr {{ key: "Tidx" value {{ type: DT_INT32 }} }} }}"""
    )


CONCAT = concat_graph()


def test_backport_concatv2_moves_the_axis_first_and_drops_tidx():
    result = TransformGraph(CONCAT, [], ["concat_node"], ["backport_concatv2"])
    concat = nodes_by_name(result)["concat_node"]
    assert concat.op == "Concat"
    assert list(concat.input) == ["const_node3", "const_node1", "const_node2"]
    assert set(concat.attr) == {"N", "T"}
    np.testing.assert_array_equal(run_graph(result, ["concat_node"])[0], run_graph(CONCAT, ["concat_node"])[0])


def test_backport_concatv2_keeps_control_inputs_last():
    graph = concat_graph('input: "^const_node1"')
    result = TransformGraph(graph, [], ["concat_node"], ["backport_concatv2"])
    assert list(nodes_by_name(result)["concat_node"].input) == [
        "const_node3", "const_node1", "const_node2", "^const_node1"]
    np.testing.assert_array_equal(run_graph(result, ["concat_node"])[0], run_graph(graph, ["concat_node"])[0])


def test_backport_concatv2_negative_case_graph_unchanged():
    graph = graph_from_text(float_const("a", (1.0,)) + 'node { name: "neg" op: "Neg" input: "a" '
                            'attr { key: "T" value { type: DT_FLOAT } } }')
    assert TransformGraph(graph, [], ["neg"], ["backport_concatv2"]) == graph


@requires_oracle
def test_backport_concatv2_matches_oracle():
    ours, oracle = ours_and_oracle(CONCAT, [], ["concat_node"], "backport_concatv2")
    assert list(ours.node) == list(oracle.node)


@requires_oracle
def test_backport_concatv2_control_input_differs_from_oracle():
    """The C++ tool took the trailing ^control input as the axis (docs/differences/backports.md)."""
    graph = concat_graph('input: "^const_node1"')
    ours, oracle = ours_and_oracle(graph, [], ["concat_node"], "backport_concatv2")
    assert nodes_by_name(oracle)["concat_node"].input[0] == "^const_node1"
    assert nodes_by_name(ours)["concat_node"].input[0] == "const_node3"


def tensor_array_graph() -> tf.compat.v1.GraphDef:
    """TensorArrayV3 read through :0 and :1 (flow), with a grad array reading both too."""
    graph = tf.Graph()
    with graph.as_default():
        size = tf.constant(1, name="size")
        array = tf.raw_ops.TensorArrayV3(size=size, dtype=tf.float32, element_shape=[1, 2], name="tensor_array_node")
        index = tf.constant(0, name="index")
        value = tf.constant([[1.0, 2.0]], name="value")
        write = tf.raw_ops.TensorArrayWriteV3(handle=array[0], index=index, value=value, flow_in=array[1],
                                              name="write")
        tf.raw_ops.TensorArrayReadV3(handle=array[0], index=index, flow_in=write, dtype=tf.float32, name="read")
        tf.raw_ops.TensorArraySizeV3(handle=array[0], flow_in=write, name="size_op")
        tf.raw_ops.TensorArrayGradV3(handle=array[0], flow_in=array[1], source="grad", name="grad_node")
    return graph.as_graph_def()


TENSOR_ARRAY = tensor_array_graph()


def test_backport_tensor_array_v3_renames_ops_and_replaces_flow():
    result = TransformGraph(TENSOR_ARRAY, [], ["read"], ["backport_tensor_array_v3"])
    nodes = nodes_by_name(result)
    assert {name: nodes[name].op for name in ("tensor_array_node", "grad_node", "write", "read", "size_op")} == {
        "tensor_array_node": "TensorArrayV2", "grad_node": "TensorArrayGradV2", "write": "TensorArrayWriteV2",
        "read": "TensorArrayReadV2", "size_op": "TensorArraySizeV2"}
    assert not any(i == "tensor_array_node:1" for node in result.node for i in node.input)
    flow = nodes["tensor_array_node/replacement_flow_node"]
    assert flow.op == "Const" and flow.attr["value"].tensor.float_val == [1.0]
    assert "grad_node/replacement_flow_node" in nodes
    assert list(nodes["write"].input)[3] == "tensor_array_node/replacement_flow_node"
    assert list(nodes["grad_node"].input) == ["tensor_array_node", "tensor_array_node/replacement_flow_node"]


def test_backport_tensor_array_v3_result_loads_and_computes_the_same():
    result = TransformGraph(TENSOR_ARRAY, [], ["read"], ["backport_tensor_array_v3"])
    assert TENSOR_ARRAY.versions.producer > 25
    assert result.versions.producer == 25  # TF 2.21 loads the V2 ops only below producer 26
    for node in result.node:  # every attr is one the V2 op defines
        assert set(node.attr) <= {attr.name for attr in op_def_registry.get(node.op).attr}, node.name
    before, after = run_graph(TENSOR_ARRAY, ["read", "size_op"]), run_graph(result, ["read", "size_op"])
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kind", ["Write", "Read", "Gather", "Scatter", "Concat", "Split", "Size", "Close"]
)
def test_backport_tensor_array_v3_renames_each_lone_user_op(kind):
    graph = graph_from_text(f'node {{ name: "lone" op: "TensorArray{kind}V3" }}')
    result = TransformGraph(graph, [], ["lone"], ["backport_tensor_array_v3"])
    assert nodes_by_name(result)["lone"].op == f"TensorArray{kind}V2"


def test_backport_tensor_array_v3_negative_case_graph_unchanged():
    assert TransformGraph(CONCAT, [], ["concat_node"], ["backport_tensor_array_v3"]) == CONCAT


@requires_oracle
def test_backport_tensor_array_v3_matches_oracle_but_drops_v3_only_attrs():
    ours, oracle = ours_and_oracle(TENSOR_ARRAY, [], ["read"], "backport_tensor_array_v3")
    assert_same_structure(ours, oracle)
    assert op_counts(ours) == op_counts(oracle)
    ours_array, oracle_array = nodes_by_name(ours)["tensor_array_node"], nodes_by_name(oracle)["tensor_array_node"]
    assert set(oracle_array.attr) - set(ours_array.attr) == {"identical_element_shapes"}
    assert oracle.versions.producer == 0 and ours.versions.producer == 25
    np.testing.assert_array_equal(run_graph(ours, ["read"])[0], run_graph(oracle, ["read"])[0])
