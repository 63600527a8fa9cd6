"""insert_logging."""

import numpy as np
import pytest
import tensorflow as tf
from graph_helpers import (
    const_text as const,
)
from graph_helpers import (
    graph_from_text,
    nodes_by_name,
    op_counts,
    oracle_transform,
    ours_and_oracle,
    requires_oracle,
    run_graph,
)
from graph_helpers import (
    op_text as op,
)

from serving_optimiser.graph_transforms import TransformError, TransformGraph

TEN = [float(v) for v in range(1, 11)]
GRAPH = graph_from_text(
    const("const_node1", TEN) + const("const_node2", TEN) + const("const_node3", TEN)
    + op("add_node2", "Add", "const_node1", "const_node2")
    + op("add_node3", "Add", "const_node1", "const_node3")
    + op("mul_node1", "Mul", "add_node2", "add_node3")
    + op("add_node4", "Add", "mul_node1", "const_node3")
)


def printed(graph) -> set[str]:
    """Names of the nodes that got a Print, checked to read that node."""
    names = set()
    for node in graph.node:
        if node.op == "Print":
            logged = node.name.removesuffix("__print__")
            assert node.input[0] == f"{logged}:0"
            names.add(logged)
    return names


@pytest.mark.parametrize(
    ("transform", "expected"),
    [
        ("insert_logging", {"mul_node1", "add_node2", "add_node3", "const_node1", "const_node2", "const_node3"}),
        ("insert_logging(op=Mul, op=Add)", {"mul_node1", "add_node2", "add_node3"}),
        ("insert_logging(prefix=add_node)", {"add_node2", "add_node3"}),
        ("insert_logging(op=Add, prefix=const)", set()),
    ],
    ids=["everything-read", "by-op", "by-prefix", "op-and-prefix-both-required"],
)
def test_insert_logging_chooses_nodes(transform, expected):
    result = TransformGraph(GRAPH, [], ["add_node4"], [transform])
    assert printed(result) == expected
    np.testing.assert_array_equal(run_graph(result, ["add_node4"])[0], run_graph(GRAPH, ["add_node4"])[0])


def test_insert_logging_rewires_readers_through_the_print():
    result = TransformGraph(GRAPH, [], ["add_node4"], ["insert_logging(op=Mul, op=Add)"])
    nodes = nodes_by_name(result)
    assert list(nodes["mul_node1"].input) == ["add_node2__print__:0", "add_node3__print__:0"]
    assert list(nodes["add_node4"].input) == ["mul_node1__print__:0", "const_node3"]
    log = nodes["mul_node1__print__"]
    assert list(log.input) == ["mul_node1:0", "mul_node1:0"]
    assert log.attr["T"].type == 1 and list(log.attr["U"].list.type) == [1]
    assert (log.attr["message"].s, log.attr["first_n"].i, log.attr["summarize"].i) == (b"", -1, 1024)
    # Each Print comes right after the node it logs.
    names = [node.name for node in result.node]
    assert names.index("mul_node1__print__") == names.index("mul_node1") + 1


RELU = graph_from_text(const("x", (-1.0, 2.0)) + op("r", "Relu", "x") + op("out", "Neg", "r"))


def test_insert_logging_message_options():
    transform = 'insert_logging(op=Relu, show_op=true, show_name=true, message="hello:", first_n=3, summarize=7)'
    result = TransformGraph(RELU, [], ["out"], [transform])
    log = nodes_by_name(result)["r__print__"]
    assert log.attr["message"].s == b";Relu;;r__print__;hello:"
    assert list(log.input) == ["r:0", "r:0"]
    assert (log.attr["first_n"].i, log.attr["summarize"].i) == (3, 7)
    np.testing.assert_array_equal(run_graph(result, ["out"])[0], run_graph(RELU, ["out"])[0])


def test_insert_logging_control_reader_counts_as_port_zero_and_stays_control():
    graph = graph_from_text(const("x", (1.0,)) + const("y", (2.0,)) + op("out", "Neg", "y", "^x"))
    result = TransformGraph(graph, [], ["out"], ["insert_logging"])
    nodes = nodes_by_name(result)
    assert list(nodes["x__print__"].input) == ["x:0", "x:0"]
    assert list(nodes["out"].input) == ["y__print__:0", "^x"]


