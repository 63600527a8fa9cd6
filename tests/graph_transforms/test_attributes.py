"""add_default_attributes, remove_attribute, rename_attribute, remove_device, set_device, rename_node,
rename_op."""

import numpy as np
import pytest
from graph_helpers import (
    const_text as const,
)
from graph_helpers import (
    graph_from_text,
    nodes_by_name,
    ops_by_name,
    oracle_transform,
    ours_and_oracle,
    requires_oracle,
    run_graph,
)
from graph_helpers import (
    op_text as op,
)

from serving_optimiser.graph_transforms import TransformError, TransformGraph


def attr_i(key: str, value: int) -> str:
    return f'attr {{ key: "{key}" value {{ i: {value} }} }}'


def attr_s(key: str, value: str) -> str:
    return f'attr {{ key: "{key}" value {{ s: "{value}" }} }}'


# The C++ tests' graph: mul_node1 carries foo=23 and bar, add_node2 foo=46, bob and bar.
ATTRIBUTE_GRAPH = graph_from_text(
    const("const_node1") + const("const_node2") + const("const_node3")
    + op("mul_node1", "Mul", "const_node1", "const_node2",
         extra=attr_i("foo", 23) + attr_s("bar", "something"))
    + op("add_node2", "Add", "mul_node1", "const_node3",
         extra=attr_i("foo", 46) + attr_i("bob", 23) + attr_s("bar", "something else"))
)


def attrs(graph, name):
    return dict(nodes_by_name(graph)[name].attr)


# --- add_default_attributes ---------------------------------------------------------------------

LRN_GRAPH = graph_from_text(
    'node { name: "input" op: "Placeholder" attr { key: "dtype" value { type: DT_FLOAT } } }'
    'node { name: "lrn_node1" op: "LRN" input: "input" }'
    'node { name: "lrn_node2" op: "LRN" input: "input" '
    'attr { key: "depth_radius" value { i: 7 } } attr { key: "bias" value { f: 2.0 } } '
    'attr { key: "alpha" value { f: 2.0 } } attr { key: "beta" value { f: 1.0 } } '
    'attr { key: "T" value { type: DT_FLOAT } } }'
    "versions { producer: 27 min_consumer: 12 }"
)


def test_add_default_attributes_fills_missing_defaults_only():
    result = TransformGraph(LRN_GRAPH, [], ["lrn_node1", "lrn_node2"], ["add_default_attributes"])
    lrn1, lrn2 = nodes_by_name(result)["lrn_node1"], nodes_by_name(result)["lrn_node2"]
    assert lrn1.attr["depth_radius"].i == 5
    assert lrn1.attr["bias"].f == pytest.approx(1.0)
    assert lrn1.attr["alpha"].f == pytest.approx(1.0)
    assert lrn1.attr["beta"].f == pytest.approx(0.5)
    assert lrn1.attr["T"].type == 1
    assert (lrn2.attr["depth_radius"].i, lrn2.attr["bias"].f, lrn2.attr["alpha"].f, lrn2.attr["beta"].f) == (
        7, 2.0, 2.0, 1.0)
    assert result.versions.producer == 27
    placeholder = nodes_by_name(result)["input"]
    assert set(placeholder.attr) == {"dtype", "shape"}
    assert placeholder.attr["shape"].shape.unknown_rank


def test_add_default_attributes_computes_the_same():
    result = TransformGraph(LRN_GRAPH, ["input"], ["lrn_node1", "lrn_node2"], ["add_default_attributes"])
    batch = np.random.default_rng(0).normal(size=(1, 2, 2, 3)).astype(np.float32)
    before = run_graph(LRN_GRAPH, ["lrn_node1", "lrn_node2"], {"input": batch})
    after = run_graph(result, ["lrn_node1", "lrn_node2"], {"input": batch})
    for b, a in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=0, atol=0)


