"""The engine hook that runs ``on_functions`` transforms on every function body of the library,
and the FunctionDef <-> GraphDef conversion under it."""

import logging
import threading

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from graph_helpers import graph_from_text, oracle_transform, requires_oracle, run_graph
from tensorflow.core.framework import function_pb2, graph_pb2
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
from tensorflow.python.framework.function_def_to_graph import function_def_to_graph_def

from serving_optimiser.graph_transforms import TransformContext, TransformGraph
from serving_optimiser.graph_transforms.function_library import (
    function_to_graph_def,
    graph_def_to_function,
    transform_library_functions,
)
from serving_optimiser.graph_transforms.registry import RegisteredTransform, get_transform


def cond_model():
    weight = tf.Variable([[2.0, 3.0]], name="weight")
    steps = tf.constant(3)

    def model(x, flag):
        weight_value = weight * 1.0  # read outside the cond, so the branches stay stateless

        def then_branch():
            chained = tf.identity(tf.identity(tf.identity(x)))
            scale = tf.constant(2.0) * tf.constant(3.0)  # foldable constant arithmetic
            return chained * scale + weight_value

        def else_branch():
            return tf.identity(x) - weight_value

        branch = tf.cond(flag, then_branch, else_branch)
        # A While keeps multi-output ops (loop vars) in the library for the round-trip tests.
        _, looped = tf.while_loop(lambda i, v: i < steps, lambda i, v: (i + 1, tf.identity(v) * 0.5), (0, branch))
        return looped

    concrete = tf.function(model).get_concrete_function(
        tf.TensorSpec([1, 2], tf.float32, name="x"), tf.TensorSpec([], tf.bool, name="flag")
    )
    return convert_variables_to_constants_v2(concrete, lower_control_flow=False).graph.as_graph_def()


@pytest.fixture(scope="module")
def frozen_cond_graph():
    return cond_model()


TRANSFORMS = ["remove_nodes(op=Identity)", "sort_by_execution_order"]
X = np.array([[1.0, -1.0]], np.float32)


def functions(graph_def):
    return {f.signature.name: f for f in graph_def.library.function}


def identities(fdef):
    return sorted(n.name for n in fdef.node_def if n.op == "Identity")


def kept_identities(fdef):
    """The Identities a body must keep: those its return values or control returns name."""
    returned = {value.split(":")[0] for value in fdef.ret.values()} | set(fdef.control_ret.values())
    return sorted(name for name in identities(fdef) if name in returned)


def test_frozen_graph_has_stateless_if_and_branch_functions(frozen_cond_graph):
    ops = {n.op for n in frozen_cond_graph.node}
    assert {"StatelessIf", "While"} <= ops or {"StatelessIf", "StatelessWhile"} <= ops
    assert len(frozen_cond_graph.library.function) == 4


def test_identities_removed_inside_branches(frozen_cond_graph):
    result = TransformGraph(frozen_cond_graph, ["x", "flag"], ["Identity"], TRANSFORMS)
    before, after = functions(frozen_cond_graph), functions(result)
    then_name = next(name for name, f in before.items() if any(n.op == "Mul" for n in f.node_def) and "true" in name)
    assert len(identities(before[then_name])) >= 4
    for name, fdef in before.items():
        assert identities(after[name]) == kept_identities(fdef), name
    assert len(after[then_name].node_def) < len(before[then_name].node_def)


@pytest.mark.parametrize("flag", [True, False], ids=["then", "else"])
def test_transformed_graph_runs_identically(frozen_cond_graph, flag):
    result = TransformGraph(frozen_cond_graph, ["x", "flag"], ["Identity"], TRANSFORMS)
    feed = {"x": X, "flag": np.array(flag)}
    expected = ((X * 6.0 + [[2.0, 3.0]]) if flag else (X - [[2.0, 3.0]])) * 0.125
    before, after = (run_graph(g, ["Identity"], feed)[0] for g in (frozen_cond_graph, result))
    np.testing.assert_array_equal(after, before)
    np.testing.assert_allclose(after, expected, rtol=1e-6)


def test_signatures_unchanged(frozen_cond_graph):
    result = TransformGraph(frozen_cond_graph, ["x", "flag"], ["Identity"], TRANSFORMS)
    assert [f.signature.name for f in result.library.function] == [
        f.signature.name for f in frozen_cond_graph.library.function
    ]
    for name, original in functions(frozen_cond_graph).items():
        transformed = functions(result)[name]
        assert transformed.signature == original.signature
        assert dict(transformed.attr) == dict(original.attr)
        assert dict(transformed.arg_attr) == dict(original.arg_attr)
        assert dict(transformed.control_ret) == dict(original.control_ret)
        assert set(transformed.ret) == set(original.ret)
    assert result.library.gradient == frozen_cond_graph.library.gradient


