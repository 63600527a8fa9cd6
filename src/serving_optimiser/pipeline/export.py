"""Export: the trained weights as a SavedModel with the notebook's two signatures.

The graph is built the way ``tf.estimator``'s DNNClassifier exported it (one float Placeholder
per feature, variables per layer, MatMul/BiasAdd/Relu, softmax head), with
``tf.compat.v1.saved_model.Builder``, so TF Serving clients of the notebook's model work
unchanged. Only inference weights are stored: no optimiser slots, no global step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import atomic_directory
from .data import FEATURE_NAMES, LABEL_VOCABULARY

SIGNATURE_KEYS = ("predict", "serving_default")
OUTPUT_TENSORS = {
    "class_ids": "dnn/head/predictions/ExpandDims:0",
    "classes": "dnn/head/predictions/str_classes:0",
    "logits": "dnn/logits/BiasAdd:0",
    "probabilities": "dnn/head/predictions/probabilities:0",
}


def export_saved_model(
    weights: list[tuple[np.ndarray, np.ndarray]],
    export_dir: str | Path,
    label_vocabulary: list[str] = LABEL_VOCABULARY,
) -> None:
    """Write the SavedModel atomically to ``export_dir``."""
    import tensorflow as tf

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        features = {name: v1.placeholder(tf.float32, shape=[None], name=name) for name in FEATURE_NAMES}
        net = tf.stack([features[name] for name in FEATURE_NAMES], axis=1, name="dnn/input_from_feature_columns/concat")
        variables = []
        for index, (kernel, bias) in enumerate(weights):
            last = index == len(weights) - 1
            scope = "dnn/logits" if last else f"dnn/hiddenlayer_{index}"
            with v1.variable_scope(scope):
                kernel_var = v1.get_variable(
                    "kernel",
                    shape=kernel.shape,
                    dtype=tf.float32,
                    initializer=v1.zeros_initializer(),
                    use_resource=True,
                )
                bias_var = v1.get_variable(
                    "bias", shape=bias.shape, dtype=tf.float32, initializer=v1.zeros_initializer(), use_resource=True
                )
                net = tf.nn.bias_add(tf.matmul(net, kernel_var, name="MatMul"), bias_var, name="BiasAdd")
                if not last:
                    net = tf.nn.relu(net, name="Relu")
            variables += [(kernel_var, kernel), (bias_var, bias)]
        logits = net
        with tf.name_scope("dnn/head/predictions"):
            probabilities = tf.nn.softmax(logits, name="probabilities")
            class_ids = tf.expand_dims(tf.argmax(logits, axis=1, name="class_ids"), -1, name="ExpandDims")
            vocabulary = tf.constant(label_vocabulary, name="label_vocabulary")
            classes = tf.gather(vocabulary, class_ids, name="str_classes")
        outputs = {"class_ids": class_ids, "classes": classes, "logits": logits, "probabilities": probabilities}
        signature = v1.saved_model.predict_signature_def(inputs=features, outputs=outputs)
        with v1.Session(graph=graph) as session:
            # Feeding each variable's initial value loads the weights without storing them as
            # constants (or assign ops) in the graph.
            for variable, value in variables:
                session.run(variable.initializer, {variable.initializer.inputs[1]: value})
            with atomic_directory(export_dir) as temporary:
                target = Path(temporary) / "model"
                builder = v1.saved_model.Builder(str(target))
                builder.add_meta_graph_and_variables(
                    session,
                    [tf.saved_model.SERVING],
                    signature_def_map={key: signature for key in SIGNATURE_KEYS},
                    strip_default_attrs=True,
                )
                builder.save()
                for item in target.iterdir():
                    item.rename(Path(temporary) / item.name)
                target.rmdir()
