"""The optimise stage's gate and its auto variant, in-process on the tiny Iris export: a list that
passes is written as it is (the same bytes as unguarded); one that breaks the model gets its most
harmful weights sent back until the evaluate stage's own judgement passes, decided on the
calibration split; ``evaluate.fallback: false`` writes the list as written; ``auto`` writes its
smallest passing candidate. Real TensorFlow graphs and SavedModels."""

import json

import numpy as np
import pytest
import yaml
from pipeline_helpers import ROOT

from serving_optimiser.errors import UserError
from serving_optimiser.pipeline.entries import ModelEntry
from serving_optimiser.pipeline.params import PipelineParams

FOLDS = ["remove_nodes(op=Identity)", "fold_constants(ignore_errors=true)"]
# Two levels per weight tensor: every weight becomes one of two values, which breaks the model.
BROKEN = [*FOLDS, "round_weights(num_steps=2)", "strip_unused_nodes"]
LOSSLESS = [*FOLDS, "strip_unused_nodes"]


def params_with(tmp_path, variants: dict, **evaluate) -> PipelineParams:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["optimise"] = variants
    data["evaluate"].update({"batch_rows": 20000, **evaluate})
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return PipelineParams.load(path)


@pytest.fixture(scope="module")
def frozen_dir(tmp_path_factory, tiny_export, tiny_samples):
    from serving_optimiser.pipeline.freeze import freeze_stage

    out = tmp_path_factory.mktemp("frozen")
    freeze_stage(str(tiny_export), tiny_samples, str(out / "frozen"), str(out / "summary.json"))
    return out / "frozen"


def run_stage(params, variant, frozen_dir, tiny_samples, tmp_path, samples=True):
    from serving_optimiser.pipeline.optimise import optimise_stage

    out, report = tmp_path / variant, tmp_path / f"{variant}.json"
    line = optimise_stage(params, variant, frozen_dir, out, tiny_samples if samples else None, report)
    return out, json.loads(report.read_text()), line


def judged(params, frozen_dir, tiny_samples, optimised, tmp_path):
    """The evaluate stage's gate failures of ``optimised`` against the frozen model."""
    from serving_optimiser.pipeline.fallback import PipelineJudge
    from serving_optimiser.pipeline.model import Samples
    from serving_optimiser.saved_model import FrozenModel

    judge = PipelineJudge(FrozenModel.load(frozen_dir), Samples.load(tiny_samples), params, tmp_path / "judge")
    return judge(FrozenModel.load(optimised).graph_def).failing


def graph_bytes(directory) -> bytes:
    from serving_optimiser.saved_model import FrozenModel

    return FrozenModel.load(directory).graph_def.SerializeToString(deterministic=True)


def test_a_breaking_list_gets_its_worst_weights_back_in_float_until_the_gate_passes(
        tmp_path, frozen_dir, tiny_samples):
    params = params_with(tmp_path, {"broken": BROKEN})
    out, report, line = run_stage(params, "broken", frozen_dir, tiny_samples, tmp_path)
    gate = report["gate"]
    assert gate["verdict"] == "pass" and gate["failing_outputs"] == []
    assert "gate: pass after" in line
    sent = gate["sent_back"]
    assert sent and all(unit["to"] == "float" and unit["transforms"] == ["round_weights"] for unit in sent)
    assert gate["model_runs"]["judged"] <= gate["model_runs"]["max_judged"]
    # Not every weight went back: the list still rounds some (else the gate would be a no-op).
    share = gate["weights"]["kept_float_share"]
    assert 0.0 < share < 1.0
    # The evaluate stage's own judgement agrees: the written graph passes it.
    assert judged(params, frozen_dir, tiny_samples, out, tmp_path) == []

    # Unguarded, the same list fails that judgement (so the test above can fail).
    off = params_with(tmp_path / "off", {"broken": BROKEN}, fallback=False)
    out_off, report_off, _ = run_stage(off, "broken", frozen_dir, tiny_samples, tmp_path / "off")
    assert report_off["gate"] == {"verdict": "not applied", "why": "evaluate.fallback is off"}
    failures = judged(off, frozen_dir, tiny_samples, out_off, tmp_path / "off")
    assert failures and any("class_ids" in failure or "probabilities" in failure for failure in failures)