@requires_oracle
def test_oracle_copied_the_library_back_unchanged(frozen_cond_graph):
    """The C++ tool never touched function bodies; we do (docs/differences/functions.md)."""
    oracle = oracle_transform(frozen_cond_graph, ["x", "flag"], ["Identity"], TRANSFORMS)
    ours = TransformGraph(frozen_cond_graph, ["x", "flag"], ["Identity"], TRANSFORMS)
    assert oracle.library == frozen_cond_graph.library
    assert ours.library != frozen_cond_graph.library


def test_conversion_matches_tensorflow(frozen_cond_graph):
    """Our FunctionDef -> GraphDef is TensorFlow's function_def_to_graph_def, without its global state."""
    for fdef in frozen_cond_graph.library.function:
        ours, ours_names = function_to_graph_def(fdef, frozen_cond_graph)
        with tf.Graph().as_default():
            tf.graph_util.import_graph_def(frozen_cond_graph, name="")
            theirs, their_names = function_def_to_graph_def(fdef)
        assert list(ours.node) == list(theirs.node), fdef.signature.name
        assert ours_names == their_names


def test_unchanged_body_converts_back_to_the_same_function(frozen_cond_graph):
    for fdef in frozen_cond_graph.library.function:
        body, names = function_to_graph_def(fdef, frozen_cond_graph)
        ret_tensors = {arg.name: names[fdef.ret[arg.name]] for arg in fdef.signature.output_arg}
        assert graph_def_to_function(fdef, body, ret_tensors, frozen_cond_graph.library) == fdef


# A body that returns an argument directly and has a control input on an argument.
PASS_THROUGH = text_format.Parse(
    """
    signature { name: "pass_through" input_arg { name: "a" type: DT_FLOAT } input_arg { name: "b" type: DT_FLOAT }
      output_arg { name: "same" type: DT_FLOAT } output_arg { name: "parts" type: DT_FLOAT } }
    node_def { name: "split" op: "Unpack" input: "b" input: "^a"
      attr { key: "T" value { type: DT_FLOAT } } attr { key: "num" value { i: 2 } } }
    node_def { name: "second" op: "Identity" input: "split:output:1" attr { key: "T" value { type: DT_FLOAT } } }
    ret { key: "same" value: "a" } ret { key: "parts" value: "second:output:0" }
    """,
    function_pb2.FunctionDef(),
)


def test_round_trip_of_argument_returns_and_list_outputs():
    body, names = function_to_graph_def(PASS_THROUGH)
    assert [list(n.input) for n in body.node] == [[], [], ["b:0", "^a"], ["split:1"]]
    ret_tensors = {"same": names["a"], "parts": names["second:output:0"]}
    assert ret_tensors == {"same": "a:0", "parts": "second:0"}
    assert graph_def_to_function(PASS_THROUGH, body, ret_tensors, function_pb2.FunctionDefLibrary()) == PASS_THROUGH


def test_graph_without_library_is_unchanged():
    graph = graph_from_text(
        'node { name: "a" op: "Const" attr { key: "dtype" value { type: DT_FLOAT } } '
        'attr { key: "value" value { tensor { dtype: DT_FLOAT tensor_shape {} float_val: 1 } } } } '
        'node { name: "b" op: "Identity" input: "a" attr { key: "T" value { type: DT_FLOAT } } }'
    )
    context = TransformContext("sort_by_execution_order", [], ["b"], {})
    assert transform_library_functions(graph, get_transform("sort_by_execution_order"), context) == graph
    assert not TransformGraph(graph, [], ["b"], ["sort_by_execution_order"]).HasField("library")


def with_extra_function(graph_def, fdef_text: str) -> graph_pb2.GraphDef:
    result = graph_pb2.GraphDef()
    result.CopyFrom(graph_def)
    text_format.Parse(fdef_text, result.library.function.add())
    return result


UNKNOWN_OP_FUNCTION = """
    signature { name: "a_uses_unknown_op"
      input_arg { name: "a" type: DT_FLOAT } output_arg { name: "out" type: DT_FLOAT } }
    node_def { name: "chain" op: "Identity" input: "a" attr { key: "T" value { type: DT_FLOAT } } }
    node_def { name: "mystery" op: "NotARegisteredOp" input: "chain:output:0" }
    node_def { name: "result" op: "Identity" input: "mystery:y:0" attr { key: "T" value { type: DT_FLOAT } } }
    ret { key: "out" value: "result:output:0" }
"""


