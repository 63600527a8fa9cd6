"""The whole pipeline with literally default params on two published models (issue 28, point 7):
`dvc exp run -S model.source=saved_model -S model.path=... -S model.samples=... report` in a
temporary copy of the repo, params.yaml as committed, on mtcnn's face refinement network ONet (an
image CNN with PReLU, a softmax face probability and box and landmark regression heads) and
basic-pitch's note model (audio; note, onset and contour multi-label heads). Every variant and peer
of params.yaml runs; a variant or peer that misses the gate is a result, not a stopped run. ONet
took 41 minutes on the shared 2-core Xeon (load ~9; 16 CPU-minutes), basic-pitch over an hour
(docs/real_models.md, "The pipeline with default params"): make test-real only; make test runs mtcnn
RNet with tiny params (tests/pipeline/test_dvc_user_model.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from dvc_helpers import copy_sources, dvc_env, ran_stages
from dvc_helpers import run as run_command
from user_model import save_published_samples

from published_models import load

# Tens of minutes per model on 2 cores: make test-real and make test-full run them, make test does not
# (it runs mtcnn RNet through the pipeline with tiny params: tests/pipeline/test_dvc_user_model.py).
pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.full]

# Each model its own xdist group: the two runs go to the two workers side by side.
MODELS = [pytest.param(name, marks=pytest.mark.xdist_group(f"pipeline_{name}"))
          for name in ("mtcnn_onet", "basic_pitch_nmp")]


def run(cwd: Path, *command: str) -> str:
    return run_command(cwd, dvc_env(), *command)


@pytest.fixture(scope="module", params=MODELS)
def pipeline(request, tmp_path_factory) -> tuple[str, Path, str, dict]:
    """(model name, repo, dvc's output, params) after `dvc exp run ... report` with default params."""
    name = request.param
    base = tmp_path_factory.mktemp(f"pipeline-{name}")
    repo = base / "repo"
    copy_sources(repo)
    saved, samples = save_published_samples(name, base)
    run(repo, "git", "init", "-q", "-b", "main")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "params.yaml as committed")
    output = run(repo, "dvc", "exp", "run", "-n", "defaults", "-S", "model.source=saved_model",
                 "-S", f"model.path={saved}", "-S", f"model.samples={samples}", "report")
    return name, repo, output, yaml.safe_load((repo / "params.yaml").read_text())


def read(repo: Path, path: str) -> dict:
    return json.loads((repo / path).read_text())


def unsupported_peers(repo: Path, params: dict) -> dict[str, str]:
    """peer -> the reason it cannot convert this model (its evaluate stage's one-line record)."""
    records = {peer: read(repo, f"reports/models/{peer}.json") for peer in params["peers"]["variants"]}
    return {peer: record["unsupported"] for peer, record in records.items() if "unsupported" in record}


def test_every_variant_and_peer_of_params_yaml_ran_and_no_stage_failed(pipeline):
    _, repo, output, params = pipeline
    variants, peers = set(params["optimise"]), set(params["peers"]["variants"])
    per_variant = {f"{stage}@{v}" for stage in ("optimise", "convert", "evaluate", "latency") for v in variants}
    per_peer = {f"{stage}@{p}" for stage in ("convert_peer", "evaluate_peer", "latency_peer") for p in peers}
    shared = {"import_model", "model", "machine", "freeze", "calibrate", "reference", "report"}
    # run() asserted dvc's exit 0: no stage failed, and the stages that ran are exactly these.
    assert ran_stages(output) == shared | per_variant | per_peer
    assert "ERROR" not in output and "Traceback" not in output
    summary = (repo / "reports" / "summary.md").read_text()
    for variant in variants:
        assert f"| {variant} |" in summary, variant


def test_the_peers_that_convert_have_figures_and_the_others_their_one_line(pipeline):
    _, repo, _, params = pipeline
    summary = (repo / "reports" / "summary.md").read_text()
    unsupported = unsupported_peers(repo, params)
    for peer in params["peers"]["variants"]:
        metrics = read(repo, f"metrics/models/{peer}.json")
        if peer in unsupported:
            assert metrics == {"unsupported": True}, peer
            lines = [line for line in summary.splitlines() if line.startswith(f"- {peer}: ")]
            assert len(lines) == 1 and unsupported[peer] in lines[0], summary
            assert f"| {peer} |" not in summary
        else:
            figures = read(repo, f"reports/models/{peer}.json")
            assert figures["size_bytes"] > 0 and figures["gate"]["verdict"] in ("pass", "fail"), peer
            assert 0 <= figures["max_rel_diff"] < float("inf"), peer
            assert f"| {peer} |" in summary, peer
            timing = read(repo, f"reports/latency/{peer}.json")
            assert "1" in timing["measured"][peer]["batches"], peer
    # The float peers compute the export's function: at most one of the three formats may fail to convert.
    assert len({"litert_fp32", "onnx_fp32", "openvino_fp32"} - set(unsupported)) >= 2, unsupported


def test_each_output_is_judged_by_its_kind_and_the_verdicts_are_in_the_report(pipeline):
    name, repo, _, params = pipeline
    expected = {output: spec.kind for output, spec in load(name).outputs.items()}
    summary = (repo / "reports" / "summary.md").read_text()
    assert "## The gate, by output kind" in summary
    gate = summary.split("## The gate, by output kind", 1)[1].split("\n## ", 1)[0]
    unsupported = unsupported_peers(repo, params)
    judged = [*params["optimise"], *(p for p in params["peers"]["variants"] if p not in unsupported)]
    for model in judged:
        figures = read(repo, f"reports/models/{model}.json")
        assert {output: figures["outputs"][output]["kind"] for output in expected} == expected, model
        failing = [output for output in expected if figures["outputs"][output]["verdict"] == "fail"]
        assert (figures["gate"]["verdict"] == "fail") == bool(failing), model
        row = next(line for line in gate.splitlines() if line.startswith(f"| {model} |"))
        for output, kind in expected.items():
            assert f"{kind}: " in row, (model, output, row)
    # Lossless computes the same function: every output passes, within float rounding.
    lossless = read(repo, "reports/models/lossless.json")
    assert lossless["gate"]["verdict"] == "pass" and lossless["max_rel_diff"] < 1e-4
