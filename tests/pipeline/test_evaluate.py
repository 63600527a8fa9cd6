"""Evaluate, latency and report: sizes, counts, accuracy and fidelity of one model against the
exported one; the gate; paired latency; the gathered report."""

import json
import shutil

import numpy as np
import pytest

from serving_optimiser.errors import UserError
from serving_optimiser.pipeline import evaluate, latency, report
from serving_optimiser.pipeline.data import features_and_labels, sample_around

PARAMS = evaluate.EvaluateParams(
    signature="predict", batch_rows=2000, seed=7, sample_rows=3, min_class_agreement=0.99, max_eval_rows_lost=1
)
VOCABULARY = ["setosa", "virginica", "versicolor"]


def test_sizes_count_every_file_and_gzip_is_reproducible(tiny_export):
    size = evaluate.model_size(tiny_export)
    files = [p for p in tiny_export.rglob("*") if p.is_file()]
    assert size["size_bytes"] == sum(p.stat().st_size for p in files)
    assert 0 < size["size_gzip_bytes"] < size["size_bytes"]
    assert evaluate.gzip_size(tiny_export) == size["size_gzip_bytes"]


def test_fidelity_counts_agreement_and_max_difference():
    reference = {"class_ids": np.array([[0], [1], [2], [2]]), "probabilities": np.zeros((4, 3))}
    candidate = {"class_ids": np.array([[0], [1], [1], [2]]), "probabilities": np.full((4, 3), 0.25)}
    assert evaluate.fidelity(reference, candidate) == (0.75, 0.25)


@pytest.fixture(scope="module")
def data(iris_split):
    features, labels = features_and_labels(iris_split[1])
    return {"eval": features, "batch": sample_around(iris_split[1], PARAMS.batch_rows, PARAMS.seed)}, labels


@pytest.fixture(scope="module")
def reference(tiny_export, data):
    return evaluate.evaluate_model("exported", tiny_export, data[0], data[1], VOCABULARY, PARAMS, threads=2)


def test_a_copy_of_the_exported_model_agrees_completely(tmp_path, tiny_export, data, reference):
    twin = tmp_path / "twin"
    shutil.copytree(tiny_export, twin)
    result = evaluate.evaluate_model("twin", twin, data[0], data[1], VOCABULARY, PARAMS, threads=2)
    evaluate.compare(result, reference.outputs, reference.figures)
    figures = result.figures
    assert figures["agreement"] == figures["eval_agreement"] == 1.0
    assert figures["max_dp"] == 0.0 and figures["size_ratio"] == 1.0 and figures["eval_rows_lost"] == 0
    assert figures["eval_accuracy"] == reference.figures["eval_accuracy"] > 0.5
    assert figures["graph_variable_nodes"] == 6
    assert len(figures["sample_predictions"]) == 3
    assert figures["sample_predictions"][0]["class"] in VOCABULARY
    assert evaluate.gate_failures(figures, PARAMS) == []
    headline = evaluate.headline(figures)
    assert set(headline) == {"size_kb", "gzip_kb", "acc", "size_x", "agree", "max_dp"}


def test_outputs_round_trip_through_the_reference_file(tmp_path, reference):
    evaluate.save_outputs(tmp_path / "reference.npz", reference.outputs)
    loaded = evaluate.load_outputs(tmp_path / "reference.npz")
    for data_set in ("eval", "batch"):
        for key in evaluate.COMPARED_OUTPUTS:
            np.testing.assert_array_equal(loaded[data_set][key], reference.outputs[data_set][key])


def test_gate_names_what_fails():
    figures = {"agreement": 0.95, "eval_rows_lost": 2}
    failures = evaluate.gate_failures(figures, PARAMS)
    assert failures[0].startswith("class agreement 95.0000% on the 2000-row batch is under")
    assert failures[1] == "2 eval rows lost against the exported model (evaluate.max_eval_rows_lost=1)"
    assert evaluate.gate_failures({"agreement": 0.995, "eval_rows_lost": 1}, PARAMS) == []


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
        evaluate.evaluate_model("broken", tmp_path / "broken", data[0], data[1], VOCABULARY, PARAMS, threads=2)


