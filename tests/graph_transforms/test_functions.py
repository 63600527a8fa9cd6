"""inline_partitionedcall."""

import numpy as np
import pytest
import tensorflow as tf
from graph_helpers import (
    assert_same_structure,
    graph_from_text,
    nodes_by_name,
    op_counts,
    oracle_transform,
    ours_and_oracle,
    requires_oracle,
    run_graph,
)

from serving_optimiser.graph_transforms import TransformError, TransformGraph
from serving_optimiser.graph_transforms.graph_utils import find_invalid_inputs

FLOAT = 'attr { key: "T" value { type: DT_FLOAT } }'


def scalar_const(name: str, value: float, typed: bool = True) -> str:
    attrs = (
        f'attr {{ key: "dtype" value {{ type: DT_FLOAT }} }} '
        f'attr {{ key: "value" value {{ tensor {{ dtype: DT_FLOAT tensor_shape {{}} float_val: {value} }} }} }}'
    )
    return f'{{ name: "{name}" op: "Const" {attrs if typed else ""} }}'


def simple_add_graph(typed: bool = True, call_extra: str = "", outer_extra: str = "") -> str:
    """The spec's 7.10 scenario: PartitionedCall(y, sub/y) of x*y + add/y, then + add/y, Identity.

    ``typed=False`` is the C++ test's attr-less version (structure only, it cannot run).
    """
    t = FLOAT if typed else ""
    placeholder_attrs = 'attr { key: "dtype" value { type: DT_FLOAT } }' if typed else ""
    return f"""
    node {{ name: "y" op: "Placeholder" {placeholder_attrs} }}
    node {scalar_const("sub/y", 3.0, typed)}
    node {{ name: "PartitionedCall" op: "PartitionedCall" input: "y" input: "sub/y" {call_extra}
      attr {{ key: "f" value {{ func {{ name: "__inference_simple_add_14" }} }} }}
      {'attr { key: "Tin" value { list { type: DT_FLOAT type: DT_FLOAT } } }' if typed else ""}
      {'attr { key: "Tout" value { list { type: DT_FLOAT } } }' if typed else ""} }}
    node {scalar_const("add/y", 10.0, typed)}
    node {{ name: "add" op: "AddV2" input: "PartitionedCall" input: "add/y" {t} }}
    node {{ name: "Identity" op: "Identity" input: "add" {t} }}
    {outer_extra}
    library {{ function {{
      signature {{ name: "__inference_simple_add_14"
        input_arg {{ name: "x" type: DT_FLOAT }} input_arg {{ name: "y" type: DT_FLOAT }}
        output_arg {{ name: "identity" type: DT_FLOAT }} }}
      node_def {{ name: "mul" op: "Mul" input: "x" input: "y" {t} }}
      node_def {scalar_const("add/y", 1.0, typed)}
      node_def {{ name: "add" op: "AddV2" input: "mul:z:0" input: "add/y:output:0" {t} }}
      node_def {{ name: "Identity" op: "Identity" input: "add:z:0" {t} }}
      ret {{ key: "identity" value: "Identity:output:0" }} }} }}
    """


SIMPLE_ADD_UNTYPED = graph_from_text(simple_add_graph(typed=False))
SIMPLE_ADD = graph_from_text(simple_add_graph())
Y = {"y": np.array(2.0, np.float32)}


def test_inline_spec_scenario():
    result = TransformGraph(SIMPLE_ADD_UNTYPED, ["y"], ["Identity"], ["inline_partitionedcall"])
    assert "PartitionedCall" not in op_counts(result)
    assert len(result.node) == 9
    assert find_invalid_inputs(result) == []
    nodes = nodes_by_name(result)
    assert list(nodes["add"].input) == ["PartitionedCall/Identity:0", "add/y"]
    assert list(nodes["PartitionedCall/mul"].input) == ["y", "sub/y"]
    assert list(nodes["PartitionedCall/add"].input) == ["PartitionedCall/mul:0", "PartitionedCall/add/y:0"]
    assert list(nodes["PartitionedCall/Identity"].input) == ["PartitionedCall/add:0"]
    assert result.library == SIMPLE_ADD_UNTYPED.library