def test_unconvertible_function_left_as_is(frozen_cond_graph, caplog):
    graph = with_extra_function(frozen_cond_graph, UNKNOWN_OP_FUNCTION)
    with caplog.at_level(logging.WARNING):
        result = TransformGraph(graph, ["x", "flag"], ["Identity"], TRANSFORMS)
    assert functions(result)["a_uses_unknown_op"] == functions(graph)["a_uses_unknown_op"]
    assert "function 'a_uses_unknown_op' left unchanged" in caplog.text
    assert "NotARegisteredOp" in caplog.text
    # The other functions were still transformed.
    assert sum(len(f.node_def) for f in result.library.function) < sum(len(f.node_def) for f in graph.library.function)


def breaking_transform(how: str) -> RegisteredTransform:
    """A transform that leaves a body no valid function can have."""

    def transform(graph_def, context):
        result = graph_pb2.GraphDef()
        result.CopyFrom(graph_def)
        if how == "drops-returned-node":
            kept = [n for n in result.node if n.name not in context.output_names]
            del result.node[:]
            result.node.extend(kept)
        else:
            result.node.add(name="stray_input", op="Placeholder").attr["dtype"].type = tf.float32.as_datatype_enum
        return result

    return RegisteredTransform(how, transform, (), True)


@pytest.mark.parametrize("how", ["drops-returned-node", "adds-placeholder"])
def test_body_the_transform_breaks_is_left_as_is(frozen_cond_graph, how, caplog):
    context = TransformContext(how, ["x", "flag"], ["Identity"], {})
    with caplog.at_level(logging.WARNING):
        result = transform_library_functions(frozen_cond_graph, breaking_transform(how), context)
    assert result == frozen_cond_graph
    for name in functions(frozen_cond_graph):
        assert f"function '{name}' left unchanged" in caplog.text


def test_functions_processed_in_name_order(frozen_cond_graph):
    graph = with_extra_function(frozen_cond_graph, UNKNOWN_OP_FUNCTION.replace("NotARegisteredOp", "Neg"))
    seen = []

    def record(graph_def, context):
        seen.append(tuple(context.output_names))
        return graph_def

    context = TransformContext("record", [], [], {})
    result = transform_library_functions(graph, RegisteredTransform("record", record, (), True), context)
    names = sorted(f.signature.name for f in graph.library.function)
    assert len(seen) == len(names)
    by_outputs = {}
    for name in names:
        fdef = functions(graph)[name]
        returned = [fdef.ret[arg.name].split(":")[0] for arg in fdef.signature.output_arg]
        by_outputs[name] = tuple(dict.fromkeys(returned + sorted(fdef.control_ret.values())))
    assert seen == [by_outputs[name] for name in names]
    assert result == graph


CONTROL_RET_FUNCTION = """
    signature { name: "with_control_ret" input_arg { name: "a" type: DT_FLOAT }
      output_arg { name: "out" type: DT_FLOAT } control_output: "side_effect" }
    node_def { name: "side_effect" op: "Identity" input: "a" attr { key: "T" value { type: DT_FLOAT } } }
    node_def { name: "chain" op: "Identity" input: "a" attr { key: "T" value { type: DT_FLOAT } } }
    node_def { name: "negated" op: "Neg" input: "chain:output:0" attr { key: "T" value { type: DT_FLOAT } } }
    ret { key: "out" value: "negated:y:0" }
    control_ret { key: "side_effect" value: "side_effect" }
"""


def test_control_return_nodes_are_protected():
    graph = with_extra_function(graph_pb2.GraphDef(), CONTROL_RET_FUNCTION)
    context = TransformContext("remove_nodes", [], [], {"op": ["Identity"]})
    result = transform_library_functions(graph, get_transform("remove_nodes"), context)
    fdef = result.library.function[0]
    assert [(n.name, list(n.input)) for n in fdef.node_def] == [("side_effect", ["a"]), ("negated", ["a"])]
    assert dict(fdef.control_ret) == {"side_effect": "side_effect"}
    assert fdef.signature == graph.library.function[0].signature


# A While body as TF 2 writes one: each loop variable returned through an Identity, one of them
# the argument itself (a pass-through), after a NoOp the returns wait for.
WHILE_BODY_FUNCTION = """
    signature { name: "while_body"
      input_arg { name: "i" type: DT_INT32 } input_arg { name: "h" type: DT_FLOAT }
      output_arg { name: "i_next" type: DT_INT32 } output_arg { name: "h_next" type: DT_FLOAT }
      output_arg { name: "i_passed" type: DT_INT32 } }
    node_def { name: "one" op: "Const" attr { key: "dtype" value { type: DT_INT32 } }
      attr { key: "value" value { tensor { dtype: DT_INT32 tensor_shape {} int_val: 1 } } } }
    node_def { name: "add" op: "AddV2" input: "i" input: "one:output:0" attr { key: "T" value { type: DT_INT32 } } }
    node_def { name: "tanh" op: "Tanh" input: "h" attr { key: "T" value { type: DT_FLOAT } } }
    node_def { name: "tanh_chain_removed" op: "Identity" input: "tanh:y:0" attr { key: "T" value { type: DT_FLOAT } } }
    node_def { name: "order" op: "NoOp" input: "^add" }
    node_def { name: "i_identity" op: "Identity" input: "add:z:0" input: "^order"
      attr { key: "T" value { type: DT_INT32 } } }
    node_def { name: "h_identity" op: "Identity" input: "tanh_chain_removed:output:0" input: "^order"
      attr { key: "T" value { type: DT_FLOAT } } }
    node_def { name: "i_passed_identity" op: "Identity" input: "i" attr { key: "T" value { type: DT_INT32 } } }
    ret { key: "i_next" value: "i_identity:output:0" }
    ret { key: "h_next" value: "h_identity:output:0" }
    ret { key: "i_passed" value: "i_passed_identity:output:0" }
"""


