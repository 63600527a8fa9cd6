"""sparsify_gather, with weights in Consts and in v1 Variables read from a Saver checkpoint."""

import numpy as np
import pytest
import tensorflow as tf
from graph_helpers import (
    assert_same_structure,
    nodes_by_name,
    op_counts,
    oracle_transform,
    ours_and_oracle,
    requires_oracle,
    run_graph,
)

from serving_optimiser.graph_transforms import TransformError, TransformGraph
from serving_optimiser.graph_transforms.graph_utils import const_value, remove_unreachable

# 1e-6 is below the 1e-5 threshold, so it is dropped and looked up as the default 0.0.
WEIGHTS = np.array([[0.2], [0.000001], [1.2], [0.001]], np.float32)
TOLERANCE = 1e-5  # what dropping 1e-6 may change


def run_initialised(graph_def, init, fetches, restore_from=None):
    """Run ``init`` (and a Saver restore) before fetching, in one Session."""
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        if restore_from is not None:
            session.run("save/restore_all", {"save/Const:0": restore_from})
        if init is not None:
            session.run(init)
        return session.run([f"{name}:0" for name in fetches])


def gather(name, params, ids, gather_v2):
    if gather_v2:
        axis = tf.constant(0, name=f"{name}_axis")
        return tf.raw_ops.GatherV2(params=params, indices=ids, axis=axis, name=name)
    return tf.raw_ops.Gather(params=params, indices=ids, name=name)


def single_partition(gather_v2=False, init_node=None, kept_concat=False, ids_dtype=tf.int64, weights=WEIGHTS):
    """The C++ test's graph: ids -> Gather(w/read(w/part_1)), and a ConcatV2 that also reads w/read."""
    graph = tf.Graph()
    with graph.as_default():
        ids = tf.constant([0, 1, 2, 3, 2], dtype=ids_dtype, name="ids")
        read = tf.identity(tf.constant(weights, name="w/part_1"), name="w/read")
        gather("gather", read, ids, gather_v2)
        if init_node:
            tf.no_op(name=init_node)
        axis = tf.constant(0, name="linear/concat/axis")
        values = [read, tf.constant([[5.0]], name="concat/input/node")]
        if kept_concat:
            values.append(tf.constant([[6.0]], name="concat/input/node_2"))
        tf.raw_ops.ConcatV2(values=values, axis=axis, name="concat/node")
    return graph.as_graph_def()


def sparsified(graph_def, transform="sparsify_gather", outputs=("gather",)):
    return TransformGraph(graph_def, ["ids"], list(outputs), [transform])


def test_single_partition_structure():
    result = sparsified(single_partition())
    nodes = nodes_by_name(result)
    for gone in ("w/part_1", "w/read", "linear/concat/axis"):
        assert gone not in nodes
    assert nodes["ids"].op == "Const"
    np.testing.assert_array_equal(const_value(nodes["w/part_1/indices"]), [0, 2, 3])
    np.testing.assert_allclose(const_value(nodes["w/part_1/values"]), [0.2, 1.2, 0.001], atol=TOLERANCE)
    assert const_value(nodes["gather/Const"]) == 0.0
    assert const_value(nodes["gather/ExpandDims/Const"]) == -1
    expected = {
        "w/part_1/HashTable": ("HashTable", []),
        "w/part_1/InitializeTable": ("InitializeTable", ["w/part_1/HashTable", "w/part_1/indices", "w/part_1/values"]),
        "gather/LookupTableFind": ("LookupTableFind", ["w/part_1/HashTable", "ids", "gather/Const"]),
        "gather": ("ExpandDims", ["gather/LookupTableFind", "gather/ExpandDims/Const"]),
        "group_deps": ("NoOp", ["^w/part_1/InitializeTable"]),
        "concat/node": ("Identity", ["concat/input/node"]),
    }
    assert {name: (nodes[name].op, list(nodes[name].input)) for name in expected} == expected
    assert set(nodes["concat/node"].attr) == {"T"}