@requires_oracle
def test_inline_spec_scenario_matches_oracle():
    ours, oracle = ours_and_oracle(SIMPLE_ADD_UNTYPED, ["y"], ["Identity"], "inline_partitionedcall")
    assert [n.name for n in ours.node] == [n.name for n in oracle.node]
    assert_same_structure(ours, oracle)


def test_inline_runs_the_same_function():
    result = TransformGraph(SIMPLE_ADD, ["y"], ["Identity"], ["inline_partitionedcall"])
    assert run_graph(result, ["Identity"], Y)[0] == pytest.approx(2.0 * 3.0 + 1.0 + 10.0)
    assert run_graph(SIMPLE_ADD, ["Identity"], Y)[0] == run_graph(result, ["Identity"], Y)[0]


def test_inline_negative_case_leaves_graph_unchanged():
    graph = graph_from_text(simple_add_graph().replace('op: "PartitionedCall"', 'op: "StatefulPartitionedCall"'))
    assert TransformGraph(graph, ["y"], ["Identity"], ["inline_partitionedcall"]) == graph


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('attr { key: "f" value { func { name: "__inference_simple_add_14" } } }', ""),
         "node 'PartitionedCall' has no attribute 'f'"),
        (('func { name: "__inference_simple_add_14" }', 's: "__inference_simple_add_14"'),
         "attribute 'f' of node 'PartitionedCall' is not a function"),
        (('func { name: "__inference_simple_add_14" }', 'func { name: "missing_fn" }'),
         "calls function 'missing_fn', which is not in the library"),
        (('input: "y" input: "sub/y"', 'input: "y"'),
         "node 'PartitionedCall' passes 1 inputs to '__inference_simple_add_14', which takes 2"),
    ],
    ids=["no-f", "f-not-func", "function-missing", "input-count"],
)
def test_inline_errors_name_the_node(edit, message):
    graph = graph_from_text(simple_add_graph().replace(*edit, 1))
    with pytest.raises(TransformError, match=message):
        TransformGraph(graph, ["y"], ["Identity"], ["inline_partitionedcall"])


def test_inline_name_clash_is_an_error():
    graph = graph_from_text(simple_add_graph(outer_extra=f"node {scalar_const('PartitionedCall/mul', 1.0)}"))
    with pytest.raises(TransformError, match="second node named 'PartitionedCall/mul'"):
        TransformGraph(graph, ["y"], ["Identity"], ["inline_partitionedcall"])


def test_inline_control_inputs():
    """The call's own control input reaches the body; ``^call`` readers wait for the body's result."""
    graph = graph_from_text(
        simple_add_graph(
            call_extra='input: "^ready"',
            outer_extra='node { name: "ready" op: "NoOp" } '
            'node { name: "after_call" op: "NoOp" input: "^PartitionedCall" }',
        )
    )
    result = TransformGraph(graph, ["y"], ["Identity", "after_call"], ["inline_partitionedcall"])
    nodes = nodes_by_name(result)
    assert find_invalid_inputs(result) == []
    # mul reads only args and add/y reads nothing: both wait for ^ready; add reads body nodes.
    assert list(nodes["PartitionedCall/mul"].input) == ["y", "sub/y", "^ready"]
    assert list(nodes["PartitionedCall/add/y"].input) == ["^ready"]
    assert list(nodes["PartitionedCall/add"].input) == ["PartitionedCall/mul:0", "PartitionedCall/add/y:0"]
    assert nodes["PartitionedCall"].op == "NoOp"
    assert list(nodes["PartitionedCall"].input) == ["^PartitionedCall/Identity"]
    assert run_graph(result, ["Identity"], Y) == run_graph(graph, ["Identity"], Y)


def test_inline_call_named_as_output_keeps_its_tensors():
    result = TransformGraph(SIMPLE_ADD, ["y"], ["PartitionedCall", "Identity"], ["inline_partitionedcall"])
    stand_in = nodes_by_name(result)["PartitionedCall"]
    assert stand_in.op == "IdentityN"
    assert list(stand_in.input) == ["PartitionedCall/Identity:0"]
    assert run_graph(result, ["PartitionedCall:0"], Y) == run_graph(SIMPLE_ADD, ["PartitionedCall:0"], Y)


