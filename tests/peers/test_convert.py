"""Every peer format converts from the exported model, loads, answers batch-N and batch-1 calls
with the TF model's four outputs, agrees with it, converts to the same bytes again, and a broken
conversion fails with one line naming the artefact and writes nothing."""

import itertools

import numpy as np
import onnx
import pytest
from peers_helpers import SPECS, first_rows

from serving_optimiser.errors import UserError
from serving_optimiser.peers.convert import calibration_subset, convert_peer, model_bytes, model_files
from serving_optimiser.peers.predictor import load_predictor
from serving_optimiser.pipeline.data import FEATURE_NAMES, LABEL_VOCABULARY
from serving_optimiser.pipeline.export import export_saved_model
from serving_optimiser.runtime import native_output_silenced

# The Iris export's predict signature's outputs (the peers map class_ids to classes).
OUTPUT_NAMES = ("class_ids", "classes", "logits", "probabilities")

# The module shares the session's trained model and artefacts: keep it on one xdist worker.
pytestmark = pytest.mark.xdist_group("peers")

QUANTISED = [name for name, spec in SPECS.items() if spec.quantization != "none"]
FLOAT = [name for name, spec in SPECS.items() if spec.quantization == "none"]


def shapes_and_dtypes(outputs):
    return {key: (value.dtype, value.shape) for key, value in outputs.items()}


@pytest.mark.parametrize("name", list(SPECS))
def test_artefact_answers_batch_n_and_batch_1_like_the_tf_model(
    name, peer_artefacts, tf_predictor, compare_rows, reference_outputs
):
    predictor = load_predictor(peer_artefacts[name].parent, threads=2, label_vocabulary=LABEL_VOCABULARY)
    single = first_rows(compare_rows, 1)
    reference_single = tf_predictor(single)
    # N, then 1, then N again: switching batch sizes must not disturb either.
    for rows, reference in ((compare_rows, reference_outputs), (single, reference_single)):
        outputs = predictor.checked(rows, LABEL_VOCABULARY)
        assert set(outputs) == set(OUTPUT_NAMES)
        assert shapes_and_dtypes(outputs) == shapes_and_dtypes(reference)
        assert isinstance(outputs["classes"][0, 0], bytes)
    outputs = predictor(compare_rows)
    agreement = np.mean(outputs["class_ids"] == reference_outputs["class_ids"])
    max_diff = np.max(np.abs(outputs["probabilities"] - reference_outputs["probabilities"]))
    if name in FLOAT:
        assert max_diff <= 1e-5
        assert agreement == 1.0
        np.testing.assert_array_equal(outputs["classes"], reference_outputs["classes"])
        np.testing.assert_allclose(predictor(single)["probabilities"][0], outputs["probabilities"][0], atol=1e-6)
    else:
        assert agreement >= 0.95, f"{name}: class agreement {agreement:.3f}"
        assert max_diff > 1e-5, f"{name}: probabilities identical to the float model's: nothing was quantised"


def litert_tensor_dtypes(path):
    from ai_edge_litert.interpreter import Interpreter

    with native_output_silenced():
        details = Interpreter(model_path=str(path)).get_tensor_details()
    return [np.dtype(detail["dtype"]).name for detail in details]


def test_litert_quantizations_store_what_they_say(peer_artefacts):
    dtypes = {name: litert_tensor_dtypes(peer_artefacts[name]) for name in SPECS if SPECS[name].format == "litert"}
    assert not {"int8", "float16"} & set(dtypes["litert_fp32"])
    assert "float16" in dtypes["litert_fp16"] and "int8" not in dtypes["litert_fp16"]
    assert "int8" in dtypes["litert_int8_dynamic"]
    # Full integer: activations are int8 too, so it holds more int8 tensors than weights-only.
    assert dtypes["litert_int8_full"].count("int8") > dtypes["litert_int8_dynamic"].count("int8")


