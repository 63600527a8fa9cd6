"""Peer artefacts of the exported model (LiteRT, ONNX Runtime, OpenVINO), and one predictor
interface over them and the TensorFlow SavedModel.

Modules: ``predictor`` (the interface, output validation, the TensorFlow predictor),
``litert``, ``onnx_runtime`` and ``openvino`` (conversion and predictor of each format),
``params`` (the ``peers`` section of a params file), ``convert`` (build, check and write one
artefact). TensorFlow, LiteRT, ONNX Runtime, OpenVINO and NNCF are imported only when a function
needs them. This package knows no model (every key, dtype and shape comes from the signature)
and imports nothing from :mod:`serving_optimiser.pipeline`; import from its modules (this file
imports none, so reading the peers' params loads no predictor code).
"""
