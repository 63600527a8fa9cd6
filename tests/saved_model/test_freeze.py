"""Freezing TF 1 and TF 2 SavedModels into one GraphDef: signatures intact, every variable a
constant, tables carried by init nodes, identical signatures shared, distinct ones scoped,
the result deterministic, and every failure one line naming the file, key, op or node."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from graph_helpers import graph_from_text, op_counts
from numerics import assert_same_function
from saved_model.models import IRIS_CLASSES, IRIS_FEATURES, iris_inputs, module_inputs
from tensorflow.core.framework import graph_pb2

from serving_optimiser.saved_model import FrozenModel, SavedModelError, freeze_saved_model
from serving_optimiser.saved_model._surgery import canonical_function_names, drop_pure_control_edges
from serving_optimiser.saved_model.reader import read_saved_model

VARIABLE_OPS = {"VariableV2", "VarHandleOp", "ReadVariableOp", "Variable"}


def run_frozen(model: FrozenModel, key: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run one signature of a frozen model in a v1 Session, init nodes first."""
    signature = model.signatures[key]
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(model.graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        if model.init_node_names:
            session.run(list(model.init_node_names))
        names = sorted(signature.outputs)
        values = session.run(
            [signature.outputs[n].name for n in names],
            {signature.inputs[k].name: v for k, v in feeds.items()},
        )
    return dict(zip(names, values, strict=True))


def run_original(directory, key: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    loaded = tf.saved_model.load(str(directory))
    outputs = loaded.signatures[key](**{k: tf.constant(v) for k, v in feeds.items()})
    return {k: v.numpy() for k, v in outputs.items()}


@pytest.fixture(scope="module")
def frozen_iris(tf1_iris):
    return freeze_saved_model(tf1_iris)


@pytest.fixture(scope="module")
def frozen_module(multi_signature_module):
    return freeze_saved_model(multi_signature_module)


def test_tf1_export_keeps_signatures_exactly(tf1_iris, frozen_iris):
    declared = read_saved_model(tf1_iris).meta_graphs[0].signature_def
    assert sorted(frozen_iris.signatures) == ["predict", "serving_default"]
    for key, signature in frozen_iris.signatures.items():
        assert signature.method_name == declared[key].method_name == "tensorflow/serving/predict"
        assert sorted(signature.inputs) == IRIS_FEATURES
        for name, info in signature.inputs.items():
            assert (info.name, info.dtype, info.shape) == (f"{name}:0", "float32", [None])
        assert {k: (v.dtype, v.shape) for k, v in signature.outputs.items()} == {
            "class_ids": ("int64", [None, 1]),
            "classes": ("string", [None, 1]),
            "logits": ("float32", [None, 3]),
            "probabilities": ("float32", [None, 3]),
        }
        assert signature.outputs["probabilities"].name == "dnn/head/predictions/probabilities:0"
    assert frozen_iris.source_format == "tf1"


def test_tf1_variables_become_constants_and_identity_nodes_stay(frozen_iris):
    counts = op_counts(frozen_iris.graph_def)
    assert not VARIABLE_OPS & set(counts)
    assert counts["Identity"] >= 2  # the /read nodes of the ref variables, and the head's identities
    assert counts["Placeholder"] == 4
    assert frozen_iris.input_node_names() == IRIS_FEATURES


def test_tf1_lookup_table_is_refilled_by_an_init_node(tf1_iris, frozen_iris):
    assert frozen_iris.init_node_names == ("dnn/head/predictions/hash_table/frozen_init",)
    assert "dnn/head/predictions/hash_table/frozen_init" in frozen_iris.output_node_names()
    feeds = iris_inputs(64)
    ours = run_frozen(frozen_iris, "predict", feeds)
    theirs = run_original(tf1_iris, "predict", feeds)
    assert set(ours["classes"].ravel()) <= set(IRIS_CLASSES)
    for name in ("class_ids", "classes", "logits", "probabilities"):
        assert_same_function(ours[name], theirs[name], err_msg=name)


def test_tf1_vocabulary_asset_table_becomes_constants(tf1_vocabulary):
    frozen = freeze_saved_model(tf1_vocabulary)
    assert "InitializeTableFromTextFileV2" not in op_counts(frozen.graph_def)
    words = run_frozen(frozen, "serving_default", {"ids": np.array([0, 3, 2, 9], np.int64)})["words"]
    assert list(words) == [b"zero", b"three", b"two", b"OOV"]


def test_keras_signatures_with_one_graph_share_it_unscoped(keras_cnn):
    frozen = freeze_saved_model(keras_cnn)
    assert sorted(frozen.signatures) == ["serve", "serving_default"]
    assert frozen.signatures["serve"].outputs == frozen.signatures["serving_default"].outputs
    assert frozen.input_node_names() == ["image"]
    assert frozen.output_node_names() == ["Identity"]
    assert not VARIABLE_OPS & set(op_counts(frozen.graph_def))
    # The NoOp that ordered the former variable reads is gone with its control edges.
    assert not [i for node in frozen.graph_def.node for i in node.input if i.startswith("^")]
    image = np.random.default_rng(0).standard_normal((4, 12, 12, 3)).astype(np.float32)
    ours = run_frozen(frozen, "serve", {"image": image})["output_0"]
    theirs = run_original(keras_cnn, "serve", {"image": image})["output_0"]
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_distinct_signatures_are_scoped_and_share_weights(frozen_module):
    assert sorted(frozen_module.signatures) == ["classify", "embed", "score"]
    assert frozen_module.input_node_names() == ["classify/x", "embed/x", "score/temperature", "score/x"]
    assert frozen_module.signatures["score"].inputs["temperature"].shape == []
    # The 32x256 hidden weight is read by all three signatures but stored once.
    shapes = [
        tuple(d.size for d in node.attr["value"].tensor.tensor_shape.dim)
        for node in frozen_module.graph_def.node
        if node.op == "Const"
    ]
    assert shapes.count((32, 256)) == 1
    assert shapes.count((256, 10)) == 1


def test_tf2_table_is_rebuilt_with_its_contents(multi_signature_module, frozen_module):
    (init,) = frozen_module.init_node_names
    nodes = {node.name: node for node in frozen_module.graph_def.node}
    table = nodes[init].input[0]  # the captured handle's placeholder, now the table itself
    assert init == f"{table}/frozen_init" and table.startswith("classify/")
    assert (nodes[init].op, nodes[table].op) == ("LookupTableImportV2", "HashTableV2")
    feeds = module_inputs(32)["classify"]
    ours = run_frozen(frozen_module, "classify", feeds)
    theirs = run_original(multi_signature_module, "classify", feeds)
    np.testing.assert_array_equal(ours["class_names"], theirs["class_names"])
    assert ours["class_names"][0].startswith(b"class_")


@pytest.mark.parametrize("fixture", ["tf1_iris", "keras_cnn", "multi_signature_module"])
def test_freezing_twice_gives_identical_bytes(fixture, request):
    directory = request.getfixturevalue(fixture)
    first, second = freeze_saved_model(directory), freeze_saved_model(directory)
    assert first.graph_def.SerializeToString(deterministic=True) == second.graph_def.SerializeToString(
        deterministic=True
    )
    assert first.metadata_json() == second.metadata_json()


def test_signature_selection_and_tags(tf1_iris, multi_signature_module):
    only = freeze_saved_model(multi_signature_module, signature_keys=["embed"])
    assert list(only.signatures) == ["embed"]
    assert only.input_node_names() == ["x"]  # a single graph needs no scope
    assert freeze_saved_model(tf1_iris, signature_keys="predict", tags="serve").tags == ("serve",)


def test_allow_ops_accepts_a_refused_op(reads_a_file, tmp_path):
    frozen = freeze_saved_model(reads_a_file, allow_ops=["ReadFile"])
    path = tmp_path / "hello.txt"
    path.write_bytes(b"hello")
    assert run_frozen(frozen, "serving_default", {"path": np.array(str(path).encode())})["contents"] == b"hello"


def _truncated(source, tmp_path):
    import shutil

    target = tmp_path / "truncated"
    shutil.copytree(source, target)
    data = (target / "saved_model.pb").read_bytes()
    (target / "saved_model.pb").write_bytes(data[: len(data) // 2])
    return target


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_directory", r"missing: no such directory"),
        ("not_a_saved_model", r"no saved_model.pb, not a SavedModel directory"),
        ("truncated_pb", r"saved_model.pb: malformed or truncated SavedModel protobuf"),
        ("unknown_signature", r"unknown signature key 'nope' \(available: predict, serving_default\)"),
        ("unknown_tags", r"no MetaGraphDef tagged gpu,serve \(available tag sets: serve\)"),
        ("unsafe_op", r"refusing unsafe op ReadFile \(node 'ReadFile' in function '__inference_read_\d+'\)"),
    ],
)
def test_failures_are_one_line_errors(case, message, tf1_iris, reads_a_file, tmp_path):
    arguments = {
        "missing_directory": (tmp_path / "missing", {}),
        "not_a_saved_model": (tmp_path, {}),
        "truncated_pb": (_truncated(tf1_iris, tmp_path), {}),
        "unknown_signature": (tf1_iris, {"signature_keys": ["nope"]}),
        "unknown_tags": (tf1_iris, {"tags": ["serve", "gpu"]}),
        "unsafe_op": (reads_a_file, {}),
    }[case]
    with pytest.raises(SavedModelError, match=message) as raised:
        freeze_saved_model(arguments[0], **arguments[1])
    assert "\n" not in str(raised.value)


def test_tf1_input_that_is_not_a_placeholder_is_refused(tmp_path):
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [None], name="x")
        doubled = tf.multiply(x, 2.0, name="doubled")
        y = tf.add(doubled, 1.0, name="y")
        with v1.Session() as session:
            builder = v1.saved_model.Builder(str(tmp_path / "model"))
            signature = v1.saved_model.predict_signature_def({"doubled": doubled}, {"y": y})
            builder.add_meta_graph_and_variables(session, ["serve"], {"serving_default": signature})
            builder.save()
    with pytest.raises(SavedModelError, match=r"input 'doubled' is tensor doubled:0 \(a Mul node\)"):
        freeze_saved_model(tmp_path / "model")


def test_frozen_model_round_trips_through_a_directory(frozen_iris, tmp_path):
    frozen_iris.save(tmp_path / "frozen")
    assert sorted(p.name for p in (tmp_path / "frozen").iterdir()) == ["frozen_graph.pb", "signatures.json"]
    loaded = FrozenModel.load(tmp_path / "frozen")
    assert loaded == frozen_iris
    frozen_iris.save(tmp_path / "frozen")  # replacing is allowed and gives the same bytes
    assert FrozenModel.load(tmp_path / "frozen") == frozen_iris


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing_graph", r"frozen_graph.pb: missing"),
        ("bad_json", r"signatures.json: not valid JSON"),
        ("wrong_format", r"signatures.json: not a frozen model description"),
        ("missing_node", r"frozen_graph.pb: signature 'predict' output 'logits': node 'dnn/head/logits'"),
    ],
)
def test_loading_a_damaged_frozen_model_names_the_file(damage, message, frozen_iris, tmp_path):
    directory = tmp_path / "frozen"
    frozen_iris.save(directory)
    if damage == "missing_graph":
        (directory / "frozen_graph.pb").unlink()
    elif damage == "bad_json":
        (directory / "signatures.json").write_text("{")
    elif damage == "wrong_format":
        (directory / "signatures.json").write_text(json.dumps({"format": "other"}))
    else:
        graph = graph_pb2.GraphDef()
        graph.node.extend(n for n in frozen_iris.graph_def.node if n.name != "dnn/head/logits")
        (directory / "frozen_graph.pb").write_bytes(graph.SerializeToString())
    with pytest.raises(SavedModelError, match=message):
        FrozenModel.load(directory)