def test_add_default_attributes_conv2d_gains_its_defaults():
    graph = graph_from_text(
        const("input") + const("filter")
        + 'node { name: "conv" op: "Conv2D" input: "input" input: "filter" '
        'attr { key: "T" value { type: DT_FLOAT } } attr { key: "padding" value { s: "SAME" } } '
        'attr { key: "strides" value { list { i: 1 i: 1 i: 1 i: 1 } } } }'
    )
    result = TransformGraph(graph, [], ["conv"], ["add_default_attributes"])
    added = set(attrs(result, "conv")) - set(attrs(graph, "conv"))
    assert added == {"data_format", "dilations", "explicit_paddings", "use_cudnn_on_gpu"}
    assert attrs(result, "conv")["data_format"].s == b"NHWC"


def test_add_default_attributes_negative_case_complete_graph_unchanged():
    complete = TransformGraph(LRN_GRAPH, [], ["lrn_node1"], ["add_default_attributes"])
    assert TransformGraph(complete, [], ["lrn_node1"], ["add_default_attributes"]) == complete


def test_add_default_attributes_uses_library_signatures():
    graph = graph_from_text(
        'library { function { signature { name: "my_fn" output_arg { name: "out" type: DT_FLOAT } '
        'attr { name: "scale" type: "int" default_value { i: 3 } } } '
        'node_def { name: "c" op: "Const" attr { key: "dtype" value { type: DT_FLOAT } } '
        'attr { key: "value" value { tensor { dtype: DT_FLOAT float_val: 1.0 } } } } '
        'ret { key: "out" value: "c:output:0" } } }'
        'node { name: "call" op: "my_fn" }'
    )
    result = TransformGraph(graph, [], ["call"], ["add_default_attributes"])
    assert attrs(result, "call")["scale"].i == 3
    assert result.library == graph.library


def test_add_default_attributes_unknown_op_is_an_error():
    graph = graph_from_text('node { name: "mystery" op: "NoSuchOp" }')
    with pytest.raises(TransformError, match="'mystery' has op 'NoSuchOp'"):
        TransformGraph(graph, [], ["mystery"], ["add_default_attributes"])


@requires_oracle
def test_add_default_attributes_matches_oracle():
    ours, oracle = ours_and_oracle(LRN_GRAPH, [], ["lrn_node1"], "add_default_attributes")
    assert list(ours.node) == list(oracle.node)
    assert ours.versions == oracle.versions  # the one C++ transform that kept versions


# --- remove_attribute / rename_attribute ---------------------------------------------------------


@pytest.mark.parametrize(
    ("transform", "mul_attrs", "add_attrs"),
    [
        ("remove_attribute(attribute_name=foo)", {"T", "bar"}, {"T", "bob", "bar"}),
        ('remove_attribute(op_name="*", attribute_name=foo)', {"T", "bar"}, {"T", "bob", "bar"}),
        ("remove_attribute(op_name=Mul, attribute_name=foo)", {"T", "bar"}, {"T", "foo", "bob", "bar"}),
        ("remove_attribute(attribute_name=absent)", {"T", "foo", "bar"}, {"T", "foo", "bob", "bar"}),
    ],
    ids=["wildcard", "explicit-star", "only-mul", "absent-attr-unchanged"],
)
def test_remove_attribute(transform, mul_attrs, add_attrs):
    result = TransformGraph(ATTRIBUTE_GRAPH, [], ["add_node2"], [transform])
    assert set(attrs(result, "mul_node1")) == mul_attrs
    assert set(attrs(result, "add_node2")) == add_attrs
    assert attrs(result, "const_node1") == attrs(ATTRIBUTE_GRAPH, "const_node1")


def test_remove_attribute_negative_case_graph_unchanged():
    result = TransformGraph(ATTRIBUTE_GRAPH, [], ["add_node2"], ["remove_attribute(op_name=Sub, attribute_name=foo)"])
    assert result == ATTRIBUTE_GRAPH