def test_a_list_that_passes_is_the_same_bytes_as_unguarded(tmp_path, frozen_dir, tiny_samples):
    from serving_optimiser.graph_transforms import TransformGraph
    from serving_optimiser.saved_model import FrozenModel

    variant = [*FOLDS, "round_weights(num_steps=256)", "strip_unused_nodes"]
    params = params_with(tmp_path, {"rounded": variant})
    out, report, line = run_stage(params, "rounded", frozen_dir, tiny_samples, tmp_path)
    assert report["gate"]["verdict"] == "pass" and report["gate"]["sent_back"] == []
    assert report["gate"]["model_runs"]["judged"] == 1
    frozen = FrozenModel.load(frozen_dir)
    unguarded = TransformGraph(frozen.graph_def, frozen.input_node_names(), frozen.output_node_names(), variant)
    assert graph_bytes(out) == unguarded.SerializeToString(deterministic=True)
    assert "gate: passes as written" in line


def test_a_lossless_list_or_no_samples_runs_without_the_gate(tmp_path, frozen_dir, tiny_samples):
    params = params_with(tmp_path, {"lossless": LOSSLESS})
    _, report, _ = run_stage(params, "lossless", frozen_dir, tiny_samples, tmp_path)
    assert report["gate"] == {"verdict": "not applied", "why": "no lossy transform in the list"}


def test_auto_writes_the_smallest_passing_candidate(tmp_path, frozen_dir, tiny_samples):
    from serving_optimiser.saved_model.candidates import CANDIDATES

    params = params_with(tmp_path, {"auto": {"objective": "size"}})
    out, report, line = run_stage(params, "auto", frozen_dir, tiny_samples, tmp_path)
    names = [row["name"] for row in report["candidates"]]
    assert names == ["lossless", "weights_8bit_per_tensor", "weights_8bit_per_channel"]
    assert [row["transforms"] for row in report["candidates"]] == [list(CANDIDATES[n][0]) for n in names]
    rows = {row["name"]: row for row in report["candidates"]}
    # The tiny model's weights are under quantize_weights' minimum_size (1024 elements) but one:
    # whatever the figures, the rule holds on them.
    passing = [r for r in rows.values() if r["verdict"] == "pass" and r["name"] != "lossless"
               and r["size_ratio"] <= 0.95]
    expected = min(passing, key=lambda r: r["size_ratio"])["name"] if passing else "lossless"
    assert report["winner"] == expected
    assert f"auto: {expected}: pass" in line and "<- written" in line
    # Deterministic: a second run writes the same bytes.
    again, _, _ = run_stage(params, "auto", frozen_dir, tiny_samples, tmp_path / "again")
    assert graph_bytes(out) == graph_bytes(again)


def test_auto_entry_and_bad_objectives(tmp_path):
    params = params_with(tmp_path, {"auto": {"objective": "size"}, "lossless": LOSSLESS})
    entry = ModelEntry.find(params, "auto")
    assert entry.lossy == ("quantize_weights",) and entry.needs_onednn is False
    with pytest.raises(UserError, match=r"'optimise.auto.objective' = 'latency': the pipeline's auto variant "
                                        r"takes size only"):
        params_with(tmp_path, {"auto": {"objective": "latency"}}).transforms("auto")
    with pytest.raises(UserError, match=r"unknown key\(s\) optimise.auto.batch"):
        params_with(tmp_path, {"auto": {"batch": 1}}).auto_objective("auto")
    with pytest.raises(UserError, match=r"'evaluate.fallback' = 'yes' must be true or false"):
        params_with(tmp_path, {"lossless": LOSSLESS}, fallback="yes").evaluate()


def test_the_committed_params_have_an_auto_variant_and_the_gate_on():
    params = PipelineParams.load(ROOT / "params.yaml")
    assert params.auto_objective("auto") == "size"
    assert params.evaluate().fallback is True
    assert np.isclose(params.evaluate().batch_rows, 100000)


