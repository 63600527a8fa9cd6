"""Calibrated int8 in one call: calibration at the point of the list, through the model's call
path, the per-layer guard and the agreement fallback."""

import dataclasses
import json
import logging

import numpy as np
import pytest
import tensorflow as tf
from saved_model.models import CALIBRATED_INT8, mixed_scale_inputs

from serving_optimiser.graph_transforms import TransformGraph
from serving_optimiser.graph_transforms.calibration import Calibration, read_calibration_file
from serving_optimiser.graph_transforms.errors import TransformError
from serving_optimiser.graph_transforms.transforms import quantize_matmuls
from serving_optimiser.graph_transforms.transforms.quantize_matmuls import QUANTIZED_OP, calibrate_ranges
from serving_optimiser.saved_model import (
    AgreementError,
    SavedModelError,
    calibrate_frozen_model,
    freeze_saved_model,
    optimise_saved_model,
)

FIRST, SECOND = "StatefulPartitionedCall/MatMul", "StatefulPartitionedCall/MatMul_1"
GUARD_OFF = CALIBRATED_INT8.replace("quantize_matmuls", "quantize_matmuls(max_layer_error=10)")
# The wide & deep's scores are read as one class per row (argmax); from its graph (a BiasAdd that no
# ArgMax reads) they would be judged as regression.
AS_CLASSES = {"scores": "class"}


def _calibration_rows():
    return {"serving_default": mixed_scale_inputs(512, seed=1)}


def _held_out_rows():
    return {"serving_default": mixed_scale_inputs(1024, seed=2)}


def _ops(directory) -> dict[str, str]:
    """Node name -> op of every node in the converted model's graph."""
    from serving_optimiser.saved_model.reader import read_meta_graph

    return {node.name: node.op for node in read_meta_graph(str(directory), ("serve",)).graph_def.node}


def test_ranges_are_the_activations_min_and_max(mixed_scale_wide_deep):
    frozen = freeze_saved_model(mixed_scale_wide_deep)
    rows = _calibration_rows()
    calibration = calibrate_frozen_model(frozen, rows, batch_rows=100)  # 6 batches, the last one short
    module = tf.saved_model.load(str(mixed_scale_wide_deep))
    features = rows["serving_default"]
    x = tf.concat([tf.gather(module.user_table, features["user"]), tf.gather(module.item_table, features["item"]),
                   features["price"][:, None], features["rating"][:, None]], axis=1).numpy()
    weights, bias = (v.numpy() for v in module.layers[0])
    hidden = np.maximum(x @ weights + bias, 0.0)
    assert calibration.rows == 512
    assert calibration.ranges[FIRST] == pytest.approx((x.min(), x.max()), rel=1e-6)
    assert calibration.ranges[SECOND] == pytest.approx((hidden.min(), hidden.max()), rel=1e-5)
    # The 64x4 logits layer is under quantize_matmuls' minimum_dim: measured for its range, no error.
    assert sorted(calibration.layer_errors) == [FIRST, SECOND]


def test_layer_errors_find_the_layer_that_mixes_scales(mixed_scale_wide_deep):
    calibration = calibrate_frozen_model(freeze_saved_model(mixed_scale_wide_deep), _calibration_rows())
    # Measured: 0.140 (steps of 30/255 over embeddings of spread 0.3; 102 weight levels, not 127, keep
    # the non-VNNI kernels' int16 pair sums from saturating on its shifted input) and 0.008.
    assert 0.08 < calibration.layer_errors[FIRST] < 0.2
    assert calibration.layer_errors[SECOND] < 0.02


