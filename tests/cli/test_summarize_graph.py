"""summarize_graph: the text of the old tool (inputs, variables, outputs, parameter counts, devices,
op types, benchmark line, structure dump), its TF 2 additions, and the command-line tool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from graph_helpers import frozen_function_graph, graph_from_text
from tensorflow.python.framework import tensor_util

from serving_optimiser.cli import summarize_graph as summarize_cli
from serving_optimiser.graph_transforms import TransformError
from serving_optimiser.graph_transforms.graph_io import save_graph_def
from serving_optimiser.graph_transforms.summary import (
    dtype_string,
    human_readable_num,
    summarize_graph,
    tensor_debug_string,
)

FLOAT = 'attr { key: "T" value { type: DT_FLOAT } }'

TF1_GRAPH_TEXT = f"""
node {{ name: "input" op: "Placeholder" attr {{ key: "dtype" value {{ type: DT_FLOAT }} }}
  attr {{ key: "shape" value {{ shape {{ dim {{ size: -1 }} dim {{ size: 3 }} }} }} }} }}
node {{ name: "label" op: "Placeholder" attr {{ key: "dtype" value {{ type: DT_INT32 }} }} }}
node {{ name: "weights" op: "Const" device: "/cpu:0" attr {{ key: "dtype" value {{ type: DT_FLOAT }} }}
  attr {{ key: "value" value {{ tensor {{ dtype: DT_FLOAT
    tensor_shape {{ dim {{ size: 3 }} dim {{ size: 2 }} }} float_val: [1, 2, 3, 4, 5, 6] }} }} }} }}
node {{ name: "var" op: "VariableV2" attr {{ key: "dtype" value {{ type: DT_FLOAT }} }}
  attr {{ key: "shape" value {{ shape {{ dim {{ size: 2 }} }} }} }} }}
node {{ name: "matmul" op: "MatMul" input: "input" input: "weights" device: "/cpu:0" {FLOAT} }}
node {{ name: "output" op: "Add" input: "matmul" input: "var" input: "^label" device: "/gpu:0" {FLOAT} }}
node {{ name: "init" op: "NoOp" input: "^var" }}
node {{ name: "dangling_const" op: "Const" attr {{ key: "dtype" value {{ type: DT_INT32 }} }}
  attr {{ key: "value" value {{ tensor {{ dtype: DT_INT32 tensor_shape {{ }} int_val: 7 }} }} }} }}