def test_inline_function_returning_its_argument():
    returns_x = simple_add_graph().replace('value: "Identity:output:0"', 'value: "x"')
    graph = graph_from_text(returns_x)
    result = TransformGraph(graph, ["y"], ["Identity"], ["inline_partitionedcall"])
    assert list(nodes_by_name(result)["add"].input) == ["y", "add/y"]
    assert run_graph(result, ["Identity"], Y)[0] == pytest.approx(12.0)


# ---------------------------------------------------------------------------------------------
# Real TF 2 graphs: a tf.function calling nested tf.functions
# ---------------------------------------------------------------------------------------------


@tf.function
def innermost(a):
    return a * 3.0


@tf.function
def inner(a, b):
    # Unique's second output arg ("idx") is port 1: the case the C++ tool got wrong.
    return innermost(a) * b + 1.0, tf.unique(a)[1]


def outer(x):
    product, indices = inner(x, x + 2.0)
    return product - 1.0, indices


@pytest.fixture(scope="module")
def nested_call_graph():
    concrete = tf.function(outer).get_concrete_function(tf.TensorSpec([3], tf.float32, name="x"))
    return concrete.graph.as_graph_def()


X = {"x": np.array([1.0, 2.0, 1.0], np.float32)}
OUTPUTS = ["Identity", "Identity_1"]


def test_inline_tf_function_graph(nested_call_graph):
    assert op_counts(nested_call_graph)["PartitionedCall"] == 1
    inner_fn = next(f for f in nested_call_graph.library.function if "inner_" in f.signature.name)
    assert any(n.op == "PartitionedCall" for n in inner_fn.node_def)
    result = TransformGraph(nested_call_graph, ["x"], OUTPUTS, ["inline_partitionedcall"])
    assert "PartitionedCall" not in op_counts(result)
    assert all(n.op != "PartitionedCall" for f in result.library.function for n in f.node_def)
    nodes = nodes_by_name(result)
    assert list(nodes["PartitionedCall/Identity_1"].input) == ["PartitionedCall/Unique:1"]
    assert nodes["PartitionedCall/PartitionedCall/mul"].op == "Mul"
    before, after = run_graph(nested_call_graph, OUTPUTS, X), run_graph(result, OUTPUTS, X)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[1], [0, 1, 0])


@requires_oracle
def test_inline_tf_function_graph_oracle_reads_wrong_port(nested_call_graph):
    """The C++ tool turned ``Unique:idx:0`` into ``Unique:0`` (the values, a float), breaking the graph."""
    oracle = oracle_transform(nested_call_graph, ["x"], OUTPUTS, "inline_partitionedcall")
    assert list(nodes_by_name(oracle)["PartitionedCall/Identity_1"].input) == ["PartitionedCall/Unique:0"]
    assert op_counts(oracle)["PartitionedCall"] == 1  # the nested call is left for another pass
    with pytest.raises(ValueError, match="incompatible with expected int32"):
        run_graph(oracle, OUTPUTS, X)


def test_inline_calls_inside_library_functions():
    """on_functions: a PartitionedCall inside a tf.cond branch body is inlined there too."""

    def model(x, flag):
        return tf.cond(flag, lambda: innermost(x) + 1.0, lambda: x)

    concrete = tf.function(model).get_concrete_function(
        tf.TensorSpec([2], tf.float32, name="x"), tf.TensorSpec([], tf.bool, name="flag")
    )
    graph = concrete.graph.as_graph_def()
    calls = [f.signature.name for f in graph.library.function for n in f.node_def if n.op == "PartitionedCall"]
    assert len(calls) == 1
    result = TransformGraph(graph, ["x", "flag"], ["Identity"], ["inline_partitionedcall"])
    assert all(n.op != "PartitionedCall" for f in result.library.function for n in f.node_def)
    for flag in (True, False):
        feed = {"x": np.array([1.0, -2.0], np.float32), "flag": np.array(flag)}
        np.testing.assert_array_equal(run_graph(result, ["Identity"], feed)[0], run_graph(graph, ["Identity"], feed)[0])