@pytest.mark.parametrize(
    ("transform", "message"),
    [
        ("remove_attribute", "exactly one 'attribute_name'"),
        ("remove_attribute(attribute_name=a, attribute_name=b)", "exactly one 'attribute_name' argument .found 2"),
        ("remove_attribute(attribute_name=a, op_name=Mul, op_name=Add)", "single 'op_name'"),
        ("rename_attribute(old_attribute_name=foo)", "exactly one 'new_attribute_name'"),
        ("rename_attribute(old_attribute_name=foo, new_attribute_name=b, op_name=Mul, op_name=Add)",
         "single 'op_name'"),
    ],
    ids=["remove-missing", "remove-twice", "remove-two-ops", "rename-missing-new", "rename-two-ops"],
)
def test_attribute_argument_errors(transform, message):
    with pytest.raises(TransformError, match=message):
        TransformGraph(ATTRIBUTE_GRAPH, [], ["add_node2"], [transform])


@pytest.mark.parametrize(
    ("transform", "renamed_on"),
    [
        ("rename_attribute(old_attribute_name=foo, new_attribute_name=baz)", {"mul_node1", "add_node2"}),
        ("rename_attribute(op_name=Mul, old_attribute_name=foo, new_attribute_name=baz)", {"mul_node1"}),
    ],
    ids=["wildcard", "only-mul"],
)
def test_rename_attribute(transform, renamed_on):
    result = TransformGraph(ATTRIBUTE_GRAPH, [], ["add_node2"], [transform])
    for name, value in (("mul_node1", 23), ("add_node2", 46)):
        node_attrs = attrs(result, name)
        if name in renamed_on:
            assert "foo" not in node_attrs
            assert node_attrs["baz"].i == value
        else:
            assert node_attrs["foo"].i == value
            assert "baz" not in node_attrs
        assert node_attrs["bar"] == attrs(ATTRIBUTE_GRAPH, name)["bar"]


def test_rename_attribute_onto_existing_key_replaces_it():
    """C++ kept the existing value and dropped the moved one; we move it (docs/differences/attributes.md)."""
    result = TransformGraph(
        ATTRIBUTE_GRAPH, [], ["add_node2"], ["rename_attribute(old_attribute_name=foo, new_attribute_name=bob)"]
    )
    assert attrs(result, "add_node2")["bob"].i == 46
    assert "foo" not in attrs(result, "add_node2")


@requires_oracle
@pytest.mark.parametrize(
    "transform",
    [
        "remove_attribute(attribute_name=foo)",
        "remove_attribute(op_name=Mul, attribute_name=foo)",
        "rename_attribute(old_attribute_name=foo, new_attribute_name=baz)",
        "rename_attribute(op_name=Mul, old_attribute_name=foo, new_attribute_name=baz)",
        "rename_op(old_op_name=Mul, new_op_name=Multiply)",
        "remove_device",
        'set_device(device="/device:GPU:0", if_default=true)',
    ],
    ids=["remove", "remove-mul", "rename", "rename-mul", "rename-op", "remove-device", "set-device-default"],
)
def test_node_field_transforms_match_oracle(transform):
    ours, oracle = ours_and_oracle(DEVICE_GRAPH, [], ["add_node2"], transform)
    assert list(ours.node) == list(oracle.node)
    assert ours.versions == DEVICE_GRAPH.versions  # the C++ tool dropped them


# --- remove_device / set_device ------------------------------------------------------------------

DEVICE_GRAPH = graph_from_text(
    const("const_node1") + const("const_node2") + const("const_node3")
    + op("mul_node1", "Mul", "const_node1", "const_node2", extra=attr_i("foo", 23), device="/device:CPU:0")
    + op("add_node2", "Add", "mul_node1", "const_node3", extra=attr_i("foo", 46), device="/device:GPU:1")
    + "versions { producer: 27 }"
)


def devices(graph):
    return {node.name: node.device for node in graph.node}