@pytest.mark.onednn
def test_guard_keeps_the_mixed_scale_layer_float_and_the_classes(mixed_scale_wide_deep, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="serving_optimiser"):
        report = optimise_saved_model(mixed_scale_wide_deep, tmp_path / "int8", CALIBRATED_INT8,
                                      calibration_inputs=_calibration_rows(), sample_inputs=_held_out_rows(),
                                      output_kinds=AS_CLASSES)
    ops = _ops(tmp_path / "int8")
    assert ops[FIRST] == "MatMul"
    assert ops[SECOND.replace("MatMul_1", "BiasAdd_1")] in (QUANTIZED_OP, "QuantizedMatMulWithBiasAndReluAndRequantize")
    step = next(s for s in report["calibration"] if s["transform"] == "quantize_matmuls")
    assert step["float_by_guard"] == [FIRST] and step["float_by_agreement"] == []
    assert step["rows"] == 512
    assert f"MatMul '{FIRST}' stays float: its int8 output error 0.14 " in caplog.text
    # Measured on the 1024 held-out rows: 99.90 % with the guard, 94.53 % without (next test).
    assert report["min_class_agreement"] >= 0.995


@pytest.mark.onednn
def test_without_the_guard_the_layer_costs_classes_and_the_fallback_restores_them(mixed_scale_wide_deep, tmp_path):
    unguarded = optimise_saved_model(mixed_scale_wide_deep, tmp_path / "unguarded", GUARD_OFF, gate=False,
                                     calibration_inputs=_calibration_rows(), sample_inputs=_held_out_rows(),
                                     output_kinds=AS_CLASSES)
    assert FIRST not in _ops(tmp_path / "unguarded")  # absorbed by its int8 layer
    assert unguarded["min_class_agreement"] < 0.97
    report = optimise_saved_model(mixed_scale_wide_deep, tmp_path / "fallback", GUARD_OFF, min_agreement=0.995,
                                  calibration_inputs=_calibration_rows(), sample_inputs=_held_out_rows(),
                                  output_kinds=AS_CLASSES)
    step = next(s for s in report["calibration"] if s["transform"] == "quantize_matmuls")
    assert step["float_by_agreement"] == [FIRST]  # the worst layer, and only it
    assert _ops(tmp_path / "fallback")[FIRST] == "MatMul"
    assert report["min_class_agreement"] >= 0.995


@pytest.mark.onednn
def test_fallback_that_cannot_reach_the_minimum_writes_nothing(mixed_scale_wide_deep, tmp_path):
    # Dropping the ReLUs is a loss no int8 layer explains: every layer goes back, then it fails.
    destructive = "remove_nodes(op=Relu) " + GUARD_OFF
    with pytest.raises(AgreementError, match=r"with every lossy tensor or layer back to float \(2, .*\) and every "
                       r"calibrated layer back to float; .* not written") as caught:
        optimise_saved_model(mixed_scale_wide_deep, tmp_path / "out", destructive, min_agreement=0.995,
                             calibration_inputs=_calibration_rows(), sample_inputs=_held_out_rows(),
                             output_kinds=AS_CLASSES)
    step = next(s for s in caught.value.report["calibration"] if s["transform"] == "quantize_matmuls")
    assert step["float_by_agreement"] == [FIRST, SECOND]
    assert not (tmp_path / "out").exists()


