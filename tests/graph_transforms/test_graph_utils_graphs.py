"""graph_utils.graphs: name and consumer maps, copies that keep the library and versions,
filtering, dangling inputs, reachability and the old tool's execution order."""

import numpy as np
import pytest
from graph_helpers import graph_of, run_graph
from tensorflow.core.framework import graph_pb2, types_pb2

from serving_optimiser.graph_transforms import TransformError
from serving_optimiser.graph_transforms.graph_utils import make_const_node, make_node
from serving_optimiser.graph_transforms.graph_utils.graphs import (
    consumers_map,
    copy_graph,
    filter_nodes,
    find_invalid_inputs,
    lowered_control_flow_nodes,
    new_graph_like,
    node_map,
    reachable_names,
    remove_unreachable,
    sort_by_execution_order,
)

FLOAT = types_pb2.DT_FLOAT


def with_library_and_versions(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    graph_def.versions.producer = 1234
    graph_def.library.function.add().signature.name = "kept_function"
    return graph_def


def scaled_sum_graph() -> graph_pb2.GraphDef:
    """``output = (x + one) * two``, a ``^init`` control input on the sum, and an unused Const."""
    return graph_of(
        make_node("Placeholder", "x", attrs={"dtype": FLOAT}),
        make_const_node("one", np.float32(1.0)),
        make_const_node("two", np.float32(2.0)),
        make_node("NoOp", "init"),
        make_node("AddV2", "sum", ["x", "one", "^init"], {"T": FLOAT}),
        make_node("Mul", "output", ["sum", "two"], {"T": FLOAT}),
        make_const_node("unused", np.float32(7.0)),
    )


def test_node_map_refuses_duplicate_names():
    with pytest.raises(TransformError, match="graph has two nodes named 'a'"):
        node_map(graph_of(make_node("Const", "a"), make_node("Const", "a")))


def test_consumers_map_lists_data_and_control_readers_once_per_input():
    graph_def = graph_of(
        make_node("Const", "c"),
        make_node("AddN", "twice", ["c", "c:0"]),
        make_node("NoOp", "after", ["^c"]),
        make_node("Identity", "reads_missing", ["ghost"]),
    )
    consumers = consumers_map(graph_def)
    assert [n.name for n in consumers["c"]] == ["twice", "twice", "after"]
    assert consumers["after"] == [] and [n.name for n in consumers["ghost"]] == ["reads_missing"]


def test_new_graph_like_and_filter_keep_library_and_versions():
    original = with_library_and_versions(scaled_sum_graph())
    empty = new_graph_like(original)
    assert not empty.node and empty.versions.producer == 1234
    assert empty.library.function[0].signature.name == "kept_function"
    filtered = filter_nodes(original, lambda node: node.op == "Const")
    assert [n.name for n in filtered.node] == ["one", "two", "unused"]
    assert filtered.versions == original.versions and filtered.library == original.library


def test_copy_graph_is_independent_of_its_source():
    original = scaled_sum_graph()
    copied = copy_graph(original)
    copied.node[0].name = "renamed"
    assert original.node[0].name == "x" and copied.SerializeToString() != original.SerializeToString()


def test_find_invalid_inputs_names_every_dangling_input():
    graph_def = graph_of(make_node("Const", "a"), make_node("AddN", "sum", ["a", "ghost:1", "^phantom"]))
    assert find_invalid_inputs(graph_def) == [("sum", "ghost:1"), ("sum", "^phantom")]
    assert find_invalid_inputs(scaled_sum_graph()) == []


def test_reachable_names_follows_data_and_control_inputs():
    nodes = node_map(scaled_sum_graph())
    assert reachable_names(nodes, ["output:0"]) == {"output", "sum", "x", "one", "two", "init"}


def test_reachable_names_stops_at_inputs_but_includes_them():
    nodes = node_map(scaled_sum_graph())
    assert reachable_names(nodes, ["output"], stop_at=["sum"]) == {"output", "sum", "two"}


def test_reachable_names_reports_missing_names_in_the_order_met():
    nodes = node_map(graph_of(make_node("AddN", "sum", ["ghost", "a"]), make_node("Identity", "a", ["phantom"])))
    missing: list[str] = []
    assert reachable_names(nodes, ["sum"], missing=missing) == {"sum", "a"}
    assert missing == ["phantom", "ghost"]


def test_remove_unreachable_drops_only_unused_nodes_and_the_graph_still_runs():
    original = with_library_and_versions(scaled_sum_graph())
    pruned = remove_unreachable(original, ["output"])
    assert [n.name for n in pruned.node] == ["x", "one", "two", "init", "sum", "output"]
    assert pruned.library == original.library
    kept = remove_unreachable(original, ["output"], keep=["unused"])
    assert "unused" in {n.name for n in kept.node}
    feeds = {"x": np.array([0.5, -3.0], np.float32)}
    [result] = run_graph(pruned, ["output"], feeds)
    np.testing.assert_array_equal(result, (feeds["x"] + 1.0) * 2.0)


def test_sort_by_execution_order_is_the_old_tools_lifo_order_and_still_runs():
    shuffled = scaled_sum_graph()
    nodes = list(shuffled.node)
    del shuffled.node[:]
    shuffled.node.extend(reversed(nodes))
    ordered = sort_by_execution_order(shuffled)
    # Kahn's algorithm popping the newest ready node: the order the C++ tool used.
    assert [n.name for n in ordered.node] == ["x", "one", "two", "init", "sum", "output", "unused"]
    feeds = {"x": np.array([4.0], np.float32)}
    np.testing.assert_array_equal(run_graph(ordered, ["output"], feeds)[0], [10.0])


def test_sort_by_execution_order_counts_only_control_inputs_and_one_data_input_of_a_merge():
    graph_def = graph_of(
        make_node("NextIteration", "next", ["merge"]),
        make_node("Enter", "enter", ["start"]),
        make_node("Merge", "merge", ["enter", "next"]),
        make_node("Const", "start"),
    )
    assert [n.name for n in sort_by_execution_order(graph_def).node] == ["start", "enter", "merge", "next"]


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        ([make_node("Identity", "a", ["b"]), make_node("Identity", "b", ["a"])], "2 nodes in a cycle"),
        ([make_node("Identity", "a", ["^ghost"])], "Node 'a': Unknown input node '\\^ghost'"),
    ],
    ids=["cycle", "unknown-input"],
)
def test_sort_by_execution_order_errors(nodes, message):
    with pytest.raises(TransformError, match=message):
        sort_by_execution_order(graph_of(*nodes))


