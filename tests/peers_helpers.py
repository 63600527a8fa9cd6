"""Shared values for the peers tests: the small model's training params and the eight peer specs."""

import numpy as np

from serving_optimiser.peers.params import PeerSpec
from serving_optimiser.pipeline.train import TrainParams

# 64 units: the 64x64 hidden weight has 4096 elements, above the LiteRT converter's 1024-element
# threshold for dynamic-range quantization, so int8_dynamic really quantizes something.
PEER_MODEL = TrainParams(hidden_units=[64, 64], learning_rate=0.05, batch_size=50, epochs=30, seed=19830610)

SPECS = {
    "litert_fp32": PeerSpec("litert_fp32", "litert", "none"),
    "litert_fp16": PeerSpec("litert_fp16", "litert", "float16"),
    "litert_int8_dynamic": PeerSpec("litert_int8_dynamic", "litert", "int8_dynamic"),
    "litert_int8_full": PeerSpec("litert_int8_full", "litert", "int8_full", calibration_rows=120),
    "onnx_fp32": PeerSpec("onnx_fp32", "onnx", "none", opset=17),
    "onnx_int8_dynamic": PeerSpec("onnx_int8_dynamic", "onnx", "int8_dynamic", opset=17),
    "openvino_fp32": PeerSpec("openvino_fp32", "openvino", "none"),
    # minimum_dim 32 as in params.yaml: of the 64x64 model's MatMuls (4x64, 64x64, 64x3) only the
    # middle one is quantised.
    "openvino_int8": PeerSpec("openvino_int8", "openvino", "int8", calibration_rows=120, minimum_dim=32),
}


def first_rows(features: dict, rows: int) -> dict:
    return {name: np.asarray(values)[:rows] for name, values in features.items()}

# The peers section of params.yaml (the same eight peers as SPECS).
SECTION = {
    "threads": 2,
    "variants": {
        "litert_fp32": {"format": "litert", "quantization": "none"},
        "litert_fp16": {"format": "litert", "quantization": "float16"},
        "litert_int8_dynamic": {"format": "litert", "quantization": "int8_dynamic"},
        "litert_int8_full": {"format": "litert", "quantization": "int8_full", "calibration_rows": 120},
        "onnx_fp32": {"format": "onnx", "quantization": "none", "opset": 17},
        "onnx_int8_dynamic": {"format": "onnx", "quantization": "int8_dynamic", "opset": 17},
        "openvino_fp32": {"format": "openvino", "quantization": "none"},
        "openvino_int8": {"format": "openvino", "quantization": "int8", "calibration_rows": 120, "minimum_dim": 32},
    },
}