def test_onnx_artefacts_hold_numeric_outputs_and_int8_matmuls(peer_artefacts):
    models = {name: onnx.load(peer_artefacts[name]) for name in ("onnx_fp32", "onnx_int8_dynamic")}
    for model in models.values():
        assert sorted(value.name for value in model.graph.input) == sorted(FEATURE_NAMES)
        assert sorted(value.name for value in model.graph.output) == ["class_ids", "logits", "probabilities"]
    ops = {name: {node.op_type for node in model.graph.node} for name, model in models.items()}
    assert "MatMul" in ops["onnx_fp32"] and "MatMulInteger" not in ops["onnx_fp32"]
    assert "MatMulInteger" in ops["onnx_int8_dynamic"] and "MatMul" not in ops["onnx_int8_dynamic"]


# litert_int8_full, onnx_int8_dynamic and openvino_int8 are reconverted in another process by
# test_convert_peer_script.
@pytest.mark.parametrize("name", ["litert_fp32", "litert_fp16", "litert_int8_dynamic", "onnx_fp32", "openvino_fp32"])
def test_conversion_gives_the_same_bytes_again(name, peer_artefacts, peer_export, train_features):
    files = model_files(SPECS[name], peer_export, train_features)
    assert files == {path.name: path.read_bytes() for path in sorted(peer_artefacts[name].parent.iterdir())}
    if SPECS[name].format != "openvino":
        assert model_bytes(SPECS[name], peer_export, train_features) == peer_artefacts[name].read_bytes()


def test_openvino_ir_is_two_files_with_float32_weights_and_numeric_outputs(peer_artefacts):
    import openvino as ov

    for name in ("openvino_fp32", "openvino_int8"):
        directory = peer_artefacts[name].parent
        assert sorted(path.name for path in directory.iterdir()) == ["model.bin", "model.xml"]
    model = ov.Core().read_model(str(peer_artefacts["openvino_fp32"]))
    assert sorted(name for output in model.outputs for name in output.get_names()) == [
        "class_ids", "logits", "probabilities"
    ]
    assert sorted(name for p in model.get_parameters() for name in p.output(0).get_names()) == sorted(FEATURE_NAMES)
    constants = [op for op in model.get_ops() if op.get_type_name() == "Constant"]
    # save_model would store float16 weights unless told not to: the fp32 IR keeps float32.
    assert {str(op.get_element_type()) for op in constants if op.get_output_size() and op.shape and
            len(op.shape) == 2} == {"<Type: 'float32'>"}


def openvino_ops(path):
    import openvino as ov

    return ov.Core().read_model(str(path)).get_ordered_ops()


def test_openvino_int8_quantises_only_the_wide_matmuls(peer_artefacts):
    """NNCF puts FakeQuantize on both inputs of each MatMul at least minimum_dim (32) wide: here the
    64x64 hidden layer; the 4-feature input layer and the 3-class logits layer stay float."""
    import openvino as ov

    from serving_optimiser.peers.openvino import narrow_matmuls

    float_model = ov.Core().read_model(str(peer_artefacts["openvino_fp32"]))
    assert narrow_matmuls(float_model, 32) == ["dnn/hiddenlayer_0/MatMul", "dnn/logits/MatMul"]
    assert narrow_matmuls(float_model, 3) == []
    quantised = {op.get_friendly_name(): op for op in openvino_ops(peer_artefacts["openvino_int8"])}
    fed_by_fake_quantize = {
        name for name, op in quantised.items() if op.get_type_name() == "MatMul"
        for value in op.input_values() if value.get_node().get_type_name() in ("FakeQuantize", "Convert")
    }
    assert fed_by_fake_quantize == {"dnn/hiddenlayer_1/MatMul"}
    assert not any(op.get_type_name() == "FakeQuantize" for op in openvino_ops(peer_artefacts["openvino_fp32"]))


def test_openvino_compiles_with_the_fair_settings_and_runs_int8_where_quantised(peer_artefacts):
    predictors = {
        name: load_predictor(peer_artefacts[name], threads=1, label_vocabulary=LABEL_VOCABULARY)
        for name in ("openvino_fp32", "openvino_int8")
    }
    for predictor in predictors.values():
        compiled = predictor.compiled
        assert str(compiled.get_property("PERFORMANCE_HINT")) == "LATENCY"
        assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
        assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    # The precision hint holds every float layer at f32, even on a CPU with bf16 or AMX.
    assert predictors["openvino_fp32"].runtime_precisions()["FullyConnected"] == {"f32"}
    assert {"i8", "u8"} & predictors["openvino_int8"].runtime_precisions()["FullyConnected"]


