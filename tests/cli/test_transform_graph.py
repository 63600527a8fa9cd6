"""transform_graph: reading and writing GraphDef files, the old flags, progress lines, and one-line
errors that leave no output file. Mostly in-process through ``main(argv)``; a few tests run the
installed console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from graph_helpers import graph_from_text, ops_by_name, run_graph
from tensorflow.core.framework import graph_pb2
from tensorflow.core.protobuf import saved_model_pb2

from serving_optimiser.cli import transform_graph
from serving_optimiser.graph_transforms import TransformError
from serving_optimiser.graph_transforms.graph_io import GraphFileError, load_graph_def, save_graph_def
from serving_optimiser.graph_transforms.graph_utils import make_const_node

# x [?,4] -> MatMul with a [4,300] weight read through an Identity -> Relu -> Softmax `output`.
# The weight has 1200 elements, over quantize_weights' default minimum_size of 1024.
SMALL_MODEL_TEXT = """
node { name: "x" op: "Placeholder" attr { key: "dtype" value { type: DT_FLOAT } }
  attr { key: "shape" value { shape { dim { size: -1 } dim { size: 4 } } } } }
node { name: "weights/read" op: "Identity" input: "weights" attr { key: "T" value { type: DT_FLOAT } } }
node { name: "matmul" op: "MatMul" input: "x" input: "weights/read" attr { key: "T" value { type: DT_FLOAT } } }
node { name: "relu" op: "Relu" input: "matmul" attr { key: "T" value { type: DT_FLOAT } } }
node { name: "unused" op: "Neg" input: "relu" attr { key: "T" value { type: DT_FLOAT } } }
node { name: "output" op: "Softmax" input: "relu" attr { key: "T" value { type: DT_FLOAT } } }
"""

VARIABLE_MODEL_TEXT = """
node { name: "w" op: "VariableV2" attr { key: "dtype" value { type: DT_FLOAT } }
  attr { key: "shape" value { shape { dim { size: 2 } } } }
  attr { key: "container" value { s: "" } } attr { key: "shared_name" value { s: "" } } }