CONTROL_EDGES = """
node { name: "x" op: "Placeholder" attr { key: "dtype" value { type: DT_FLOAT } } }
node { name: "weight" op: "Const" attr { key: "dtype" value { type: DT_FLOAT } }
       attr { key: "value" value { tensor { dtype: DT_FLOAT tensor_shape {} float_val: 2 } } } }
node { name: "read" op: "Identity" input: "weight" attr { key: "T" value { type: DT_FLOAT } } }
node { name: "ordering_noop_expect_removed" op: "NoOp" input: "^read" }
node { name: "check" op: "CheckNumerics" input: "x" attr { key: "T" value { type: DT_FLOAT } }
       attr { key: "message" value { s: "bad" } } }
node { name: "mul" op: "Mul" input: "x" input: "read" input: "^check"
       attr { key: "T" value { type: DT_FLOAT } } }
node { name: "out" op: "Identity" input: "mul" input: "^ordering_noop_expect_removed"
       attr { key: "T" value { type: DT_FLOAT } } }
"""


def test_only_control_edges_between_pure_nodes_are_dropped():
    result = drop_pure_control_edges(graph_from_text(CONTROL_EDGES), ["x", "out"])
    nodes = {node.name: list(node.input) for node in result.node}
    assert "ordering_noop_expect_removed" not in nodes
    assert nodes["out"] == ["mul"]
    assert nodes["mul"] == ["x", "read", "^check"]  # the check still runs


