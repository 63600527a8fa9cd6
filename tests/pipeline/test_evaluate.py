"""Evaluate, latency and report: sizes, counts, accuracy and fidelity of one model against the
exported one; the gate; paired latency; the gathered report."""

import dataclasses
import json
import shutil
import types

import numpy as np
import pytest
from pipeline_helpers import ROOT

from serving_optimiser.errors import UserError
from serving_optimiser.pipeline import evaluate, latency, latency_figures, report, sizes
from serving_optimiser.pipeline import figures as stage_figures
from serving_optimiser.pipeline.data import FEATURE_NAMES, features_and_labels, sample_around
from serving_optimiser.pipeline.model import ModelSpec

PARAMS = evaluate.EvaluateParams(batch_rows=2000, seed=7, sample_rows=3, max_eval_rows_lost=1)
VOCABULARY = ["setosa", "virginica", "versicolor"]
# What the model stage records for the Iris export's predict signature.
SPEC = ModelSpec(
    source="iris", signature="predict", input_order=FEATURE_NAMES,
    inputs={name: {"dtype": "float32", "shape": [None]} for name in FEATURE_NAMES},
    outputs={"class_ids": {"dtype": "int64", "shape": [None, 1]}, "classes": {"dtype": "string", "shape": [None, 1]},
             "logits": {"dtype": "float32", "shape": [None, 3]},
             "probabilities": {"dtype": "float32", "shape": [None, 3]}},
    class_output="class_ids", diff_output="probabilities", compared=["class_ids", "probabilities"],
    label_vocabulary=VOCABULARY, has_labels=True,
)
# A model without a class output: the gate is max |Δ| relative to the output's range.
REGRESSION = ModelSpec(
    source="saved_model", signature="serving_default", input_order=["x"], inputs={"x": {"dtype": "float32",
                                                                                        "shape": [None, 2]}},
    outputs={"y": {"dtype": "float32", "shape": [None, 2]}}, class_output=None, diff_output=None, compared=["y"],
    label_vocabulary=None, has_labels=False,
)


def test_sizes_count_every_file_and_gzip_is_reproducible(tiny_export):
    size = sizes.model_size(tiny_export)
    files = [p for p in tiny_export.rglob("*") if p.is_file()]
    assert size["size_bytes"] == sum(p.stat().st_size for p in files)
    assert 0 < size["size_gzip_bytes"] < size["size_bytes"]
    assert sizes.gzip_size(tiny_export) == size["size_gzip_bytes"]


def test_fidelity_counts_agreement_and_max_difference():
    reference = {"class_ids": np.array([[0], [1], [2], [2]]), "probabilities": np.zeros((4, 3))}
    candidate = {"class_ids": np.array([[0], [1], [1], [2]]), "probabilities": np.full((4, 3), 0.25)}
    assert stage_figures.fidelity(reference, candidate, SPEC) == {"agreement": 0.75, "max_dp": 0.25}


def test_without_a_class_output_fidelity_is_relative_to_the_outputs_range():
    reference = {"y": np.array([[0.0, 10.0], [5.0, -10.0]], np.float32)}
    candidate = {"y": np.array([[0.5, 10.0], [5.0, -9.0]], np.float32)}
    assert stage_figures.fidelity(reference, candidate, REGRESSION) == {"max_dp": 1.0, "max_rel_diff": 0.05}


