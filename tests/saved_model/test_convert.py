"""Converting a frozen model back to a SavedModel: the original's signatures exactly, loadable by
``tf.saved_model.load`` and a TF 1 Session (as TF Serving loads it), weights dequantized once
at load, byte-identical output run after run, and atomic writes."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import tensorflow as tf
from graph_helpers import op_counts
from numerics import assert_same_function
from saved_model.models import IRIS_CLASSES, QUANTISING, iris_inputs, module_inputs
from tensorflow.python.tools import saved_model_cli

from serving_optimiser.graph_transforms import TransformGraph
from serving_optimiser.saved_model import SavedModelError, convert_to_saved_model, freeze_saved_model
from serving_optimiser.saved_model.reader import read_saved_model


@pytest.fixture(scope="module")
def frozen_iris(tf1_iris):
    return freeze_saved_model(tf1_iris)


@pytest.fixture(scope="module")
def quantised_iris(frozen_iris):
    graph_def = TransformGraph(
        frozen_iris.graph_def, frozen_iris.input_node_names(), frozen_iris.output_node_names(), QUANTISING
    )
    return frozen_iris.with_graph_def(graph_def)


def call(directory, key: str, feeds: dict) -> dict[str, np.ndarray]:
    loaded = tf.saved_model.load(str(directory))
    return {k: v.numpy() for k, v in loaded.signatures[key](**{k: tf.constant(v) for k, v in feeds.items()}).items()}


def call_in_session(directory, key: str, feeds: dict) -> dict[str, np.ndarray]:
    """Load the way TF Serving does (restore, then main_op) and run one signature."""
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(directory))
        signature = meta_graph.signature_def[key]
        names = sorted(signature.outputs)
        values = session.run(
            [signature.outputs[n].name for n in names], {signature.inputs[k].name: v for k, v in feeds.items()}
        )
    return dict(zip(names, values, strict=True))


def signature_listing(directory) -> str:
    """What ``saved_model_cli show --all`` prints about the signatures (the op list excluded)."""
    stream = io.StringIO()
    with contextlib.redirect_stdout(stream):
        saved_model_cli._show_all(str(directory))
    return stream.getvalue().split("The MetaGraph with tag set")[0]


def test_tf1_model_converts_with_identical_signatures(tf1_iris, frozen_iris, tmp_path):
    convert_to_saved_model(frozen_iris, tmp_path / "out")
    original = read_saved_model(tf1_iris).meta_graphs[0]
    converted = read_saved_model(tmp_path / "out").meta_graphs[0]
    assert dict(converted.signature_def) == dict(original.signature_def)
    assert list(converted.meta_info_def.tags) == ["serve"]
    assert signature_listing(tmp_path / "out") == signature_listing(tf1_iris)
    assert "outputs['classes'] tensor_info:\n        dtype: DT_STRING" in signature_listing(tmp_path / "out")


def test_tf2_model_keeps_keys_dtypes_shapes_and_method_names(multi_signature_module, tmp_path):
    convert_to_saved_model(freeze_saved_model(multi_signature_module), tmp_path / "out")
    original = read_saved_model(multi_signature_module).meta_graphs[0].signature_def
    converted = read_saved_model(tmp_path / "out").meta_graphs[0].signature_def
    assert sorted(converted) == ["classify", "embed", "score"]
    for key, signature in converted.items():
        assert signature.method_name == original[key].method_name
        for side in ("inputs", "outputs"):
            ours, theirs = getattr(signature, side), getattr(original[key], side)
            assert sorted(ours) == sorted(theirs)
            for name in ours:
                assert (ours[name].dtype, ours[name].tensor_shape) == (theirs[name].dtype, theirs[name].tensor_shape)
    feeds = module_inputs(16)
    for key in converted:
        ours, theirs = call(tmp_path / "out", key, feeds[key]), call(multi_signature_module, key, feeds[key])
        for name in theirs:
            assert_same_function(ours[name], theirs[name], err_msg=f"{key}/{name}")


def test_converted_table_answers_in_tf2_and_in_a_session(frozen_iris, tmp_path):
    convert_to_saved_model(frozen_iris, tmp_path / "out")
    feeds = iris_inputs(32)
    eager, session = call(tmp_path / "out", "predict", feeds), call_in_session(tmp_path / "out", "predict", feeds)
    np.testing.assert_array_equal(eager["classes"], session["classes"])
    expected = np.array(IRIS_CLASSES, dtype=object)[session["class_ids"]]
    np.testing.assert_array_equal(session["classes"], expected)


def test_dequantize_once_caches_float_weights_in_local_variables(quantised_iris, tmp_path):
    convert_to_saved_model(quantised_iris, tmp_path / "once", dequantize_once=True)
    convert_to_saved_model(quantised_iris, tmp_path / "every_call", dequantize_once=False)
    meta_graph = read_saved_model(tmp_path / "once").meta_graphs[0]
    counts = op_counts(meta_graph.graph_def)
    assert counts["Dequantize"] == counts["VarHandleOp"] == counts["AssignVariableOp"] == 4
    assert "variables" not in meta_graph.collection_def  # nothing is saved in the checkpoint
    assert len(meta_graph.collection_def["local_variables"].bytes_list.value) == 4
    assert not any((tmp_path / "once" / "variables").iterdir())
    # The 8-bit weights are what is stored: the file is no bigger than with Dequantize per call.
    once_size = (tmp_path / "once" / "saved_model.pb").stat().st_size
    assert once_size < (tmp_path / "every_call" / "saved_model.pb").stat().st_size + 4096
    matmuls = [n for n in meta_graph.graph_def.node if n.op == "MatMul"]
    assert all(n.input[1].endswith("/dequantized_once/Read/ReadVariableOp") for n in matmuls)
    feeds = iris_inputs(64)
    for load in (call, call_in_session):
        once, every_call = load(tmp_path / "once", "predict", feeds), load(tmp_path / "every_call", "predict", feeds)
        for name in once:
            assert_same_function(once[name], every_call[name], err_msg=f"{load.__name__}: {name}")


def test_dequantized_variable_init_runs_when_tf_saved_model_load_loads(quantised_iris, tmp_path):
    convert_to_saved_model(quantised_iris, tmp_path / "once")
    loaded = tf.saved_model.load(str(tmp_path / "once"))
    cached = [v for v in loaded.variables if "dequantized_once" in v.name]
    assert len(cached) == 4
    kernel = next(v for v in cached if v.name.startswith("dnn/hiddenlayer_1/"))
    assert kernel.shape == (512, 512) and float(tf.reduce_max(tf.abs(kernel))) > 0.0
    # The signature function reads the variables; no Dequantize runs per call.
    function_graph = loaded.signatures["predict"].graph.as_graph_def()
    assert "Dequantize" not in op_counts(function_graph)


def test_converting_twice_gives_identical_files(quantised_iris, tmp_path):
    convert_to_saved_model(quantised_iris, tmp_path / "first")
    convert_to_saved_model(quantised_iris, tmp_path / "second")
    files = sorted(p.relative_to(tmp_path / "first") for p in (tmp_path / "first").rglob("*") if p.is_file())
    # TF 1's Builder writes no fingerprint.pb; the warm-up records are ours.
    assert [str(p) for p in files] == ["assets.extra/tf_serving_warmup_requests", "saved_model.pb"]
    for path in files:
        assert (tmp_path / "first" / path).read_bytes() == (tmp_path / "second" / path).read_bytes()


def test_existing_output_directory_is_refused_unless_overwrite(frozen_iris, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(SavedModelError, match=r"out: output directory already exists and is not empty"):
        convert_to_saved_model(frozen_iris, target)
    assert (target / "keep.txt").read_text() == "mine"
    convert_to_saved_model(frozen_iris, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["assets.extra", "saved_model.pb", "variables"]


def test_failed_conversion_leaves_nothing_behind(frozen_iris, tmp_path):
    graph_def = type(frozen_iris.graph_def)()
    graph_def.CopyFrom(frozen_iris.graph_def)
    for node in graph_def.node:
        if node.name == "dnn/head/predictions/probabilities":
            node.op = "Softmax"
            node.attr["T"].type = tf.int32.as_datatype_enum  # no int32 Softmax kernel signature
    broken = frozen_iris.with_graph_def(graph_def)
    message = r"out: the graph does not import into TensorFlow: .*\(node 'dnn/head/predictions/probabilities'\)"
    with pytest.raises(SavedModelError, match=message):
        convert_to_saved_model(broken, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
