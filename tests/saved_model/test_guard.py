"""The gate on lossy transforms (saved_model.guard): the ranking in one pass, the bound on runs, the
order units go back in, the same bytes when a list passes, the CLI's failure, and the models it must
rescue with default options: a wide & deep in calibrated int8, a tf.Module with a while loop in a
cond under 8-bit weights, and (marker real) basic-pitch under the notebook's list."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import tensorflow as tf
from saved_model.models import (
    CALIBRATED_INT8,
    LOSSLESS,
    QUANTISING,
    build_embedding_wide_deep,
    embedding_wide_deep_inputs,
    iris_inputs,
)
from saved_model.test_cli import run_command

from serving_optimiser.graph_transforms import TransformGraph, parse_and_check
from serving_optimiser.graph_transforms.registry import lossy_names
from serving_optimiser.saved_model import freeze_saved_model, optimise_saved_model
from serving_optimiser.saved_model.guard import (
    TransformSteps,
    Verdict,
    doubling,
    guard_transforms,
    max_judged_runs,
    rank_units,
)
from serving_optimiser.saved_model.output_kinds import DEFAULT_TOLERANCES

# Every weight of the small module is under quantize_weights' default minimum_size of 1024: lowered
# so that all three are quantised.
EIGHT_BIT = "quantize_weights(minimum_size=1)"
QUANTIZE_WEIGHTS = (
    "remove_nodes(op=Identity) fold_constants(ignore_errors=true) fold_batch_norms fold_old_batch_norms "
    "quantize_weights strip_unused_nodes sort_by_execution_order"
)


class ThreeLayers(tf.Module):
    """16 -> 32 -> 32 -> 4, seeded. The middle weight holds one value 100x its spread: one 8-bit
    range per tensor then resolves the rest in steps wider than themselves (the tensor that hurts);
    per channel only its own column suffers."""

    def __init__(self) -> None:
        rng = np.random.default_rng(3)
        middle = rng.normal(0, 0.2, (32, 32))
        middle[0, 0] = 25.0
        self.weights = [tf.Variable(rng.normal(0, 0.3, shape).astype(np.float32), name=name)
                        for shape, name in (((16, 32), "first"), ((32, 32), "middle"), ((32, 4), "last"))]
        self.weights[1].assign(middle.astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 16], tf.float32, name="x")])
    def serve(self, x):
        h = tf.nn.relu(x @ self.weights[0])
        h = tf.nn.relu(h @ self.weights[1])
        return {"scores": h @ self.weights[2]}


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory):
    directory = tmp_path_factory.mktemp("guard") / "three_layers"
    module = ThreeLayers()
    tf.saved_model.save(module, str(directory), signatures={"serving_default": module.serve})
    return directory


def _rows(count: int = 256, seed: int = 0) -> dict:
    return {"serving_default": {"x": np.random.default_rng(seed).normal(0, 1, (count, 16)).astype(np.float32)}}


def _weight_names(frozen) -> dict[tuple[int, ...], str]:
    """Shape -> name of each float weight Const of the frozen module."""
    return {tuple(d.size for d in node.attr["value"].tensor.tensor_shape.dim): node.name
            for node in frozen.graph_def.node if node.op == "Const" and node.attr["dtype"].type == 1
            and len(node.attr["value"].tensor.tensor_shape.dim) == 2}


def test_the_lossy_transforms_are_marked_where_registered():
    assert lossy_names() == ["quantize_convs", "quantize_matmuls", "quantize_nodes", "quantize_weights",
                             "round_weights"]


@pytest.mark.parametrize(("count", "sizes"), [(0, []), (1, [1]), (2, [1, 2]), (5, [1, 2, 4, 5]), (8, [1, 2, 4, 8])],
                         ids=["none", "one", "two", "five", "eight"])
def test_units_go_back_in_doubling_rounds(count, sizes):
    assert doubling(count) == sizes


def test_the_bound_on_judged_runs():
    # One run as written; per-channel rounds 1, 2, 4, 8, 16, 21; float rounds 1, 2, ..., 32, 39;
    # bisection between two float sizes at most ceil(log2 39) = 6 (tries and the re-run).
    assert max_judged_runs(39, 21) == 1 + 6 + 7 + 6
    assert max_judged_runs(0, 0) == 1
    assert max_judged_runs(1, 0) == 2
    for units in range(2, 200):
        assert max_judged_runs(units, units) == 3 * int(np.ceil(np.log2(units))) + 3


def test_ranking_is_one_pass_and_puts_the_tensor_that_hurts_first(three_layers):
    frozen = freeze_saved_model(three_layers)
    names = _weight_names(frozen)
    steps = TransformSteps(frozen, parse_and_check(EIGHT_BIT), None)
    units, runs = rank_units(frozen, steps, steps.run(), _rows())
    assert runs == 1  # every weight measured in one call of one probe graph
    assert units[0].name == names[(32, 32)]
    assert {unit.name for unit in units} == set(names.values())
    assert all(unit.measured == "consumer output error" and unit.per_channel for unit in units)
    # The middle layer's output moves by tens of percent in its worst channel; the others by well
    # under one percent (measured: 0.45, 0.004, 0.002).
    assert units[0].error > 0.1 > 0.01 > max(unit.error for unit in units[1:])


def _guarded(frozen, judge_passes, caplog):
    """The gate on the module with a judge that passes when ``judge_passes(graph nodes)``."""
    calls = []

    def judge(graph_def):
        calls.append(graph_def)
        nodes = {node.name: node for node in graph_def.node}
        return Verdict([] if judge_passes(nodes) else ["signature 'serving_default' output 'scores': off"])

    with caplog.at_level(logging.INFO, logger="serving_optimiser"):
        guarded = guard_transforms(frozen, parse_and_check(EIGHT_BIT), _rows(), None, judge=judge)
    return guarded, calls


def test_the_most_harmful_tensor_goes_back_first_and_alone(three_layers, caplog):
    """Mutation check: a guard that sent the least harmful tensor back first would need more runs
    and more tensors sent back."""
    frozen = freeze_saved_model(three_layers)
    middle = _weight_names(frozen)[(32, 32)]
    guarded, calls = _guarded(frozen, lambda nodes: nodes[middle].op == "Const" or "axis" in nodes[middle].attr,
                              caplog)
    assert guarded.passed and len(calls) == 2
    assert [(unit["name"], unit["to"]) for unit in guarded.report["sent_back"]] == [(middle, "per_channel")]
    assert f"tensor '{middle}' (consumer output error" in caplog.text
    assert "goes back to per-channel ranges" in caplog.text
    assert caplog.text.count("goes back to") == 1
    assert guarded.report["model_runs"] == {"judged": 2, "ranking": 1, "max_judged": max_judged_runs(3, 3)}


def test_per_channel_first_then_float_within_the_bound(three_layers, caplog):
    frozen = freeze_saved_model(three_layers)
    middle = _weight_names(frozen)[(32, 32)]
    guarded, calls = _guarded(frozen, lambda nodes: nodes[middle].op == "Const", caplog)
    # 1 as written, per channel 1, 2, 3, then float 1: it passes there, nothing to bisect.
    assert guarded.passed and len(calls) == 5 <= max_judged_runs(3, 3)
    sent = {unit["name"]: unit["to"] for unit in guarded.report["sent_back"]}
    assert sent[middle] == "float" and sorted(sent.values()) == ["float", "per_channel", "per_channel"]
    weights = guarded.report["weights"]
    assert weights["exact_float_bytes"] == 32 * 32 * 4 and weights["kept_float_share"] == pytest.approx(
        32 * 32 / (16 * 32 + 32 * 32 + 32 * 4))


def test_a_gate_that_cannot_pass_returns_every_unit_float(three_layers, caplog):
    frozen = freeze_saved_model(three_layers)
    guarded, calls = _guarded(frozen, lambda nodes: False, caplog)
    assert not guarded.passed and len(calls) <= max_judged_runs(3, 3)
    assert guarded.report["weights"]["kept_float_share"] == 1.0
    assert guarded.failing == ["signature 'serving_default' output 'scores': off"]


def test_the_default_judge_compares_with_the_frozen_model_itself(three_layers, caplog):
    """What the pipeline calls: no judge given, the frozen float model is the reference."""
    frozen = freeze_saved_model(three_layers)
    with caplog.at_level(logging.INFO, logger="serving_optimiser"):
        # Tolerances 10x tighter than the default, which this list meets as it is.
        tight = dataclasses.replace(DEFAULT_TOLERANCES, rms_diff_of_range=0.001, max_diff_of_range=0.005)
        guarded = guard_transforms(frozen, parse_and_check(EIGHT_BIT), _rows(), _rows(128, seed=1), tight)
    middle = _weight_names(frozen)[(32, 32)]
    assert guarded.passed and guarded.report["verdict"] == "pass"
    assert guarded.report["sent_back"][0]["name"] == middle
    assert "guard: signature 'serving_default' output 'scores' (regression): " in caplog.text


def test_transform_graph_keeps_the_old_tools_behaviour(three_layers):
    frozen = freeze_saved_model(three_layers)
    graph = TransformGraph(frozen.graph_def, frozen.input_node_names(), frozen.output_node_names(), EIGHT_BIT)
    assert sum(node.op == "Dequantize" for node in graph.node) == 3  # no gate: every weight quantised


def test_a_list_that_passes_is_written_byte_for_byte_as_without_the_gate(tf1_iris, tmp_path):
    inputs = {key: iris_inputs(64) for key in ("predict", "serving_default")}
    gated = optimise_saved_model(tf1_iris, tmp_path / "gated", QUANTISING, sample_inputs=inputs)
    ungated = optimise_saved_model(tf1_iris, tmp_path / "ungated", QUANTISING, sample_inputs=inputs, gate=False)
    assert gated["gate"]["sent_back"] == [] and gated["gate"]["model_runs"]["judged"] == 1
    assert "gate" not in ungated
    written = [(tmp_path / name / "saved_model.pb").read_bytes() for name in ("gated", "ungated")]
    assert written[0] == written[1]


@pytest.fixture(scope="module")
def embedding_wide_deep(tmp_path_factory):
    directory = tmp_path_factory.mktemp("guard") / "embedding_wide_deep"
    build_embedding_wide_deep(str(directory))
    return directory


@pytest.mark.onednn
def test_wide_and_deep_int8_passes_because_its_layers_go_back(embedding_wide_deep, tmp_path, caplog):
    calibration = {"serving_default": embedding_wide_deep_inputs(1024, seed=1)}
    samples = {"serving_default": embedding_wide_deep_inputs(2048, seed=2)}
    ungated = optimise_saved_model(embedding_wide_deep, tmp_path / "ungated", CALIBRATED_INT8, gate=False,
                                   calibration_inputs=calibration, sample_inputs=samples)
    # Measured: both layers under max_layer_error (0.025 and 0.012), yet 3.4 % of the clicks flip.
    assert ungated["failing_outputs"] and ungated["calibration"][-1]["float_by_guard"] == []
    with caplog.at_level(logging.INFO, logger="serving_optimiser"):
        report = optimise_saved_model(embedding_wide_deep, tmp_path / "gated", CALIBRATED_INT8,
                                      calibration_inputs=calibration, sample_inputs=samples)
    assert report["verdict"] == "pass"
    gate = report["gate"]
    assert gate["decided_on"] == "calibration inputs" and gate["judged_on"] == "sample inputs"
    first = "StatefulPartitionedCall/MatMul"
    assert gate["sent_back"][0]["name"] == first  # the larger calibrated error goes first
    assert report["calibration"][-1]["float_by_agreement"][0] == first
    assert f"quantize_matmuls layer '{first}' (int8 output error 0.02" in caplog.text
    assert gate["model_runs"]["judged"] <= gate["model_runs"]["max_judged"]


def _build_while_cond_with_an_outlier(directory: str) -> dict:
    """The zoo's tf.Module (a tf.while_loop over a digit's rows inside a tf.cond), its recurrent
    weight holding one value 30x its spread, as trained weights often do: per tensor, 8 bits then
    resolve the rest of it in steps a fifth of their spread, and the error compounds over the
    8 steps. The logits are fitted on the states it then computes. Returns the held-out inputs."""
    from model_builders.zoo import MODULE_CLASSES, RecurrentClassifier, digit_sequences, ridge_head

    module = RecurrentClassifier()
    recurrent = module.wh.numpy()
    recurrent[3, 5] = 30.0 * recurrent.std()
    module.wh.assign(recurrent)
    sequences, labels = digit_sequences()
    kernel, bias = ridge_head(module.state(tf.constant(sequences)).numpy(), labels, MODULE_CLASSES)
    module.head.assign(kernel)
    module.head_bias.assign(bias)
    tf.saved_model.save(module, directory, signatures={"serving_default": module.classify})
    held_out, _ = digit_sequences(held_out=True)
    return {"serving_default": {"sequence": held_out}}


@pytest.mark.slow
def test_while_loop_in_a_cond_under_eight_bit_weights(tmp_path, caplog):
    samples = _build_while_cond_with_an_outlier(str(tmp_path / "module"))
    ungated = optimise_saved_model(tmp_path / "module", tmp_path / "ungated", QUANTIZE_WEIGHTS, sample_inputs=samples,
                                   gate=False)
    assert ungated["failing_outputs"]
    with caplog.at_level(logging.INFO, logger="serving_optimiser"):
        report = optimise_saved_model(tmp_path / "module", tmp_path / "gated", QUANTIZE_WEIGHTS, sample_inputs=samples)
    assert report["verdict"] == "pass"
    sent = report["gate"]["sent_back"]
    # The recurrent weight is read inside the loop: no consumer output to fetch, its own error ranks it.
    recurrent = next(unit for unit in report["gate"]["ranked"] if unit["measured"] == "weight error")
    assert sent[0]["name"] == recurrent["name"] == report["gate"]["ranked"][0]["name"]
    lossless = optimise_saved_model(tmp_path / "module", tmp_path / "lossless", LOSSLESS, sample_inputs=samples)
    assert report["size_bytes"]["output"] < lossless["size_bytes"]["output"]


@pytest.mark.slow
def test_command_that_cannot_meet_the_tolerance_exits_3_naming_outputs_and_units(tf1_iris, tmp_path):
    # Dropping the ReLUs is a loss no lossy unit explains: every weight goes back and it still fails.
    result = run_command(tf1_iris, tmp_path / "out", "--transforms", "remove_nodes(op=Relu) quantize_weights",
                         "--sample-inputs", _iris_npz(tmp_path))
    assert result.returncode == 3, result.stderr
    assert not (tmp_path / "out").exists()
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("optimise_saved_model: error: signature ")
    assert "with every lossy tensor or layer back to float (" in error and "not written" in error
    # The report still says what the gate tried: every weight back to float, all of them kept float.
    assert "weights kept float: 100.0% of" in result.stdout
    assert "  back to float: quantize_weights weight '" in result.stdout


@pytest.mark.slow
def test_no_compare_skips_the_gate_and_says_so(tf1_iris, tmp_path):
    result = run_command(tf1_iris, tmp_path / "out", "--transforms", QUANTISING, "--no-compare")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("not compared, so not gated") == 1


def _iris_npz(tmp_path):
    path = tmp_path / "inputs.npz"
    np.savez(path, **iris_inputs(64))
    return path


@pytest.mark.real
def test_basic_pitch_notes_and_onsets_pass_the_notebook_list_smaller_than_lossless(tmp_path):
    from published_models import PublishedModelsError, load

    try:
        model = load("basic_pitch_nmp")
    except PublishedModelsError as error:
        pytest.fail(str(error), pytrace=False)
    samples = {model.signature: dict(model.inputs)}
    notebook = QUANTISING  # the notebook's list: params.yaml optimise.notebook
    ungated = optimise_saved_model(model.saved_model, tmp_path / "ungated", notebook, sample_inputs=samples,
                                   gate=False)
    onset = ungated["comparison"][model.signature]["onset"]
    assert onset["verdict"] == "fail" and onset["value"] > 0.2  # measured: 37 of 94 onsets flip
    lossless = optimise_saved_model(model.saved_model, tmp_path / "lossless", LOSSLESS, sample_inputs=samples)
    report = optimise_saved_model(model.saved_model, tmp_path / "gated", notebook, sample_inputs=samples)
    outputs = report["comparison"][model.signature]
    assert outputs["note"]["verdict"] == outputs["onset"]["verdict"] == "pass"
    assert report["size_bytes"]["output"] < lossless["size_bytes"]["output"]
    runs = report["gate"]["model_runs"]
    assert runs["ranking"] == 1 and runs["judged"] <= runs["max_judged"]
    assert 0.0 < report["gate"]["weights"]["kept_float_share"] < 1.0
