"""Run a published model three ways on the same inputs: our SavedModel, and the authors' .tflite and .onnx.

Every runner takes inputs by signature input name and returns outputs by signature output name
(the peers' tensor names are mapped through ``PublishedModel.peer_inputs`` / ``peer_outputs``), as
float arrays with the batch first. A peer whose batch size is fixed (the authors' TFLite files
take one row) is run row by row.
"""

from __future__ import annotations

import numpy as np

from published_models.model import PublishedModel


def run_saved_model(model: PublishedModel, inputs: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """``model``'s SavedModel signature on ``inputs`` (default: its sample inputs)."""
    import tensorflow as tf

    inputs = model.inputs if inputs is None else inputs
    function = tf.saved_model.load(str(model.saved_model)).signatures[model.signature]
    return {name: value.numpy() for name, value in function(**{k: tf.constant(v) for k, v in inputs.items()}).items()}


def run_tflite(model: PublishedModel, inputs: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The authors' ``.tflite`` of ``model`` on ``inputs``, through ai_edge_litert's interpreter."""
    from ai_edge_litert.interpreter import Interpreter

    inputs = model.inputs if inputs is None else inputs
    interpreter = Interpreter(model_path=str(model.peers["tflite"]))
    details = {d["name"]: d for d in interpreter.get_input_details()}
    fixed = {int(d["shape_signature"][0]) for d in details.values()}
    rows = len(next(iter(inputs.values())))
    step = rows if fixed == {-1} else fixed.pop()
    if step == rows:
        for name, detail in details.items():
            interpreter.resize_tensor_input(detail["index"], inputs[model.peer_inputs[name]].shape)
    interpreter.allocate_tensors()
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in model.peer_outputs.values()}
    for start in range(0, rows, step):
        for name, detail in details.items():
            interpreter.set_tensor(detail["index"], np.asarray(inputs[model.peer_inputs[name]][start : start + step]))
        interpreter.invoke()
        for detail in interpreter.get_output_details():
            chunks[model.peer_outputs[detail["name"]]].append(interpreter.get_tensor(detail["index"]).copy())
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def run_onnx(model: PublishedModel, inputs: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The authors' ``.onnx`` of ``model`` on ``inputs``, through onnxruntime on the CPU."""
    import onnxruntime

    inputs = model.inputs if inputs is None else inputs
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    session = onnxruntime.InferenceSession(str(model.peers["onnx"]), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: np.asarray(inputs[model.peer_inputs[i.name]]) for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    return {model.peer_outputs[name]: value for name, value in zip(names, session.run(names, feeds))}


RUNNERS = {"tflite": run_tflite, "onnx": run_onnx}


def run_peer(model: PublishedModel, peer: str, inputs: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The authors' ``peer`` file ('tflite' or 'onnx') of ``model`` on ``inputs``."""
    if peer not in model.peers:
        shipped = ", ".join(sorted(model.peers)) or "none"
        raise ValueError(f"published_models: {model.name} has no {peer!r} peer; the authors ship: {shipped}")
    return RUNNERS[peer](model, inputs)