"""

# Lines listing nodes end in a space, as the old tool printed them.
TF1_SUMMARY = "\n".join([
    "Found 2 possible inputs: (name=input, type=float(1), shape=[?,3]) (name=label, type=int32(3), shape=None) ",
    "Found 1 variables: (name=var, type=float(1), shape=[2]) ",
    "Found 1 possible outputs: (name=output, op=Add) ",
    "Found 7 (7) const parameters, 2 (2) variable parameters, and 2 control_edges",
    "2 nodes assigned to device '/cpu:0'",
    "1 nodes assigned to device '/gpu:0'",
    "Op types used: 2 Const, 2 Placeholder, 1 Add, 1 MatMul, 1 NoOp, 1 VariableV2",
    "To use with tensorflow/tools/benchmark:benchmark_model try these arguments:",
    "bazel run tensorflow/tools/benchmark:benchmark_model -- --graph=model.pb --show_flops"
    " --input_layer=input,label,var --input_layer_type=float,int32,float --input_layer_shape=-1,3::2"
    " --output_layer=output",
]) + "\n"

# Execution order of the old tool's sort (LIFO ready list), with each Const's value.
TF1_STRUCTURE = """\
dangling_const (Const): [], value=Tensor<type: int32 shape: [] values: 7>
var (VariableV2): []
init (NoOp): [^var]
weights (Const): [], value=Tensor<type: float shape: [3,2] values: [1 2][3...]...>
label (Placeholder): []
input (Placeholder): []
matmul (MatMul): [input, weights]
output (Add): [matmul, var, ^label]
"""


def test_tf1_graph_summary_is_the_old_tools_text():
    assert summarize_graph(graph_from_text(TF1_GRAPH_TEXT), "model.pb") == TF1_SUMMARY


def test_print_structure_appends_nodes_in_execution_order():
    text = summarize_graph(graph_from_text(TF1_GRAPH_TEXT), "model.pb", print_structure=True)
    assert text == TF1_SUMMARY + TF1_STRUCTURE


def test_empty_lists_are_spelled_out():
    graph = graph_from_text(
        'node { name: "c" op: "Const" attr { key: "dtype" value { type: DT_FLOAT } } '
        'attr { key: "value" value { tensor { dtype: DT_FLOAT tensor_shape { } float_val: 1 } } } }'
    )
    lines = summarize_graph(graph).splitlines()
    assert lines[:4] == [
        "No inputs spotted.",
        "No variables spotted.",
        "No outputs spotted.",
        "Found 1 (1) const parameters, 0 (0) variable parameters, and 0 control_edges",
    ]


def test_tf2_frozen_graph_shows_what_the_identity_output_forwards():
    weights = tf.Variable(np.arange(6, dtype=np.float32).reshape(3, 2))

    def classify(features):
        return tf.nn.softmax(tf.matmul(features, weights))

    graph = frozen_function_graph(classify, tf.TensorSpec([None, 3], tf.float32, name="features"))
    lines = summarize_graph(graph).splitlines()
    assert lines[0] == "Found 1 possible inputs: (name=features, type=float(1), shape=[?,3]) "
    [softmax] = [node.name for node in graph.node if node.op == "Softmax"]
    assert lines[2] == f"Found 1 possible outputs: (name=Identity, op=Identity, forwards={softmax} (Softmax)) "
    # The weight Const plus its ReadVariableOp Identity tied to the NoOp: one control edge each.
    assert lines[3].startswith("Found 6 (6) const parameters, 0 (0) variable parameters, and ")
    assert lines[-1].endswith("--input_layer=features --input_layer_type=float --input_layer_shape=-1,3 "
                              "--output_layer=Identity")


RESOURCE_VARIABLE_GRAPH = f"""
node {{ name: "x" op: "Placeholder" attr {{ key: "dtype" value {{ type: DT_FLOAT }} }} }}
node {{ name: "v" op: "VarHandleOp" attr {{ key: "dtype" value {{ type: DT_FLOAT }} }}
  attr {{ key: "shape" value {{ shape {{ dim {{ size: 4 }} dim {{ size: 1500 }} }} }} }}
  attr {{ key: "shared_name" value {{ s: "v" }} }} }}
node {{ name: "read" op: "ReadVariableOp" input: "v" attr {{ key: "dtype" value {{ type: DT_FLOAT }} }} }}
node {{ name: "y" op: "MatMul" input: "x" input: "read" {FLOAT} }}
"""


def test_resource_variables_are_listed_and_counted_but_not_benchmark_inputs():
    lines = summarize_graph(graph_from_text(RESOURCE_VARIABLE_GRAPH), "g.pb").splitlines()
    assert lines[1] == "Found 1 variables: (name=v, type=float(1), shape=[4,1500]) "
    assert lines[3] == "Found 0 (0) const parameters, 6000 (6.00k) variable parameters, and 0 control_edges"
    assert " --input_layer=x --input_layer_type=float --input_layer_shape= " in lines[-1]


LIBRARY_GRAPH = f"""
node {{ name: "x" op: "Placeholder" attr {{ key: "dtype" value {{ type: DT_FLOAT }} }} }}
node {{ name: "call" op: "PartitionedCall" input: "x"
  attr {{ key: "Tin" value {{ list {{ type: DT_FLOAT }} }} }}
  attr {{ key: "Tout" value {{ list {{ type: DT_FLOAT }} }} }}
  attr {{ key: "f" value {{ func {{ name: "negate" }} }} }} }}
library {{ function {{
  signature {{ name: "negate" input_arg {{ name: "a" type: DT_FLOAT }} output_arg {{ name: "b" type: DT_FLOAT }} }}
  node_def {{ name: "neg" op: "Neg" input: "a" {FLOAT} }}
  node_def {{ name: "neg_again" op: "Neg" input: "neg:y:0" {FLOAT} }}
  ret {{ key: "b" value: "neg_again:y:0" }} }} }}