def lowered_loop_and_branch() -> graph_pb2.GraphDef:
    """A while loop as freezing lowers it (Enter, Merge, Switch, body, NextIteration, Exit) and a
    conditional branch after it (Switch, branch, Merge); the graph's wiring, not runnable."""
    return graph_of(
        make_node("Placeholder", "x"),
        make_node("Placeholder", "pred"),
        make_node("Enter", "loop/enter", ["x"]),
        make_node("Merge", "loop/merge", ["loop/enter", "loop/next"]),
        make_node("Less", "loop/less", ["loop/merge", "x"]),
        make_node("LoopCond", "loop/cond", ["loop/less"]),
        make_node("Switch", "loop/switch", ["loop/merge", "loop/cond"]),
        make_node("Identity", "loop/body/in", ["loop/switch:1"]),
        make_node("MatMul", "loop/body/matmul", ["loop/body/in", "x"]),
        make_node("NextIteration", "loop/next", ["loop/body/matmul"]),
        make_node("Exit", "loop/exit", ["loop/switch"]),
        make_node("Relu", "after_loop", ["loop/exit"]),
        make_node("Switch", "cond/switch", ["after_loop", "pred"]),
        make_node("MatMul", "cond/then", ["cond/switch:1", "x"]),
        make_node("Merge", "cond/merge", ["cond/switch", "cond/then"]),
        make_node("Identity", "out", ["cond/merge"]),
    )


def test_lowered_control_flow_nodes_are_the_loop_and_branch_bodies():
    graph_def = lowered_loop_and_branch()
    loop = {"loop/enter", "loop/merge", "loop/less", "loop/cond", "loop/switch", "loop/body/in", "loop/body/matmul",
            "loop/next"}
    assert lowered_control_flow_nodes(graph_def, conditionals=False) == loop
    assert lowered_control_flow_nodes(graph_def) == loop | {"cond/switch", "cond/then"}
    assert lowered_control_flow_nodes(graph_of(make_node("Placeholder", "x"), make_node("Relu", "y", ["x"]))) == set()
