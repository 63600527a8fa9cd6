"""The safety scan: denylisted ops in the graph and the function library are found and named,
allowed ops are let through, and the checkpoint machinery a SaverDef points at is exempt."""

from __future__ import annotations

import pytest
from graph_helpers import graph_from_text
from tensorflow.core.protobuf import meta_graph_pb2, saver_pb2

from serving_optimiser.saved_model import SavedModelError, UnsafeOp, scan_for_unsafe_ops
from serving_optimiser.saved_model.reader import read_saved_model
from serving_optimiser.saved_model.safety import refuse_unsafe_ops

SAFE_GRAPH = """
node { name: "x" op: "Placeholder" attr { key: "dtype" value { type: DT_FLOAT } } }
node { name: "y" op: "Relu" input: "x" attr { key: "T" value { type: DT_FLOAT } } }
"""

READS_AT_TOP_LEVEL = """
node { name: "path" op: "Placeholder" attr { key: "dtype" value { type: DT_STRING } } }
node { name: "contents_expect_refused" op: "ReadFile" input: "path" }
"""

PYTHON_IN_LIBRARY = """
node { name: "x" op: "Placeholder" attr { key: "dtype" value { type: DT_FLOAT } } }
node { name: "call" op: "StatefulPartitionedCall" input: "x"
       attr { key: "f" value { func { name: "outer_fn" } } } }
library {
  function { signature { name: "outer_fn" }
             node_def { name: "nested_call" op: "inner_fn" } }
  function { signature { name: "inner_fn" }
             node_def { name: "python_expect_refused" op: "EagerPyFunc" } }
}
"""


def _findings(text: str, allow=()) -> list[tuple[str, str, str | None]]:
    return [(f.op, f.node, f.function) for f in scan_for_unsafe_ops(graph_from_text(text), allow)]


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        (SAFE_GRAPH, []),
        (READS_AT_TOP_LEVEL, [("ReadFile", "contents_expect_refused", None)]),
        (PYTHON_IN_LIBRARY, [("EagerPyFunc", "python_expect_refused", "inner_fn")]),
    ],
    ids=["safe_graph_passes", "read_file_in_graph", "py_func_in_nested_library_function"],
)
def test_scan_finds_denylisted_ops_in_graph_and_library(graph, expected):
    assert _findings(graph) == expected


def test_allow_ops_lets_named_ops_through():
    assert _findings(READS_AT_TOP_LEVEL, allow=["ReadFile"]) == []
    assert _findings(READS_AT_TOP_LEVEL, allow="ReadFile,PrintV2") == []


@pytest.mark.parametrize(
    ("allow", "message"),
    [(["ReadFlie"], "allowed op 'ReadFlie' is not an op TensorFlow knows"), (["ReadFile", ""], "empty op name")],
    ids=["typo_in_op_name", "empty_name"],
)
def test_allow_ops_rejects_unknown_names(allow, message):
    with pytest.raises(SavedModelError, match=message):
        scan_for_unsafe_ops(graph_from_text(SAFE_GRAPH), allow)


def _meta_graph_with_saver(text: str, save_tensor: str, restore_op: str) -> meta_graph_pb2.MetaGraphDef:
    meta_graph = meta_graph_pb2.MetaGraphDef()
    meta_graph.graph_def.CopyFrom(graph_from_text(text))
    meta_graph.saver_def.CopyFrom(
        saver_pb2.SaverDef(filename_tensor_name="filename:0", save_tensor_name=save_tensor, restore_op_name=restore_op)
    )
    return meta_graph


CHECKPOINT_GRAPH = """
node { name: "filename" op: "Placeholder" attr { key: "dtype" value { type: DT_STRING } } }
node { name: "save/SaveV2" op: "SaveV2" input: "filename" }
node { name: "save/Identity" op: "Identity" input: "filename" input: "^save/SaveV2" }
node { name: "save/RestoreV2" op: "RestoreV2" input: "filename" }
node { name: "save/restore_all" op: "NoOp" input: "^save/RestoreV2" }
node { name: "sneaky_write_expect_refused" op: "SaveV2" input: "filename" }
node { name: "output" op: "Identity" input: "filename" input: "^sneaky_write_expect_refused" }
"""


def test_checkpoint_ops_are_allowed_only_on_the_savers_paths():
    meta_graph = _meta_graph_with_saver(CHECKPOINT_GRAPH, "save/Identity:0", "save/restore_all")
    findings = scan_for_unsafe_ops(meta_graph)
    assert [(f.op, f.node) for f in findings] == [("SaveV2", "sneaky_write_expect_refused")]
    assert "outside the checkpoint's save path" in findings[0].reason


def test_a_save_op_reached_from_the_restore_op_is_refused():
    # The loader runs the restore op: a SaveV2 under it would write a file at load time.
    text = CHECKPOINT_GRAPH.replace('input: "^save/RestoreV2"', 'input: "^save/RestoreV2" input: "^save/SaveV2"')
    meta_graph = _meta_graph_with_saver(text, "save/Identity:0", "save/restore_all")
    assert {f.node for f in scan_for_unsafe_ops(meta_graph)} == {"save/SaveV2", "sneaky_write_expect_refused"}


def test_exported_models_pass_the_scan(tf1_iris, keras_cnn, multi_signature_module, tf1_vocabulary):
    # TF 1 savers, TF 2 traced save/restore functions and declared vocabulary assets are fine.
    for directory in (tf1_iris, keras_cnn, multi_signature_module, tf1_vocabulary):
        assert scan_for_unsafe_ops(directory) == [], directory


def test_text_file_table_must_read_a_declared_asset(tf1_vocabulary):
    meta_graph = read_saved_model(tf1_vocabulary).meta_graphs[0]
    del meta_graph.asset_file_def[:]
    del meta_graph.collection_def["asset_filepaths"].node_list.value[:]
    findings = scan_for_unsafe_ops(meta_graph)
    assert [f.op for f in findings] == ["InitializeTableFromTextFileV2"]
    assert "not one of the SavedModel's assets" in findings[0].reason


def test_tf2_model_reading_a_file_is_found_in_its_library(reads_a_file):
    findings = scan_for_unsafe_ops(reads_a_file)
    assert {f.op for f in findings} == {"ReadFile"}
    assert all(f.function for f in findings)


def test_refusal_is_one_line_naming_op_node_and_how_to_allow():
    findings = [
        UnsafeOp("ReadFile", "read", None, "reads files"),
        UnsafeOp("PrintV2", "print", "fn", "prints to the process's output"),
    ]
    with pytest.raises(SavedModelError) as raised:
        refuse_unsafe_ops(findings, "model_dir")
    message = str(raised.value)
    assert "\n" not in message
    assert message == (
        "model_dir: refusing unsafe op ReadFile (node 'read') reads files (and 1 more unsafe node(s)); "
        "allow it with --allow-ops PrintV2,ReadFile"
    )
