"""The peers section of params.yaml: each bad entry fails with one line naming its key."""

import copy

import pytest
from peers_helpers import SECTION

from serving_optimiser.errors import UserError
from serving_optimiser.peers.params import PeersParams, PeerSpec


def test_section_reads_as_eight_specs():
    params = PeersParams.from_section(SECTION)
    assert params.threads == 2
    assert params.variant("litert_int8_full") == PeerSpec("litert_int8_full", "litert", "int8_full", 120, None)
    assert params.variant("onnx_int8_dynamic") == PeerSpec("onnx_int8_dynamic", "onnx", "int8_dynamic", None, 17)
    assert params.variant("openvino_int8") == PeerSpec("openvino_int8", "openvino", "int8", 120, None, 32)
    assert {name: spec.filename for name, spec in params.variants.items()} == {
        "litert_fp32": "model.tflite",
        "litert_fp16": "model.tflite",
        "litert_int8_dynamic": "model.tflite",
        "litert_int8_full": "model.tflite",
        "onnx_fp32": "model.onnx",
        "onnx_int8_dynamic": "model.onnx",
        "openvino_fp32": "model.xml",
        "openvino_int8": "model.xml",
    }


def variants(section):
    return section["variants"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: s.pop("threads"), "missing key 'peers.threads'"),
        (lambda s: s.update(threads=0), "'peers.threads' must be positive, got 0"),
        (lambda s: s.update(threads=True), "'peers.threads' must be int, got True"),
        (lambda s: s.update(variants={}), "'peers.variants' must not be empty"),
        (lambda s: s.update(thread=2), "unknown key(s) peers.thread (expected threads, variants)"),
        (lambda s: variants(s).update(onnx_fp32="onnx"), "'peers.variants.onnx_fp32' must be a mapping"),
        (lambda s: variants(s)["litert_fp32"].pop("format"), "missing key 'peers.variants.litert_fp32.format'"),
        (
            lambda s: variants(s)["litert_fp32"].update(format="tflite"),
            "'peers.variants.litert_fp32.format' must be one of litert, onnx, openvino, got 'tflite'",
        ),
        (
            lambda s: variants(s)["onnx_fp32"].update(quantization="float16"),
            "'peers.variants.onnx_fp32.quantization' for onnx must be one of none, int8_dynamic, got 'float16'",
        ),
        (
            lambda s: variants(s)["litert_int8_full"].pop("calibration_rows"),
            "missing key 'peers.variants.litert_int8_full.calibration_rows'",
        ),
        (
            lambda s: variants(s)["litert_fp32"].update(calibration_rows=120),
            "unknown key(s) peers.variants.litert_fp32.calibration_rows "
            "(litert none peers take format, quantization)",
        ),
        (lambda s: variants(s)["onnx_fp32"].pop("opset"), "missing key 'peers.variants.onnx_fp32.opset'"),
        (
            lambda s: variants(s)["onnx_fp32"].update(opset=21),
            "'peers.variants.onnx_fp32.opset' must be between 13 and 18, got 21",
        ),
        (
            lambda s: variants(s)["litert_fp16"].update(opset=17),
            "unknown key(s) peers.variants.litert_fp16.opset",
        ),
        (
            lambda s: variants(s)["openvino_int8"].pop("minimum_dim"),
            "missing key 'peers.variants.openvino_int8.minimum_dim'",
        ),
        (
            lambda s: variants(s)["openvino_int8"].update(minimum_dim=0),
            "'peers.variants.openvino_int8.minimum_dim' must be positive, got 0",
        ),
        (
            lambda s: variants(s)["openvino_fp32"].update(calibration_rows=120),
            "unknown key(s) peers.variants.openvino_fp32.calibration_rows "
            "(openvino none peers take format, quantization)",
        ),
        (
            lambda s: variants(s)["openvino_fp32"].update(quantization="int8_dynamic"),
            "'peers.variants.openvino_fp32.quantization' for openvino must be one of none, int8, got 'int8_dynamic'",
        ),
    ],
    ids=[
        "no-threads",
        "zero-threads",
        "bool-threads",
        "no-variants",
        "unknown-top-key",
        "entry-not-mapping",
        "no-format",
        "unknown-format",
        "quantization-of-other-format",
        "int8-full-without-rows",
        "rows-on-fp32",
        "onnx-without-opset",
        "opset-too-new",
        "opset-on-litert",
        "openvino-int8-without-minimum-dim",
        "openvino-zero-minimum-dim",
        "rows-on-openvino-fp32",
        "openvino-unknown-quantization",
    ],
)
def test_bad_section_fails_naming_the_key(change, expected):
    section = copy.deepcopy(SECTION)
    change(section)
    with pytest.raises(UserError) as info:
        PeersParams.from_section(section, "params.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("params.yaml: ") and expected in message, message


def test_unknown_peer_name_lists_the_known_ones():
    with pytest.raises(UserError, match=r"no peer 'onnx_fp16' in 'peers.variants' \(has litert_fp16, litert_fp32"):
        PeersParams.from_section(SECTION).variant("onnx_fp16")