def test_control_edges_into_loop_frames_are_kept():
    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def cumulative(x):
        return tf.map_fn(lambda v: v * 3.0 + 1.0, x)

    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    graph_def = convert_variables_to_constants_v2(cumulative.get_concrete_function()).graph.as_graph_def()
    outputs = [n.name for n in graph_def.node if n.op == "Identity" and n.name.startswith("Identity")]
    result = drop_pure_control_edges(graph_def, outputs)
    in_frame = [n for n in result.node if n.op == "Const" and any(i.startswith("^") for i in n.input)]
    assert in_frame, "Consts inside the loop body keep the control edge that puts them in its frame"


def test_library_functions_get_stable_names():
    def graph_calling(name: str) -> graph_pb2.GraphDef:
        return graph_from_text(f"""
        node {{ name: "call" op: "PartitionedCall" attr {{ key: "f" value {{ func {{ name: "{name}" }} }} }} }}
        library {{ function {{ signature {{ name: "{name}" }} node_def {{ name: "n" op: "NoOp" }} }}
                   function {{ signature {{ name: "__inference_unused_9" }} }} }}
        """)

    first = canonical_function_names(graph_calling("__inference_body_123"))
    second = canonical_function_names(graph_calling("__inference_body_4567"))
    assert first == second
    assert [f.signature.name for f in first.library.function] == ["__inference_body_0"]
    assert first.node[0].attr["f"].func.name == "__inference_body_0"


def test_oversized_saved_model_is_refused_before_parsing(tf1_iris, monkeypatch):
    from serving_optimiser.saved_model import reader

    monkeypatch.setattr(reader, "MAX_PROTO_BYTES", 1000)
    with pytest.raises(SavedModelError, match=r"saved_model.pb: \d+ bytes, over protobuf's 2 GiB limit"):
        freeze_saved_model(tf1_iris)


def test_tf1_table_the_main_op_leaves_empty_is_refused(tmp_path):
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        ids = v1.placeholder(tf.int64, [None], name="ids")
        initializer = tf.lookup.KeyValueTensorInitializer(tf.constant([0], tf.int64), tf.constant(["zero"]))
        words = tf.lookup.StaticHashTable(initializer, "?").lookup(ids)
        with v1.Session() as session:
            builder = v1.saved_model.Builder(str(tmp_path / "model"))
            signature = v1.saved_model.predict_signature_def({"ids": ids}, {"words": words})
            builder.add_meta_graph_and_variables(session, ["serve"], {"serving_default": signature})  # no main_op
            builder.save()
    with pytest.raises(SavedModelError, match=r"lookup table 'hash_table' is not initialised by the SavedModel's"):
        freeze_saved_model(tmp_path / "model")