def test_the_judged_runs_use_the_batch_first_rows_up_to_fallback_batch_bytes(tmp_path, frozen_dir, tiny_samples):
    from serving_optimiser.chunks import row_bytes
    from serving_optimiser.pipeline.fallback import PipelineJudge
    from serving_optimiser.pipeline.figures import evaluation_data
    from serving_optimiser.pipeline.model import Samples
    from serving_optimiser.saved_model import FrozenModel

    samples = Samples.load(tiny_samples)
    per_row = row_bytes(samples.evaluation)
    params = params_with(tmp_path, {"lossless": LOSSLESS}, fallback_batch_bytes=100 * per_row + per_row // 2)
    judge = PipelineJudge(FrozenModel.load(frozen_dir), samples, params, tmp_path / "judge")
    whole = evaluation_data(samples, params.evaluate())["batch"]
    assert {key: len(rows) for key, rows in judge.data["batch"].items()} == {key: 100 for key in whole}
    for key, rows in judge.data["batch"].items():
        np.testing.assert_array_equal(rows, whole[key][:100])
    assert judge.figures(FrozenModel.load(frozen_dir).graph_def)["batch_rows"] == 100
    # The committed default holds Iris's whole batch (1.6 MB).
    committed = PipelineParams.load(ROOT / "params.yaml").evaluate()
    assert committed.fallback_batch_bytes == 16 * 2**20 and 100000 * per_row < committed.fallback_batch_bytes


@pytest.mark.onednn
def test_an_int8_layer_of_the_ranges_file_goes_back_to_float_when_the_variant_misses(
        tmp_path, frozen_dir, tiny_samples):
    """The calibrate stage's file ranks the int8 layers by their measured error; a layer sent back
    reaches the step through keep_float (a ranges_file wins over a calibration handed in)."""
    from serving_optimiser.pipeline.calibrate import calibrate, calibration_plan
    from serving_optimiser.pipeline.model import Samples

    ranges = tmp_path / "ranges.json"
    # The tiny model's hidden layers are 16 wide: under quantize_matmuls' default minimum_dim (32).
    int8 = [*FOLDS, f"quantize_matmuls(ranges_file={ranges}, minimum_dim=16)", "strip_unused_nodes"]
    lenient = params_with(tmp_path / "lenient", {"int8": int8})
    calibration = calibrate(frozen_dir, Samples.load(tiny_samples).calibration,
                            calibration_plan(lenient, str(ranges)), ranges)
    layers = set(calibration.layer_errors)  # the 16 x 16 hidden layer (the others are under 16)
    assert layers == {"dnn/hiddenlayer_1/MatMul"}
    out, report, _ = run_stage(lenient, "int8", frozen_dir, tiny_samples, tmp_path / "lenient")
    assert report["gate"]["verdict"] == "pass" and report["gate"]["sent_back"] == []
    assert sum(node.op.startswith("QuantizedMatMul") for node in load_graph(out).node) == len(layers)

    # Every class the same on the 20,000-row batch: int8 flips a few rows, so a layer goes back.
    strict = params_with(tmp_path / "strict", {"int8": int8}, tolerances={"agreement": 1.0})
    out, report, line = run_stage(strict, "int8", frozen_dir, tiny_samples, tmp_path / "strict")
    assert "gate: pass after" in line and "unit(s) sent back" in line
    gate = report["gate"]
    sent = {unit["name"] for unit in gate["sent_back"]}
    assert gate["verdict"] == "pass" and sent and sent <= layers
    assert all(unit["to"] == "float" and unit["kind"] == "layer" for unit in gate["sent_back"])
    int8_left = sum(node.op.startswith("QuantizedMatMul") for node in load_graph(out).node)
    assert int8_left == len(layers) - len(sent) == 0
    assert judged(strict, frozen_dir, tiny_samples, out, tmp_path / "strict") == []


def load_graph(directory):
    from serving_optimiser.saved_model import FrozenModel

    return FrozenModel.load(directory).graph_def
