"""Bring your own SavedModel: freeze any TF 2 or TF 1 SavedModel to one GraphDef, transform it
with the Graph Transform Tool, convert it back with every signature intact, compare it with the
original, and refuse models that reach the file system, the network or Python.

    from serving_optimiser.saved_model import freeze_saved_model, convert_to_saved_model

    frozen = freeze_saved_model("export/1")
    graph_def = TransformGraph(frozen.graph_def, frozen.input_node_names(),
                               frozen.output_node_names(), "fold_constants quantize_weights")
    convert_to_saved_model(frozen.with_graph_def(graph_def), "optimised/1")
"""

from .compare import compare_outputs, compare_saved_models, generate_inputs, load_sample_inputs, min_class_agreement
from .convert import convert_to_saved_model, write_saved_model
from .errors import SavedModelError
from .freeze import freeze_saved_model
from .model import FrozenModel, SignatureInfo, TensorInfo
from .optimise import AgreementError, optimise_saved_model
from .safety import DENYLIST, UnsafeOp, scan_for_unsafe_ops

__all__ = [
    "DENYLIST",
    "AgreementError",
    "FrozenModel",
    "SavedModelError",
    "SignatureInfo",
    "TensorInfo",
    "UnsafeOp",
    "compare_outputs",
    "compare_saved_models",
    "convert_to_saved_model",
    "freeze_saved_model",
    "generate_inputs",
    "load_sample_inputs",
    "min_class_agreement",
    "optimise_saved_model",
    "scan_for_unsafe_ops",
    "write_saved_model",
]
