"""The candidate transform lists of ``optimise_saved_model --auto`` and of the pipeline's ``auto``
variant: one table, importable without TensorFlow or numpy (the pipeline's params read it)."""

from __future__ import annotations

_FOLDS = ("remove_nodes(op=Identity)", "fold_constants(ignore_errors=true)", "fold_batch_norms", "fold_old_batch_norms")
_FINISH = ("strip_unused_nodes", "sort_by_execution_order")
LOSSLESS = "lossless"
# name -> (transform list, needs calibration inputs, times its int8 layers at the serving batch size)
CANDIDATES: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    LOSSLESS: ((*_FOLDS, *_FINISH), False, False),
    "weights_8bit_per_tensor": ((*_FOLDS, "quantize_weights", *_FINISH), False, False),
    "weights_8bit_per_channel": ((*_FOLDS, "quantize_weights(per_channel=true)", *_FINISH), False, False),
    "int8": ((*_FOLDS, "fuse_layer_norms", "quantize_convs", "quantize_matmuls(quantize_kernel=tensorflow)",
              *_FINISH), True, False),
    # oneDNN's fused layer norm builds its primitives at every call, which small batches pay for;
    # the speed guard keeps a layer float where int8 is not faster at the serving batch size.
    "int8_small_batch": ((*_FOLDS, "quantize_convs", "quantize_matmuls(quantize_kernel=tensorflow)", *_FINISH),
                         True, True),
}