def test_each_output_is_judged_by_its_kind_and_the_gate_names_the_failures():
    """Iris: class ids are labels, probabilities a class output (argmax); the default tolerances
    (agreement >= 0.99) with evaluate.tolerances' overrides."""
    assert SPEC.kinds() == {"class_ids": "label", "probabilities": "class"}
    rows = 200
    reference = {"class_ids": np.zeros((rows, 1), np.int64),
                 "probabilities": np.tile(np.array([[0.6, 0.3, 0.1]], np.float32), (rows, 1))}
    candidate = {"class_ids": reference["class_ids"].copy(), "probabilities": reference["probabilities"].copy()}
    candidate["class_ids"][:3] = 1  # 98.5 % agreement: under 0.99
    candidate["probabilities"][:3] = [0.2, 0.7, 0.1]
    judged = stage_figures.judged_outputs(reference, candidate, SPEC, PARAMS)
    assert judged["class_ids"]["kind"] == "label" and judged["class_ids"]["metric"] == "label_agreement"
    assert judged["probabilities"]["metric"] == "class_agreement"
    assert judged["probabilities"]["value"] == pytest.approx(0.985) and judged["probabilities"]["verdict"] == "fail"
    failures = stage_figures.gate_failures({"outputs": judged}, PARAMS)
    assert failures == [
        "output 'class_ids' (label): label agreement 0.9850 is under the minimum 0.9900 on the 2000-row batch",
        "output 'probabilities' (class): class agreement 0.9850 is under the minimum 0.9900 on the 2000-row batch",
    ]
    looser = dataclasses.replace(PARAMS, tolerances={"agreement": 0.98})
    judged = stage_figures.judged_outputs(reference, candidate, SPEC, looser)
    assert stage_figures.gate_failures({"outputs": judged}, looser) == []


def test_a_regression_output_is_judged_on_its_range():
    reference = {"y": np.linspace(0, 10, 100, dtype=np.float32).reshape(50, 2)}
    candidate = {"y": reference["y"] + np.float32(0.6)}  # 6 % of the range everywhere
    judged = stage_figures.judged_outputs(reference, candidate, REGRESSION, PARAMS)["y"]
    assert judged["kind"] == "regression" and judged["verdict"] == "fail"
    assert [c["passed"] for c in judged["checks"]] == [False, False]


@pytest.fixture(scope="module")
def data(iris_split):
    features, labels = features_and_labels(iris_split[1])
    return {"eval": features, "batch": sample_around(iris_split[1], PARAMS.batch_rows, PARAMS.seed)}, labels


@pytest.fixture(scope="module")
def reference(tiny_export, data):
    return evaluate.evaluate_model("exported", tiny_export, data[0], data[1], SPEC, PARAMS, threads=2)


def test_a_copy_of_the_exported_model_agrees_completely(tmp_path, tiny_export, data, reference):
    twin = tmp_path / "twin"
    shutil.copytree(tiny_export, twin)
    result = evaluate.evaluate_model("twin", twin, data[0], data[1], SPEC, PARAMS, threads=2)
    evaluate.compare(result, reference.outputs, reference.figures, SPEC)
    figures = result.figures
    assert figures["agreement"] == figures["eval_agreement"] == 1.0
    assert figures["max_dp"] == 0.0 and figures["size_ratio"] == 1.0 and figures["eval_rows_lost"] == 0
    assert figures["eval_accuracy"] == reference.figures["eval_accuracy"] > 0.5
    assert figures["graph_variable_nodes"] == 6
    assert len(figures["sample_predictions"]) == 3
    assert figures["sample_predictions"][0]["class"] in VOCABULARY
    assert stage_figures.gate_failures(figures, PARAMS) == []
    headline = stage_figures.headline(figures)
    assert set(headline) == {"size_kb", "gzip_kb", "acc", "size_x", "agree", "max_dp"}


def test_outputs_round_trip_through_the_reference_file(tmp_path, reference):
    evaluate.save_outputs(tmp_path / "reference.npz", reference.outputs, SPEC)
    loaded = evaluate.load_outputs(tmp_path / "reference.npz")
    assert {key for outputs in loaded.values() for key in outputs} == set(SPEC.compared)
    for data_set in ("eval", "batch"):
        for key in SPEC.compared:
            np.testing.assert_array_equal(loaded[data_set][key], reference.outputs[data_set][key])


def test_gate_names_eval_rows_lost():
    assert stage_figures.gate_failures({"outputs": {}, "eval_rows_lost": 2}, PARAMS) == [
        "2 eval rows lost against the exported model (evaluate.max_eval_rows_lost=1)"
    ]
    assert stage_figures.gate_failures({"outputs": {}, "eval_rows_lost": 1}, PARAMS) == []


