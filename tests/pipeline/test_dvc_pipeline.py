"""End to end: `dvc repro` on tiny params in a temporary copy of the repo, reruns, and sharing
artefacts through a local DVC remote. Real git, real DVC, real TensorFlow."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from dvc_helpers import copy_sources, dvc_env, ran_stages
from dvc_helpers import run as run_command

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dvc_pipeline")]

TINY_PARAMS = {
    "train": {"hidden_units": [64, 64], "epochs": 40},
    "evaluate": {"batch_rows": 5000, "tolerances": {"agreement": 0.95}},
    "latency": {"batch_sizes": [1, 8, 64, 5000], "repeats": 5, "calls_per_round": 5, "rows_per_round": 128,
                "load_repeats": 1},
}
VARIANTS = ("notebook", "lossless", "per_channel", "per_tensor", "int8", "int8_dynamic", "auto")
PEERS = (
    "litert_fp32", "litert_fp16", "litert_int8_dynamic", "litert_int8_full", "onnx_fp32", "onnx_int8_dynamic",
    "openvino_fp32", "openvino_int8",
)
LATENCY_STAGES = {f"latency@{v}" for v in VARIANTS} | {f"latency_peer@{p}" for p in PEERS}


def run(cwd: Path, *command: str) -> str:
    return run_command(cwd, dvc_env(), *command)


def set_params(repo: Path, changes: dict) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    base = tmp_path_factory.mktemp("dvc")
    repo = base / "repo"
    copy_sources(repo)
    set_params(repo, TINY_PARAMS)
    run(repo, "git", "init", "-q", "-b", "main")
    run(repo, "dvc", "remote", "modify", "local", "url", str(base / "remote"))
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "tiny params")
    output = run(repo, "dvc", "repro")
    return repo, base, output


def test_repro_runs_every_stage_and_writes_metrics(repo):
    repo, _, output = repo
    per_variant = {f"{stage}@{v}" for stage in ("optimise", "convert", "evaluate", "latency") for v in VARIANTS}
    per_peer = {f"{stage}@{p}" for stage in ("convert_peer", "evaluate_peer", "latency_peer") for p in PEERS}
    shared = {"machine", "prepare", "train", "export", "import_model", "model", "freeze", "calibrate", "reference",
              "report"}
    assert ran_stages(output) == shared | per_variant | per_peer
    for peer in PEERS:
        figures = json.loads((repo / "reports" / "models" / f"{peer}.json").read_text())
        assert figures["agreement"] >= 0.95 and figures["size_bytes"] > 0, peer
    exported = json.loads((repo / "reports" / "models" / "exported.json").read_text())
    assert exported["eval_accuracy"] >= 0.8
    lossless = json.loads((repo / "reports" / "models" / "lossless.json").read_text())
    assert lossless["agreement"] == 1.0 and lossless["max_dp"] < 1e-5
    notebook = json.loads((repo / "metrics" / "models" / "notebook.json").read_text())
    assert notebook["agree"] >= 0.95 and notebook["size_x"] < 0.5
    machine = json.loads((repo / "reports" / "machine.json").read_text())
    timing = json.loads((repo / "reports" / "latency" / "notebook.json").read_text())
    assert timing["machine"] == machine and machine["cpu"]
    assert set(timing["measured"]["notebook"]["batches"]) == {"1", "8", "64", "5000"}
    assert timing["measured"]["notebook"]["batches"]["5000"]["p50_ms"] > 0
    assert set(json.loads((repo / "metrics" / "latency" / "notebook.json").read_text())) == {"t5k_x", "t1_x"}
    openvino = json.loads((repo / "reports" / "latency" / "openvino_int8.json").read_text())
    assert openvino["measured"]["openvino_int8"]["how"] == "OpenVINO CPU, 2 threads"
    curve = json.loads((repo / "metrics" / "batch_curve.json").read_text())
    assert {row["batch_size"] for row in curve} == {1, 8, 64, 5000}
    assert {row["model"] for row in curve} >= {"exported", *VARIANTS, *PEERS}
    freeze = json.loads((repo / "reports" / "freeze.json").read_text())
    assert freeze["frozen"]["variable_count"] == 0
    assert (repo / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").read_text().count("\n") == 41
    assert (repo / "metrics" / "models.csv").read_text().startswith("model,")
    summary = (repo / "reports" / "summary.md").read_text()
    assert "## Best per objective" in summary and "Timings measured on:" in summary
    assert "## Which to serve, by batch size" in summary and "- any runtime: 1" in summary
    assert "| openvino_int8 |" in summary
    signatures = (repo / "reports" / "signatures" / "notebook.txt").read_text()
    for name in ("signature_def['predict']", "signature_def['serving_default']", "class_ids", "classes", "logits"):
        assert name in signatures
    # The optimise stage's gate: every lossy Iris list passes as written (nothing sent back), and
    # the auto variant writes the smallest passing candidate, which is one of the committed lists.
    for variant in ("notebook", "per_tensor", "per_channel", "int8", "int8_dynamic"):
        gate = json.loads((repo / "reports" / "optimise" / f"{variant}.json").read_text())["gate"]
        assert gate["verdict"] == "pass" and gate["sent_back"] == [] and gate["model_runs"]["judged"] == 1, variant
    auto = json.loads((repo / "reports" / "optimise" / "auto.json").read_text())
    same_list = {"lossless": "lossless", "weights_8bit_per_tensor": "per_tensor",
                 "weights_8bit_per_channel": "per_channel"}
    assert [row["name"] for row in auto["candidates"]] == list(same_list)
    assert all(row["verdict"] == "pass" for row in auto["candidates"])
    smallest = min(auto["candidates"], key=lambda row: row["size_ratio"])
    assert auto["winner"] == (smallest["name"] if smallest["size_ratio"] <= 0.95 else "lossless")
    written, twin = repo / "models" / "optimised" / "auto", repo / "models" / "optimised" / same_list[auto["winner"]]
    assert sorted(f.name for f in written.iterdir()) == sorted(f.name for f in twin.iterdir())
    assert all((written / f.name).read_bytes() == f.read_bytes() for f in twin.iterdir() if f.is_file())
    assert "| fallback (optimise stage) |" in summary and f"| auto | pass | {auto['winner']}: " in summary
    # The deterministic figures and the timings live in separate files: `dvc metrics show` lists both.
    shown = run(repo, "dvc", "metrics", "show")
    assert max(len(line) for line in shown.splitlines()) <= 120, shown


def test_second_repro_runs_nothing_and_variant_edit_reruns_only_that_variant(repo):
    repo, _, _ = repo
    # The machine stage always runs; on the same machine its file is unchanged, so nothing else does.
    assert ran_stages(run(repo, "dvc", "repro")) == {"machine"}
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "first run")
    before = json.loads((repo / "reports" / "models" / "lossless.json").read_text())
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["optimise"]["lossless"] = [t for t in params["optimise"]["lossless"] if t != "sort_by_execution_order"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran_stages(run(repo, "dvc", "repro")) == {
        "machine", "optimise@lossless", "convert@lossless", "evaluate@lossless", "latency@lossless", "report"
    }
    diff = json.loads(run(repo, "dvc", "metrics", "diff", "HEAD", "--json").splitlines()[0])
    assert set(diff) <= {"metrics/models/lossless.json", "metrics/latency/lossless.json"}
    after = json.loads((repo / "reports" / "models" / "lossless.json").read_text())
    assert after["agreement"] == before["agreement"] == 1.0
    set_params(repo, {"train": {"epochs": 41}})
    status = run(repo, "dvc", "status", "--json")
    assert json.loads(status.splitlines()[-1]).keys() == {"train", "machine"}
    run(repo, "git", "checkout", "--", "params.yaml")


def test_a_broken_variant_fails_its_evaluate_stage_naming_it(repo):
    repo, _, _ = repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["optimise"]["broken"] = ["round_weights(num_steps=2)", "quantize_weights(minimum_size=1)"]
    # Unguarded: the optimise stage's fallback would send the weights back until the list passes
    # (it does: tests/pipeline/test_optimise_gate.py), and there would be no failure to stop on.
    params["evaluate"]["fallback"] = False
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = subprocess.run(
            ["dvc", "repro", "evaluate@broken"], cwd=repo, env=dvc_env(), capture_output=True, text=True
        )
        assert result.returncode != 0
        errors = [line for line in result.stderr.splitlines() if line.startswith("evaluate: ")]
        assert len(errors) == 1, result.stderr
        assert errors[0].startswith(
            "evaluate: error: broken: fails the gate: output 'class_ids' (label): label agreement "
        )
        assert "Traceback" not in result.stderr
        assert not (repo / "metrics" / "models" / "broken.json").exists()
    finally:
        run(repo, "git", "checkout", "--", ".")
        for leftover in ("models/optimised/broken", "models/converted/broken"):
            shutil.rmtree(repo / leftover, ignore_errors=True)


def test_push_then_pull_into_a_second_clone(repo):
    repo, base, _ = repo
    run(repo, "dvc", "repro")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "lock", "--allow-empty")
    run(repo, "dvc", "push")
    clone = base / "clone"
    run(base, "git", "clone", "-q", str(repo), str(clone))
    run(clone, "dvc", "pull")
    for artefact in ("models/exported", "models/frozen", "models/converted/notebook", "data/prepared"):
        originals = sorted(p.relative_to(repo) for p in (repo / artefact).rglob("*") if p.is_file())
        copies = sorted(p.relative_to(clone) for p in (clone / artefact).rglob("*") if p.is_file())
        assert originals == copies and originals
        for path in originals:
            assert (repo / path).read_bytes() == (clone / path).read_bytes(), path
    assert json.loads(run(clone, "dvc", "status", "--json").splitlines()[-1]) == {"machine": ["always changed"]}
    assert ran_stages(run(clone, "dvc", "repro")) == {"machine"}


def test_pull_says_in_one_line_why_it_cannot(repo):
    repo, base, _ = repo
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "the run the clone will try to pull", "--allow-empty")
    clone = base / "clone-without-remote"
    run(base, "git", "clone", "-q", str(repo), str(clone))

    def pull() -> list[str]:
        result = subprocess.run(
            [sys.executable, "scripts/pull.py"], cwd=clone, env=dvc_env(), capture_output=True, text=True
        )
        assert result.returncode == 1
        return result.stderr.splitlines()

    run(clone, "dvc", "remote", "modify", "local", "url", str(base / "nowhere"))
    lines = pull()
    assert len(lines) == 1 and "does not exist on this machine" in lines[0] and "`make all`" in lines[0], lines
    (base / "empty-remote").mkdir()
    run(clone, "dvc", "remote", "modify", "local", "url", str(base / "empty-remote"))
    lines = pull()
    assert len(lines) == 1 and "missing there" in lines[0] and "`make all`" in lines[0], "\n".join(lines)


INT8_VARIANTS = ("int8", "int8_dynamic")


@pytest.mark.parametrize("onednn", ["0", "1"], ids=["onednn_off", "onednn_on"])
def test_every_converted_model_serves_through_the_cpp_loader(repo, tmp_path, onednn):
    """TF Serving's loader (the C API) on every converted model of the pipeline: answers equal to
    tf.saved_model.load's within float rounding, warm-up records replayed; an int8 model with
    oneDNN off fails at load through both loaders, naming the fix, never at a request."""
    import pandas as pd
    from serving_check import check_in_child

    from serving_optimiser.saved_model.compare import within_rounding

    repo, _, _ = repo
    rows = pd.read_csv(repo / "data" / "prepared" / "eval.csv")
    inputs = {name: rows[name].to_numpy(np.float32) for name in ("sepal_length", "sepal_width", "petal_length",
                                                                 "petal_width")}
    directories = sorted(d for d in (repo / "models" / "converted").iterdir() if d.is_dir())
    assert [d.name for d in directories] == sorted(VARIANTS)
    answers = check_in_child(tmp_path, inputs, directories, {**dvc_env(), "TF_ENABLE_ONEDNN_OPTS": onednn})
    for name, answer in answers.items():
        if onednn == "0" and name in INT8_VARIANTS:
            assert "int8_ops_need_oneDNN-set_TF_ENABLE_ONEDNN_OPTS_to_1" in answer["errors"]["tf"], name
            assert "TF_ENABLE_ONEDNN_OPTS=1" in answer["errors"]["c_api"], name
            continue
        assert not answer["errors"], (name, answer["errors"])
        assert int(answer["warmup_replies"]) == 2, name  # batch 1 for each of the two signatures
        arrays = answer["arrays"]
        keys = sorted(k.split("/", 1)[1] for k in arrays if k.startswith("c_api/"))
        assert len(keys) == 8, keys  # predict and serving_default, four outputs each
        for key in keys:
            assert within_rounding(arrays[f"tf/{key}"], arrays[f"c_api/{key}"]), (name, key)


def stale_stages(repo: Path) -> set[str]:
    return set(json.loads(run(repo, "dvc", "status", "--json").splitlines()[-1]))


def stale_after_appending_a_comment(repo: Path, module: str) -> set[str]:
    """The stages `dvc status` calls stale (none re-run) with a comment appended to ``module``,
    beside those stale before; the module is put back after."""
    path = repo / "src/serving_optimiser" / module
    original = path.read_bytes()
    before = stale_stages(repo)
    try:
        path.write_bytes(original + b"\n# an edit that changes nothing it computes\n")
        return stale_stages(repo) - before
    finally:
        path.write_bytes(original)


def test_editing_one_module_makes_only_the_stages_that_run_it_stale(repo):
    """A stage reruns only when code it runs changed (dvc.yaml's deps, tests/dvc_deps.py): a
    transform module makes stale the stages that apply transforms, and a peer runtime module only
    that runtime's peers; neither touches model, freeze, reference, evaluate, latency or report."""
    repo, _, _ = repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    variants = set(params["optimise"])
    openvino = {name for name, entry in params["peers"]["variants"].items() if entry["format"] == "openvino"}
    assert variants and openvino
    # The machine stage is always stale (it describes this machine); anything else an earlier test
    # left stale (an edited variant put back) is brought up to date first.
    if stale_stages(repo) - {"machine"}:
        run(repo, "dvc", "repro")
    assert stale_stages(repo) <= {"machine"}
    assert stale_after_appending_a_comment(repo, "graph_transforms/transforms/constants.py") == (
        {f"optimise@{variant}" for variant in variants} | {"calibrate"})
    assert stale_after_appending_a_comment(repo, "peers/openvino.py") == {
        f"{stage}@{peer}" for stage in ("convert_peer", "evaluate_peer", "latency_peer") for peer in openvino}
    # Put back, each module leaves nothing stale behind (dvc compares contents, not times).
    assert stale_stages(repo) <= {"machine"}


def test_another_machine_re_times_every_model_and_nothing_else(repo, tmp_path):
    """Emulated with TF_ENABLE_ONEDNN_OPTS=0 (a CPU whose oneDNN default is off): the machine file
    changes, so every latency stage is stale and no deterministic one; the int8 variant's stage
    then times the float export both ways. Last in the module: it leaves the workspace re-timed."""
    repo, _, _ = repo
    run(repo, "dvc", "repro")  # whatever an earlier test left stale (an edited variant put back)
    assert stale_stages(repo) == {"machine"}
    off = dvc_env(TF_ENABLE_ONEDNN_OPTS="0")
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0":
        # The suite itself runs as on an off-default CPU (TF_ENABLE_ONEDNN_OPTS=0 make test): another
        # recorded setting stands in for the other machine.
        off["OMP_NUM_THREADS"] = "2" if os.environ.get("OMP_NUM_THREADS") != "2" else "1"
    output = run_command(repo, off, "dvc", "repro", "machine")
    assert ran_stages(output) == {"machine"}
    machine = json.loads((repo / "reports" / "machine.json").read_text())
    assert machine["onednn"] is False and machine["onednn_why"] == "off (TF_ENABLE_ONEDNN_OPTS=0)"
    # Stale: every latency stage (its machine dep changed) and nothing else (the report follows once they ran).
    assert stale_stages(repo) == {"machine", *LATENCY_STAGES}
    output = run_command(repo, off, "dvc", "repro", "latency@int8", "latency@lossless")
    assert ran_stages(output) == {"machine", "latency@int8", "latency@lossless"}
    int8 = json.loads((repo / "reports" / "latency" / "int8.json").read_text())["measured"]
    assert set(int8) == {"exported", "exported_onednn", "int8"}
    assert int8["exported"]["how"] == "TensorFlow, oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)"
    assert int8["exported_onednn"]["how"] == "TensorFlow, oneDNN on (TF_ENABLE_ONEDNN_OPTS=1)"
    assert int8["int8"]["how"] == "TensorFlow, oneDNN on (TF_ENABLE_ONEDNN_OPTS=1: its int8 ops need it)"
    assert all(point["ratio"] == 1.0 for point in int8["exported"]["batches"].values())
    lossless = json.loads((repo / "reports" / "latency" / "lossless.json").read_text())["measured"]
    assert set(lossless) == {"exported", "lossless"}
    assert lossless["lossless"]["how"] == "TensorFlow, oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)"
    # The report over these files (the other models still hold the first run's timings).
    outputs = {flag: str(tmp_path / name) for flag, name in (
        ("--out-plots", "plots.json"), ("--out-curve", "curve.json"), ("--out-table", "models.csv"),
        ("--out-summary", "summary.md"))}
    run_command(repo, off, sys.executable, "scripts/report.py", "--details-dir", "reports/models",
                "--latency-details-dir", "reports/latency", *[item for pair in outputs.items() for item in pair])
    summary = (tmp_path / "summary.md").read_text()
    assert "| exported_onednn |" in summary
    assert "- oneDNN is off by default on this CPU: every ratio is against the export" in summary
    assert "- TensorFlow, oneDNN on (TF_ENABLE_ONEDNN_OPTS=1: its int8 ops need it): int8" in summary