def test_missing_model_directory_is_named(tmp_path, data):
    with pytest.raises(UserError, match=r"ghost: .*ghost not found"):
        evaluate.evaluate_model("ghost", tmp_path / "ghost", data[0], data[1], VOCABULARY, PARAMS, threads=2)


def test_latency_pairs_each_round_against_the_first_model():
    def sleeper(seconds):
        import time

        return lambda inputs: time.sleep(seconds)

    models = [latency.TimedModel("exported", sleeper(0.002), 0.1), latency.TimedModel("slow", sleeper(0.004), 0.2)]
    figures = latency.measure_latency(models, {"x": np.zeros(10)}, {"x": np.zeros(1)}, 5, 10, seed=0)
    assert figures["exported"]["batch_ratio"] == 1.0 and figures["exported"]["batch1_p50_ratio"] == 1.0
    assert 1.5 < figures["slow"]["batch_ratio"] < 2.5 and 1.5 < figures["slow"]["batch1_p50_ratio"] < 2.5
    assert figures["slow"]["batch1_p99_ms"] >= figures["slow"]["batch1_p50_ms"] >= 4.0
    assert figures["slow"]["load_s"] == 0.2


def test_fewer_than_five_latency_repeats_is_refused():
    with pytest.raises(UserError, match=r"'latency\.repeats' must be at least 5"):
        latency.LatencyParams.from_section({"repeats": 3, "single_row_calls": 10, "load_repeats": 1, "seed": 0})


def test_machine_info_names_the_cpu_and_how_tensorflow_ran():
    info = latency.machine_info()
    assert info["cpu"] and info["cores"] >= 1 and "avx2" in info["isa"]
    assert info["tensorflow_version"].startswith("2.")
    assert {"onednn_opts", "onednn_max_cpu_isa", "intra_op_threads", "inter_op_threads"} <= set(info)


def test_report_gathers_every_model(tmp_path, reference):
    details, timings = tmp_path / "details", tmp_path / "latency"
    details.mkdir()
    timings.mkdir()
    exported = evaluate.rounded(reference.figures)
    (details / "exported.json").write_text(json.dumps(exported))
    variant = {**exported, "agreement": 0.999, "max_dp": 0.01, "size_ratio": 0.25, "size_bytes": 100}
    (details / "small.json").write_text(json.dumps(variant))
    measured = {"batch_ms": 10.0, "batch1_p50_ms": 0.5, "batch1_p99_ms": 0.9, "load_s": 0.1, "first_call_ms": 2.0}
    machine = latency.machine_info()
    (timings / "small.json").write_text(json.dumps({"machine": machine, "measured": {
        "exported": {**measured, "batch_ratio": 1.0, "batch1_p50_ratio": 1.0},
        "small": {**measured, "batch_ratio": 0.5, "batch1_p50_ratio": 0.9},
    }}))
    records = report.gather(["small"], details, timings)
    assert list(records) == ["exported", "small"]
    report.write_report(records, tmp_path / "plots.json", tmp_path / "models.csv", tmp_path / "summary.md")
    summary = (tmp_path / "summary.md").read_text()
    assert "- smallest on disk: **small** (0.1 KB)" in summary
    assert "- fastest at 100,000 rows: **small** (0.500 × the export's time)" in summary
    assert "- most faithful (max |Δp| against the export): **small**" in summary
    assert machine["cpu"] in summary
    # Cold start apart from the warm figures: load 0.1 s, first call 2 ms, 4 x the warm p50.
    assert "## Cold start and warm calls" in summary
    assert "| small | 0.100 | 2.00 | 0.500 | 0.900 | 4 × |" in summary.splitlines()
    table = report.results_table(records).splitlines()
    assert len(table) == 4 and table[0].count(" | ") == table[2].count(" | ") == table[3].count(" | ")
    plots = json.loads((tmp_path / "plots.json").read_text())
    assert [row["model"] for row in plots] == ["exported", "small"] and plots[1]["batch_ratio"] == 0.5
    assert (tmp_path / "models.csv").read_text().splitlines()[0].startswith("model,size_bytes,")


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