def test_body_returns_keep_their_tensors():
    """A body's ``ret`` is its outputs: remove_nodes keeps the Identities it names (the counter's
    among them, or the loop would stop advancing) and bypasses the others."""
    graph = with_extra_function(graph_pb2.GraphDef(), WHILE_BODY_FUNCTION)
    context = TransformContext("remove_nodes", [], [], {"op": ["Identity"]})
    result = transform_library_functions(graph, get_transform("remove_nodes"), context)
    original, fdef = graph.library.function[0], result.library.function[0]
    assert dict(fdef.ret) == dict(original.ret)
    assert identities(fdef) == ["h_identity", "i_identity", "i_passed_identity"]
    assert list(next(n for n in fdef.node_def if n.name == "h_identity").input) == ["tanh:y:0", "^order"]
    assert fdef.signature == original.signature


def run_within(seconds, *args):
    """run_graph, failing instead of hanging when a loop no longer ends."""
    results = []
    thread = threading.Thread(target=lambda: results.append(run_graph(*args)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the graph did not return within {seconds} s"
    return results[0]


NOTEBOOK = [
    "remove_nodes(op=Identity)", "fold_constants(ignore_errors=true)", "fold_batch_norms", "fold_old_batch_norms",
    "round_weights(num_steps=256)", "quantize_weights", "strip_unused_nodes", "sort_by_execution_order",
]


@pytest.mark.parametrize("transforms", [*NOTEBOOK, " ".join(NOTEBOOK)], ids=[*NOTEBOOK, "all"])
def test_notebook_transforms_keep_what_bodies_return(frozen_cond_graph, transforms):
    result = TransformGraph(frozen_cond_graph, ["x", "flag"], ["Identity"], transforms)
    for name, original in functions(frozen_cond_graph).items():
        fdef = functions(result)[name]
        body_names = {n.name for n in fdef.node_def} | {a.name for a in fdef.signature.input_arg}
        for arg in original.signature.output_arg:
            # The same node (a folded one may now be a Const, output:0) returns each output.
            assert fdef.ret[arg.name].split(":")[0] == original.ret[arg.name].split(":")[0], (name, arg.name)
            assert fdef.ret[arg.name].split(":")[0] in body_names
    for flag in (True, False):
        feeds = {"x": X, "flag": np.array(flag)}
        before, after = (run_within(60, g, ["Identity"], feeds)[0] for g in (frozen_cond_graph, result))
        np.testing.assert_array_equal(after, before)


def test_one_log_line_when_only_function_bodies_change_or_nothing_does(caplog):
    graph = with_extra_function(graph_pb2.GraphDef(), WHILE_BODY_FUNCTION)
    with caplog.at_level(logging.INFO, logger="serving_optimiser.graph_transforms"):
        TransformGraph(graph, [], [], ["remove_nodes(op=Identity)", "fold_batch_norms"])
    engine = [r.getMessage() for r in caplog.records if r.name.endswith(".engine")]
    assert len(engine) == 2
    assert engine[0].startswith("remove_nodes: 0 -> 0 nodes, ") and "1 of 1 functions changed" in engine[0]
    assert engine[1].startswith("fold_batch_norms: no change (")


def test_quantize_weights_says_why_nothing_changed(frozen_cond_graph, caplog):
    """Every Const of this model is far under the default minimum_size: a "no change" line, and
    the reason, for the main graph and each body that holds float Consts."""
    with caplog.at_level(logging.INFO, logger="serving_optimiser.graph_transforms"):
        result = TransformGraph(frozen_cond_graph, ["x", "flag"], ["Identity"], ["quantize_weights"])
    assert result == frozen_cond_graph
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if m.startswith("quantize_weights: no change (")] == [messages[-1]]
    assert any("under minimum_size=1024 elements" in m and "left float" in m for m in messages[:-1])
