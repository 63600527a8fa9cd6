"""The whole round trip on any SavedModel: freeze, TransformGraph, convert back, compare with the
original, and only then move the result into place."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_directory
from ..graph_transforms import TransformError, TransformGraph, parse_and_check
from ..graph_transforms.transforms._int8 import int8_kernels_available
from ._files import check_output_directory, directory_size
from .compare import DEFAULT_TIMEOUT_S, compare_saved_models, load_sample_inputs, min_class_agreement
from .convert import write_saved_model
from .errors import SavedModelError
from .freeze import freeze_saved_model
from .onednn import missing_kernels_message, onednn_only_ops
from .safety import check_allow_ops
from .warmup import DEFAULT_BATCH_SIZES

log = logging.getLogger(__name__)

SampleInputs = Mapping[str, Mapping[str, np.ndarray]]


class AgreementError(SavedModelError):
    """The converted model's class agreement fell under the minimum; ``report`` has the details."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def _transform_string(transforms: str | Sequence[str]) -> str:
    return transforms if isinstance(transforms, str) else " ".join(transforms)


def optimise_saved_model(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    transforms: str | Sequence[str],
    signature_keys: Sequence[str] | None = None,
    tags: str | Iterable[str] = ("serve",),
    allow_ops: Iterable[str] = (),
    *,
    sample_inputs: SampleInputs | str | os.PathLike | None = None,
    compare: bool = True,
    min_agreement: float | None = None,
    dequantize_once: bool = True,
    frozen_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    warmup_batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    compare_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict:
    """Freeze ``in_dir``, apply ``transforms`` (old-tool syntax), write the SavedModel ``out_dir``.

    The transform string, options and output directory are checked before anything loads. The
    result is written in a temporary directory beside ``out_dir``, compared with the original
    and renamed into place only when the lowest class agreement is at least ``min_agreement``
    (AgreementError otherwise, ``out_dir`` not created). ``sample_inputs`` (signature -> input
    -> array, or an ``.npz`` path) feed the comparison; signatures without get generated inputs.
    ``frozen_dir``, if given, receives the frozen (untransformed) model. ``warmup_batch_sizes``
    (empty: none) are the batch sizes of the TF Serving warm-up records written for each kept
    signature, from the sample inputs where given. A signature call that takes longer than
    ``compare_timeout_s`` stops the comparison with an error naming it.

    When the transforms emit int8 ops that only oneDNN implements and this process cannot run
    them (oneDNN's rewrites off), the comparison could not call the model: that is an error
    saying what to set, before anything is written.
    Returns a report: sizes, node counts, timings and the per-output comparison.
    """
    transform_string = _transform_string(transforms)
    try:
        parse_and_check(transform_string)
    except TransformError as error:
        raise SavedModelError(f"transforms: {error}") from None
    allow_ops = check_allow_ops(allow_ops)
    if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
        raise SavedModelError(f"min_agreement must be between 0 and 1, found {min_agreement}")
    if min_agreement is not None and not compare:
        raise SavedModelError("min_agreement needs the comparison (compare=True)")
    check_output_directory(out_dir, overwrite)
    if isinstance(sample_inputs, (str, os.PathLike)) and not Path(sample_inputs).is_file():
        raise SavedModelError(f"{sample_inputs}: no such sample inputs file")
    if not compare_timeout_s > 0:
        raise SavedModelError(f"compare_timeout_s must be positive, found {compare_timeout_s}")
    timings = {}

    start = time.perf_counter()
    frozen = freeze_saved_model(in_dir, signature_keys, tags, allow_ops)
    if frozen_dir is not None:
        frozen.save(frozen_dir)
    timings["freeze_s"] = time.perf_counter() - start

    start = time.perf_counter()
    log.info("transforming: %s", transform_string)
    try:
        graph_def = TransformGraph(
            frozen.graph_def, frozen.input_node_names(), frozen.output_node_names(), transform_string
        )
    except TransformError as error:
        raise SavedModelError(str(error)) from None
    optimised = frozen.with_graph_def(graph_def)
    if isinstance(sample_inputs, (str, os.PathLike)):
        sample_inputs = load_sample_inputs(sample_inputs, frozen.signatures.values())
    timings["transform_s"] = time.perf_counter() - start
    int8_ops = onednn_only_ops(graph_def)
    if int8_ops and not int8_kernels_available():
        if compare:
            raise SavedModelError(f"{missing_kernels_message(int8_ops)}; {Path(out_dir)} not written")
        log.warning("not compared, and it will not load here: %s", missing_kernels_message(int8_ops))

    report = {
        "input_dir": str(in_dir),
        "output_dir": str(out_dir),
        "source_format": frozen.source_format,
        "signatures": sorted(frozen.signatures),
        "transforms": transform_string,
        "nodes": {"frozen": len(frozen.graph_def.node), "optimised": len(graph_def.node)},
        "graph_bytes": {"frozen": frozen.graph_def.ByteSize(), "optimised": graph_def.ByteSize()},
    }
    with atomic_directory(check_output_directory(out_dir, overwrite)) as temporary:
        start = time.perf_counter()
        converted = write_saved_model(
            optimised, temporary, dequantize_once, label=str(out_dir),
            warmup_batch_sizes=warmup_batch_sizes, warmup_samples=sample_inputs,
        )
        timings["convert_s"] = time.perf_counter() - start
        report["dequantized_once"] = converted["dequantized_once"]
        report["onednn_only_ops"] = converted["onednn_only_ops"]
        report["warmup_batch_sizes"] = converted["warmup_batch_sizes"]
        size_in, size_out = directory_size(in_dir), directory_size(temporary)
        report["size_bytes"] = {"input": size_in, "output": size_out}
        report["size_ratio"] = size_out / size_in if size_in else None
        if compare:
            start = time.perf_counter()
            log.info("comparing with the original")
            comparison = compare_saved_models(
                in_dir, temporary, sample_inputs, sorted(frozen.signatures), frozen.tags, allow_ops,
                timeout_s=compare_timeout_s,
            )
            timings["compare_s"] = time.perf_counter() - start
            report["comparison"] = comparison
            report["min_class_agreement"] = min_class_agreement(comparison)
            lowest = report["min_class_agreement"]
            if min_agreement is not None and lowest is not None and lowest < min_agreement:
                report["timings"] = timings
                raise AgreementError(
                    f"class agreement {lowest:.4f} is under the minimum {min_agreement:.4f}; "
                    f"{Path(out_dir)} not written",
                    report,
                )
    report["timings"] = timings
    log.info("wrote %s", out_dir)
    return report
