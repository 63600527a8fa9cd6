"""Export: the notebook's two signatures, inputs and outputs, and only inference weights."""

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from serving_optimiser.pipeline.data import FEATURE_NAMES, LABEL_VOCABULARY, features_and_labels
from serving_optimiser.pipeline.train import stack_features

EXPECTED_OUTPUTS = {
    "class_ids": (tf.int64, [-1, 1]),
    "classes": (tf.string, [-1, 1]),
    "logits": (tf.float32, [-1, 3]),
    "probabilities": (tf.float32, [-1, 3]),
}


def test_signatures_are_the_notebooks(tiny_export):
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((tiny_export / "saved_model.pb").read_bytes())
    (meta_graph,) = saved_model.meta_graphs
    assert list(meta_graph.meta_info_def.tags) == ["serve"]
    assert set(meta_graph.signature_def) == {"predict", "serving_default"}
    for signature in meta_graph.signature_def.values():
        assert signature.method_name == "tensorflow/serving/predict"
        assert {k: (v.name, v.dtype, [d.size for d in v.tensor_shape.dim]) for k, v in signature.inputs.items()} == {
            name: (f"{name}:0", tf.float32.as_datatype_enum, [-1]) for name in FEATURE_NAMES
        }
        assert {k: (v.dtype, [d.size for d in v.tensor_shape.dim]) for k, v in signature.outputs.items()} == {
            k: (dtype.as_datatype_enum, shape) for k, (dtype, shape) in EXPECTED_OUTPUTS.items()
        }
    variable_ops = [n.name for n in meta_graph.graph_def.node if n.op == "VarHandleOp"]
    assert len(variable_ops) == 6  # kernel and bias of 2 hidden layers and the logits: no optimiser slots


def test_exported_model_computes_what_keras_computed(tiny_export, tiny_trained, iris_split):
    model = tiny_trained[0]
    features, _ = features_and_labels(iris_split[1])
    loaded = tf.saved_model.load(str(tiny_export))
    for key in ("predict", "serving_default"):
        outputs = loaded.signatures[key](**{k: tf.constant(v) for k, v in features.items()})
        logits = model(stack_features(features)).numpy()
        np.testing.assert_allclose(outputs["logits"].numpy(), logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(outputs["probabilities"].numpy().sum(axis=1), 1.0, rtol=1e-5)
        class_ids = outputs["class_ids"].numpy()
        assert class_ids.shape == (len(logits), 1)
        np.testing.assert_array_equal(class_ids[:, 0], logits.argmax(axis=1))
        assert [c.decode() for c in outputs["classes"].numpy()[:, 0]] == [LABEL_VOCABULARY[i] for i in class_ids[:, 0]]