def test_remove_device_clears_every_device():
    graph = graph_from_text(
        const("const_node1", device="//cpu:0") + op("relu", "Relu", "const_node1", device="//device:GPU:1")
    )
    result = TransformGraph(graph, [], ["relu"], ["remove_device"])
    assert devices(result) == {"const_node1": "", "relu": ""}


def test_remove_device_negative_case_graph_unchanged():
    graph = graph_from_text(const("const_node1") + op("relu", "Relu", "const_node1"))
    assert TransformGraph(graph, [], ["relu"], ["remove_device"]) == graph


@pytest.mark.parametrize(
    ("transform", "expected"),
    [
        ('set_device(device="/device:CPU:0")', dict.fromkeys(
            ["const_node1", "const_node2", "const_node3", "mul_node1", "add_node2"], "/device:CPU:0")),
        ('set_device(device="/device:GPU:0", if_default=true)', {
            "const_node1": "/device:GPU:0", "const_node2": "/device:GPU:0", "const_node3": "/device:GPU:0",
            "mul_node1": "/device:CPU:0", "add_node2": "/device:GPU:1"}),
        ("set_device", dict.fromkeys(["const_node1", "const_node2", "const_node3", "mul_node1", "add_node2"], "")),
    ],
    ids=["all", "if-default", "no-device-clears"],
)
def test_set_device(transform, expected):
    assert devices(TransformGraph(DEVICE_GRAPH, [], ["add_node2"], [transform])) == expected


def test_set_device_bad_bool_is_an_error():
    with pytest.raises(TransformError, match="if_default='yes' is not a boolean"):
        TransformGraph(DEVICE_GRAPH, [], ["add_node2"], ["set_device(device=x, if_default=yes)"])


def test_devices_do_not_change_what_the_graph_computes():
    graph = graph_from_text(
        const("a", (1.0, -2.0), device="/device:CPU:0") + op("relu", "Relu", "a", device="/device:CPU:0")
    )
    cleared = TransformGraph(graph, [], ["relu"], ["remove_device"])
    moved = TransformGraph(cleared, [], ["relu"], ['set_device(device="/device:CPU:0")'])
    assert moved == graph
    np.testing.assert_array_equal(run_graph(cleared, ["relu"])[0], run_graph(graph, ["relu"])[0])


# --- rename_node / rename_op ---------------------------------------------------------------------

SPLIT_GRAPH = graph_from_text(
    'node { name: "input" op: "Placeholder" attr { key: "dtype" value { type: DT_FLOAT } } }'
    'node { name: "split_dim" op: "Const" attr { key: "dtype" value { type: DT_INT32 } } '
    'attr { key: "value" value { tensor { dtype: DT_INT32 int_val: 0 } } } }'
    'node { name: "splitter" op: "Split" input: "split_dim" input: "input" '
    'attr { key: "T" value { type: DT_FLOAT } } attr { key: "num_split" value { i: 2 } } }'
    'node { name: "adder" op: "Add" input: "splitter" input: "splitter:1" input: "^splitter" '
    'attr { key: "T" value { type: DT_FLOAT } } }'
)


def test_rename_node_rewrites_every_reference():
    result = TransformGraph(SPLIT_GRAPH, [], ["adder"], ["rename_node(old_node_name=splitter, new_node_name=demux)"])
    nodes = nodes_by_name(result)
    assert "splitter" not in nodes
    assert nodes["demux"].op == "Split"
    assert list(nodes["adder"].input) == ["demux", "demux:1", "^demux"]
    batch = np.array([1.0, 2.0, 3.0, 5.0], np.float32)
    np.testing.assert_array_equal(
        run_graph(result, ["adder"], {"input": batch})[0], run_graph(SPLIT_GRAPH, ["adder"], {"input": batch})[0]
    )


