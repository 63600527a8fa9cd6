"""What the three command-line tools say about themselves: usage with the required flags
marked, --help with an example and the exit codes, --version, and transform_graph --list.
Parsers are built without importing TensorFlow, so argument errors come before its start-up."""

import subprocess
import sys
from importlib import metadata

import pytest

from serving_optimiser.cli import optimise_saved_model, summarize_graph, transform_graph
from serving_optimiser.graph_transforms import registry

TOOLS = {
    "transform_graph": transform_graph,
    "summarize_graph": summarize_graph,
    "optimise_saved_model": optimise_saved_model,
}


def run(capsys, tool, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        tool.main(list(argv))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


@pytest.mark.parametrize("name", TOOLS)
def test_version(capsys, name):
    status, out, _ = run(capsys, TOOLS[name], "--version")
    assert status == 0
    assert out == f"{name} {metadata.version('serving-optimiser')}\n"


@pytest.mark.parametrize("name", TOOLS)
def test_help_has_an_example_and_the_exit_codes(capsys, name):
    status, out, _ = run(capsys, TOOLS[name], "--help")
    assert status == 0
    assert f"Example:\n\n    {name} " in out
    assert "Exit codes: 0 done; 1 error" in out and "2 bad usage" in out


@pytest.mark.parametrize(
    ("name", "required"),
    [
        ("transform_graph", ["--in_graph IN_GRAPH", "--out_graph OUT_GRAPH", "--transforms TRANSFORMS"]),
        ("summarize_graph", ["--in_graph IN_GRAPH"]),
        ("optimise_saved_model", ["IN_DIR", "OUT_DIR", "--transforms TRANSFORMS"]),
    ],
)
def test_required_flags_are_required_in_usage(capsys, name, required):
    status, out, _ = run(capsys, TOOLS[name], "--help")
    usage = " ".join(out.split("\n\n")[0].split())  # argparse wraps usage lines anywhere
    for flag in required:
        assert flag in usage and f"[{flag}]" not in usage
    status, _, err = run(capsys, TOOLS[name])
    assert status == 2
    assert err.startswith(f"{name}: error: the following arguments are required: ")


def test_optimise_saved_model_help_explains_default_inputs_and_the_gate(capsys):
    _, out, _ = run(capsys, optimise_saved_model, "--help")
    flat = " ".join(out.split())
    assert "64 seeded rows generated from each input's dtype and shape" in flat
    assert "The gate is on by default." in flat
    assert "--no-compare skips the comparison and the gate, and says so on stderr" in flat


def test_list_prints_every_transform_with_its_arguments_and_defaults(capsys):
    status, out, _ = run(capsys, transform_graph, "--list")
    assert status == 0
    lines = out.splitlines()
    for name in registry.registered_names():
        assert any(line == name or line.startswith(f"{name}(") for line in lines), name
    assert "round_weights(num_steps=256, keep_float=(none; repeatable: Const names left as they are))" in lines
    assert any(line.startswith("quantize_weights(minimum_size=1024, per_channel=false, per_channel_for=")
               for line in lines)
    assert "ignore_errors" in lines[0]


def test_list_needs_no_other_flag_and_wins_over_missing_ones(capsys):
    status, out, err = run(capsys, transform_graph, "--list", "--in_graph=x")
    assert status == 0 and err == ""
    assert "fold_constants(" in out


def test_parsers_build_without_importing_tensorflow():
    code = (
        "import sys\n"
        "from serving_optimiser.cli import optimise_saved_model, summarize_graph, transform_graph\n"
        "for tool in (optimise_saved_model, summarize_graph, transform_graph):\n"
        "    tool.build_parser().format_help()\n"
        "print('tensorflow' in sys.modules)\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert completed.stdout == "False\n"