def test_a_model_answering_nan_fails_naming_it(tmp_path, data):
    """A broken conversion (here a SavedModel whose logits are NaN) fails its evaluation."""
    import tensorflow as tf

    class Broken(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name=n) for n in
                                      ("sepal_length", "sepal_width", "petal_length", "petal_width")])
        def predict(self, sepal_length, sepal_width, petal_length, petal_width):
            logits = tf.stack([sepal_length * np.nan] * 3, axis=1)
            ids = tf.argmax(logits, axis=1)[:, None]
            return {"class_ids": ids, "classes": tf.gather(tf.constant(VOCABULARY), ids),
                    "logits": logits, "probabilities": tf.nn.softmax(logits)}

    module = Broken()
    tf.saved_model.save(module, str(tmp_path / "broken"), signatures={"predict": module.predict})
    with pytest.raises(UserError, match=r"^broken: .*(NaN|finite)"):
        evaluate.evaluate_model("broken", tmp_path / "broken", data[0], data[1], SPEC, PARAMS, threads=2)


def test_missing_model_directory_is_named(tmp_path, data):
    with pytest.raises(UserError, match=r"ghost: .*ghost not found"):
        evaluate.evaluate_model("ghost", tmp_path / "ghost", data[0], data[1], SPEC, PARAMS, threads=2)


TIMING = latency.LatencyParams(
    batch_sizes=(1, 10), repeats=5, calls_per_round=4, rows_per_round=20, load_repeats=1, seed=0
)


def sleeper(seconds_per_call, seconds_per_row=0.0):
    import time

    return lambda inputs: time.sleep(seconds_per_call + seconds_per_row * len(inputs["x"]))


def test_latency_pairs_each_round_against_the_first_model_at_every_batch_size():
    inputs = latency.batch_inputs({"x": np.zeros(10)}, TIMING.batch_sizes)
    models = [
        latency.TimedModel("exported", latency.local_timer(sleeper(0.002), inputs), 0.1, "TensorFlow"),
        # Twice the fixed cost, and a cost per row: slower at batch 1 than at batch 10, relatively.
        latency.TimedModel("slow", latency.local_timer(sleeper(0.004, 0.0002), inputs), 0.2, "elsewhere"),
    ]
    figures = latency.measure_latency(models, TIMING)
    assert set(figures["exported"]["batches"]) == {"1", "10"}
    assert {point["ratio"] for point in figures["exported"]["batches"].values()} == {1.0}
    one, ten = figures["slow"]["batches"]["1"], figures["slow"]["batches"]["10"]
    assert 1.6 < one["ratio"] < 2.6 and 2.2 < ten["ratio"] < 3.6 and ten["ratio"] > one["ratio"]
    assert one["p99_ms"] >= one["p50_ms"] >= 4.0 and ten["p50_ms"] >= 6.0
    assert ten["per_row_us"] == pytest.approx(ten["p50_ms"] * 100)  # 1000 µs per ms over 10 rows
    # Batch 1: calls_per_round (4) calls a round; batch 10: rows_per_round // 10 = 2.
    assert (one["calls"], ten["calls"]) == (4 * 5, 2 * 5)
    assert figures["slow"]["load_s"] == 0.2 and figures["slow"]["how"] == "elsewhere"
    headline = latency_figures.headline_figures(figures["slow"])
    assert headline["batch_ratio"] == ten["ratio"] and headline["batch1_p50_ratio"] == one["ratio"]


def test_latency_params_read_the_curve_and_name_a_bad_key():
    section = {"batch_sizes": [512, 1, 8], "repeats": 5, "calls_per_round": 100, "rows_per_round": 2048,
               "load_repeats": 1, "seed": 0, "max_call_bytes": 2**20, "max_stage_seconds": 90}
    params = latency.LatencyParams.from_section(section)
    assert params.batch_sizes == (1, 8, 512)
    # Iris rows (16 bytes) are timed at every size; 48 x 48 x 3 images (27,648 bytes) not at 512.
    assert params.sizes_that_fit(16) == (1, 8, 512)
    assert params.sizes_that_fit(48 * 48 * 3 * 4) == (1, 8)
    assert params.sizes_that_fit(2**21) == (1,)
    assert [params.calls(size) for size in (1, 8, 64, 512, 100_000)] == [100, 100, 32, 4, 1]
    assert [latency_figures.batch_label(size) for size in (1, 512, 100_000, 2500)] == ["1", "512", "100k", "2.5k"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"repeats": 3}, "'latency.repeats' must be at least 5"),
        ({"batch_sizes": [1, 8, 8]}, "'latency.batch_sizes' lists a size twice: [1, 8, 8]"),
        ({"batch_sizes": [0, 8]}, "'latency.batch_sizes' must be positive row counts, got 0"),
        ({"batch_sizes": []}, "'latency.batch_sizes' must not be empty"),
        ({"single_row_calls": 1100}, "unknown key(s) latency.single_row_calls (expected batch_sizes, "),
    ],
    ids=["few-repeats", "duplicate-size", "zero-size", "no-sizes", "old-key"],
)
def test_bad_latency_params_fail_in_one_line(change, expected):
    section = {"batch_sizes": [1, 8], "repeats": 5, "calls_per_round": 10, "rows_per_round": 100,
               "load_repeats": 1, "seed": 0, "max_call_bytes": 2**20, "max_stage_seconds": 90, **change}
    with pytest.raises(UserError) as info:
        latency.LatencyParams.from_section(section)
    assert "\n" not in str(info.value) and expected in str(info.value), str(info.value)