node { name: "out" op: "Identity" input: "w" attr { key: "T" value { type: DT_FLOAT } } }
"""

TRANSFORMS = "remove_nodes(op=Identity) strip_unused_nodes quantize_weights"
TRANSFORM_NAMES = ["remove_nodes", "strip_unused_nodes", "quantize_weights"]


def small_model() -> graph_pb2.GraphDef:
    graph_def = graph_from_text(SMALL_MODEL_TEXT)
    weights = np.random.default_rng(0).normal(size=(4, 300)).astype(np.float32)
    graph_def.node.insert(0, make_const_node("weights", weights))
    return graph_def


FEEDS = {"x": np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)}


@pytest.fixture
def model_files(tmp_path) -> dict[str, Path]:
    paths = {"pb": tmp_path / "model.pb", "pbtxt": tmp_path / "model.pbtxt", "variables": tmp_path / "vars.pb"}
    save_graph_def(small_model(), paths["pb"])
    save_graph_def(small_model(), paths["pbtxt"])
    save_graph_def(graph_from_text(VARIABLE_MODEL_TEXT), paths["variables"])
    return paths


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        status = transform_graph.main(list(argv))
    except SystemExit as exit_:  # argparse usage errors
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_transformed(path: Path) -> None:
    result = load_graph_def(path)
    ops = ops_by_name(result)
    assert ops["weights"] == "Dequantize"
    assert "weights/read" not in ops and "unused" not in ops
    expected = run_graph(small_model(), ["output"], FEEDS)[0]
    actual = run_graph(result, ["output"], FEEDS)[0]
    # 8-bit weights: probabilities move by a few hundredths at most.
    np.testing.assert_allclose(actual, expected, atol=0.02)


# --------------------------------------------------------------------------------------------
# Happy paths (in-process)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "target", "extra", "expect_text"),
    [
        pytest.param("pb", "out.pb", [], False, id="binary-to-binary"),
        pytest.param("pbtxt", "out.pbtxt", [], True, id="text-to-text-by-extension"),
        pytest.param("pbtxt", "out.pb", [], False, id="text-to-binary"),
        pytest.param("pb", "out.pb", ["--output_as_text"], True, id="output_as_text-flag"),
        pytest.param("pb", "out.pb", ["--output_as_text=false"], False, id="output_as_text-false"),
    ],
)
def test_transforms_the_file(capsys, model_files, tmp_path, source, target, extra, expect_text):
    out = tmp_path / target
    status, stdout, stderr = run_main(
        capsys, f"--in_graph={model_files[source]}", f"--out_graph={out}", "--inputs=x", "--outputs=output",
        f"--transforms={TRANSFORMS}", *extra,
    )
    assert status == 0, stderr
    assert_transformed(out)
    data = out.read_bytes()
    if expect_text:
        text_format.Parse(data.decode(), graph_pb2.GraphDef())
    else:
        graph_pb2.GraphDef.FromString(data)
        assert not data.lstrip().startswith(b"node {")
    # One progress line per transform, naming it, and nothing else.
    lines = stderr.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == TRANSFORM_NAMES
    assert all(line.startswith("transform_graph: ") for line in lines)
    assert stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"model.pb", "model.pbtxt", "vars.pb", target})


def test_space_separated_flag_values_and_no_change_log(capsys, model_files, tmp_path):
    out = tmp_path / "out.pb"
    status, _, stderr = run_main(
        capsys, "--in_graph", str(model_files["pb"]), "--out_graph", str(out), "--outputs", "output",
        "--transforms", "remove_device",
    )
    assert status == 0
    assert "remove_device: no change" in stderr
    assert ops_by_name(load_graph_def(out)) == ops_by_name(small_model())


def test_binary_named_file_holding_text_is_read_by_fallback(capsys, model_files, tmp_path):
    disguised = tmp_path / "text_in_disguise.pb"
    shutil.copy(model_files["pbtxt"], disguised)
    assert load_graph_def(disguised) == small_model()


def test_overwrites_existing_output_atomically(capsys, model_files, tmp_path):
    out = tmp_path / "out.pb"
    out.write_bytes(b"old contents")
    status, _, _ = run_main(
        capsys, f"--in_graph={model_files['pb']}", f"--out_graph={out}", "--outputs=output",
        f"--transforms={TRANSFORMS}",
    )
    assert status == 0
    assert_transformed(out)
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------------------
# Errors: one line on stderr, non-zero exit, no traceback, no output file
# --------------------------------------------------------------------------------------------

ERROR_CASES = {
    "unknown-transform": (["--transforms=fold_constant"], "did you mean 'fold_constants'"),
    "malformed-transform-string": (["--transforms=strip_unused_nodes(type=float"], "position"),
    "bad-character-in-transform-string": (["--transforms=fold-constants"], "position 4"),
    "argument-a-transform-does-not-take": (
        ["--transforms=round_weights(num_stepz=4)"], "round_weights: unknown argument 'num_stepz'"
    ),
    "missing-input-name": (["--inputs=x,nope", f"--transforms={TRANSFORMS}"], "'nope'"),
    "missing-output-name": (["--outputs=nowhere", f"--transforms={TRANSFORMS}"], "'nowhere'"),
    "empty-name-in-list": (["--outputs=output,,relu", f"--transforms={TRANSFORMS}"], "empty name"),
    "empty-transforms": (["--transforms= "], "at least one transform"),
    "missing-in_graph": (["--in_graph=", f"--transforms={TRANSFORMS}"], "--in_graph is required"),
    "missing-out_graph": (["--out_graph=", f"--transforms={TRANSFORMS}"], "--out_graph is required"),
    "file-missing": (["--in_graph=MISSING", f"--transforms={TRANSFORMS}"], "does not exist"),
    "file-not-a-graphdef": (["--in_graph=GARBAGE", f"--transforms={TRANSFORMS}"], "is not a GraphDef"),
    "saved-model-not-a-graphdef": (["--in_graph=SAVED_MODEL", f"--transforms={TRANSFORMS}"], "is not a GraphDef"),
    "text-file-not-a-graphdef": (["--in_graph=NOT_TEXT", f"--transforms={TRANSFORMS}"], "not a text-format GraphDef"),
    "directory-not-a-file": (["--in_graph=DIRECTORY", f"--transforms={TRANSFORMS}"], "is a directory"),
    "variables-given-to-quantize_weights": (
        ["--in_graph=VARIABLES", "--outputs=out", "--transforms=quantize_weights"], "'w' is a variable"
    ),
    "bad-ignore_errors-value": (["--transforms=remove_device(ignore_errors=maybe)"], "ignore_errors"),
}


def _resolve(argument: str, model_files: dict[str, Path], tmp_path: Path) -> str:
    garbage = tmp_path / "garbage.pb"
    garbage.write_bytes(bytes(range(256)) * 4)
    saved_model = tmp_path / "saved_model.pb"
    # A SavedModel's saved_model.pb: protobuf parses it as a GraphDef without complaint.
    saved_model_proto = saved_model_pb2.SavedModel(saved_model_schema_version=1)
    saved_model_proto.meta_graphs.add().graph_def.CopyFrom(small_model())
    saved_model.write_bytes(saved_model_proto.SerializeToString())
    not_text = tmp_path / "broken.pbtxt"
    not_text.write_text('node { name: "a" op: "Const" ')
    (tmp_path / "a_directory").mkdir(exist_ok=True)
    replacements = {
        "MISSING": str(tmp_path / "missing.pb"), "GARBAGE": str(garbage), "SAVED_MODEL": str(saved_model),
        "NOT_TEXT": str(not_text), "DIRECTORY": str(tmp_path / "a_directory"),
        "VARIABLES": str(model_files["variables"]),
    }
    for key, value in replacements.items():
        argument = argument.replace(f"={key}", f"={value}")
    return argument


@pytest.mark.parametrize(("arguments", "expected"), list(ERROR_CASES.values()), ids=list(ERROR_CASES))
def test_error_is_one_line_and_leaves_no_output(capsys, model_files, tmp_path, arguments, expected):
    out = tmp_path / "out" / "result.pb"
    defaults = {"--in_graph": str(model_files["pb"]), "--out_graph": str(out), "--outputs": "output"}
    given = [_resolve(a, model_files, tmp_path) for a in arguments]
    argv = [f"{k}={v}" for k, v in defaults.items() if not any(a.startswith(f"{k}=") for a in given)] + given
    status, stdout, stderr = run_main(capsys, *argv)
    assert status == 1
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("transform_graph: error: ")
    assert expected in lines[0]
    assert "Traceback" not in stderr
    assert not out.parent.exists()


def test_unknown_flag_is_a_one_line_usage_error(capsys, model_files, tmp_path):
    status, _, stderr = run_main(
        capsys, f"--in_graph={model_files['pb']}", f"--out_graph={tmp_path / 'out.pb'}", "--transforms=remove_device",
        "--bogus=1", "positional",
    )
    assert status == 2
    assert stderr.count("\n") == 1
    assert "unrecognized arguments: --bogus=1 positional" in stderr


def test_failure_after_earlier_transforms_keeps_the_old_output(capsys, model_files, tmp_path):
    out = tmp_path / "out.pb"
    out.write_bytes(b"previous result")
    status, _, stderr = run_main(
        capsys, f"--in_graph={model_files['variables']}", f"--out_graph={out}", "--outputs=out",
        "--transforms=sort_by_execution_order quantize_weights",
    )
    assert status == 1
    assert stderr.splitlines()[-1].startswith("transform_graph: error: quantize_weights: ")
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --------------------------------------------------------------------------------------------
# graph_io directly
# --------------------------------------------------------------------------------------------


def test_load_rejects_an_empty_file(tmp_path):
    empty = tmp_path / "empty.pb"
    empty.write_bytes(b"")
    with pytest.raises(GraphFileError, match="empty GraphDef"):
        load_graph_def(empty)


def test_graph_file_error_is_a_transform_error():
    assert issubclass(GraphFileError, TransformError)


def test_save_expands_home_and_creates_directories(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    save_graph_def(small_model(), "~/nested/dir/model.pbtxt")
    written = tmp_path / "nested" / "dir" / "model.pbtxt"
    assert written.read_text().startswith("node {")
    assert load_graph_def("~/nested/dir/model.pbtxt") == small_model()


# --------------------------------------------------------------------------------------------
# The installed console script (each run pays TensorFlow's import, about 5 s)
# --------------------------------------------------------------------------------------------


def _console_script(name: str) -> str:
    script = Path(sys.executable).parent / name
    assert script.exists(), f"console script {name} is not installed next to {sys.executable}"
    return str(script)


@pytest.mark.slow
def test_console_script_transforms_text_to_binary(model_files, tmp_path):
    out = tmp_path / "out.pb"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    completed = subprocess.run(
        [_console_script("transform_graph"), f"--in_graph={model_files['pbtxt']}", f"--out_graph={out}",
         "--inputs=x", "--outputs=output", f"--transforms={TRANSFORMS}"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    # Only our progress lines: TensorFlow's own start-up logs are silenced.
    assert [line.split(":")[1].strip() for line in completed.stderr.splitlines()] == TRANSFORM_NAMES
    assert_transformed(out)


@pytest.mark.slow
def test_console_script_error_is_one_line_without_traceback(model_files, tmp_path):
    out = tmp_path / "out.pb"
    completed = subprocess.run(
        [_console_script("transform_graph"), f"--in_graph={model_files['variables']}", f"--out_graph={out}",
         "--outputs=out", "--transforms=quantize_weights"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert completed.returncode == 1
    assert completed.stderr.count("\n") == 1, completed.stderr
    assert completed.stderr.startswith("transform_graph: error: quantize_weights: node 'w' is a variable")
    assert "Traceback" not in completed.stderr
    assert not out.exists()
