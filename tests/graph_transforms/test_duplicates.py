"""merge_duplicate_nodes.

Which member of a set of duplicates survives: ours is always the first in graph order; the C++
tool emitted nodes in hash order, so after the first round its survivor could be any member.
Differential tests therefore compare graphs up to that choice: the multiset of node
"structures" (op, attrs, device and the structures of the inputs, names only where protected).
"""

from collections import Counter

import numpy as np
import pytest
import tensorflow as tf
from graph_helpers import (
    graph_from_text,
    nodes_by_name,
    op_counts,
    oracle_transform,
    ours_and_oracle,
    requires_oracle,
    run_graph,
)

from serving_optimiser.graph_transforms import TransformError, TransformGraph
from serving_optimiser.graph_transforms.graph_utils import parse_input

WIDTH = 10


def iota(start: float):
    return np.arange(start, start + WIDTH, dtype=np.float32)


def build(body) -> tf.compat.v1.GraphDef:
    graph = tf.Graph()
    with graph.as_default():
        body()
    return graph.as_graph_def()


def duplicate_consts():
    a = tf.constant(iota(1.0), name="a_op")
    b = tf.constant(iota(1.0), name="b_op")
    add = tf.raw_ops.Add(x=a, y=b, name="add_op")
    tf.raw_ops.Mul(x=add, y=tf.constant(iota(2.0), name="c_op"), name="mul_op")


def nested_duplicates():
    a = tf.raw_ops.Relu(features=tf.constant(iota(1.0), name="a_op"), name="a_relu_op")
    b = tf.raw_ops.Relu(features=tf.constant(iota(1.0), name="b_op"), name="b_relu_op")
    add = tf.raw_ops.Add(x=a, y=b, name="add_op")
    return add, tf.constant(iota(2.0), name="c_op")


def nested_with_mul():
    add, c = nested_duplicates()
    tf.raw_ops.Mul(x=add, y=c, name="mul_op")


def in_and_out():
    add, c = nested_duplicates()
    tf.raw_ops.Mul(x=add, y=c, name="mul_op1")
    mul2 = tf.raw_ops.Mul(x=add, y=c, name="mul_op2")
    mul3 = tf.raw_ops.Mul(x=add, y=c, name="mul_op3")
    tf.raw_ops.Mul(x=mul2, y=mul3, name="final_mul_op")


def quantize_chains():
    quantized = tf.constant(np.zeros((), np.uint8), dtype=tf.quint8, name="quantized_op")
    low = tf.constant(2.0, name="quantized_min_op")
    high = tf.constant(2.0, name="quantized_max_op")
    dequantized = tf.raw_ops.Dequantize(input=quantized, min_range=low, max_range=high, name="dequantize_op")
    outputs = []
    for k in (1, 2):
        reshaped = tf.raw_ops.Reshape(tensor=dequantized, shape=tf.constant([-1], name=f"dequantize_reshape_dims{k}"),
                                      name=f"quantize_reshape{k}")
        axis = tf.constant(0, name=f"quantize_reduction_dims{k}")
        tf.raw_ops.Min(input=reshaped, axis=axis, name=f"quantize_min{k}")
        tf.raw_ops.Max(input=reshaped, axis=axis, name=f"quantize_max{k}")
    graph = tf.compat.v1.get_default_graph()
    low1, high1 = graph.get_tensor_by_name("quantize_min1:0"), graph.get_tensor_by_name("quantize_max1:0")
    for k in (1, 2):  # both QuantizeV2 read min1/max1, as in the C++ test
        quantize = tf.raw_ops.QuantizeV2(input=dequantized, min_range=low1, max_range=high1, T=tf.quint8,
                                         mode="MIN_FIRST", name=f"quantize_op{k}")
        outputs.append(tf.raw_ops.Dequantize(input=quantize.output, min_range=quantize.output_min,
                                             max_range=quantize.output_max, name=f"final_dequantize{k}"))
    tf.raw_ops.Add(x=outputs[0], y=outputs[1], name="add_op")


CONSTS = build(duplicate_consts)
NESTED = build(nested_with_mul)
IN_OUT = build(in_and_out)
QUANTIZE = build(quantize_chains)


def merged(graph, inputs, outputs):
    return TransformGraph(graph, inputs, outputs, ["merge_duplicate_nodes"])


def assert_same_outputs(before, after, outputs, tolerance=0.0):
    for b, a in zip(run_graph(before, outputs), run_graph(after, outputs)):
        np.testing.assert_allclose(a, b, rtol=0, atol=tolerance)


