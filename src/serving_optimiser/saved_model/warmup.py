"""TF Serving's warm-up records: ``assets.extra/tf_serving_warmup_requests``, a TFRecord file of
``tensorflow.serving.PredictionLog`` protos, each holding a ``PredictRequest``. TF Serving
replays them at load, before the model takes traffic, so the first real request does not pay for
oneDNN's first run per input shape (primitive creation, often many times a warm call).

The messages are declared here from tensorflow_serving/apis (``prediction_log.proto``,
``predict.proto``, ``model.proto``; only the fields a warm-up record uses, with their field
numbers) in a descriptor pool of our own, so there is no dependency on ``tensorflow-serving-api``
(which pins a TensorFlow of its own) and no clash with it in the default pool.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from tensorflow.core.framework import tensor_pb2

from .errors import SavedModelError
from .model import SignatureInfo

WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
DEFAULT_BATCH_SIZES = (1,)
_PACKAGE = "tensorflow.serving"


def _message(name: str, *fields: tuple[str, int, int, str | None, int]) -> descriptor_pb2.DescriptorProto:
    message = descriptor_pb2.DescriptorProto(name=name)
    for field_name, number, kind, type_name, label in fields:
        field = message.field.add(name=field_name, number=number, type=kind, label=label)
        if type_name:
            field.type_name = type_name
    return message


@functools.cache
def _classes() -> dict[str, type]:
    pool = descriptor_pool.DescriptorPool()
    _add_with_dependencies(pool, tensor_pb2.DESCRIPTOR)
    field = descriptor_pb2.FieldDescriptorProto
    optional, repeated = field.LABEL_OPTIONAL, field.LABEL_REPEATED
    string, message = field.TYPE_STRING, field.TYPE_MESSAGE
    inputs_entry = _message(
        "InputsEntry", ("key", 1, string, None, optional), ("value", 2, message, ".tensorflow.TensorProto", optional)
    )
    inputs_entry.options.map_entry = True
    request = _message(
        "PredictRequest",
        ("model_spec", 1, message, f".{_PACKAGE}.ModelSpec", optional),
        ("inputs", 2, message, f".{_PACKAGE}.PredictRequest.InputsEntry", repeated),
        ("output_filter", 3, string, None, repeated),
    )
    request.nested_type.append(inputs_entry)
    file = descriptor_pb2.FileDescriptorProto(
        name="serving_optimiser/tf_serving_warmup.proto",
        package=_PACKAGE,
        syntax="proto3",
        dependency=[tensor_pb2.DESCRIPTOR.name],
    )
    file.message_type.extend([
        _message("ModelSpec", ("name", 1, string, None, optional), ("signature_name", 3, string, None, optional)),
        request,
        _message("PredictLog", ("request", 1, message, f".{_PACKAGE}.PredictRequest", optional)),
        _message("PredictionLog", ("predict_log", 6, message, f".{_PACKAGE}.PredictLog", optional)),
    ])
    pool.Add(file)
    names = ("PredictionLog", "PredictRequest")
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}")) for name in names}


def _add_with_dependencies(pool: descriptor_pool.DescriptorPool, file_descriptor) -> None:
    for dependency in file_descriptor.dependencies:
        _add_with_dependencies(pool, dependency)
    try:
        pool.FindFileByName(file_descriptor.name)
    except KeyError:
        proto = descriptor_pb2.FileDescriptorProto()
        file_descriptor.CopyToProto(proto)
        pool.Add(proto)


def warmup_inputs(
    signature: SignatureInfo, batch_size: int, samples: Mapping[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """``batch_size`` rows for each input: the first rows of ``samples`` (repeated if too few), or
    seeded values generated from the signature's dtypes and shapes."""
    from .compare import generate_inputs

    if not samples:
        return generate_inputs(signature, batch_size)
    result = {}
    for name in sorted(signature.inputs):
        array = np.asarray(samples[name])
        if array.ndim == 0:
            result[name] = array
            continue
        rows = np.resize(np.arange(len(array)), batch_size) if len(array) else np.zeros(batch_size, int)
        result[name] = array[rows]
    return result


def prediction_logs(
    signatures: Iterable[SignatureInfo],
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    samples: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> list[bytes]:
    """Serialised PredictionLog records: one PredictRequest per signature and batch size."""
    from tensorflow.python.framework import tensor_util

    classes = _classes()
    records = []
    for signature in sorted(signatures, key=lambda s: s.key):
        for batch_size in batch_sizes:
            log = classes["PredictionLog"]()
            request = log.predict_log.request
            request.model_spec.signature_name = signature.key
            feeds = warmup_inputs(signature, batch_size, (samples or {}).get(signature.key))
            for name, value in feeds.items():
                dtype = signature.inputs[name].dtype
                # Our pool's TensorProto is another class than TensorFlow's: copy through the wire format.
                tensor = tensor_util.make_tensor_proto(value, dtype=dtype)
                request.inputs[name].ParseFromString(tensor.SerializeToString(deterministic=True))
            records.append(log.SerializeToString(deterministic=True))
    return records


def write_warmup_requests(
    directory: str | os.PathLike,
    signatures: Iterable[SignatureInfo],
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    samples: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> Path:
    """Write ``assets.extra/tf_serving_warmup_requests`` into the SavedModel ``directory``."""
    import tensorflow as tf

    if not batch_sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in batch_sizes):
        raise SavedModelError(f"warm-up batch sizes must be positive integers, got {list(batch_sizes)}")
    path = Path(directory) / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in prediction_logs(signatures, batch_sizes, samples):
            writer.write(record)
    return path


def read_warmup_requests(directory: str | os.PathLike) -> list[tuple[str, dict[str, np.ndarray]]]:
    """(signature key, inputs) of each warm-up record in the SavedModel ``directory``, in order
    (an empty signature name means ``serving_default``, as in TF Serving)."""
    import tensorflow as tf

    path = Path(directory) / WARMUP_FILE
    if not path.is_file():
        raise SavedModelError(f"{directory}: no warm-up records ({WARMUP_FILE})")
    parse = _classes()["PredictionLog"].FromString
    requests = []
    for index, record in enumerate(tf.data.TFRecordDataset(str(path)).as_numpy_iterator()):
        log = parse(record)
        if not log.HasField("predict_log"):
            raise SavedModelError(f"{path}: record {index} is not a PredictLog")
        request = log.predict_log.request
        inputs = {
            name: tf.make_ndarray(tensor_pb2.TensorProto.FromString(tensor.SerializeToString()))
            for name, tensor in sorted(request.inputs.items())
        }
        requests.append((request.model_spec.signature_name or "serving_default", inputs))
    return requests
