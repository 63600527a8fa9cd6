"""obfuscate_names (and its old misspelling obsfucate_names)."""

import numpy as np
import pytest
from graph_helpers import const_text as const
from graph_helpers import graph_from_text, nodes_by_name, ours_and_oracle, requires_oracle, run_graph
from graph_helpers import op_text as op

from serving_optimiser.graph_transforms import TransformError, TransformGraph
from serving_optimiser.graph_transforms.transforms.names import base62

TREE = graph_from_text(
    op("add_node1", "Add", "add_node2", "add_node3")
    + op("add_node2", "Add", "const_node1", "const_node2")
    + op("add_node3", "Add", "const_node3", "const_node4")
    + const("const_node1", (1.0, 2.0)) + const("const_node2", (3.0, 4.0))
    + const("const_node3", (5.0, 6.0)) + const("const_node4", (7.0, 8.0))
)

MANY_CONSTS = graph_from_text("".join(const(f"const_node{i}", (float(i),)) for i in range(1000)))
NUMERIC_NAMES = graph_from_text("".join(const(f"1{i}", (float(i),)) for i in range(1000)))


@pytest.mark.parametrize(
    ("number", "text"),
    [(0, "0"), (9, "9"), (10, "a"), (35, "z"), (36, "A"), (61, "Z"), (62, "10"), (3843, "ZZ"), (3844, "100")],
)
def test_base62(number, text):
    assert base62(number) == text


def test_obfuscate_names_keeps_only_inputs_and_outputs():
    result = TransformGraph(TREE, ["const_node1"], ["add_node1"], ["obfuscate_names"])
    names = [node.name for node in result.node]
    assert names == ["add_node1", "0", "1", "const_node1", "2", "3", "4"]
    nodes = nodes_by_name(result)
    assert list(nodes["add_node1"].input) == ["0", "1"]
    assert list(nodes["0"].input) == ["const_node1", "2"]
    np.testing.assert_array_equal(run_graph(result, ["add_node1"])[0], run_graph(TREE, ["add_node1"])[0])


def test_obfuscate_names_thousand_nodes():
    result = TransformGraph(MANY_CONSTS, ["const_node0"], ["const_node999"], ["obfuscate_names"])
    names = {node.name for node in result.node}
    assert {"const_node0", "const_node999"} <= names
    assert "const_node500" not in names
    assert len(names) == 1000
    assert max(len(name) for name in names - {"const_node0", "const_node999"}) == 2  # 998 ids < 62**2


def test_obfuscate_names_skips_ids_equal_to_protected_names():
    result = TransformGraph(NUMERIC_NAMES, ["10"], ["19"], ["obfuscate_names"])
    nodes = nodes_by_name(result)
    assert len(nodes) == 1000
    assert nodes["10"].attr["value"].tensor.float_val == [0.0]
    assert nodes["19"].attr["value"].tensor.float_val == [9.0]


def test_obfuscate_names_keeps_control_markers_and_ports():
    graph = graph_from_text(
        const("values", (1.0, 2.0, 3.0, 4.0))
        + 'node { name: "halves" op: "Split" input: "split_dim" input: "values" '
        'attr { key: "T" value { type: DT_FLOAT } } attr { key: "num_split" value { i: 2 } } }'
        + 'node { name: "split_dim" op: "Const" attr { key: "dtype" value { type: DT_INT32 } } '
        'attr { key: "value" value { tensor { dtype: DT_INT32 int_val: 0 } } } }'
        + op("sum", "Add", "halves:1", "halves", "^split_dim")
    )
    result = TransformGraph(graph, [], ["sum"], ["obfuscate_names"])
    assert list(nodes_by_name(result)["sum"].input) == ["1:1", "1", "^2"]
    np.testing.assert_array_equal(run_graph(result, ["sum"])[0], run_graph(graph, ["sum"])[0])


def test_obfuscate_names_port_suffix_protects_nothing():
    result = TransformGraph(TREE, [], ["add_node1:0"], ["obfuscate_names"])
    assert "add_node1" not in nodes_by_name(result)


def test_obsfucate_names_alias():
    assert TransformGraph(TREE, [], ["add_node1"], ["obsfucate_names"]) == TransformGraph(
        TREE, [], ["add_node1"], ["obfuscate_names"])


def test_obfuscate_names_negative_case_all_protected_graph_unchanged():
    graph = graph_from_text(const("a") + op("relu", "Relu", "a"))
    assert TransformGraph(graph, ["a"], ["relu"], ["obfuscate_names"]) == graph


def test_obfuscate_names_dangling_input_is_an_error():
    graph = graph_from_text(op("relu", "Relu", "ghost"))
    with pytest.raises(TransformError, match="'relu' reads 'ghost', but no node is named 'ghost'"):
        TransformGraph(graph, [], ["relu"], ["obfuscate_names"])


@requires_oracle
@pytest.mark.parametrize(
    ("graph", "inputs", "outputs"),
    [
        (TREE, ["const_node1"], ["add_node1"]),
        (TREE, [], ["add_node1:0"]),
        (MANY_CONSTS, ["const_node0"], ["const_node999"]),
        (NUMERIC_NAMES, ["10"], ["19"]),
    ],
    ids=["tree", "port-protects-nothing", "thousand", "numeric-names"],
)
def test_obfuscate_names_matches_oracle(graph, inputs, outputs):
    ours, oracle = ours_and_oracle(graph, inputs, outputs, "obfuscate_names")
    assert [(n.name, list(n.input)) for n in ours.node] == [(n.name, list(n.input)) for n in oracle.node]
    assert list(ours.node) == list(oracle.node)
