"""Training: the notebook's architecture, deterministic weights, curves logged with DVCLive."""

import json

import numpy as np
from pipeline_helpers import TINY

from serving_optimiser.pipeline.data import features_and_labels
from serving_optimiser.pipeline.train import (
    build_model,
    dense_weights,
    load_weights,
    log_history,
    save_weights,
    train_model,
)


def test_architecture_matches_the_notebook():
    model = build_model([512, 512, 512, 512], n_classes=3)
    shapes = [tuple(w.shape) for w in model.weights]
    assert shapes == [(4, 512), (512,), (512, 512), (512,), (512, 512), (512,), (512, 512), (512,), (512, 3), (3,)]
    assert sum(int(np.prod(s)) for s in shapes) == 792_067  # 3.17 MB of float32, as the notebook's export
    assert [layer.activation.__name__ for layer in model.layers] == ["relu"] * 4 + ["linear"]


def test_training_learns_and_is_deterministic(iris_split, tiny_trained):
    _, weights, history = tiny_trained
    assert len(history["loss"]) == TINY.epochs
    assert history["loss"][-1] < history["loss"][0]
    features, labels = features_and_labels(iris_split[0])
    model_again, history_again = train_model(features, labels, TINY, n_classes=3)
    assert history_again == history
    retrained = dense_weights(model_again)
    for (kernel, bias), (kernel2, bias2) in zip(weights, retrained):
        np.testing.assert_array_equal(kernel, kernel2)
        np.testing.assert_array_equal(bias, bias2)


def test_weights_round_trip(tmp_path, tiny_trained):
    weights = tiny_trained[1]
    save_weights(weights, tmp_path / "w.npz")
    loaded = load_weights(tmp_path / "w.npz")
    assert len(loaded) == len(weights)
    for (kernel, bias), (kernel2, bias2) in zip(weights, loaded):
        np.testing.assert_array_equal(kernel, kernel2)
        np.testing.assert_array_equal(bias, bias2)


def test_history_logged_per_epoch(tmp_path):
    log_history({"loss": [3.0, 2.0, 1.0], "accuracy": [0.3, 0.6, 0.9]}, tmp_path / "live")
    loss_rows = (tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert loss_rows[0].split("\t")[:2] == ["step", "loss"]
    assert [row.split("\t")[:2] for row in loss_rows[1:]] == [["0", "3.0"], ["1", "2.0"], ["2", "1.0"]]
    summary = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert summary["train"]["accuracy"] == 0.9
