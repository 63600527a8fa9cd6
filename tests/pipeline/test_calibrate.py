"""The calibrate stage: which variants it calibrates and at which point of their lists, the file
it writes (ranges equal to the activations' min and max at that point, a per-layer int8 error),
and the optimise stage's int8 variant reading that file after the same transforms."""

import json

import numpy as np
import pytest
import yaml
from pipeline_helpers import ROOT

from serving_optimiser.errors import UserError
from serving_optimiser.pipeline.calibrate import calibrate, calibration_plan
from serving_optimiser.pipeline.model import Samples
from serving_optimiser.pipeline.params import PipelineParams

RANGES = "models/calibration/ranges.json"
BEFORE = ["remove_nodes(op=Identity)", "fold_constants(ignore_errors=true)", "fold_batch_norms"]
# The tiny model's hidden layers are 16 wide: under quantize_matmuls' default minimum_dim (32).
INT8 = [*BEFORE, f"quantize_matmuls(ranges_file={RANGES}, minimum_dim=16)", "strip_unused_nodes"]


def params_with(tmp_path, variants: dict) -> PipelineParams:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["optimise"] = variants
    path = tmp_path / "my-params.yaml"
    path.write_text(yaml.safe_dump(data))
    return PipelineParams.load(path)


def test_the_plan_is_the_lists_before_the_step_that_reads_the_file(tmp_path):
    plan = calibration_plan(params_with(tmp_path, {
        "lossless": BEFORE,
        "int8": INT8,
        "int8_more": [*INT8, "sort_by_execution_order"],
        "dynamic": [*BEFORE, "quantize_matmuls"],
    }), RANGES)
    assert plan.variants == ("int8", "int8_more")
    assert plan.before == tuple(BEFORE)
    assert plan.transforms == ("quantize_matmuls",)
    assert plan.minimum_dims == {"quantize_matmuls": 16}


def test_the_committed_params_calibrate_the_int8_variant_after_its_folds():
    plan = calibration_plan(PipelineParams.load(ROOT / "params.yaml"), RANGES)
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())["optimise"]["int8"]
    assert plan.variants == ("int8",) and plan.transforms == ("quantize_matmuls", "quantize_convs")
    assert list(plan.before) == committed[: len(plan.before)] and "fold_constants" in plan.before[1]


@pytest.mark.parametrize(("variants", "message"), [
    ({"int8": INT8, "other": [f"quantize_matmuls(ranges_file={RANGES})"]},
     "'optimise.int8' and 'optimise.other' read ranges_file=models/calibration/ranges.json after different "
     "transforms"),
    ({"lossless": BEFORE}, "no variant of 'optimise' names ranges_file=models/calibration/ranges.json"),
    ({"odd": [f"quantize_weights(ranges_file={RANGES})"]},
     "'optimise.odd': quantize_weights reads ranges_file=models/calibration/ranges.json, but only"),
    ({"a": [f"quantize_matmuls(ranges_file={RANGES}, minimum_dim=8)"],
      "b": [f"quantize_matmuls(ranges_file={RANGES}, minimum_dim=x)"]},
     "quantize_matmuls: minimum_dim must be an integer, found 'x'"),
])
def test_a_plan_that_cannot_be_calibrated_is_one_line_naming_the_file(tmp_path, variants, message):
    with pytest.raises(UserError) as raised:
        calibration_plan(params_with(tmp_path, variants), RANGES)
    assert message in str(raised.value) and str(tmp_path / "my-params.yaml") in str(raised.value)
    assert "\n" not in str(raised.value)


def test_the_file_holds_the_ranges_at_that_point_and_the_int8_variant_reads_it(tmp_path, tiny_export, tiny_samples):
    import tensorflow as tf

    from serving_optimiser.graph_transforms import TransformGraph
    from serving_optimiser.saved_model import freeze_saved_model

    frozen = freeze_saved_model(tiny_export)
    plan = calibration_plan(params_with(tmp_path, {"int8": INT8}), RANGES)
    rows = Samples.load(tiny_samples).calibration
    out = tmp_path / "ranges.json"
    calibration = calibrate(frozen, rows, plan, out)

    written = json.loads(out.read_text())
    assert written["format"] == "serving_optimiser.calibration" and written["rows"] == len(rows["sepal_length"])
    # At the point of the list: the names are the folded graph's, every one of its MatMuls is there.
    folded = TransformGraph(frozen.graph_def, frozen.input_node_names(), frozen.output_node_names(), BEFORE)
    matmuls = {node.name: node for node in folded.node if node.op == "MatMul"}
    assert set(written["ranges"]) == set(matmuls)
    # Each range is the min and max of that MatMul's input over the calibration rows, in float.
    predict = frozen.signatures["predict"]
    with tf.Graph().as_default() as graph:
        tf.graph_util.import_graph_def(folded, name="")
        with tf.compat.v1.Session(graph=graph) as session:
            fetched = session.run(
                {name: f"{node.input[0]}:0" if ":" not in node.input[0] else node.input[0]
                 for name, node in matmuls.items()},
                {predict.inputs[key].name: values for key, values in rows.items()},
            )
    for name, values in fetched.items():
        low, high = written["ranges"][name]
        assert low == pytest.approx(float(values.min()), rel=1e-6, abs=1e-6), name
        assert high == pytest.approx(float(values.max()), rel=1e-6, abs=1e-6), name
    # The 16-wide hidden layers are the candidates (the 4-feature input layer is under minimum_dim).
    assert set(calibration.layer_errors) == {n for n, node in matmuls.items() if _weights_min_dim(folded, node) >= 16}
    assert calibration.layer_errors and all(0 < error < 0.05 for error in calibration.layer_errors.values())

    # The int8 variant's list reads the file after the same transforms: no name is missing.
    listed = [step.replace(RANGES, str(out)) for step in INT8]
    optimised = TransformGraph(frozen.graph_def, frozen.input_node_names(), frozen.output_node_names(), listed)
    int8_ops = [node.op for node in optimised.node if node.op.startswith("Quantized")]
    assert len(int8_ops) == len(calibration.layer_errors)


def _weights_min_dim(graph_def, matmul) -> int:
    from tensorflow.python.framework import tensor_util

    nodes = {node.name: node for node in graph_def.node}
    weights = nodes[matmul.input[1].split(":")[0]]
    return min(tensor_util.MakeNdarray(weights.attr["value"].tensor).shape)


def test_rows_that_feed_no_signature_are_one_line(tmp_path, tiny_export):
    from serving_optimiser.saved_model import freeze_saved_model

    plan = calibration_plan(params_with(tmp_path, {"int8": INT8}), RANGES)
    with pytest.raises(UserError, match="no signature takes exactly the inputs petals"):
        calibrate(freeze_saved_model(tiny_export), {"petals": np.zeros((4, 1), np.float32)}, plan, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()
