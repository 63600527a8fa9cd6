"""Peer artefacts of the exported model (LiteRT, ONNX Runtime, OpenVINO), and one predictor
interface over them and the TensorFlow SavedModel.

Modules: ``base`` (the predictor interface, its load options, the input and output checks; no
runtime), ``formats`` (the format table: files, quantisations, which are calibrated, and the
runtime module of each format, imported on first use), one module per runtime (``tf``,
``litert``, ``onnx``, ``openvino``, each importing only ``base`` and ``formats``),
``predictor`` (load any artefact), ``params`` (the ``peers`` section of a params file),
``convert`` (build, check and write one artefact, from the frozen model where the SavedModel
fails). TensorFlow, LiteRT, ONNX Runtime, OpenVINO and NNCF are imported only when a function
needs them. This package knows no model (every key, dtype and shape comes from the signature)
and imports nothing from :mod:`serving_optimiser.pipeline`; import from its modules (this file
imports none, so reading the peers' params loads no predictor code).
"""
