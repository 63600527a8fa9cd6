"""Peer artefacts of the exported model (LiteRT, ONNX Runtime, OpenVINO), and one predictor
interface over them and the TensorFlow SavedModel.

Modules: ``predictor`` (the interface, output validation, the TensorFlow predictor),
``litert``, ``onnx_runtime`` and ``openvino`` (conversion and predictor of each format),
``params`` (the ``peers`` section of params.yaml), ``convert`` (build, check and write one
artefact). TensorFlow, LiteRT, ONNX Runtime, OpenVINO and NNCF are imported only when a function
needs them.
"""

from .predictor import OUTPUT_NAMES, Predictor, load_predictor, validate_outputs

__all__ = ["OUTPUT_NAMES", "Predictor", "load_predictor", "validate_outputs"]