def test_merges_identical_consts():
    result = merged(CONSTS, [], ["mul_op"])
    nodes = nodes_by_name(result)
    assert set(nodes) == {"a_op", "add_op", "c_op", "mul_op"}
    assert list(nodes["add_op"].input) == ["a_op", "a_op"]
    assert list(nodes["mul_op"].input) == ["add_op", "c_op"]
    assert_same_outputs(CONSTS, result, ["mul_op"])


def test_merges_nested_duplicates_in_later_rounds():
    result = merged(NESTED, [], ["mul_op"])
    nodes = nodes_by_name(result)
    assert set(nodes) == {"a_op", "a_relu_op", "add_op", "c_op", "mul_op"}
    assert list(nodes["add_op"].input) == ["a_relu_op", "a_relu_op"]
    assert_same_outputs(NESTED, result, ["mul_op"])


def test_inputs_and_outputs_are_never_merged_away():
    result = merged(IN_OUT, ["a_op"], ["mul_op1", "final_mul_op"])
    nodes = nodes_by_name(result)
    assert {"a_op", "b_op", "a_relu_op", "b_relu_op", "mul_op1", "final_mul_op", "c_op"} <= set(nodes)
    assert ("mul_op2" in nodes) + ("mul_op3" in nodes) == 1
    assert list(nodes["final_mul_op"].input) == ["mul_op2", "mul_op2"]
    assert list(nodes["mul_op1"].input) == ["add_op", "c_op"]
    assert_same_outputs(IN_OUT, result, ["mul_op1", "final_mul_op"])


def test_merges_duplicate_quantize_chains():
    result = merged(QUANTIZE, [], ["add_op"])
    counts = op_counts(result)
    assert counts["QuantizeV2"] == 1
    assert counts["Reshape"] == 1 and counts["Min"] == 1 and counts["Max"] == 1
    assert_same_outputs(QUANTIZE, result, ["add_op"])


def test_redirects_ports_and_control_inputs():
    graph = graph_from_text(
        """node { name: "values" op: "Const" attr { key: "dtype" value { type: DT_FLOAT } }
             attr { key: "value" value { tensor { dtype: DT_FLOAT tensor_shape { dim { size: 4 } }
               float_val: 1 float_val: 2 float_val: 3 float_val: 4 } } } }
           node { name: "dim" op: "Const" attr { key: "dtype" value { type: DT_INT32 } }
             attr { key: "value" value { tensor { dtype: DT_INT32 int_val: 0 } } } }
           node { name: "split1" op: "Split" input: "dim" input: "values"
             attr { key: "T" value { type: DT_FLOAT } } attr { key: "num_split" value { i: 2 } } }
           node { name: "split2" op: "Split" input: "dim:0" input: "values"
             attr { key: "T" value { type: DT_FLOAT } } attr { key: "num_split" value { i: 2 } } }
           node { name: "sum" op: "Add" input: "split1" input: "split2:1" input: "^split2"
             attr { key: "T" value { type: DT_FLOAT } } }"""
    )
    result = merged(graph, [], ["sum"])
    nodes = nodes_by_name(result)
    assert "split2" not in nodes
    assert list(nodes["sum"].input) == ["split1", "split1:1", "^split1"]
    assert_same_outputs(graph, result, ["sum"])


@pytest.fixture
def unseeded_random_ops_allowed():
    """Op determinism is process-wide, and an in-process training test on the same worker turns it
    on (pipeline.train.make_deterministic), after which an unseeded random op refuses to run."""
    from tensorflow.python.framework import config

    enabled = config.is_op_determinism_enabled()
    config.disable_op_determinism()
    yield
    if enabled:
        config.enable_op_determinism()


def test_stateful_duplicates_are_kept(unseeded_random_ops_allowed):
    def randoms():
        shape = tf.constant([3], name="shape")
        first = tf.raw_ops.RandomUniform(shape=shape, dtype=tf.float32, name="random1")
        second = tf.raw_ops.RandomUniform(shape=shape, dtype=tf.float32, name="random2")
        tf.raw_ops.Sub(x=first, y=second, name="difference")

    graph = build(randoms)
    result = merged(graph, [], ["difference"])
    assert list(result.node) == list(graph.node)
    assert np.any(run_graph(result, ["difference"])[0] != 0)  # merged, it would be all zeros


