"""Bring your own SavedModel: freeze any TF 2 or TF 1 SavedModel to one GraphDef, transform it
with the Graph Transform Tool, convert it back with every signature intact, compare it with the
original, and refuse models that reach the file system, the network or Python.

    from serving_optimiser.saved_model import freeze_saved_model, convert_to_saved_model

    frozen = freeze_saved_model("export/1")
    graph_def = TransformGraph(frozen.graph_def, frozen.input_node_names(),
                               frozen.output_node_names(), "fold_constants quantize_weights")
    convert_to_saved_model(frozen.with_graph_def(graph_def), "optimised/1")
"""

from .._lazy import lazy_exports

# Imported on first use (PEP 562), so importing the errors or the reader costs no TensorFlow import.
_EXPORTS = {
    "DENYLIST": ".safety",
    "AgreementError": ".optimise",
    "Calibration": ".calibration",
    "FrozenModel": ".model",
    "SavedModelError": ".errors",
    "ServingSession": ".serving_session",
    "SignatureInfo": ".model",
    "TensorInfo": ".model",
    "UnsafeOp": ".safety",
    "calibrate_frozen_model": ".calibration",
    "compare_outputs": ".compare",
    "compare_saved_models": ".compare",
    "convert_to_saved_model": ".convert",
    "freeze_saved_model": ".freeze",
    "generate_inputs": ".compare",
    "guard_transforms": ".guard",
    "load_calibration_inputs": ".calibration",
    "load_sample_inputs": ".compare",
    "min_class_agreement": ".compare",
    "onednn_only_ops": ".onednn",
    "optimise_saved_model": ".optimise",
    "read_warmup_requests": ".warmup",
    "scan_for_unsafe_ops": ".safety",
    "write_saved_model": ".convert",
    "write_warmup_requests": ".warmup",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