@pytest.mark.onednn
def test_convs_are_calibrated_after_the_batch_norm_folds(keras_cnn, tmp_path):
    """The frozen graph's names are not the folded graph's: a ranges file calibrated on the
    frozen graph fails, calibration at the point of the list does not."""
    frozen = freeze_saved_model(keras_cnn)
    images = np.random.default_rng(5).uniform(0, 1, (64, 12, 12, 3)).astype(np.float32)
    feeds = {"image": images}
    on_frozen = calibrate_ranges(frozen.graph_def, [{frozen.signatures["serving_default"].inputs["image"].name:
                                                     images}])
    path = tmp_path / "frozen_ranges.json"
    path.write_text(json.dumps(on_frozen))
    folds = "remove_nodes(op=Identity) fold_constants(ignore_errors=true) fold_batch_norms fold_old_batch_norms"
    with pytest.raises(TransformError, match="ranges_file names nodes that are not in the graph"):
        TransformGraph(frozen.graph_def, frozen.input_node_names(), frozen.output_node_names(),
                       f"{folds} quantize_convs(ranges_file={path})")
    report = optimise_saved_model(keras_cnn, tmp_path / "int8", CALIBRATED_INT8,
                                  calibration_inputs={key: feeds for key in ("serve", "serving_default")})
    step = next(s for s in report["calibration"] if s["transform"] == "quantize_convs")
    # conv2 (32 -> 64, measured 0.012); conv1 reads 3 channels, under minimum_dim.
    # (Keras numbers its functional models per process: the prefix depends on what ran before.)
    assert len(step["layer_errors"]) == 1 and next(iter(step["layer_errors"])).endswith("/conv2_1/convolution")
    ops = set(_ops(tmp_path / "int8").values())
    # The conv's bias add and Keras' ReLU are absorbed by the fused kernel.
    assert {op for op in ops if op.startswith("QuantizedConv2D")} == {"QuantizedConv2DWithBiasAndReluAndRequantize"}
    assert report["min_class_agreement"] >= 0.99


def test_calibration_runs_through_loops_and_lookup_tables(tf1_iris, tmp_path):
    """A TF 1 export with a string lookup table in its init op (a TF 1 Session of the frozen graph
    has no table); the ranges come from the signature's own call."""
    from saved_model.models import iris_inputs

    frozen = freeze_saved_model(tf1_iris)
    rows = iris_inputs(128, seed=3)
    inputs = {key: rows for key, signature in frozen.signatures.items() if set(signature.inputs) == set(rows)}
    calibration = calibrate_frozen_model(frozen, inputs)
    assert calibration.ranges and all(low <= high for low, high in calibration.ranges.values())
    assert calibration.layer_errors and max(calibration.layer_errors.values()) < 0.05


def test_calibration_of_a_while_loop_model_skips_the_loop_body(tmp_path, caplog):
    from model_builders.zoo import build_while_cond_module

    built = build_while_cond_module(str(tmp_path / "module"))
    frozen = freeze_saved_model(tmp_path / "module")
    inputs = {key: {name: built.inputs[name] for name in signature.inputs} for key, signature in
              frozen.signatures.items()}
    with caplog.at_level(logging.INFO, logger="serving_optimiser"):
        calibration = calibrate_frozen_model(frozen, inputs)
    assert "inside loops or conditional branches are not measured" in caplog.text
    assert all(np.isfinite(pair).all() for pair in calibration.ranges.values())


def test_calibration_file_round_trips_and_old_files_still_read(tmp_path):
    calibration = Calibration({"a": (-1.0, 2.0)}, {"a": 0.25}, frozenset({"b"}), rows=7)
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(calibration.to_json()))
    assert read_calibration_file("quantize_matmuls", str(path)) == calibration
    path.write_text(json.dumps({"a": [-1.0, 2.0]}))
    assert read_calibration_file("quantize_matmuls", str(path)) == Calibration({"a": (-1.0, 2.0)})
    path.write_text(json.dumps({**calibration.to_json(), "layer_errors": {"a": -1}}))
    with pytest.raises(TransformError, match="layer error of 'a' must be a number >= 0, found -1"):
        read_calibration_file("quantize_matmuls", str(path))


def test_bad_calibration_inputs_are_one_line_errors(mixed_scale_wide_deep, tmp_path):
    rows = mixed_scale_inputs(16)
    np.savez(tmp_path / "lacking.npz", **{k: v for k, v in rows.items() if k != "price"})
    with pytest.raises(SavedModelError, match="no array for signature 'serving_default' input 'price'"):
        optimise_saved_model(mixed_scale_wide_deep, tmp_path / "out", CALIBRATED_INT8,
                             calibration_inputs=tmp_path / "lacking.npz")
    np.savez(tmp_path / "extra.npz", **rows, weight=rows["price"])
    with pytest.raises(SavedModelError, match="array 'weight' feeds no calibrated signature input"):
        optimise_saved_model(mixed_scale_wide_deep, tmp_path / "out", CALIBRATED_INT8,
                             calibration_inputs=tmp_path / "extra.npz")
    with pytest.raises(SavedModelError, match=r"nowhere\.npz: no such calibration inputs file"):
        optimise_saved_model(mixed_scale_wide_deep, tmp_path / "out", CALIBRATED_INT8,
                             calibration_inputs=tmp_path / "nowhere.npz")
    assert not (tmp_path / "out").exists()


