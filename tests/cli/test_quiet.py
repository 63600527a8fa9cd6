"""Every command-line tool is quiet on every CPU: on an error, stderr is exactly the one error
line (no TensorFlow, absl or oneDNN start-up line, even with oneDNN's rewrites on), and errors
that need no TensorFlow (a missing input, a malformed or unknown transform, an unknown flag) are
reported without importing it."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

# Runs a tool's main in a fresh interpreter and reports whether TensorFlow got imported.
RUNNER = """
import sys
from serving_optimiser.cli.{module} import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print("tensorflow imported" if "tensorflow" in sys.modules else "tensorflow not imported")
sys.exit(code)
"""


def run_tool(module: str, *argv: str, log_level: str | None = None) -> tuple[int, list[str], str]:
    """Run a tool with ``TF_CPP_MIN_LOG_LEVEL`` unset (the Makefile's exported value cleared), or
    set to ``log_level``."""
    # oneDNN's rewrites forced on: the start-up lines appear then even on CPUs without AVX-512.
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"} | {"TF_ENABLE_ONEDNN_OPTS": "1"}
    if log_level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = log_level
    result = subprocess.run(
        [sys.executable, "-c", RUNNER.format(module=module), *argv], env=env, capture_output=True, text=True
    )
    return result.returncode, result.stderr.splitlines(), result.stdout.splitlines()[-1]


TRANSFORM_GRAPH_CASES = {
    "missing_input": (["--transforms=strip_unused_nodes", "--in_graph=MISSING"], "graph file 'MISSING' does not exist"),
    "malformed_transform": (["--transforms=fold_constants(ignore_errors=true", "--in_graph=MISSING"], "never closed"),
    "unknown_transform": (["--transforms=fold_constant", "--in_graph=MISSING"], "did you mean 'fold_constants'"),
    "unknown_argument": (["--transforms=round_weights(steps=2)", "--in_graph=MISSING"], "unknown argument 'steps'"),
    "unknown_flag": (["--transforms=strip_unused_nodes", "--in_graph=MISSING", "--bogus"], "unrecognized arguments"),
}


@pytest.mark.parametrize("case", sorted(TRANSFORM_GRAPH_CASES))
def test_transform_graph_errors_are_one_line_without_tensorflow(case, tmp_path):
    argv, expected = TRANSFORM_GRAPH_CASES[case]
    argv = [arg.replace("MISSING", str(tmp_path / "missing.pb")) for arg in argv]
    code, stderr, marker = run_tool("transform_graph", *argv, f"--out_graph={tmp_path / 'out.pb'}")
    assert code in (1, 2) and len(stderr) == 1, stderr
    assert stderr[0].startswith("transform_graph: error: ")
    assert expected.replace("MISSING", str(tmp_path / "missing.pb")) in stderr[0]
    assert marker == "tensorflow not imported"
    assert not (tmp_path / "out.pb").exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["MISSING", "OUT", "--transforms", "strip_unused_nodes"], "MISSING: no such directory"),
        (["HERE", "OUT", "--transforms", "quantize_weights("], "transforms: malformed transform string"),
        (["HERE", "OUT", "--transforms", "quantise_weights"], "did you mean 'quantize_weights'"),
        (["HERE", "OUT"], "one of the arguments --transforms --auto is required"),
        (["HERE", "OUT", "--auto"], "--auto judges every candidate on your data: it needs --sample-inputs"),
    ],
    ids=["missing_directory", "malformed_transform", "unknown_transform", "missing_flag", "auto_without_samples"],
)
def test_optimise_saved_model_errors_are_one_line_without_tensorflow(argv, expected, tmp_path):
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "saved_model.pb").write_bytes(b"")
    paths = {"MISSING": str(tmp_path / "missing"), "HERE": str(tmp_path / "here"), "OUT": str(tmp_path / "out")}
    code, stderr, marker = run_tool("optimise_saved_model", *[paths.get(a, a) for a in argv])
    assert code in (1, 2) and len(stderr) == 1, stderr
    assert stderr[0].startswith("optimise_saved_model: error: ")
    assert expected.replace("MISSING", str(tmp_path / "missing")) in stderr[0]
    assert marker == "tensorflow not imported"
    assert not (tmp_path / "out").exists()


def test_summarize_graph_missing_file_is_one_line_without_tensorflow(tmp_path):
    code, stderr, marker = run_tool("summarize_graph", f"--in_graph={tmp_path / 'missing.pb'}")
    assert code == 1 and stderr == [f"summarize_graph: error: graph file '{tmp_path / 'missing.pb'}' does not exist"]
    assert marker == "tensorflow not imported"


@pytest.mark.parametrize("module", ["transform_graph", "summarize_graph", "optimise_saved_model"])
def test_errors_found_by_tensorflow_are_one_line_too(module, tmp_path):
    """A file that exists but is no model: TensorFlow is imported to read it, and stays quiet."""
    bogus = tmp_path / "bogus.pb"
    bogus.write_bytes(b"\x08\x96\x01 not a graph")
    argv = {
        "transform_graph": [
            f"--in_graph={bogus}", f"--out_graph={tmp_path / 'out.pb'}", "--transforms=strip_unused_nodes"
        ],
        "summarize_graph": [f"--in_graph={bogus}"],
        "optimise_saved_model": [str(tmp_path), str(tmp_path / "out"), "--transforms", "strip_unused_nodes"],
    }[module]
    if module == "optimise_saved_model":
        bogus.rename(tmp_path / "saved_model.pb")
    code, stderr, marker = run_tool(module, *argv)
    assert code == 1 and len(stderr) == 1, stderr
    assert stderr[0].startswith(f"{module}: error: ")
    assert marker == "tensorflow imported"


@pytest.mark.parametrize("log_level", [None, "1", "2"], ids=["unset", "level-1", "level-2"])
def test_corrupt_saved_model_is_one_line_at_every_quiet_log_level(log_level, tmp_path):
    """TF_CPP_MIN_LOG_LEVEL=2 (errors only) is a common line in shell profiles and Dockerfiles: absl's
    pre-init warning and oneDNN's notice ignore it, so the import must be silenced at 1 and 2 too."""
    (tmp_path / "saved_model.pb").write_bytes(b"garbage")
    code, stderr, marker = run_tool(
        "optimise_saved_model", str(tmp_path), str(tmp_path / "out"), "--transforms", "strip_unused_nodes",
        log_level=log_level,
    )
    assert code == 1 and len(stderr) == 1, stderr
    assert stderr[0].startswith("optimise_saved_model: error: ") and "malformed or truncated" in stderr[0]
    assert marker == "tensorflow imported"
    assert not (tmp_path / "out").exists()


def test_log_level_0_shows_tensorflows_start_up(tmp_path):
    """0 means everything: the start-up lines show, then the same one-line error."""
    (tmp_path / "saved_model.pb").write_bytes(b"garbage")
    code, stderr, _ = run_tool(
        "optimise_saved_model", str(tmp_path), str(tmp_path / "out"), "--transforms", "strip_unused_nodes",
        log_level="0",
    )
    assert code == 1
    assert any("oneDNN custom operations are on" in line for line in stderr[:-1]), stderr
    assert stderr[-1].startswith("optimise_saved_model: error: ")