@pytest.mark.parametrize(
    ("gather_v2", "init_node", "kept_concat"),
    [
        (False, None, False),
        (True, None, False),
        (False, "group_deps", False),
        (True, "shared_inits", False),
        (False, None, True),
        (True, "group_deps", True),
    ],
    ids=["gather", "gather-v2", "existing-init", "v2-custom-init", "kept-concat", "v2-existing-init-kept-concat"],
)
def test_single_partition_computes_the_same(gather_v2, init_node, kept_concat):
    graph = single_partition(gather_v2, init_node, kept_concat)
    init = init_node or "group_deps"
    transform = f"sparsify_gather(group_init_node={init})" if init_node == "shared_inits" else "sparsify_gather"
    result = sparsified(graph, transform)
    nodes = nodes_by_name(result)
    assert nodes["gather"].op == "ExpandDims"
    assert list(nodes[init].input) == ["^w/part_1/InitializeTable"]
    assert op_counts(result)["NoOp"] == 1
    if kept_concat:
        concat = nodes["concat/node"]
        assert (concat.op, list(concat.input), concat.attr["N"].i) == (
            "ConcatV2", ["concat/input/node", "concat/input/node_2", "linear/concat/axis"], 2)
    before = run_graph(graph, ["gather"])[0]
    after = run_initialised(result, init, ["gather"])[0]
    assert after.shape == before.shape == (5, 1)
    np.testing.assert_allclose(after, before, rtol=0, atol=TOLERANCE)
    assert after[1, 0] == 0.0


def multi_partition(gather_v2=False):
    graph = tf.Graph()
    with graph.as_default():
        ids = tf.constant([3, 0, 1], dtype=tf.int64, name="ids")
        reads = [tf.identity(tf.constant(WEIGHTS * k, name=f"w{k}/part_1"), name=f"w{k}/part_1/read") for k in (1, 2)]
        for k, read in zip((1, 2), reads):
            gather(f"gather{k}", read, ids, gather_v2)
        tf.raw_ops.ConcatV2(values=reads, axis=tf.constant(0, name="linear/concat/axis"), name="concat/node")
    return graph.as_graph_def()


@pytest.mark.parametrize("gather_v2", [False, True], ids=["gather", "gather-v2"])
def test_two_partitions_sharing_ids(gather_v2):
    graph = multi_partition(gather_v2)
    result = sparsified(graph, outputs=("gather1", "gather2"))
    nodes = nodes_by_name(result)
    assert "concat/node" not in nodes and "linear/concat/axis" not in nodes
    assert sorted(nodes["group_deps"].input) == ["^w1/part_1/InitializeTable", "^w2/part_1/InitializeTable"]
    assert list(nodes["gather2/LookupTableFind"].input) == ["w2/part_1/HashTable", "ids", "gather2/Const"]
    before = run_graph(graph, ["gather1", "gather2"])
    after = run_initialised(result, "group_deps", ["gather1", "gather2"])
    for b, a in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=0, atol=2 * TOLERANCE)


def test_int32_ids_are_cast_to_the_table_key_type():
    graph = single_partition(ids_dtype=tf.int32)
    result = sparsified(graph)
    nodes = nodes_by_name(result)
    assert (nodes["gather/Cast"].op, list(nodes["gather/Cast"].input)) == ("Cast", ["ids"])
    assert nodes["gather/LookupTableFind"].input[1] == "gather/Cast"
    np.testing.assert_allclose(run_initialised(result, "group_deps", ["gather"])[0], run_graph(graph, ["gather"])[0],
                               atol=TOLERANCE)


def test_all_zero_weights_keep_one_dummy_entry():
    result = sparsified(single_partition(weights=np.zeros((4, 1), np.float32)))
    nodes = nodes_by_name(result)
    np.testing.assert_array_equal(const_value(nodes["w/part_1/indices"]), [0])
    np.testing.assert_array_equal(const_value(nodes["w/part_1/values"]), [0.0])
    np.testing.assert_array_equal(run_initialised(result, "group_deps", ["gather"])[0], np.zeros((5, 1)))