def test_openvino_sends_no_telemetry(peer_export, train_features):
    import sys

    model_files(SPECS["openvino_int8"], peer_export, train_features)
    assert "openvino_telemetry" not in sys.modules


def test_openvino_ir_without_its_weights_or_truncated_fails_naming_it(peer_artefacts, tmp_path):
    source = peer_artefacts["openvino_fp32"]
    lonely = tmp_path / "lonely" / "model.xml"
    lonely.parent.mkdir()
    lonely.write_bytes(source.read_bytes())
    with pytest.raises(UserError) as info:
        load_predictor(lonely.parent, label_vocabulary=LABEL_VOCABULARY)
    assert_fails_naming(info.value, lonely, "no model.bin beside it")
    broken = tmp_path / "broken" / "model.xml"
    broken.parent.mkdir()
    broken.write_bytes(source.read_bytes()[: len(source.read_bytes()) // 2])
    broken.with_suffix(".bin").write_bytes(source.with_suffix(".bin").read_bytes())
    with pytest.raises(UserError) as info:
        load_predictor(broken, label_vocabulary=LABEL_VOCABULARY)
    assert_fails_naming(info.value, broken, "not a valid OpenVINO model")
    # Without a vocabulary there is nothing to spell class ids with: the numeric outputs only.
    outputs = load_predictor(source)({name: np.ones(2, np.float32) for name in FEATURE_NAMES})
    assert sorted(outputs) == ["class_ids", "logits", "probabilities"]


def test_calibration_rows_are_spread_over_the_split(train_features):
    subset = calibration_subset(train_features, 12)
    assert len(subset["petal_length"]) == 12
    # The split lists the classes one after the other; a spread sample covers all three.
    assert subset["petal_length"].min() < 2 and subset["petal_length"].max() > 5
    assert len(calibration_subset(train_features, 10_000)["petal_length"]) == len(train_features["petal_length"])


@pytest.fixture(scope="module")
def nan_export(tmp_path_factory):
    rng = np.random.default_rng(0)
    sizes = [4, 8, 3]
    weights = [
        (rng.normal(size=(a, b)).astype(np.float32), np.zeros(b, np.float32)) for a, b in itertools.pairwise(sizes)
    ]
    weights[-1][1][1] = np.nan  # a broken conversion's symptom: one poisoned bias
    directory = tmp_path_factory.mktemp("nan") / "exported"
    export_saved_model(weights, directory)
    return directory


def assert_fails_naming(error: UserError, artefact, reason: str):
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"{artefact}: ") and reason in message, message


@pytest.mark.parametrize("name", ["litert_fp32", "onnx_fp32", "openvino_fp32"])
def test_conversion_whose_outputs_hold_nan_fails_and_writes_nothing(name, nan_export, train_features, tmp_path):
    with pytest.raises(UserError) as info:
        convert_peer(SPECS[name], nan_export, tmp_path, train_features, LABEL_VOCABULARY)
    assert_fails_naming(info.value, tmp_path / name / SPECS[name].filename, "has ")
    assert "NaN values" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_conversion_with_the_wrong_output_shape_fails(peer_export, train_features, tmp_path):
    # The signature says four classes where the model has three: [N, 3] where [N, 4] is expected.
    expected = {"logits": ("float32", [None, 4])}
    with pytest.raises(UserError) as info:
        convert_peer(SPECS["onnx_fp32"], peer_export, tmp_path, train_features, LABEL_VOCABULARY, expected=expected)
    assert_fails_naming(info.value, tmp_path / "onnx_fp32" / "model.onnx", "output 'logits' must be float32 [120, 4]")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["litert_fp32", "onnx_fp32"])
def test_truncated_artefact_fails_to_load_naming_it(name, peer_artefacts, tmp_path):
    content = peer_artefacts[name].read_bytes()
    broken = tmp_path / name / SPECS[name].filename
    broken.parent.mkdir()
    broken.write_bytes(content[: len(content) // 2])
    with pytest.raises(UserError) as info:
        load_predictor(broken.parent, label_vocabulary=LABEL_VOCABULARY)
    assert_fails_naming(info.value, broken, "not a valid")

