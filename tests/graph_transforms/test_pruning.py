"""remove_nodes, strip_unused_nodes, remove_control_dependencies, sort_by_execution_order."""

import threading

import numpy as np
import pytest
import tensorflow as tf
from graph_helpers import (
    const_text as const,
)
from graph_helpers import (
    graph_from_text,
    nodes_by_name,
    ops_by_name,
    ours_and_oracle,
    requires_oracle,
    run_graph,
)
from graph_helpers import (
    op_text as op,
)
from tensorflow.core.framework import graph_pb2
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from serving_optimiser.graph_transforms import TransformError, TransformGraph

IDENTITY_TREE = graph_from_text(
    const("const_node1", (1.0, 2.0))
    + const("const_node2", (3.0, 4.0))
    + const("const_node3", (5.0, 6.0))
    + op("identity_node1", "Identity", "const_node1")
    + op("identity_node2", "Identity", "const_node2")
    + op("identity_node3", "Identity", "const_node3")
    + op("add_node2", "Add", "identity_node1", "identity_node2")
    + op("add_node3", "Add", "identity_node1", "const_node3")
    + op("add_node1", "Add", "add_node2", "add_node3")
    + op("add_node4", "Add", "add_node2", "add_node3")
)


def test_remove_nodes_bypasses_identities():
    result = TransformGraph(IDENTITY_TREE, [], ["add_node1"], ["remove_nodes(op=Identity)"])
    nodes = nodes_by_name(result)
    assert "Identity" not in ops_by_name(result).values()
    assert list(nodes["add_node2"].input) == ["const_node1", "const_node2"]
    assert list(nodes["add_node3"].input) == ["const_node1", "const_node3"]
    before, after = (run_graph(g, ["add_node1"])[0] for g in (IDENTITY_TREE, result))
    np.testing.assert_allclose(after, before, rtol=0, atol=0)


def test_remove_nodes_keeps_named_output():
    graph = graph_from_text(
        const("const_node1")
        + const("const_node2")
        + op("add_node", "Add", "const_node1", "const_node2")
        + op("identity_node", "Identity", "add_node")
    )
    result = TransformGraph(graph, [], ["identity_node"], ["remove_nodes(op=Identity)"])
    assert ops_by_name(result)["identity_node"] == "Identity"


def test_remove_nodes_chain_and_max_inputs():
    chain = graph_from_text(
        const("const_node1")
        + const("const_node2")
        + op("identity_node1", "Identity", "const_node1")
        + op("identity_node2", "Identity", "identity_node1")
        + op("identity_node3", "Identity", "identity_node2")
        + op("add_node", "Add", "identity_node3", "const_node2")
    )
    result = TransformGraph(chain, [], ["add_node"], ["remove_nodes(op=Identity)"])
    assert list(nodes_by_name(result)["add_node"].input) == ["const_node1", "const_node2"]
    assert len(result.node) == 3


def test_remove_nodes_redirects_control_and_port_inputs():
    graph = graph_from_text(
        const("s")
        + const("d")
        + 'node { name: "split" op: "Unpack" input: "s" attr { key: "T" value { type: DT_FLOAT } } '
        'attr { key: "num" value { i: 2 } } }'
        + op("id", "Identity", "split:1", "^d")
        + op("consumer", "Add", "id", "s")
        + 'node { name: "after" op: "NoOp" input: "^id" input: "^consumer" }'
    )
    result = TransformGraph(graph, [], ["after"], ["remove_nodes(op=Identity)"])
    nodes = nodes_by_name(result)
    assert list(nodes["consumer"].input) == ["split:1", "s"]
    assert list(nodes["after"].input) == ["^split", "^consumer"]


def test_remove_nodes_needs_an_op():
    with pytest.raises(TransformError, match="at least one 'op'"):
        TransformGraph(IDENTITY_TREE, [], ["add_node1"], ["remove_nodes"])