"""


def test_library_functions_are_listed_and_their_ops_counted():
    lines = summarize_graph(graph_from_text(LIBRARY_GRAPH)).splitlines()
    assert lines[4] == "Found 1 functions in the library: negate"
    assert lines[5] == "Op types used: 2 Neg, 1 PartitionedCall, 1 Placeholder"


def test_input_naming_a_missing_node_is_an_error():
    graph = graph_from_text(f'node {{ name: "y" op: "Neg" input: "ghost:1" {FLOAT} }}')
    with pytest.raises(TransformError, match="input ghost:1 for node y"):
        summarize_graph(graph)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        pytest.param(0, "0", id="zero"),
        pytest.param(999, "999", id="below-1000"),
        pytest.param(1000, "1.00k", id="thousand"),
        pytest.param(792_072, "792.07k", id="iris-weights"),
        pytest.param(23_851_784, "23.85M", id="millions"),
        pytest.param(1_234_567_890, "1.23B", id="billions"),
        pytest.param(-1500, "-1.50k", id="negative"),
    ],
)
def test_human_readable_num(value, text):
    assert human_readable_num(value) == text


@pytest.mark.parametrize(
    ("array", "text"),
    [
        pytest.param(np.float32(5), "Tensor<type: float shape: [] values: 5>", id="scalar"),
        pytest.param(np.array([0.1, 2.5], np.float32), "Tensor<type: float shape: [2] values: 0.1 2.5>", id="vector"),
        pytest.param(np.arange(5, dtype=np.int32), "Tensor<type: int32 shape: [5] values: 0 1 2...>", id="cut-vector"),
        pytest.param(
            np.arange(1, 9, dtype=np.float32).reshape(1, 2, 2, 2),
            "Tensor<type: float shape: [1,2,2,2] values: [[[1 2][3...]]]...>", id="cut-4d",
        ),
        pytest.param(np.array([1 / 3], np.float32), "Tensor<type: float shape: [1] values: 0.333333343>",
                     id="float-needing-9-digits"),
        pytest.param(np.array([b"a\nb"]), "Tensor<type: string shape: [1] values: a\\nb>", id="string-escaped"),
        pytest.param(np.zeros((0, 3), np.float32), "Tensor<type: float shape: [0,3] values: >", id="empty"),
    ],
)
def test_tensor_debug_string(array, text):
    assert tensor_debug_string(tensor_util.make_tensor_proto(array)) == text


@pytest.mark.parametrize(
    ("dtype", "name"),
    [(1, "float"), (2, "double"), (3, "int32"), (19, "half"), (20, "resource"), (101, "float_ref"), (0, "INVALID")],
)
def test_dtype_string_is_tfs_data_type_string(dtype, name):
    assert dtype_string(dtype) == name


# --------------------------------------------------------------------------------------------
# The command-line tool
# --------------------------------------------------------------------------------------------


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        status = summarize_cli.main(list(argv))
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("suffix", [".pb", ".pbtxt"])
def test_main_prints_the_summary(capsys, tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    save_graph_def(graph_from_text(TF1_GRAPH_TEXT), path)
    status, out, err = run_main(capsys, f"--in_graph={path}", "--print_structure")
    assert (status, err) == (0, "")
    assert out == summarize_graph(graph_from_text(TF1_GRAPH_TEXT), str(path), print_structure=True)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(["--in_graph="], "--in_graph is required", id="empty-in_graph"),
        pytest.param(["--in_graph=MISSING"], "does not exist", id="file-missing"),
        pytest.param(["--in_graph=GARBAGE"], "is not a GraphDef", id="not-a-graphdef"),
        pytest.param(["--in_graph=INVALID"], "inputs refer to nonexistent nodes", id="dangling-input"),
    ],
)
def test_main_errors_are_one_line(capsys, tmp_path, argv, expected):
    garbage = tmp_path / "garbage.pb"
    garbage.write_bytes(b"\xff" * 64)
    invalid = tmp_path / "invalid.pbtxt"
    save_graph_def(graph_from_text(f'node {{ name: "y" op: "Neg" input: "ghost" {FLOAT} }}'), invalid)
    paths = {"MISSING": str(tmp_path / "missing.pb"), "GARBAGE": str(garbage), "INVALID": str(invalid)}
    argv = [next((a.replace(k, v) for k, v in paths.items() if k in a), a) for a in argv]
    status, out, err = run_main(capsys, *argv)
    assert status == 1
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("summarize_graph: error: ")
    assert expected in err


@pytest.mark.slow
def test_console_script_prints_the_summary(tmp_path):
    path = tmp_path / "model.pbtxt"
    save_graph_def(graph_from_text(TF1_GRAPH_TEXT), path)
    script = Path(sys.executable).parent / "summarize_graph"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    completed = subprocess.run(
        [str(script), f"--in_graph={path}"], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    assert completed.stdout == TF1_SUMMARY.replace("--graph=model.pb", f"--graph={path}")
