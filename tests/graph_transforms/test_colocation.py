"""Colocation attrs (``_class: ["loc:@<node>"]``) across renaming and removing transforms.

TF 1 frozen graphs pin nodes to their variables with ``_class`` entries, and
``tf.import_graph_def`` rejects an entry naming a node the graph lacks. Renaming transforms
rewrite the entries (``graph_utils.fix_colocation_attrs`` with their rename map); the engine
drops entries naming nodes a transform removed. The C++ tool did neither, so its results
stopped importing (asserted against the oracle below).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from graph_helpers import graph_from_text, nodes_by_name, ops_by_name, oracle_transform, requires_oracle, run_graph

from model_builders import sample_graphs
from serving_optimiser.graph_transforms import TransformGraph
from serving_optimiser.graph_transforms.graph_utils import fix_colocation_attrs

FEEDS = {"x": np.array([[1.0, 2.0], [-3.0, 0.5], [0.0, 4.0]], np.float32)}


def freeze(graph: tf.Graph, outputs: list[str]):
    with tf.compat.v1.Session(graph=graph) as session:
        session.run(tf.compat.v1.global_variables_initializer())
        return tf.compat.v1.graph_util.convert_variables_to_constants(session, graph.as_graph_def(), outputs)


def build_dense_with_probe():
    """x -> MatMul(dense/w) -> BiasAdd(dense/b) -> Relu `out`, frozen with `out` and `probe`.

    Colocation: the `/read` Identities with their weights (convert_variables_to_constants),
    `dense/MatMul` and `dense/out` with `dense/w`, and `out` with `probe` (an Identity of x
    that only the freeze asked for).
    """
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
        w = tf.compat.v1.get_variable(
            "dense/w", initializer=np.array([[1.0, 2.0], [3.0, -4.0]], np.float32), use_resource=False
        )
        b = tf.compat.v1.get_variable("dense/b", initializer=np.array([0.5, -0.5], np.float32), use_resource=False)
        probe = tf.identity(x, name="probe")
        with tf.compat.v1.colocate_with(w):
            product = tf.matmul(x, w, name="dense/MatMul")
        with tf.compat.v1.colocate_with(graph.get_operation_by_name("dense/w/read")):
            biased = tf.nn.bias_add(product, b, name="dense/out")
        with tf.compat.v1.colocate_with(probe):
            tf.nn.relu(biased, name="out")
    return freeze(graph, ["out", "probe"])


def build_twins():
    """Two identical branches: `twin_<b>` weights (read through `/read`), a `shift_<b>` Const
    colocated with the weight, `sum_<b>` = MatMul + shift; `out` multiplies the two sums."""
    graph = tf.Graph()
    kernel = np.array([[1.0, -1.0], [2.0, 0.5]], np.float32)
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
        sums = []
        for branch in ("a", "b"):
            w = tf.compat.v1.get_variable(f"twin_{branch}", initializer=kernel, use_resource=False)
            with tf.compat.v1.colocate_with(w):
                shift = tf.constant([0.25, -0.75], name=f"shift_{branch}")
            sums.append(tf.add(tf.matmul(x, w, name=f"matmul_{branch}"), shift, name=f"sum_{branch}"))
        tf.multiply(sums[0], sums[1], name="out")
    return freeze(graph, ["out"])


DENSE = build_dense_with_probe()
TWINS = build_twins()


def colocation(graph_def) -> dict[str, list[str]]:
    """Node -> its `_class` entries, for the nodes that have one."""
    return {
        node.name: [entry.decode() for entry in node.attr["_class"].list.s]
        for node in graph_def.node
        if "_class" in node.attr
    }


def assert_imports_and_matches(result, original, tolerance=1e-6):
    """The result imports (no dangling colocation) and computes what the original did."""
    expected = run_graph(original, ["out"], FEEDS)[0]
    np.testing.assert_allclose(run_graph(result, ["out"], FEEDS)[0], expected, rtol=tolerance, atol=tolerance)


def test_fixtures_carry_colocation_attrs():
    assert colocation(DENSE) == {
        "dense/w/read": ["loc:@dense/w"],
        "dense/b/read": ["loc:@dense/b"],
        "dense/MatMul": ["loc:@dense/w"],
        "dense/out": ["loc:@dense/w"],  # colocating with a read joins its variable's group
        "out": ["loc:@probe"],
    }
    assert colocation(TWINS) == {
        "twin_a/read": ["loc:@twin_a"], "shift_a": ["loc:@twin_a"],
        "twin_b/read": ["loc:@twin_b"], "shift_b": ["loc:@twin_b"],
    }


def test_obfuscate_names_rewrites_colocation_to_the_new_names():
    result = TransformGraph(DENSE, ["x"], ["out"], ["obfuscate_names"])
    # Node order is kept, so the original and renamed nodes pair up position by position.
    new_name = {old.name: new.name for old, new in zip(DENSE.node, result.node, strict=True)}
    assert new_name["dense/w"] != "dense/w" and new_name["probe"] != "probe"
    expected = {
        new_name[node]: [f"loc:@{new_name[entry.removeprefix('loc:@')]}" for entry in entries]
        for node, entries in colocation(DENSE).items()
    }
    assert colocation(result) == expected
    assert_imports_and_matches(result, DENSE)


def test_obfuscate_names_on_the_frozen_iris_dnn_imports():
    """The reported bug: the renamed TF 1 Iris graph did not import (its `/read` Identities
    are colocated with the weights)."""
    iris = sample_graphs.frozen_iris_dnn(seed=0)
    inputs, outputs = list(sample_graphs.IRIS_FEATURES), [sample_graphs.IRIS_OUTPUT]
    assert len(colocation(iris)) == 10
    result = TransformGraph(iris, inputs, outputs, ["obfuscate_names"])
    names = set(ops_by_name(result))
    assert all(entry.removeprefix("loc:@") in names for entries in colocation(result).values() for entry in entries)
    features, _ = sample_graphs.iris_samples(16, seed=3)
    np.testing.assert_allclose(
        run_graph(result, outputs, features)[0], run_graph(iris, outputs, features)[0], rtol=0, atol=0
    )


def test_rename_node_rewrites_colocation_to_the_new_name():
    result = TransformGraph(DENSE, ["x"], ["out"], ["rename_node(old_node_name=dense/w, new_node_name=weights)"])
    assert colocation(result) == {
        "dense/w/read": ["loc:@weights"],
        "dense/b/read": ["loc:@dense/b"],
        "dense/MatMul": ["loc:@weights"],
        "dense/out": ["loc:@weights"],
        "out": ["loc:@probe"],
    }
    assert_imports_and_matches(result, DENSE)


def test_merge_duplicate_nodes_redirects_colocation_and_merges_the_holders():
    """twin_b merges into twin_a; `loc:@twin_b` becomes `loc:@twin_a`, which makes
    twin_b/read and shift_b duplicates too, and then the whole b branch collapses."""
    result = TransformGraph(TWINS, ["x"], ["out"], ["merge_duplicate_nodes"])
    assert list(ops_by_name(result)) == ["x", "twin_a", "twin_a/read", "shift_a", "matmul_a", "sum_a", "out"]
    assert list(nodes_by_name(result)["out"].input) == ["sum_a", "sum_a"]
    assert colocation(result) == {"twin_a/read": ["loc:@twin_a"], "shift_a": ["loc:@twin_a"]}
    assert_imports_and_matches(result, TWINS)


SURVIVORS = {"dense/b/read": ["loc:@dense/b"], "dense/MatMul": ["loc:@dense/w"], "dense/out": ["loc:@dense/w"]}
REMOVING_CASES = {
    # probe (an Identity) goes: `out` loses its only entry, so its `_class` goes too.
    "remove_nodes": ("remove_nodes(op=Identity)", {"dense/MatMul": ["loc:@dense/w"], "dense/out": ["loc:@dense/w"]}),
    # probe is not needed for `out`.
    "strip_unused_nodes": ("strip_unused_nodes", {"dense/w/read": ["loc:@dense/w"], **SURVIVORS}),
    # The reads fold into Consts without `_class`; dense/w, dense/b and probe are pruned.
    "fold_constants": ("fold_constants", {}),
}


@pytest.mark.parametrize(("transform", "expected"), list(REMOVING_CASES.values()), ids=list(REMOVING_CASES))
def test_engine_drops_entries_naming_removed_nodes(transform, expected):
    result = TransformGraph(DENSE, ["x"], ["out"], [transform])
    assert colocation(result) == expected
    assert_imports_and_matches(result, DENSE)


def test_transform_that_keeps_every_target_leaves_colocation_alone():
    result = TransformGraph(DENSE, ["x"], ["out", "probe"], ["remove_nodes(op=Identity)"])
    assert "probe" in ops_by_name(result)  # an output, so not removed
    assert colocation(result) == {
        "dense/MatMul": ["loc:@dense/w"], "dense/out": ["loc:@dense/w"], "out": ["loc:@probe"],
    }
    assert_imports_and_matches(result, DENSE)


# ---------------------------------------------------------------------------------------------
# The helper on its own
# ---------------------------------------------------------------------------------------------

def node(name: str, *entries: str) -> str:
    colocated = " ".join(f's: "{entry}"' for entry in entries)
    attr = f'attr {{ key: "_class" value {{ list {{ {colocated} }} }} }}' if entries else ""
    return f'node {{ name: "{name}" op: "NoOp" {attr} }}\n'


@pytest.mark.parametrize(
    "graph_text",
    [node("a") + node("b"), node("a") + node("b", "loc:@a", "loc:@b")],
    ids=["no_class_attrs", "every_entry_names_a_node"],
)
def test_fix_colocation_attrs_returns_a_valid_graph_unchanged(graph_text):
    graph = graph_from_text(graph_text)
    assert fix_colocation_attrs(graph) is graph
    assert fix_colocation_attrs(graph, {"ghost": "spirit"}) is graph


def test_engine_leaves_a_graph_with_valid_entries_unchanged():
    graph = graph_from_text(node("x") + node("out", "loc:@x"))
    assert TransformGraph(graph, ["x"], ["out"], ["remove_nodes(op=Identity)"]) == graph


def test_fix_colocation_attrs_renames_in_one_step():
    """Renames apply all at once: a -> b and b -> a swap the entries rather than chaining."""
    graph = graph_from_text(node("a") + node("b") + node("reader", "loc:@a", "loc:@b"))
    result = fix_colocation_attrs(graph, {"a": "b", "b": "a"})
    assert colocation(result) == {"reader": ["loc:@b", "loc:@a"]}
    assert colocation(graph) == {"reader": ["loc:@a", "loc:@b"]}  # argument not mutated


def test_fix_colocation_attrs_drops_missing_and_repeated_entries_keeps_others():
    graph = graph_from_text(
        node("kept")
        + node("mixed", "loc:@gone", "loc:@old", "loc:@kept", "other:tag")
        + node("orphan", "loc:@gone", "loc:@also_gone")
    )
    result = fix_colocation_attrs(graph, {"old": "kept"})
    assert colocation(result) == {"mixed": ["loc:@kept", "other:tag"]}
    assert "_class" not in nodes_by_name(result)["orphan"].attr


# ---------------------------------------------------------------------------------------------
# Against the C++ oracle: same structure, but its results do not import
# ---------------------------------------------------------------------------------------------

ORACLE_CASES = {
    "obfuscate_names": (DENSE, "obfuscate_names", "expects to be colocated with unknown node 'dense/w'"),
    "rename_node": (
        DENSE, "rename_node(old_node_name=dense/w, new_node_name=weights)",
        "expects to be colocated with unknown node 'dense/w'",
    ),
    "remove_nodes": (DENSE, "remove_nodes(op=Identity)", "expects to be colocated with unknown node 'probe'"),
    "strip_unused_nodes": (DENSE, "strip_unused_nodes", "expects to be colocated with unknown node 'probe'"),
    "fold_constants": (DENSE, "fold_constants", "expects to be colocated with unknown node 'dense/w'"),
    "merge_duplicate_nodes": (TWINS, "merge_duplicate_nodes", "expects to be colocated with unknown node 'twin_b'"),
}


@requires_oracle
@pytest.mark.parametrize(("graph", "transform", "error"), list(ORACLE_CASES.values()), ids=list(ORACLE_CASES))
def test_oracle_results_do_not_import_ours_do(graph, transform, error):
    oracle = oracle_transform(graph, ["x"], ["out"], [transform])
    with pytest.raises(ValueError, match=error):
        run_graph(oracle, ["out"], FEEDS)
    ours = TransformGraph(graph, ["x"], ["out"], [transform])
    assert_imports_and_matches(ours, graph)
    if transform == "merge_duplicate_nodes":
        # The oracle keeps the b branch: twin_b/read, shift_b still name the merged twin_b.
        assert set(ops_by_name(oracle)) - set(ops_by_name(ours)) == {
            "twin_b/read", "shift_b", "matmul_b", "sum_b",
        }
    else:
        assert ops_by_name(ours) == ops_by_name(oracle)
