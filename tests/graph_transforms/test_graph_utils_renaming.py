"""graph_utils.renaming: the one input-renaming helper (``rename_node_inputs``: canonical and
``:*`` matches, chains, cycles, ignored nodes, one-step renames), ``rename_nodes`` built on it,
and the colocation entries that follow a rename."""

import numpy as np
import pytest
from graph_helpers import graph_of, run_graph

from model_builders.sample_graphs import IRIS_OUTPUT, frozen_iris_dnn, iris_samples
from serving_optimiser.graph_transforms import TransformError
from serving_optimiser.graph_transforms.graph_utils import make_node, node_map
from serving_optimiser.graph_transforms.graph_utils.renaming import (
    fix_colocation_attrs,
    rename_node_inputs,
    rename_nodes,
)

# Node names that are prefixes of one another, so a rename matching on text would catch the
# wrong ones: ``a`` must not touch ``ab``, ``a/b`` or ``a:b``-like strings.
SOURCES = ("a", "ab", "a/b", "b", "c")


def reader_inputs(renames: dict[str, str], inputs: list[str], **options) -> list[str]:
    nodes = [make_node("Const", name) for name in SOURCES] + [make_node("AddN", "reader", inputs)]
    return list(node_map(rename_node_inputs(graph_of(*nodes), renames, **options))["reader"].input)


@pytest.mark.parametrize(
    ("renames", "inputs", "expected"),
    [
        ({"a": "b"}, ["a", "a:0", "a:1", "^a"], ["b", "b", "a:1", "^a"]),
        ({"a:1": "c"}, ["a", "a:1"], ["a", "c"]),
        ({"^a": "^c"}, ["a", "^a"], ["a", "^c"]),
        ({"a:*": "b"}, ["a", "a:0", "a:1", "^a"], ["b", "b:0", "b:1", "^b"]),
        ({"a:*": "c"}, ["ab", "a/b:1", "^ab", "a"], ["ab", "a/b:1", "^ab", "c"]),
        ({"a": "b", "b": "c"}, ["a"], ["c"]),
        ({"a": "a"}, ["a"], ["a"]),
        ({"a:*": "a"}, ["a:1", "^a"], ["a:1", "^a"]),
    ],
    ids=["canonical-port-0-only", "one-port", "control-only", "wildcard-keeps-port-and-control",
         "prefixes-of-other-names-untouched", "chain-followed", "self-rename-is-no-op", "wildcard-self-rename"],
)
def test_rename_node_inputs(renames, inputs, expected):
    assert reader_inputs(renames, inputs) == expected


@pytest.mark.parametrize(
    "renames", [{"a": "b", "b": "a"}, {"a:*": "b", "b:*": "c", "c:*": "a"}], ids=["two-cycle", "wildcard-three-cycle"]
)
def test_rename_cycles_are_errors(renames):
    with pytest.raises(TransformError, match="RenameNodeInputs argument contains a cycle for"):
        reader_inputs(renames, ["a"])


def test_renames_in_one_step_swap_names_and_never_cycle():
    renames = {"a:*": "b", "b:*": "a"}
    assert reader_inputs(renames, ["a", "b:1", "^a"], follow_chains=False) == ["b", "a:1", "^b"]
    assert reader_inputs({"a": "b", "b": "c"}, ["a", "b"], follow_chains=False) == ["b", "c"]


def test_rename_leaves_ignored_nodes_alone():
    nodes = [make_node("Const", "a"), make_node("Identity", "keep", ["a"]), make_node("Identity", "move", ["a"])]
    result = node_map(rename_node_inputs(graph_of(*nodes), {"a": "b"}, nodes_to_ignore=["keep"]))
    assert list(result["keep"].input) == ["a"] and list(result["move"].input) == ["b"]


def test_rename_node_inputs_does_not_change_its_argument():
    original = graph_of(make_node("Const", "a"), make_node("Identity", "reader", ["a"]))
    rename_node_inputs(original, {"a": "b"})
    assert list(original.node[1].input) == ["a"]


def test_rename_nodes_renames_nodes_and_every_reference_at_once():
    original = graph_of(
        make_node("Const", "a"),
        make_node("Const", "ab"),
        make_node("Split", "b", ["a", "ab"], {"num_split": 2}),
        make_node("NoOp", "wait", ["^a"]),
        make_node("AddN", "sum", ["b", "b:1", "b:0", "ab", "^wait"]),
    )
    result = rename_nodes(original, {"a": "b", "b": "a", "wait": "wait", "ghost": "unused"})
    assert [(n.name, list(n.input)) for n in result.node] == [
        ("b", []),
        ("ab", []),
        ("a", ["b", "ab"]),
        ("wait", ["^b"]),
        ("sum", ["a", "a:1", "a:0", "ab", "^wait"]),
    ]


def test_renamed_frozen_graph_computes_the_same():
    """Every node of the frozen Iris DNN renamed under a prefix, with a control input added so
    ``^`` inputs are renamed too, and its ``_class`` entries (``loc:@<variable>``) following: it
    imports into TensorFlow (which rejects an entry naming no node) and gives the same
    probabilities, bit for bit."""
    original = frozen_iris_dnn(seed=0, hidden_units=(8, 8))
    original.node.append(make_node("NoOp", "before_softmax", ["^dnn/logits/BiasAdd"]))
    [softmax] = [node for node in original.node if node.name == IRIS_OUTPUT]
    softmax.input.append("^before_softmax")
    renames = {node.name: f"renamed/{node.name}" for node in original.node}
    renamed = fix_colocation_attrs(rename_nodes(original, renames), renames)
    assert {node.name for node in renamed.node} == set(renames.values())
    [renamed_softmax] = [node for node in renamed.node if node.name == f"renamed/{IRIS_OUTPUT}"]
    assert list(renamed_softmax.input) == ["renamed/dnn/logits/BiasAdd", "^renamed/before_softmax"]
    features, _ = iris_samples(16, seed=1)
    expected = run_graph(original, [IRIS_OUTPUT], features)[0]
    actual = run_graph(renamed, [f"renamed/{IRIS_OUTPUT}"], {f"renamed/{k}": v for k, v in features.items()})[0]
    np.testing.assert_array_equal(actual, expected)


def test_colocation_entries_follow_the_rename():
    original = graph_of(
        make_node("Const", "weights", attrs={"_class": ["loc:@weights"]}),
        make_node("Identity", "weights/read", ["weights"], {"_class": ["loc:@weights", "loc:@gone"]}),
    )
    renames = {"weights": "w"}
    result = fix_colocation_attrs(rename_nodes(original, renames), renames)
    assert [(n.name, list(n.input), list(n.attr["_class"].list.s)) for n in result.node] == [
        ("w", [], [b"loc:@w"]),
        ("weights/read", ["w"], [b"loc:@w"]),
    ]