def test_keep_float_and_bad_guard_params(mixed_scale_wide_deep, tmp_path, caplog):
    frozen = freeze_saved_model(mixed_scale_wide_deep)
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(calibrate_frozen_model(frozen, _calibration_rows()).to_json()))
    names = frozen.input_node_names(), frozen.output_node_names()
    with caplog.at_level(logging.INFO, logger="serving_optimiser"):
        graph_def = TransformGraph(frozen.graph_def, *names,
                                   f"quantize_matmuls(ranges_file={path}, max_layer_error=1, keep_float={SECOND})")
    ops = {node.name: node.op for node in graph_def.node}
    assert FIRST not in ops and ops["StatefulPartitionedCall/BiasAdd"] == QUANTIZED_OP  # under max_layer_error=1
    assert ops[SECOND] == "MatMul"
    assert f"MatMul '{SECOND}' stays float: keep_float names it" in caplog.text
    assert f"MatMul '{FIRST}' stays float" not in caplog.text
    with pytest.raises(TransformError, match="max_layer_error must be positive, got 0"):
        TransformGraph(frozen.graph_def, *names, "quantize_matmuls(max_layer_error=0)")


def test_a_layer_cut_out_of_the_graph_computes_what_it_computed_there(mixed_scale_wide_deep):
    from serving_optimiser.saved_model.speed_guard import layer_graph

    frozen = freeze_saved_model(mixed_scale_wide_deep)
    graph_def = TransformGraph(frozen.graph_def, frozen.input_node_names(), frozen.output_node_names(),
                               "remove_nodes(op=Identity) fold_constants(ignore_errors=true)")
    probe = next(p for p in quantize_matmuls.layer_probes(graph_def, {}) if p.layer == SECOND)
    cut = layer_graph(graph_def, probe.input_tensor, probe.output_tensor)
    input_node = probe.input_tensor.split(":")[0]
    ops = {node.name: node.op for node in cut.node}
    assert ops[input_node] == "Placeholder" and ops[SECOND] == "MatMul"
    assert [name for name, op in ops.items() if op == "Placeholder"] == [input_node]  # no model input
    assert len(cut.node) < len(graph_def.node) / 2
    # The same float ops on the same input: the same values, bit for bit.
    feeds = {frozen.signatures["serving_default"].inputs[k].name: v for k, v in mixed_scale_inputs(64).items()}
    whole, part = tf.Graph(), tf.Graph()
    with whole.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    with part.as_default():
        tf.graph_util.import_graph_def(cut, name="")
    with tf.compat.v1.Session(graph=whole) as session:
        hidden, expected = session.run([probe.input_tensor, probe.output_tensor], feeds)
    with tf.compat.v1.Session(graph=part) as session:
        actual = session.run(probe.output_tensor, {probe.input_tensor: hidden})
    np.testing.assert_array_equal(actual, expected)
    # From one model input to the first layer's output is no layer alone: the other inputs feed it.
    first = next(p for p in quantize_matmuls.layer_probes(graph_def, {}) if p.layer == FIRST)
    price = frozen.signatures["serving_default"].inputs["price"].name
    assert layer_graph(graph_def, price, first.output_tensor) is None
    assert layer_graph(graph_def, first.input_tensor, first.output_tensor) is not None


