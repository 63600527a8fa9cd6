"""Every registered transform returns a new GraphDef and leaves its argument alone: the guard in
optimise_saved_model re-applies the list to the same frozen graph on every fallback round, so a
transform that edited its input in place would compound its own changes."""

import pytest

from model_builders.sample_graphs import (
    IRIS_FEATURES,
    IRIS_OUTPUT,
    MOBILENET_INPUT,
    frozen_iris_dnn,
    frozen_mobilenet_v2,
)
from serving_optimiser.errors import UserError
from serving_optimiser.graph_transforms import registry
from serving_optimiser.graph_transforms.context import TransformContext

# What a transform needs to do something on these graphs (the old tool's parameter names).
PARAMS = {
    "remove_nodes": {"op": ["Identity"]},
    "rename_op": {"old_op_name": ["Relu"], "new_op_name": ["Elu"]},
    "rename_attribute": {"old_attribute_name": ["T"], "new_attribute_name": ["Tx"]},
    "remove_attribute": {"attribute_name": ["T"]},
    "rename_node": {"old_node_name": ["sepal_length"], "new_node_name": ["sepal_length_cm"]},
    "set_device": {"device": ["/cpu:0"]},
    "insert_logging": {"op": ["Relu"]},
    "quantize_matmuls": {"minimum_dim": ["1"]},
    "quantize_weights": {"minimum_size": ["16"]},
}


@pytest.fixture(scope="module")
def graphs():
    return {
        "iris": (frozen_iris_dnn(hidden_units=(64, 64)), list(IRIS_FEATURES), [IRIS_OUTPUT]),
        "mobilenet": (frozen_mobilenet_v2(alpha=0.35, size=32), [MOBILENET_INPUT], ["Identity"]),
    }


@pytest.mark.parametrize("name", registry.registered_names())
def test_the_transform_leaves_its_argument_unchanged(name, graphs):
    transform = registry.get_transform(name)
    changed = False
    for graph_def, inputs, outputs in graphs.values():
        before = graph_def.SerializeToString(deterministic=True)
        context = TransformContext(name, list(inputs), list(outputs), dict(PARAMS.get(name, {})))
        try:
            result = transform.function(graph_def, context)
        except UserError:
            result = None  # refusing these graphs (no ranges, no log file) is fine: the argument must still be intact
        assert graph_def.SerializeToString(deterministic=True) == before, f"{name} edited its argument"
        if result is not None:  # (a transform with nothing to do may hand its argument back, untouched)
            changed |= result.SerializeToString(deterministic=True) != before
    # Most transforms change one of the graphs: the check above ran them for real.
    if name in ("remove_nodes", "rename_op", "quantize_weights", "round_weights",
                "sort_by_execution_order", "quantize_matmuls", "set_device", "insert_logging"):
        assert changed, f"{name} changed neither graph: the test did not exercise it"
