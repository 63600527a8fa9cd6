"""The driver itself: ignore_errors (user errors skipped, bugs raised), the invalid-graph check
that blames the transform that broke the graph, and refusing arguments a transform lacks."""

import logging

import pytest
from graph_helpers import graph_from_text, op_text, ops_by_name

from serving_optimiser.errors import UserError
from serving_optimiser.graph_transforms import TransformError, TransformGraph, registry
from serving_optimiser.graph_transforms.graph_utils import new_graph_like

GRAPH = graph_from_text(
    op_text("x", "Placeholder", extra='attr { key: "dtype" value { type: DT_FLOAT } }')
    + op_text("output", "Identity", "x", extra='attr { key: "T" value { type: DT_FLOAT } }')
)


def fails_with_user_error(graph_def, context):
    raise TransformError(f"{context.transform}: the graph has no batch norm to fold")


def fails_with_key_error(graph_def, context):
    return {}["a bug in the transform"]


def drops_the_input(graph_def, context):
    return new_graph_like(graph_def, [node for node in graph_def.node if node.name != "x"])


@pytest.fixture
def test_transforms(monkeypatch):
    """Three throw-away transforms, registered for one test only."""
    registry.registered_names()  # load the real ones first, so ours are not overwritten
    for name, function in (
        ("fails_with_user_error", fails_with_user_error),
        ("fails_with_key_error", fails_with_key_error),
        ("drops_the_input", drops_the_input),
    ):
        monkeypatch.setitem(registry._REGISTRY, name, registry.RegisteredTransform(name, function, (), False))


def test_user_error_is_raised_without_ignore_errors(test_transforms):
    with pytest.raises(TransformError, match="fails_with_user_error: the graph has no batch norm"):
        TransformGraph(GRAPH, ["x"], ["output"], ["fails_with_user_error"])


@pytest.mark.parametrize("value", ["true", "TRUE", "True", "1"])
def test_ignore_errors_skips_a_user_error(test_transforms, caplog, value):
    with caplog.at_level(logging.WARNING):
        result = TransformGraph(GRAPH, ["x"], ["output"], [f"fails_with_user_error(ignore_errors={value})"])
    assert result == GRAPH
    assert "graph left unchanged (ignore_errors=true)" in caplog.text


@pytest.mark.parametrize("ignore_errors", ["true", "false"])
def test_a_bug_in_a_transform_propagates_with_its_traceback(test_transforms, ignore_errors):
    with pytest.raises(KeyError, match="a bug in the transform") as error:
        TransformGraph(GRAPH, ["x"], ["output"], [f"fails_with_key_error(ignore_errors={ignore_errors})"])
    assert not isinstance(error.value, UserError)
    assert error.traceback[-1].name == "fails_with_key_error"


@pytest.mark.parametrize("value", ["false", "FALSE", "0"])
def test_ignore_errors_false_spellings(test_transforms, value):
    with pytest.raises(TransformError):
        TransformGraph(GRAPH, ["x"], ["output"], [f"fails_with_user_error(ignore_errors={value})"])


@pytest.mark.parametrize("value", ["yes", "on", "2", "tru"])
def test_ignore_errors_refuses_other_words(value):
    with pytest.raises(TransformError, match=f"ignore_errors should be true, false, 1 or 0, found {value}"):
        TransformGraph(GRAPH, ["x"], ["output"], [f"fold_constants(ignore_errors={value})"])


def test_invalid_graph_is_blamed_on_the_transform_that_made_it(test_transforms):
    with pytest.raises(TransformError) as error:
        TransformGraph(GRAPH, ["x"], ["output"], ["sort_by_execution_order", "drops_the_input", "strip_unused_nodes"])
    assert str(error.value) == (
        "drops_the_input produced an invalid graph: node 'output' reads 'x', which does not exist "
        "(1 dangling input(s))"
    )


def test_ignore_errors_does_not_hide_an_invalid_graph(test_transforms):
    with pytest.raises(TransformError, match="drops_the_input produced an invalid graph"):
        TransformGraph(GRAPH, ["x"], ["output"], ["drops_the_input(ignore_errors=true)"])


@pytest.mark.parametrize(
    ("transforms", "message"),
    [
        ("round_weights(num_step=4)",
         "round_weights: unknown argument 'num_step' (it takes: num_steps, keep_float, ignore_errors)"),
        ("sort_by_execution_order(x=1)", "sort_by_execution_order: unknown argument 'x' (it takes: ignore_errors)"),
        ("fold_constant", "unknown transform 'fold_constant' (did you mean 'fold_constants'?)"),
        ("nonsense fold_constant", "unknown transform 'nonsense', 'fold_constant' (did you mean"),
        ("fold_constants(ignore_errors=true, ignore_errors=false)", "ignore_errors should be true, false, 1 or 0"),
    ],
    ids=["misspelt-argument", "argument-to-a-transform-without-any", "unknown-name", "all-unknown-names-at-once",
         "repeated-ignore-errors"],
)
def test_refused_before_anything_runs(transforms, message, caplog):
    with caplog.at_level(logging.INFO), pytest.raises(TransformError) as error:
        TransformGraph(GRAPH, ["x"], ["output"], f"remove_nodes(op=Identity) {transforms}")
    assert message in str(error.value)
    assert "remove_nodes" not in caplog.text  # the valid first transform never ran


def test_result_is_a_new_graph_and_the_input_is_untouched():
    before = GRAPH.SerializeToString(deterministic=True)
    result = TransformGraph(GRAPH, "x", "output", "remove_nodes(op=Identity)")
    assert result is not GRAPH
    assert GRAPH.SerializeToString(deterministic=True) == before
    # An output node is never removed, even when its op is listed.
    assert ops_by_name(result) == {"x": "Placeholder", "output": "Identity"}


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [("x", "missing", "output 'missing' not found in the graph"), ("x,,y", "output", "empty name in inputs list")],
    ids=["missing-output", "empty-input-name"],
)
def test_names_are_checked_up_front(inputs, outputs, message):
    with pytest.raises(TransformError, match=message):
        TransformGraph(GRAPH, inputs, outputs, "sort_by_execution_order")