@pytest.mark.parametrize(
    "difference",
    ["attr", "device", "input order"],
)
def test_negative_case_near_duplicates_are_kept(difference):
    def near_duplicates():
        a = tf.constant(iota(1.0), name="a_op")
        b = tf.constant(iota(2.0), name="b_op")
        first = tf.raw_ops.Sub(x=a, y=b, name="first")
        if difference == "attr":
            first = tf.raw_ops.Cast(x=a, DstT=tf.int32, Truncate=False, name="first")
            second = tf.raw_ops.Cast(x=a, DstT=tf.int32, Truncate=True, name="second")
        elif difference == "device":
            with tf.device("/device:CPU:0"):
                second = tf.raw_ops.Sub(x=a, y=b, name="second")
        else:
            second = tf.raw_ops.Sub(x=b, y=a, name="second")
        tf.raw_ops.Add(x=first, y=second, name="total")

    graph = build(near_duplicates)
    result = merged(graph, [], ["total"])
    assert result == graph


def test_unknown_op_is_an_error():
    graph = graph_from_text('node { name: "mystery" op: "NoSuchOp" }')
    with pytest.raises(TransformError, match="'mystery' has op 'NoSuchOp'"):
        merged(graph, [], ["mystery"])


def test_survivors_keep_graph_order():
    result = merged(IN_OUT, [], ["final_mul_op"])
    original_order = [node.name for node in IN_OUT.node]
    names = [node.name for node in result.node]
    assert names == [name for name in original_order if name in names]


def structures(graph, protected=()) -> Counter:
    """Multiset of node structures: op, device, attrs and input structures; names only if protected."""
    nodes = nodes_by_name(graph)
    memo: dict[str, tuple] = {}

    def structure(name):
        if name not in memo:
            node = nodes[name]
            inputs = []
            for input_string in node.input:
                is_control, source, port = parse_input(input_string)
                inputs.append((is_control, port, structure(source)))
            attrs = tuple((k, node.attr[k].SerializeToString(deterministic=True)) for k in sorted(node.attr))
            memo[name] = (node.op, node.device, attrs, tuple(inputs), name if name in protected else "")
        return memo[name]

    return Counter(structure(name) for name in nodes)


@requires_oracle
@pytest.mark.parametrize(
    ("graph", "inputs", "outputs"),
    [
        (CONSTS, [], ["mul_op"]),
        (NESTED, [], ["mul_op"]),
        (IN_OUT, ["a_op"], ["mul_op1", "final_mul_op"]),
        (QUANTIZE, [], ["add_op"]),
    ],
    ids=["consts", "nested", "in-out", "quantize"],
)
def test_matches_oracle_up_to_which_duplicate_survives(graph, inputs, outputs):
    ours, oracle = ours_and_oracle(graph, inputs, outputs, "merge_duplicate_nodes")
    protected = set(inputs) | set(outputs)
    assert structures(ours, protected) == structures(oracle, protected)
    assert len(ours.node) == len(oracle.node)
    assert protected <= set(nodes_by_name(oracle)) and protected <= set(nodes_by_name(ours))
    assert set(nodes_by_name(ours)) <= {node.name for node in graph.node}
    assert_same_outputs(oracle, ours, outputs)


FUNCTION_CALLS = graph_from_text(
    'library { function { signature { name: "one" output_arg { name: "out" type: DT_FLOAT } } '
    'node_def { name: "c" op: "Const" attr { key: "dtype" value { type: DT_FLOAT } } '
    'attr { key: "value" value { tensor { dtype: DT_FLOAT float_val: 1.0 } } } } '
    'ret { key: "out" value: "c:output:0" } } }'
    'node { name: "call1" op: "one" } node { name: "call2" op: "one" }'
    'node { name: "sum" op: "Add" input: "call1" input: "call2" attr { key: "T" value { type: DT_FLOAT } } }'
)


def test_calls_of_a_stateless_library_function_merge():
    result = merged(FUNCTION_CALLS, [], ["sum"])
    assert list(nodes_by_name(result)["sum"].input) == ["call1", "call1"]
    assert "call2" not in nodes_by_name(result)
    assert_same_outputs(FUNCTION_CALLS, result, ["sum"])


@requires_oracle
def test_library_function_calls_fail_in_oracle():
    with pytest.raises(RuntimeError, match="Op type not registered 'one'"):
        oracle_transform(FUNCTION_CALLS, [], ["sum"], "merge_duplicate_nodes")