@pytest.mark.parametrize(
    ("transform", "message"),
    [
        ("rename_node(old_node_name=splitter, new_node_name=adder)", "a node named 'adder' already exists"),
        ("rename_node(old_node_name=nowhere, new_node_name=demux)", "no node named 'nowhere'"),
        ("rename_node(old_node_name=splitter)", "exactly one 'new_node_name'"),
    ],
    ids=["name-taken", "missing-node", "missing-arg"],
)
def test_rename_node_errors(transform, message):
    with pytest.raises(TransformError, match=message):
        TransformGraph(SPLIT_GRAPH, [], ["adder"], [transform])


@requires_oracle
def test_rename_node_matches_oracle():
    transform = "rename_node(old_node_name=splitter, new_node_name=demux)"
    ours, oracle = ours_and_oracle(SPLIT_GRAPH, [], ["adder"], transform)
    assert list(ours.node) == list(oracle.node)


@requires_oracle
def test_rename_node_missing_is_an_error_unlike_oracle():
    transform = "rename_node(old_node_name=nowhere, new_node_name=demux)"
    assert list(oracle_transform(SPLIT_GRAPH, [], ["adder"], transform).node) == list(SPLIT_GRAPH.node)
    with pytest.raises(TransformError, match="no node named 'nowhere'"):
        TransformGraph(SPLIT_GRAPH, [], ["adder"], [transform])


def test_rename_op_changes_only_the_op_field():
    result = TransformGraph(ATTRIBUTE_GRAPH, [], ["add_node2"], ["rename_op(old_op_name=Mul, new_op_name=Multiply)"])
    assert ops_by_name(result) == {**ops_by_name(ATTRIBUTE_GRAPH), "mul_node1": "Multiply"}
    assert attrs(result, "mul_node1") == attrs(ATTRIBUTE_GRAPH, "mul_node1")


def test_rename_op_computes_the_same_when_renamed_to_an_equivalent_op():
    graph = graph_from_text(const("a", (1.0, 2.0)) + const("b", (3.0, 4.0)) + op("sum", "Add", "a", "b"))
    result = TransformGraph(graph, [], ["sum"], ["rename_op(old_op_name=Add, new_op_name=AddV2)"])
    assert ops_by_name(result)["sum"] == "AddV2"
    np.testing.assert_array_equal(run_graph(result, ["sum"])[0], run_graph(graph, ["sum"])[0])


def test_rename_op_negative_case_graph_unchanged():
    result = TransformGraph(ATTRIBUTE_GRAPH, [], ["add_node2"], ["rename_op(old_op_name=Sub, new_op_name=Minus)"])
    assert result == ATTRIBUTE_GRAPH


def test_rename_op_needs_both_names():
    with pytest.raises(TransformError, match="exactly one 'new_op_name'"):
        TransformGraph(ATTRIBUTE_GRAPH, [], ["add_node2"], ["rename_op(old_op_name=Mul)"])


@requires_oracle
def test_rename_attribute_onto_existing_key_differs_from_oracle():
    transform = "rename_attribute(old_attribute_name=foo, new_attribute_name=bob)"
    ours, oracle = ours_and_oracle(ATTRIBUTE_GRAPH, [], ["add_node2"], transform)
    assert attrs(oracle, "add_node2")["bob"].i == 23  # the moved foo=46 was lost
    assert attrs(ours, "add_node2")["bob"].i == 46


@requires_oracle
def test_rename_attribute_repeated_op_name_is_an_error_unlike_oracle():
    transform = "rename_attribute(old_attribute_name=foo, new_attribute_name=baz, op_name=Mul, op_name=Add)"
    oracle = oracle_transform(ATTRIBUTE_GRAPH, [], ["add_node2"], transform)
    assert "foo" in attrs(oracle, "add_node2") and "baz" in attrs(oracle, "mul_node1")  # Add silently ignored
    with pytest.raises(TransformError, match="single 'op_name'"):
        TransformGraph(ATTRIBUTE_GRAPH, [], ["add_node2"], [transform])