def test_a_worker_times_the_export_under_its_own_onednn_setting(tiny_export, tiny_samples, tmp_path):
    import os

    environment = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}
    worker = latency.WorkerModel(tiny_export, tiny_samples, 64, 7, environment)
    try:
        assert worker.settings["onednn_opts"] == "0" and worker.load_seconds > 0
        seconds = worker.timer(64, 3)
        assert len(seconds) == 3 and all(0 < value < 5 for value in seconds)
        assert len(worker.timer(1, 5)) == 5
    finally:
        worker.close()
    with pytest.raises(UserError, match=r"^latency worker for the exported model exited: .*ghost"):
        latency.WorkerModel(tmp_path / "ghost", tiny_samples, 64, 7, environment)


def test_process_settings_say_how_tensorflow_ran():
    info = latency.process_settings()
    assert info["tensorflow_version"].startswith("2.")
    assert {"onednn_opts", "onednn_max_cpu_isa", "intra_op_threads", "inter_op_threads"} <= set(info)


def measured_entry(how, ratios, p50s, load=0.1):
    return {"how": how, "load_s": load, "first_call_ms": 2.0, "batches": {
        size: {"p50_ms": p50, "p99_ms": p50 * 2, "per_row_us": p50 * 1000 / int(size), "ratio": ratio, "calls": 10}
        for size, ratio, p50 in zip(("1", "64", "5000"), ratios, p50s)
    }}


@pytest.fixture
def report_inputs(tmp_path, reference):
    """Details and latency files of three models, as the stages write them, on a CPU whose oneDNN
    default is off: 'small' is a float SavedModel, 'int8' ran with oneDNN forced on beside the
    export timed both ways, 'peer' is another runtime's artefact."""
    from serving_optimiser.pipeline.machine import describe_machine

    details, timings = tmp_path / "details", tmp_path / "latency"
    details.mkdir()
    timings.mkdir()
    exported = stage_figures.rounded(reference.figures)
    (details / "exported.json").write_text(json.dumps(exported))
    variant = {**exported, "agreement": 0.999, "max_dp": 0.01, "size_ratio": 0.25, "size_bytes": 100}
    (details / "small.json").write_text(json.dumps(variant))
    (details / "int8.json").write_text(json.dumps({**variant, "size_bytes": 120, "max_dp": 0.02}))
    peer = {key: value for key, value in variant.items() if not key.startswith("graph_")}
    (details / "peer.json").write_text(json.dumps({**peer, "size_bytes": 90, "max_dp": 0.000001}))
    machine = describe_machine(environ={"TF_ENABLE_ONEDNN_OPTS": "0"})
    default = "TensorFlow, oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)"
    forced = "TensorFlow, oneDNN on (TF_ENABLE_ONEDNN_OPTS=1"
    files = {
        "small": {"exported": measured_entry(default, (1, 1, 1), (0.5, 1.0, 100.0)),
                  "small": measured_entry(default, (0.9, 0.8, 0.5), (0.45, 0.8, 50.0))},
        "int8": {"exported": measured_entry(default, (1, 1, 1), (0.6, 1.2, 110.0)),
                 "int8": measured_entry(forced + ": its int8 ops need it)", (1.4, 0.7, 0.3), (0.8, 0.8, 33.0)),
                 "exported_onednn": measured_entry(forced + ")", (1.1, 0.9, 0.7), (0.7, 1.1, 77.0))},
        "peer": {"exported": measured_entry(default, (1, 1, 1), (0.55, 1.1, 105.0)),
                 "peer": measured_entry("OpenVINO CPU, 2 threads", (0.1, 0.5, 0.6), (0.05, 0.5, 63.0))},
    }
    for name, measured in files.items():
        (timings / f"{name}.json").write_text(json.dumps({"machine": machine, "measured": measured}))
    return details, timings, machine


