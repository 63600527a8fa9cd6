"""optimise_saved_model on published models with default options: each output judged by its kind
(mtcnn RNet: a softmax face probability, a box regression head; fer: a softmax over emotions), the
lossless list identical within float rounding, 8-bit weights and calibrated int8 through the gate,
and --auto writing a passing candidate. The fixed slice make test runs (marker real)."""

from __future__ import annotations

import numpy as np
import pytest

from serving_optimiser.saved_model import optimise_saved_model
from serving_optimiser.saved_model.auto import auto_optimise

pytestmark = [pytest.mark.real, pytest.mark.xdist_group("published_models")]

LOSSLESS = "remove_nodes(op=Identity) fold_constants(ignore_errors=true) fold_batch_norms fold_old_batch_norms " \
           "strip_unused_nodes sort_by_execution_order"
WEIGHTS = "fold_constants(ignore_errors=true) fold_batch_norms fold_old_batch_norms quantize_weights " \
          "strip_unused_nodes"
INT8 = "fold_constants(ignore_errors=true) fold_batch_norms fold_old_batch_norms quantize_convs quantize_matmuls " \
       "strip_unused_nodes"


def halves(model) -> tuple[dict, dict]:
    """The model's sample rows split: the first half decides (calibrates), the second judges."""
    rows = model.rows // 2
    first = {key: np.array(values[:rows]) for key, values in model.inputs.items()}
    second = {key: np.array(values[rows:]) for key, values in model.inputs.items()}
    return {model.signature: first}, {model.signature: second}


@pytest.fixture(scope="module")
def rnet():
    from published_models import load

    return load("mtcnn_rnet")


def test_lossless_is_the_same_function_and_each_output_has_its_kind(rnet, tmp_path):
    _, judge = halves(rnet)
    report = optimise_saved_model(rnet.saved_model, tmp_path / "out", LOSSLESS, sample_inputs=judge)
    outputs = report["comparison"][rnet.signature]
    assert {name: result["kind"] for name, result in outputs.items()} == {
        name: output.kind for name, output in rnet.outputs.items()}
    assert all(result["within_rounding"] for result in outputs.values())
    assert report["verdict"] == "pass"


@pytest.mark.parametrize(("transforms", "calibrated"), [
    (WEIGHTS, False), pytest.param(INT8, True, marks=pytest.mark.onednn),  # int8 ops need oneDNN
], ids=["weights", "int8"])
def test_lossy_lists_pass_the_gate_on_the_face_network(rnet, tmp_path, transforms, calibrated):
    decide, judge = halves(rnet)
    report = optimise_saved_model(rnet.saved_model, tmp_path / "out", transforms, sample_inputs=judge,
                                  calibration_inputs=decide if calibrated else None)
    outputs = report["comparison"][rnet.signature]
    assert report["verdict"] == "pass" and all(r["verdict"] == "pass" for r in outputs.values())
    box = outputs["box"]
    assert box["kind"] == "regression" and box["metric"] == "rms_diff_of_range" and box["value"] <= 0.01
    assert outputs["face_prob"]["metric"] == "class_agreement" and outputs["face_prob"]["value"] >= 0.99
    assert (tmp_path / "out" / "saved_model.pb").is_file()


@pytest.mark.onednn  # its int8 candidates run on oneDNN's kernels
def test_auto_writes_a_passing_candidate_on_the_face_network(rnet, tmp_path):
    decide, judge = halves(rnet)
    report = auto_optimise(rnet.saved_model, tmp_path / "out", sample_inputs=judge, calibration_inputs=decide,
                           objective="size", serving_batch_size=16)
    rows = {row["name"]: row for row in report["candidates"]}
    assert rows[report["written"]]["verdict"] == "pass"
    assert all(row["verdict"] in ("pass", "fail") for row in rows.values())
    assert (tmp_path / "out" / "saved_model.pb").is_file()