def test_remove_nodes_negative_case_leaves_graph_unchanged():
    result = TransformGraph(IDENTITY_TREE, [], ["add_node1"], ["remove_nodes(op=CheckNumerics)"])
    assert result == IDENTITY_TREE


@requires_oracle
def test_remove_nodes_matches_oracle():
    ours, oracle = ours_and_oracle(IDENTITY_TREE, [], ["add_node1"], "remove_nodes(op=Identity)")
    assert ops_by_name(ours) == ops_by_name(oracle)
    oracle_nodes = nodes_by_name(oracle)
    for node in ours.node:
        assert list(node.input) == list(oracle_nodes[node.name].input)


@requires_oracle
def test_remove_nodes_keeps_other_inputs_unlike_oracle():
    """The C++ tool deletes the 2nd..nth input nodes of a bypassed node; we keep them (docs/differences.md)."""
    transforms = "remove_nodes(op=Identity, op=Add, max_inputs=2)"
    ours, oracle = ours_and_oracle(IDENTITY_TREE, [], ["add_node1"], transforms)
    assert set(ops_by_name(ours)) - set(ops_by_name(oracle)) == {"const_node2", "const_node3"}
    assert {n.name: list(n.input) for n in ours.node if n.name in ops_by_name(oracle)} == {
        n.name: list(n.input) for n in oracle.node
    }


# A frozen tf.cond, lowered as TF lowers If: a Switch of the predicate whose ports feed the
# pivots; each branch waits for its pivot, so the branch not taken is dead. The then pivot is a
# chain of two Identities; the else branch returns a constant that only its pivot makes dead.
LOWERED_COND = graph_from_text(
    'node { name: "pred" op: "Placeholder" attr { key: "dtype" value { type: DT_BOOL } } }'
    'node { name: "x" op: "Placeholder" attr { key: "dtype" value { type: DT_FLOAT } } }'
    'node { name: "switch_pred" op: "Switch" input: "pred" input: "pred" attr { key: "T" value { type: DT_BOOL } } }'
    'node { name: "pivot_t_first" op: "Identity" input: "switch_pred:1" attr { key: "T" value { type: DT_BOOL } } }'
    'node { name: "pivot_t" op: "Identity" input: "pivot_t_first" attr { key: "T" value { type: DT_BOOL } } }'
    'node { name: "pivot_f" op: "Identity" input: "switch_pred" attr { key: "T" value { type: DT_BOOL } } }'
    + op("x_switch", "Switch", "x", "pred")
    + op("then_x_bypassed", "Identity", "x_switch:1", "^pivot_t")
    + const("then_scale", (10.0,)).replace('op: "Const"', 'op: "Const" input: "^pivot_t"')
    + op("then_mul", "Mul", "then_x_bypassed", "then_scale")
    + op("then_out_bypassed", "Identity", "then_mul")
    + const("else_value", (-1.0,))
    + op("else_out_kept", "Identity", "else_value", "^pivot_f")
    + op("merge", "Merge", "then_out_bypassed", "else_out_kept", extra='attr { key: "N" value { i: 2 } }')
    + op("output", "Identity", "merge")
)


def test_remove_nodes_keeps_the_pivots_of_a_lowered_cond():
    result = TransformGraph(LOWERED_COND, ["pred", "x"], ["output"], ["remove_nodes(op=Identity)"])
    nodes = nodes_by_name(result)
    # ^pivot_t must not become ^switch_pred: a control edge from a Switch fires on both branches.
    assert list(nodes["pivot_t"].input) == ["switch_pred:1"]
    assert list(nodes["pivot_f"].input) == ["switch_pred"]
    assert list(nodes["then_scale"].input) == ["^pivot_t"]
    # The reader of a bypassed node takes over its control inputs, unless the reader is a Merge.
    assert list(nodes["then_mul"].input) == ["x_switch:1", "then_scale", "^pivot_t"]
    assert list(nodes["else_out_kept"].input) == ["else_value", "^pivot_f"]
    assert list(nodes["merge"].input) == ["then_mul", "else_out_kept"]
    assert {"pivot_t_first", "then_x_bypassed", "then_out_bypassed"}.isdisjoint(nodes)