def test_negative_case_gather_without_identity_unchanged():
    graph = tf.Graph()
    with graph.as_default():
        tf.raw_ops.Gather(params=tf.constant(WEIGHTS, name="w"), indices=tf.constant([1], tf.int64, name="ids"),
                          name="gather")
    graph_def = graph.as_graph_def()
    assert sparsified(graph_def) == graph_def


@pytest.mark.parametrize(
    ("weights", "gather_v2", "axis", "message"),
    [
        (WEIGHTS.astype(np.float64), False, 0, "have dtype DT_DOUBLE, expected DT_FLOAT"),
        (WEIGHTS.reshape(4), False, 0, r"have shape \[4\], expected \[N, 1\]"),
        (WEIGHTS, True, 1, "gathers over axis 1; only axis 0"),
    ],
    ids=["double", "vector", "axis-1"],
)
def test_unsupported_weights_are_errors(weights, gather_v2, axis, message):
    graph = tf.Graph()
    with graph.as_default():
        read = tf.identity(tf.constant(weights, name="w"), name="w/read")
        ids = tf.constant([0], tf.int64, name="ids")
        if gather_v2:
            tf.raw_ops.GatherV2(params=read, indices=ids, axis=tf.constant(axis, name="axis"), name="gather")
        else:
            tf.raw_ops.Gather(params=read, indices=ids, name="gather")
    with pytest.raises(TransformError, match=message):
        sparsified(graph.as_graph_def())


# --- Variables read from a checkpoint ---------------------------------------------------------------


def variable_graph(tmp_path, partitioned=False):
    """A v1 graph whose weights are VariableV2 nodes, saved by a Saver to a V2 checkpoint."""
    graph = tf.Graph()
    with graph.as_default():
        ids = tf.constant([0, 1, 2, 3], tf.int64, name="ids")
        if partitioned:
            weights = tf.compat.v1.get_variable(
                "w", shape=[8, 1], initializer=tf.compat.v1.zeros_initializer(),
                partitioner=tf.compat.v1.fixed_size_partitioner(2), use_resource=False)
            parts = list(weights)
            values = [WEIGHTS, WEIGHTS * 3]
            for k, part in enumerate(parts):
                tf.raw_ops.Gather(params=part.value(), indices=ids, name=f"gather{k}")
        else:
            parts = [tf.compat.v1.Variable(tf.zeros([4, 1]), name="w", use_resource=False)]
            values = [WEIGHTS]
            tf.raw_ops.Gather(params=parts[0].value(), indices=ids, name="gather0")
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            for part, value in zip(parts, values):
                part.load(value, session)
            prefix = saver.save(session, str(tmp_path / "model"))
    return graph.as_graph_def(), prefix, [f"gather{k}" for k in range(len(parts))]


@pytest.mark.parametrize("partitioned", [False, True], ids=["variable", "partitioned"])
def test_variables_read_from_checkpoint(tmp_path, partitioned):
    graph_def, prefix, outputs = variable_graph(tmp_path, partitioned)
    result = TransformGraph(graph_def, ["ids"], outputs, [f'sparsify_gather(input_checkpoint="{prefix}")'])
    ops = op_counts(result)
    assert "VariableV2" not in ops and ops["HashTable"] == len(outputs)
    nodes = nodes_by_name(result)
    assert "save/restore_all" not in nodes  # its only input, the save Assign, went with the variable
    assert nodes["save/RestoreV2"].op == "RestoreV2"  # never deleted, as in C++
    before = run_initialised(graph_def, None, outputs, restore_from=prefix)
    # The Saver's SaveV2 lost its variable inputs, so run only what the outputs need.
    runnable = remove_unreachable(result, outputs, keep=["group_deps"])
    after = run_initialised(runnable, "group_deps", outputs)
    for b, a in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=0, atol=3 * TOLERANCE)
    if partitioned:
        np.testing.assert_allclose(after[1][:, 0], [0.6, 0.0, 3.6, 0.003], atol=TOLERANCE)