def test_report_gathers_every_model_and_the_export_timed_both_ways(tmp_path, report_inputs):
    details, timings, machine = report_inputs
    records = report.gather(["int8", "peer", "small"], details, timings)
    assert list(records) == ["exported", "exported_onednn", "int8", "peer", "small"]
    # The export's timings: the median over the three stages that timed it.
    assert records["exported"]["curve"]["5000"]["p50_ms"] == 105.0 and records["exported"]["batch_ratio"] == 1.0
    assert records["exported_onednn"]["batch_ratio"] == 0.7 and records["exported_onednn"]["how"].endswith("=1)")
    outputs = [tmp_path / name for name in ("plots.json", "curve.json", "models.csv", "summary.md")]
    report.write_report(records, *outputs)
    summary = outputs[3].read_text()
    assert "- smallest on disk: **peer** (0.1 KB)" in summary
    assert "- fastest at 5,000 rows: **int8** (0.300 × the export's time)" in summary
    assert "- fastest at batch 1: **peer** (0.100 × the export's time)" in summary
    # Which to serve, per batch range: consecutive sizes with one winner are merged.
    assert "- any runtime: 1–64 rows: **peer** (0.100–0.500 ×); 5,000 rows: **int8** (0.300 ×)" in summary
    assert ("- a TensorFlow SavedModel (TF Serving, the same signatures): 1 row: **small** (0.900 ×); "
            "64–5,000 rows: **int8** (0.300–0.700 ×)") in summary
    assert "- the float function within float rounding (max |Δp| ≤ 1e-5): 1–5,000 rows: **peer**" in summary
    assert ("oneDNN is off by default on this CPU: every ratio is against the export as TensorFlow runs it by "
            "default (TensorFlow, oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)); the int8 variants ran with "
            "TF_ENABLE_ONEDNN_OPTS=1, and the float export with it set takes 0.700 × the default's time at "
            "5,000 rows and 1.100 × at 1") in summary
    assert "- TensorFlow, oneDNN on (TF_ENABLE_ONEDNN_OPTS=1: its int8 ops need it): int8" in summary
    assert "- OpenVINO CPU, 2 threads: peer" in summary
    assert "| peer | 50 (0.10 ×) | 7.81 (0.50 ×) | 12.6 (0.60 ×) |" in summary
    assert machine["cpu"] in summary and "oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)" in summary
    # Cold start apart from the warm figures: load 0.1 s, first call 2 ms, 4 x the warm batch-1 p50.
    assert "## Cold start and warm calls" in summary
    assert "| small | 0.100 | 2.00 | 0.450 | 0.900 | 4 × |" in summary.splitlines()
    table = report.results_table(records).splitlines()
    assert len(table) == 7 and len({line.count(" | ") for line in table[2:]}) == 1
    assert "| 5k-row call ms: model / export |" in table[0] and "| batch-1 p50 ms: model / export |" in table[0]
    # Each row divides its own figures: the model's time over the export's from the same process.
    int8_row = next(line for line in table if line.startswith("| int8 |")).split(" | ")
    own, export = (float(value) for value in int8_row[-4].split(" / "))
    assert float(int8_row[-3]) == pytest.approx(own / export, abs=0.01)
    plots = json.loads(outputs[0].read_text())
    assert [row["model"] for row in plots] == list(records) and plots[2]["batch_ratio"] == 0.3
    curve = json.loads(outputs[1].read_text())
    assert len(curve) == 5 * 3 and curve[-1] == {"model": "small", "batch_size": 5000, "per_row_us": 10.0,
                                                  "p50_ms": 50.0, "ratio": 0.5}
    header = outputs[2].read_text().splitlines()[0]
    assert header.startswith("model,size_bytes,") and header.endswith(",per_row_us_5k,ratio_5k,how")