@pytest.mark.parametrize("pred, expected", [(True, 30.0), (False, -1.0)], ids=["then", "else"])
def test_remove_nodes_keeps_what_a_lowered_cond_computes(pred, expected):
    result = TransformGraph(LOWERED_COND, ["pred", "x"], ["output"], ["remove_nodes(op=Identity)"])
    feeds = {"pred": np.array(pred), "x": np.array(3.0, np.float32)}
    for graph in (LOWERED_COND, result):
        np.testing.assert_array_equal(run_graph(graph, ["output"], feeds)[0], [expected])


def lowered_while_loop() -> graph_pb2.GraphDef:
    """tf.while_loop then tf.cond, frozen as freeze_saved_model freezes (v1 control flow)."""

    @tf.function(input_signature=[tf.TensorSpec([], tf.int32, name="steps")])
    def count(steps):
        _, total = tf.while_loop(lambda i, t: i < steps, lambda i, t: (i + 1, t + 2.0), [0, 0.0])
        return tf.cond(total > 3.0, lambda: total * 10.0, lambda: total - 1.0)

    return convert_variables_to_constants_v2(count.get_concrete_function()).graph.as_graph_def()


def run_graph_within(seconds: float, *args) -> list[np.ndarray]:
    """run_graph, failing instead of hanging if the graph does not return (a loop that never ends
    keeps its thread busy until pytest exits, but the test fails)."""
    results: list = []
    thread = threading.Thread(target=lambda: results.append(run_graph(*args)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the graph did not return within {seconds} s"
    return results[0]


def test_remove_nodes_keeps_a_lowered_while_loop_ending():
    """Issue 16: ``^loop_body_control`` became ``^<loop counter Switch>``, which fires after the
    last iteration too, so the body ran forever."""
    graph = lowered_while_loop()
    ops = ops_by_name(graph)
    assert {"Switch", "Merge", "NextIteration"} <= set(ops.values())
    result = TransformGraph(graph, ["steps"], ["Identity"], ["remove_nodes(op=Identity)"])
    assert len(result.node) < len(graph.node)

    def switch_control_edges(graph_def):
        return {
            (node.name, i) for node in graph_def.node for i in node.input
            if i.startswith("^") and ops.get(i[1:]) == "Switch"
        }

    assert switch_control_edges(result) <= switch_control_edges(graph)
    pivots = {n.name for n in graph.node if n.op == "Identity" and ops.get(n.input[0].split(":")[0]) == "Switch"}
    read_as_control = {i[1:] for n in graph.node for i in n.input if i.startswith("^")}
    assert pivots & read_as_control <= set(ops_by_name(result))
    for steps, expected in ((0, -1.0), (1, 1.0), (3, 60.0)):
        feeds = {"steps": np.array(steps, np.int32)}
        assert run_graph_within(60, result, ["Identity"], feeds)[0] == expected


def test_remove_nodes_without_switch_still_drops_control_inputs():
    """Control inputs only order nodes there: the C++ tool's result, unchanged."""
    graph = graph_from_text(const("a") + const("b") + op("id", "Identity", "a", "^b") + op("neg", "Neg", "id"))
    result = TransformGraph(graph, [], ["neg"], ["remove_nodes(op=Identity)"])
    assert list(nodes_by_name(result)["neg"].input) == ["a"]


ADD_MUL = graph_from_text(
    const("a_node")
    + const("b_node")
    + const("c_node")
    + op("mul_node", "Mul", "b_node", "c_node")
    + op("add_node", "Add", "mul_node", "a_node")
)


def test_strip_unused_nodes_removes_unreachable():
    result = TransformGraph(ADD_MUL, [], ["mul_node"], ["strip_unused_nodes"])
    assert set(ops_by_name(result)) == {"b_node", "c_node", "mul_node"}


def test_strip_unused_nodes_turns_input_into_scalar_placeholder():
    result = TransformGraph(ADD_MUL, ["mul_node"], ["add_node"], ["strip_unused_nodes"])
    nodes = nodes_by_name(result)
    assert set(nodes) == {"mul_node", "a_node", "add_node"}
    assert nodes["mul_node"].op == "Placeholder"
    assert nodes["mul_node"].attr["dtype"].type == 1
    assert list(nodes["mul_node"].attr["shape"].shape.dim) == []


def test_strip_unused_nodes_type_and_shape_per_name():
    result = TransformGraph(
        ADD_MUL,
        ["mul_node", "a_node"],
        ["add_node"],
        [
            'strip_unused_nodes(name=a_node, type_for_name=int64, shape_for_name="1,2", '
            'name=mul_node, type_for_name=quint8, shape_for_name="1, 2, 3")'
        ],
    )
    nodes = nodes_by_name(result)
    assert nodes["a_node"].attr["dtype"].type == 9  # int64
    assert [d.size for d in nodes["a_node"].attr["shape"].shape.dim] == [1, 2]
    assert nodes["mul_node"].attr["dtype"].type == 12  # quint8
    assert [d.size for d in nodes["mul_node"].attr["shape"].shape.dim] == [1, 2, 3]


def test_strip_unused_nodes_runs_the_same_function():
    result = TransformGraph(ADD_MUL, [], ["add_node"], ["strip_unused_nodes"])
    np.testing.assert_array_equal(run_graph(result, ["add_node"])[0], run_graph(ADD_MUL, ["add_node"])[0])


@requires_oracle
@pytest.mark.parametrize(
    ("inputs", "transform"),
    [([], "strip_unused_nodes"), (["mul_node"], 'strip_unused_nodes(type=int32, shape="1,2,3")')],
    ids=["no-inputs", "typed-input"],
)
def test_strip_unused_nodes_matches_oracle(inputs, transform):
    ours, oracle = ours_and_oracle(ADD_MUL, inputs, ["add_node"], transform)
    assert [n.name for n in ours.node] == [n.name for n in oracle.node]
    for ours_node, oracle_node in zip(ours.node, oracle.node):
        assert ours_node.op == oracle_node.op
        assert dict(ours_node.attr) == dict(oracle_node.attr)


def test_remove_control_dependencies():
    graph = graph_from_text(const("a") + const("b") + op("add", "Add", "a", "^b", "b"))
    result = TransformGraph(graph, [], ["add"], ["remove_control_dependencies"])
    assert list(nodes_by_name(result)["add"].input) == ["a", "b"]


TREE = graph_from_text(
    op("add1", "Add", "add2", "add3")
    + op("add2", "Add", "c1", "c2")
    + op("add3", "Add", "c3", "c4")
    + const("c1")
    + const("c2")
    + const("c3")
    + const("c4")
)


def test_sort_by_execution_order_tree():
    result = TransformGraph(TREE, [], ["add1"], ["sort_by_execution_order"])
    assert [n.name for n in result.node] == ["c4", "c3", "add3", "c2", "c1", "add2", "add1"]


def test_sort_by_execution_order_cycle_is_an_error():
    cycle = graph_from_text(op("a", "Add", "b", "b") + op("b", "Add", "a", "a"))
    with pytest.raises(TransformError, match="2 nodes in a cycle"):
        TransformGraph(cycle, [], ["a"], ["sort_by_execution_order"])


@requires_oracle
def test_sort_by_execution_order_matches_oracle():
    ours, oracle = ours_and_oracle(TREE, [], ["add1"], "sort_by_execution_order")
    assert [n.name for n in ours.node] == [n.name for n in oracle.node]
