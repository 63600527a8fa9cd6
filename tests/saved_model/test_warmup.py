"""TF Serving's warm-up records: convert and optimise_saved_model write
``assets.extra/tf_serving_warmup_requests`` (PredictionLog records, TF Serving's wire format),
one PredictRequest per kept signature and batch size; read back, they replay through the loaded
model as the model server replays them at load."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from saved_model.models import LOSSLESS, iris_inputs
from tensorflow.core.framework import tensor_pb2

from serving_optimiser.saved_model import (
    FrozenModel,
    SavedModelError,
    ServingSession,
    convert_to_saved_model,
    freeze_saved_model,
    optimise_saved_model,
    read_warmup_requests,
)
from serving_optimiser.saved_model.warmup import WARMUP_FILE


@pytest.fixture(scope="module")
def frozen_iris(tf1_iris) -> FrozenModel:
    return freeze_saved_model(tf1_iris)


def test_one_batch_1_request_per_signature_by_default(frozen_iris, tmp_path):
    convert_to_saved_model(frozen_iris, tmp_path / "model")
    requests = read_warmup_requests(tmp_path / "model")
    assert [key for key, _ in requests] == ["predict", "serving_default"]
    for key, inputs in requests:
        signature = frozen_iris.signatures[key]
        assert sorted(inputs) == sorted(signature.inputs)
        for name, value in inputs.items():
            assert value.dtype == np.dtype(signature.inputs[name].dtype) and value.shape == (1,), name


def test_the_records_are_tf_serving_prediction_logs(frozen_iris, tmp_path):
    """Decoded field by field from the wire format TF Serving reads (prediction_log.proto:
    predict_log = 6; PredictLog.request = 1; PredictRequest.model_spec = 1, inputs = 2 (map);
    ModelSpec.signature_name = 3), independently of the module's own descriptors."""
    convert_to_saved_model(frozen_iris, tmp_path / "model", warmup_batch_sizes=[2])
    records = list(tf.data.TFRecordDataset(str(tmp_path / "model" / WARMUP_FILE)).as_numpy_iterator())
    assert len(records) == 2
    log = _fields(records[0])
    request = _fields(log[6][0])[1][0]
    fields = _fields(request)
    assert _fields(fields[1][0])[3] == [b"predict"]
    entries = [_fields(entry) for entry in fields[2]]
    names = sorted(entry[1][0] for entry in entries)
    assert names == [b"petal_length", b"petal_width", b"sepal_length", b"sepal_width"]
    tensor = tf.make_ndarray(tensor_pb2.TensorProto.FromString(entries[0][2][0]))
    assert tensor.dtype == np.float32 and tensor.shape == (2,)


def _fields(message: bytes) -> dict[int, list]:
    """Length-delimited and varint fields of one protobuf message, by field number."""
    fields: dict[int, list] = {}
    position = 0
    while position < len(message):
        key, position = _varint(message, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 2:
            length, position = _varint(message, position)
            value, position = message[position:position + length], position + length
        elif wire_type == 0:
            value, position = _varint(message, position)
        else:
            raise AssertionError(f"unexpected wire type {wire_type}")
        fields.setdefault(number, []).append(value)
    return fields


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, position


def test_replayed_through_both_loaders(tf1_iris, tmp_path):
    samples = {key: iris_inputs(3, seed=2) for key in ("predict", "serving_default")}
    np.savez(tmp_path / "inputs.npz", **samples["predict"])
    report = optimise_saved_model(
        tf1_iris, tmp_path / "model", LOSSLESS, sample_inputs=tmp_path / "inputs.npz", warmup_batch_sizes=[1, 8]
    )
    assert report["warmup_batch_sizes"] == [1, 8]
    requests = read_warmup_requests(tmp_path / "model")
    assert [(key, len(inputs["petal_length"])) for key, inputs in requests] == [
        ("predict", 1), ("predict", 8), ("serving_default", 1), ("serving_default", 8)]
    # From the sample inputs, their rows repeated to fill the batch.
    np.testing.assert_array_equal(requests[1][1]["petal_length"], np.resize(samples["predict"]["petal_length"], 8))
    loaded = tf.saved_model.load(str(tmp_path / "model"))
    with ServingSession(tmp_path / "model") as session:
        replies = session.replay_warmup()
        for (key, inputs), reply in zip(requests, replies, strict=True):
            expected = loaded.signatures[key](**{k: tf.constant(v) for k, v in inputs.items()})
            assert reply["classes"].shape == (len(inputs["petal_length"]), 1)
            np.testing.assert_array_equal(reply["classes"], expected["classes"].numpy())


def test_bytes_are_the_same_every_time_and_none_when_asked(frozen_iris, tmp_path):
    for name in ("a", "b"):
        convert_to_saved_model(frozen_iris, tmp_path / name, warmup_batch_sizes=[1, 4])
    assert (tmp_path / "a" / WARMUP_FILE).read_bytes() == (tmp_path / "b" / WARMUP_FILE).read_bytes()
    convert_to_saved_model(frozen_iris, tmp_path / "none", warmup_batch_sizes=[])
    assert not (tmp_path / "none" / "assets.extra").exists()
    with pytest.raises(SavedModelError, match="no warm-up records"):
        read_warmup_requests(tmp_path / "none")


def test_bad_batch_sizes_fail_and_write_nothing(frozen_iris, tmp_path):
    with pytest.raises(SavedModelError, match=r"warm-up batch sizes must be positive integers, got \[0\]"):
        convert_to_saved_model(frozen_iris, tmp_path / "model", warmup_batch_sizes=[0])
    assert not (tmp_path / "model").exists()