SPLIT = graph_from_text(
    const("values", (1.0, 2.0, 3.0, 4.0))
    + 'node { name: "dim" op: "Const" attr { key: "dtype" value { type: DT_INT32 } } '
    'attr { key: "value" value { tensor { dtype: DT_INT32 int_val: 0 } } } }'
    + 'node { name: "halves" op: "Split" input: "dim" input: "values" '
    'attr { key: "T" value { type: DT_FLOAT } } attr { key: "num_split" value { i: 2 } } }'
    + op("out", "Neg", "halves:1")
)


def test_insert_logging_types_only_the_read_ports():
    result = TransformGraph(SPLIT, [], ["out"], ["insert_logging(op=Split)"])
    log = nodes_by_name(result)["halves__print__"]
    assert list(log.input) == ["halves:0", "halves:1"]
    assert list(log.attr["U"].list.type) == [1]
    assert list(nodes_by_name(result)["out"].input) == ["halves:1"]  # port 1 is not rewired
    np.testing.assert_array_equal(run_graph(result, ["out"])[0], run_graph(SPLIT, ["out"])[0])


@requires_oracle
def test_insert_logging_multi_output_differs_from_oracle():
    """C++ set U to every output type: two types for one data input, so its graph does not load."""
    oracle = oracle_transform(SPLIT, [], ["out"], "insert_logging(op=Split)")
    assert list(nodes_by_name(oracle)["halves__print__"].attr["U"].list.type) == [1, 1]
    with pytest.raises(ValueError, match="halves__print__"):
        run_graph(oracle, ["out"])


def test_insert_logging_skips_nodes_without_outputs_and_ref_outputs():
    graph = graph_from_text(
        'node { name: "done" op: "NoOp" }'
        'node { name: "weights" op: "VariableV2" attr { key: "dtype" value { type: DT_FLOAT } } '
        'attr { key: "shape" value { shape { dim { size: 2 } } } } }'
        + op("read", "Identity", "weights", "^done")
    )
    result = TransformGraph(graph, [], ["read"], ["insert_logging"])
    assert result == graph


def test_insert_logging_negative_case_no_op_matches():
    assert TransformGraph(GRAPH, [], ["add_node4"], ["insert_logging(op=Conv2D)"]) == GRAPH


def test_insert_logging_unknown_op_is_an_error():
    graph = graph_from_text(const("x", (1.0,)) + op("mystery", "NoSuchOp", "x") + op("out", "Neg", "mystery"))
    with pytest.raises(TransformError, match="'mystery' has op 'NoSuchOp'"):
        TransformGraph(graph, [], ["out"], ["insert_logging"])


def test_insert_logging_bad_number_is_an_error():
    with pytest.raises(TransformError, match="first_n='many' is not an integer"):
        TransformGraph(GRAPH, [], ["add_node4"], ["insert_logging(first_n=many)"])


@requires_oracle
@pytest.mark.parametrize(
    ("graph", "output", "transform"),
    [
        (GRAPH, "add_node4", "insert_logging"),
        (GRAPH, "add_node4", "insert_logging(op=Mul, op=Add)"),
        (GRAPH, "add_node4", "insert_logging(prefix=add_node)"),
        (RELU, "out", 'insert_logging(show_op=true, show_name=true, message="hello:")'),
    ],
    ids=["everything", "by-op", "by-prefix", "message"],
)
def test_insert_logging_matches_oracle(graph, output, transform):
    ours, oracle = ours_and_oracle(graph, [], [output], transform)
    assert list(ours.node) == list(oracle.node)
    assert op_counts(ours)["Print"] == len(printed(oracle))


@requires_oracle
def test_insert_logging_ref_outputs_differ_from_oracle():
    """C++ gave a v1 Variable a Print with T=float_ref, which TensorFlow refuses to load."""
    graph = tf.Graph()
    with graph.as_default():
        weights = tf.compat.v1.Variable(tf.ones([2]), name="weights", use_resource=False)
        tf.raw_ops.Neg(x=weights.value(), name="out")
    graph_def = graph.as_graph_def()
    ours, oracle = ours_and_oracle(graph_def, [], ["out"], "insert_logging(op=VariableV2)")
    with pytest.raises(ValueError, match="reference type"):
        run_graph(oracle, ["out"])
    assert ours == graph_def
