"""Evaluate: sizes, counts, latency, accuracy and fidelity, side by side; the fidelity gate."""

import csv
import json
import shutil

import numpy as np
import pytest

from serving_optimiser.errors import UserError
from serving_optimiser.pipeline.data import features_and_labels, sample_around
from serving_optimiser.pipeline.evaluate import (
    EvaluateParams,
    evaluate_models,
    failing_variants,
    fidelity,
    gzip_size,
    model_sizes,
)
from serving_optimiser.pipeline.report import results_table, write_reports

PARAMS = EvaluateParams(
    batch_rows=2000,
    repeats=5,
    single_row_calls=20,
    load_repeats=1,
    seed=7,
    min_class_agreement=0.99,
    signature="predict",
)


def test_sizes_count_every_file_and_gzip_is_reproducible(tiny_export):
    sizes = model_sizes(tiny_export)
    pb = (tiny_export / "saved_model.pb").stat().st_size
    variables = sum(p.stat().st_size for p in (tiny_export / "variables").iterdir())
    assert sizes["size_saved_model_pb_bytes"] == pb
    assert sizes["size_variables_bytes"] == variables
    assert sizes["size_total_bytes"] >= pb + variables
    assert 0 < sizes["size_gzip_bytes"] < sizes["size_total_bytes"]
    assert gzip_size(tiny_export) == sizes["size_gzip_bytes"]


def test_fidelity_counts_agreement_and_max_difference():
    reference = {"class_ids": np.array([[0], [1], [2], [2]]), "probabilities": np.zeros((4, 3))}
    candidate = {"class_ids": np.array([[0], [1], [1], [2]]), "probabilities": np.full((4, 3), 0.25)}
    assert fidelity(reference, candidate) == (0.75, 0.25)


@pytest.fixture(scope="module")
def metrics(tmp_path_factory, tiny_export, iris_split):
    twin = tmp_path_factory.mktemp("variants") / "twin"
    shutil.copytree(tiny_export, twin)
    features, labels = features_and_labels(iris_split[1])
    batch = sample_around(iris_split[1], PARAMS.batch_rows, PARAMS.seed)
    return evaluate_models({"exported": tiny_export, "twin": twin}, features, labels, batch, PARAMS)


def test_a_copy_of_the_exported_model_agrees_completely(metrics):
    assert set(metrics) == {"exported", "twin"}
    twin, exported = metrics["twin"], metrics["exported"]
    assert twin["batch_class_agreement"] == 1.0 and twin["eval_class_agreement"] == 1.0
    assert twin["batch_max_abs_prob_diff"] == 0.0
    assert twin["eval_accuracy"] == exported["eval_accuracy"] > 0.5
    assert twin["size_total_ratio"] == 1.0
    for key in ("latency_batch_ms_median", "latency_single_ms_p50", "latency_single_ms_p99", "load_seconds"):
        assert twin[key] > 0, key
    assert twin["latency_single_ms_p99"] >= twin["latency_single_ms_p50"]
    assert exported["graph_variable_nodes"] == 6
    assert failing_variants(metrics, 0.99) == []


def test_gate_names_the_variant_below_the_threshold():
    metrics = {
        "exported": {"eval_class_agreement": 1.0, "batch_class_agreement": 1.0},
        "notebook": {"eval_class_agreement": 1.0, "batch_class_agreement": 0.95},
    }
    assert failing_variants(metrics, 0.99) == ["notebook (class agreement 0.9500)"]


def test_reports_are_written(tmp_path, metrics):
    write_reports(metrics, tmp_path / "m.json", tmp_path / "m.csv", tmp_path / "p.json")
    assert json.loads((tmp_path / "m.json").read_text()) == metrics
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert [r["model"] for r in rows] == ["exported", "twin"]
    plots = json.loads((tmp_path / "p.json").read_text())
    assert plots[1]["model"] == "twin" and "latency_batch_ms_median" in plots[1]
    table = results_table(metrics).splitlines()
    assert len(table) == 4 and table[0].count("|") == table[1].count("|") == table[3].count("|")
    assert table[3].startswith("| twin | ") and "| 1.000 |" in table[3] and "100.0000%" in table[3]


def test_fewer_than_five_repeats_is_refused():
    with pytest.raises(UserError, match=r"'evaluate\.repeats' must be at least 5"):
        EvaluateParams.from_section({"repeats": 3, "min_class_agreement": 0.99})


def test_missing_variant_directory_is_named(tmp_path, tiny_export, iris_split):
    features, labels = features_and_labels(iris_split[1])
    with pytest.raises(UserError, match="ghost: not a SavedModel"):
        evaluate_models({"exported": tiny_export, "ghost": tmp_path / "ghost"}, features, labels, features, PARAMS)