def test_variable_without_checkpoint_is_an_error(tmp_path):
    graph_def, _, outputs = variable_graph(tmp_path)
    with pytest.raises(TransformError, match="'w' are a variable; pass input_checkpoint"):
        TransformGraph(graph_def, ["ids"], outputs, ["sparsify_gather"])


def test_missing_checkpoint_is_an_error(tmp_path):
    graph_def, _, outputs = variable_graph(tmp_path)
    with pytest.raises(TransformError, match="is not a V2 checkpoint prefix"):
        TransformGraph(graph_def, ["ids"], outputs, [f'sparsify_gather(input_checkpoint="{tmp_path}/nothing")'])


# --- Against the C++ tool ------------------------------------------------------------------------------


@requires_oracle
@pytest.mark.parametrize(
    ("graph", "outputs", "transform"),
    [
        (single_partition(), ["gather"], "sparsify_gather"),
        (single_partition(gather_v2=True, init_node="shared_inits"), ["gather"],
         "sparsify_gather(group_init_node=shared_inits)"),
        (single_partition(kept_concat=True, init_node="group_deps"), ["gather"], "sparsify_gather"),
        (multi_partition(), ["gather1", "gather2"], "sparsify_gather"),
        (multi_partition(gather_v2=True), ["gather1", "gather2"], "sparsify_gather"),
    ],
    ids=["single", "v2-custom-init", "kept-concat", "two-partitions", "two-partitions-v2"],
)
def test_matches_oracle(graph, outputs, transform):
    ours, oracle = ours_and_oracle(graph, ["ids"], outputs, transform)
    assert_same_structure(ours, oracle)
    ours_nodes, oracle_nodes = nodes_by_name(ours), nodes_by_name(oracle)
    for name, node in oracle_nodes.items():
        if node.op == "Const":
            np.testing.assert_array_equal(const_value(ours_nodes[name]), const_value(node))


@requires_oracle
def test_variable_matches_oracle(tmp_path):
    graph_def, prefix, outputs = variable_graph(tmp_path)
    transform = f'sparsify_gather(input_checkpoint="{prefix}")'
    ours, oracle = ours_and_oracle(graph_def, ["ids"], outputs, transform)
    assert_same_structure(ours, oracle)


@requires_oracle
def test_partitioned_variable_reads_its_own_slice_unlike_oracle(tmp_path):
    """C++ restored every partition from the first slice saved under the key (docs/differences/sparsify.md)."""
    graph_def, prefix, outputs = variable_graph(tmp_path, partitioned=True)
    transform = f'sparsify_gather(input_checkpoint="{prefix}")'
    ours = TransformGraph(graph_def, ["ids"], outputs, [transform])
    oracle = oracle_transform(graph_def, ["ids"], outputs, transform)
    assert_same_structure(ours, oracle)
    np.testing.assert_allclose(const_value(nodes_by_name(oracle)["w/part_1/values"]), [0.2, 1.2, 0.001], atol=1e-6)
    np.testing.assert_allclose(const_value(nodes_by_name(ours)["w/part_1/values"]), [0.6, 3.6, 0.003], atol=1e-6)


@requires_oracle
def test_concat_becoming_identity_drops_tidx_unlike_oracle():
    graph = single_partition()
    ours, oracle = ours_and_oracle(graph, ["ids"], ["gather"], "sparsify_gather")
    assert set(nodes_by_name(oracle)["concat/node"].attr) == {"T", "Tidx"}
    assert set(nodes_by_name(ours)["concat/node"].attr) == {"T"}
    np.testing.assert_array_equal(run_graph(ours, ["concat/node"])[0], [[5.0]])