@pytest.mark.onednn
def test_the_speed_guard_sends_layers_back_until_the_model_is_faster(mixed_scale_wide_deep, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="serving_optimiser"):
        # gate=False: the verdicts only reported, so what goes back is the speed guard's alone.
        report = optimise_saved_model(mixed_scale_wide_deep, tmp_path / "int8", GUARD_OFF, serving_batch_size=1,
                                      gate=False, calibration_inputs=_calibration_rows(),
                                      sample_inputs=_held_out_rows(), output_kinds=AS_CLASSES)
    step = next(s for s in report["calibration"] if s["transform"] == "quantize_matmuls")
    ratios, tries = step["layer_time_ratios"], report["serving_batch"]["time_ratios"]
    assert step["timed_batch_size"] == 1 and set(ratios) == {FIRST, SECOND} and min(ratios.values()) > 0
    for layer, ratio in ratios.items():
        assert f"layer '{layer}' int8 takes {ratio:.2f} x its float time at batch 1" in caplog.text
    # Which way it goes is this machine's measurement: one try per layer sent back, the slowest alone
    # first, and it stops at the first model faster than the original or when no int8 layer is left.
    sent_back = step["float_by_speed"]
    assert report["serving_batch"]["batch_size"] == 1 and len(tries) == len(sent_back) + 1
    assert all(ratio >= 1.0 for ratio in tries[:-1])
    assert tries[-1] < 1.0 or sent_back == sorted(ratios, key=lambda layer: -ratios[layer])
    still_slower = f"at batch 1 the optimised model still takes {tries[-1]:.2f} x the original's time with no int8"
    assert (still_slower in caplog.text) is (tries[-1] >= 1.0)
    assert sent_back == sorted(sent_back, key=lambda layer: -ratios[layer])
    ops = _ops(tmp_path / "int8")
    for layer in ratios:
        assert (ops.get(layer) == "MatMul") is (layer in sent_back)
    for count, ratio in enumerate(tries[:-1]):
        assert (f"at batch 1 the optimised model takes {ratio:.2f} x the original's time: quantize_matmuls layer "
                f"'{sent_back[count]}' (int8 alone {ratios[sent_back[count]]:.2f} x float) goes back") in caplog.text
    assert report["min_class_agreement"] >= 0.9


def test_time_ratios_round_trip_in_the_file_and_bad_ones_are_named(mixed_scale_wide_deep, tmp_path):
    calibration = calibrate_frozen_model(freeze_saved_model(mixed_scale_wide_deep), _calibration_rows())
    timed = dataclasses.replace(calibration, layer_time_ratios={SECOND: 1.25}, timed_batch_size=4)
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(timed.to_json()))
    assert read_calibration_file("quantize_matmuls", str(path)) == timed
    path.write_text(json.dumps({**timed.to_json(), "timed_batch_size": 0}))
    with pytest.raises(TransformError, match="'timed_batch_size' must be an integer >= 1, found 0"):
        read_calibration_file("quantize_matmuls", str(path))
    path.write_text(json.dumps({**timed.to_json(), "layer_time_ratios": {SECOND: "fast"}}))
    with pytest.raises(TransformError, match="'layer_time_ratios' must map names to positive numbers"):
        read_calibration_file("quantize_matmuls", str(path))


def test_a_serving_batch_size_needs_calibration_inputs(mixed_scale_wide_deep, tmp_path):
    with pytest.raises(SavedModelError, match="serving_batch_size times the calibrated layers: it needs "):
        optimise_saved_model(mixed_scale_wide_deep, tmp_path / "out", CALIBRATED_INT8, serving_batch_size=1)
    with pytest.raises(SavedModelError, match="serving_batch_size must be at least 1, found 0"):
        optimise_saved_model(mixed_scale_wide_deep, tmp_path / "out", CALIBRATED_INT8, serving_batch_size=0,
                             calibration_inputs=_calibration_rows())
    assert not (tmp_path / "out").exists()