def test_a_peer_that_cannot_convert_is_one_line_in_the_summary(tmp_path, report_inputs):
    details, timings, _ = report_inputs
    (details / "openvino_fp32.json").write_text(json.dumps({"unsupported": "cnn: OpenVINO converts only ..."}))
    records = report.gather(["openvino_fp32", "small"], details, timings)
    assert list(records) == ["exported", "small"]
    summary = report.summary_markdown(records)
    assert "## Peers that cannot convert this model\n\n- openvino_fp32: cnn: OpenVINO converts only ...\n" in summary
    assert "| openvino_fp32 |" not in summary


def test_report_without_a_forced_variant_names_the_one_setting(tmp_path, report_inputs):
    details, timings, _ = report_inputs
    records = report.gather(["small"], details, timings)
    assert "exported_onednn" not in records
    lines = report.which_to_serve(records)
    assert lines[-1] == ("- every TensorFlow model ran as TensorFlow runs by default here: "
                         "TensorFlow, oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)")


def test_signature_dump_is_the_same_text_in_every_process(tiny_export):
    """What saved_model_cli prints, with its op set sorted: Python prints sets in hash order."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from serving_optimiser.pipeline.evaluate import signature_dump; "
        "sys.stdout.write(signature_dump(Path(sys.argv[1])))"
    )
    texts = {
        subprocess.run(
            [sys.executable, "-c", code, str(tiny_export)], capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(texts) == 1
    text = texts.pop()
    assert "signature_def['predict']" in text and "contains the following ops: {'ArgMax', " in text


@pytest.mark.parametrize(("row_shape", "expected_rows"), [((4,), 100_000), ((48, 48, 3), 9709)],
                         ids=["iris-100k-rows", "48x48x3-images-256MiB"])
def test_the_batch_holds_at_most_max_batch_bytes(row_shape, expected_rows):
    samples = types.SimpleNamespace(
        evaluation={"x": np.random.default_rng(0).standard_normal((30, *row_shape)).astype(np.float32)}
    )
    params = dataclasses.replace(PARAMS, batch_rows=100_000, max_batch_bytes=256 * 2**20)
    data = stage_figures.evaluation_data(samples, params)
    assert data["eval"]["x"].shape == (30, *row_shape)
    assert data["batch"]["x"].shape == (expected_rows, *row_shape)


def test_the_lossy_transforms_are_read_without_tensorflow_and_named_per_variant():
    from serving_optimiser.graph_transforms.catalogue import lossy_transforms
    from serving_optimiser.graph_transforms.registry import lossy_names
    from serving_optimiser.pipeline.entries import ModelEntry
    from serving_optimiser.pipeline.params import PipelineParams

    assert lossy_transforms() >= {"quantize_weights", "round_weights", "quantize_nodes", "quantize_matmuls",
                                  "quantize_convs"}
    assert lossy_transforms() == set(lossy_names())  # the ast reading agrees with the live registry
    params = PipelineParams.load(ROOT / "params.yaml")
    assert ModelEntry.find(params, "int8").lossy == ("quantize_matmuls", "quantize_convs")
    assert ModelEntry.find(params, "lossless").lossy == ()


def test_a_variant_whose_lossy_steps_changed_nothing_is_labelled_and_never_recommended():
    same = {"probabilities": np.array([[0.2, 0.8]], np.float32), "class_ids": np.array([[1]])}
    moved = {"probabilities": np.array([[0.25, 0.75]], np.float32), "class_ids": np.array([[1]])}
    assert stage_figures.computes_the_same_function(same, {k: v.copy() for k, v in same.items()}, SPEC)
    assert not stage_figures.computes_the_same_function(same, moved, SPEC)
    record = {"size_bytes": 1024, "size_ratio": 1.0, "gzip_bytes": 512, "max_dp": 0.0}
    records = {"exported": dict(record), "int8_dynamic": {**record, "no_change": "no change on this model: ..."},
               "broken": {**record, "gate": {"verdict": "fail", "failures": ["..."]}}}
    table = report.results_table(records)
    assert "| int8_dynamic (no change on this model) |" in table and "| broken (fails the gate) |" in table
    assert not report.passes_gate(records["int8_dynamic"]) and not report.passes_gate(records["broken"])
    assert report.passes_gate(records["exported"])


def test_latency_drops_the_largest_batch_sizes_whose_rounds_pass_the_stage_budget():
    """Estimated from one call per model and size (fixed figures here, no clock)."""
    def fixed(seconds_per_row):
        return lambda batch, calls: [0.001 + seconds_per_row * batch] * calls

    models = [latency.TimedModel("exported", fixed(0.001), 0.0), latency.TimedModel("int8", fixed(0.0005), 0.0)]
    params = dataclasses.replace(TIMING, batch_sizes=(1, 10, 1000), repeats=5, calls_per_round=4, rows_per_round=20)
    # 1 row: 4 calls a round, 0.0025 s a pair; 10 rows: 2 calls, 0.017 s; 1000 rows: 1 call, 1.502 s.
    assert latency.sizes_within_budget(models, dataclasses.replace(params, max_stage_seconds=90)) == ((1, 10, 1000), [])
    assert latency.sizes_within_budget(models, dataclasses.replace(params, max_stage_seconds=1.0)) == ((1, 10), [1000])
    # The smallest size is always timed.
    tiny = dataclasses.replace(params, max_stage_seconds=0.001)
    assert latency.sizes_within_budget(models, tiny) == ((1,), [10, 1000])


def test_the_verdicts_table_says_what_the_optimise_stage_gate_sent_back(tmp_path, report_inputs):
    details, timings, _ = report_inputs
    judged = {"kind": "class", "metric": "class_agreement", "value": 0.995, "tolerance": 0.99, "verdict": "pass",
              "checks": [{"metric": "class_agreement", "op": ">=", "value": 0.995, "tolerance": 0.99, "passed": True}]}
    for name in ("int8", "small"):
        record = json.loads((details / f"{name}.json").read_text())
        (details / f"{name}.json").write_text(json.dumps({**record, "outputs": {"probabilities": judged}}))
    gates = tmp_path / "optimise"
    gates.mkdir()
    sent = [{"name": "w1", "to": "float"}, {"name": "w2", "to": "float"}, {"name": "w3", "to": "per_channel"}]
    (gates / "int8.json").write_text(json.dumps({"variant": "int8", "gate": {
        "verdict": "pass", "sent_back": sent, "weights": {"kept_float_share": 0.125}}}))
    (gates / "small.json").write_text(json.dumps({"variant": "small", "objective": "size", "winner": "lossless",
                                                  "gate": {"verdict": "not applied", "why": "no lossy transform"}}))
    records = report.gather(["int8", "small"], details, timings, gates)
    assert records["int8"]["fallback"] == {"verdict": "pass", "per_channel": 1, "to_float": 2,
                                           "kept_float_share": 0.125}
    table = report.verdicts_table(records)
    assert "| model | gate | fallback (optimise stage) | probabilities |" in table
    assert "| int8 | pass | 1 per channel, 2 to float; 12.5% of weight bytes float | class: " in table
    assert "| small | pass | lossless: no lossy step | class: " in table


def test_the_summary_lists_as_failing_only_a_failing_verdict_not_a_variant_that_changed_nothing():
    judged = {"kind": "class", "metric": "class_agreement", "value": 1.0, "tolerance": 0.99, "verdict": "pass",
              "checks": [{"metric": "class_agreement", "op": ">=", "value": 1.0, "tolerance": 0.99, "passed": True}]}
    record = {"size_bytes": 1024, "size_ratio": 1.0, "gzip_bytes": 512, "max_dp": 0.0, "sample_predictions": [],
              "outputs": {"probabilities": judged}}
    records = {"exported": dict(record),
               "int8": {**record, "gate": {"verdict": "pass", "failures": []}, "no_change": "no change on this model"},
               "broken": {**record, "gate": {"verdict": "fail", "failures": ["..."]}}}
    summary = report.summary_markdown(records)
    assert "never recommended (failing: broken)." in summary