@requires_oracle
def test_no_match_adds_no_init_node_unlike_oracle():
    graph = tf.Graph()
    with graph.as_default():
        tf.raw_ops.Gather(params=tf.constant(WEIGHTS, name="w"), indices=tf.constant([1], tf.int64, name="ids"),
                          name="gather")
    graph_def = graph.as_graph_def()
    ours, oracle = ours_and_oracle(graph_def, ["ids"], ["gather"], "sparsify_gather")
    assert nodes_by_name(oracle)["group_deps"].op == "NoOp"
    assert ours == graph_def


@requires_oracle
def test_int32_ids_graph_loads_unlike_oracle():
    graph = single_partition(ids_dtype=tf.int32)
    ours, oracle = ours_and_oracle(graph, ["ids"], ["gather"], "sparsify_gather")
    with pytest.raises(ValueError, match="gather/LookupTableFind"):
        run_initialised(oracle, "group_deps", ["gather"])
    assert run_initialised(ours, "group_deps", ["gather"])[0].shape == (5, 1)


def weights_read_twice(port_reference=False, shared_axis=False):
    """Two GatherV2s sharing ids (and optionally their axis), and a ConcatV2 reading ``w1/read:0``."""
    graph = tf.Graph()
    with graph.as_default():
        ids = tf.constant([0, 2], tf.int64, name="ids")
        reads = [tf.identity(tf.constant(WEIGHTS * k, name=f"w{k}"), name=f"w{k}/read") for k in (1, 2)]
        shared = tf.constant(0, name="axis")
        for k, read in zip((1, 2), reads):
            axis = shared if shared_axis else tf.constant(0, name=f"axis{k}")
            tf.raw_ops.GatherV2(params=read, indices=ids, axis=axis, name=f"gather{k}")
        tf.raw_ops.ConcatV2(values=[reads[0], tf.constant([[5.0]], name="other")], axis=tf.constant(0, name="c_axis"),
                            name="concat")
    graph_def = graph.as_graph_def()
    if port_reference:
        nodes_by_name(graph_def)["concat"].input[0] = "w1/read:0"
    return graph_def


@requires_oracle
@pytest.mark.parametrize(
    ("port_reference", "shared_axis"), [(True, False), (False, True)], ids=["port-reference", "shared-axis"]
)
def test_port_references_and_shared_axis_work_unlike_oracle(port_reference, shared_axis):
    graph = weights_read_twice(port_reference, shared_axis)
    outputs = ["gather1", "gather2", "concat"]
    with pytest.raises(RuntimeError, match="Invalid graph with inputs referring to nonexistent nodes"):
        oracle_transform(graph, ["ids"], outputs, "sparsify_gather")
    result = sparsified(graph, outputs=outputs)
    assert list(nodes_by_name(result)["concat"].input) == ["other"]  # the weights leave the concat, as in C++
    before = run_graph(graph, outputs[:2])
    after = run_initialised(result, "group_deps", outputs)
    for b, a in zip(before, after[:2]):
        np.testing.assert_allclose(a, b, rtol=0, atol=2 * TOLERANCE)
    np.testing.assert_array_equal(after[2], [[5.0]])


def test_unrelated_variable_without_save_nodes_is_fine():
    """The C++ tool looked up every Variable's save slice up front and crashed on this graph."""
    graph = tf.Graph()
    with graph.as_default():
        read = tf.identity(tf.constant(WEIGHTS, name="w"), name="w/read")
        tf.raw_ops.Gather(params=read, indices=tf.constant([2], tf.int64, name="ids"), name="gather")
        tf.compat.v1.Variable(tf.zeros([2]), name="unrelated", use_resource=False)
    result = sparsified(graph.as_graph_def())
    assert nodes_by_name(result)["gather"].op == "ExpandDims"
    assert nodes_by_name(result)["unrelated"].op == "VariableV2"
