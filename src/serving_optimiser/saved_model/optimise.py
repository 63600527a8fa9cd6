"""The whole round trip on any SavedModel: freeze, TransformGraph, convert back, compare with the
original, and only then move the result into place."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from tensorflow.core.framework import graph_pb2

from ..atomic import atomic_directory
from ..chunks import DEFAULT_CHUNK_BYTES
from ..graph_transforms import TransformError, parse_and_check
from ..graph_transforms.transforms._int8 import int8_kernels_available
from ._files import check_output_directory, clear_directory, directory_size
from .calibration import CALIBRATED_TRANSFORMS, load_calibration_inputs
from .compare import (
    DEFAULT_TIMEOUT_S,
    check_output_kinds,
    compare_saved_models,
    failing_outputs,
    load_sample_inputs,
    min_class_agreement,
)
from .convert import write_saved_model
from .errors import SavedModelError
from .freeze import freeze_saved_model
from .guard import Guarded, Verdict, guard_transforms
from .onednn import missing_kernels_message, onednn_only_ops
from .output_kinds import DEFAULT_TOLERANCES, GROSS_TOLERANCES, KINDS
from .safety import check_allow_ops
from .warmup import DEFAULT_BATCH_SIZES

log = logging.getLogger(__name__)

SampleInputs = Mapping[str, Mapping[str, np.ndarray]]


class AgreementError(SavedModelError):
    """The gate could not make every output pass its verdict (a class agreement under the
    minimum, or another kind's metric over its tolerance) with every lossy unit it could send
    back sent back; ``report`` has the details."""

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
    calibration_inputs: SampleInputs | str | os.PathLike | None = None,
    serving_batch_size: int | None = None,
    output_kinds: Mapping[str, str] | None = None,
    gate: bool = True,
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
) -> dict:
    """Freeze ``in_dir``, apply ``transforms`` (old-tool syntax), write the SavedModel ``out_dir``.

    The transform string, options and output directory are checked before anything loads. The
    result is written in a temporary directory beside ``out_dir`` and compared with the original:
    each output gets its kind (inferred from the original's graph, or ``output_kinds``: output or
    ``signature/output`` -> ``class``, ``label``, ``multi_label`` or ``regression``), its metric
    and a verdict under the default tolerances (:mod:`.output_kinds`). ``sample_inputs``
    (signature -> input -> array, or an ``.npz`` path) feed the comparison; signatures without
    get generated inputs, on which only the gross-breakage tolerances apply. ``min_agreement``,
    if given, replaces the class and label agreement tolerance.

    The gate (:mod:`.guard`) is on by default: when an output misses its tolerance, the lossy
    transforms' tensors and layers that hurt most go back to per-channel ranges, then to float,
    ranked on the calibration inputs where given (else the sample inputs) and judged on the
    sample inputs, until every output passes; a list that already passes is written exactly as
    without the gate. When nothing left to send back makes it pass, AgreementError names the
    outputs and the units, and ``out_dir`` is not created. ``gate=False`` only reports the
    verdicts; ``compare=False`` skips the comparison and the gate. ``report["gate"]`` has what
    the gate did: the ranking, the units sent back, the share of weight bytes kept float and the
    number of model runs against their bound.
    ``frozen_dir``, if given, receives the frozen (untransformed) model. ``warmup_batch_sizes``
    (empty: none) are the batch sizes of the TF Serving warm-up records written for each kept
    signature, from the sample inputs where given. A signature call that takes longer than
    ``compare_timeout_s`` stops the comparison with an error naming it.

    When the transforms emit int8 ops that only oneDNN implements and this process cannot run
    them (oneDNN's rewrites off), the comparison could not call the model: that is an error
    saying what to set, before anything is written.

    ``calibration_inputs`` (like ``sample_inputs``) calibrate each quantize_matmuls or
    quantize_convs step without a ``ranges_file`` on the graph as it is at that step; a layer
    whose int8 output error is over the step's ``max_layer_error`` stays float, and the gate
    sends the others back by their calibrated error. With ``serving_batch_size`` each calibrated
    layer is also timed in int8 and float at that many rows on this machine, and, while the
    model is not faster than the original there, int8 layers go back to float, the slowest first.
    The comparison, the gate's ranking and calibration call a model on at most ``chunk_bytes``
    of input rows at a time (None: all rows in one call); inputs under the bound are one call.
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
    if min_agreement is not None and not gate:
        raise SavedModelError("min_agreement is the gate's tolerance: it needs gate=True")
    output_kinds = dict(output_kinds or {})
    for name, kind in sorted(output_kinds.items()):
        if kind not in KINDS:
            raise SavedModelError(f"output kind '{kind}' for '{name}' is unknown (expected {', '.join(KINDS)})")
    check_output_directory(out_dir, overwrite)
    if isinstance(sample_inputs, (str, os.PathLike)) and not Path(sample_inputs).is_file():
        raise SavedModelError(f"{sample_inputs}: no such sample inputs file")
    if isinstance(calibration_inputs, (str, os.PathLike)) and not Path(calibration_inputs).is_file():
        raise SavedModelError(f"{calibration_inputs}: no such calibration inputs file")
    if chunk_bytes is not None and not chunk_bytes >= 1:
        raise SavedModelError(f"chunk_bytes must be at least 1, found {chunk_bytes}")
    if not compare_timeout_s > 0:
        raise SavedModelError(f"compare_timeout_s must be positive, found {compare_timeout_s}")
    if serving_batch_size is not None:
        if calibration_inputs is None:
            raise SavedModelError("serving_batch_size times the calibrated layers: it needs calibration_inputs")
        if not serving_batch_size >= 1:
            raise SavedModelError(f"serving_batch_size must be at least 1, found {serving_batch_size}")
    timings = {}

    start = time.perf_counter()
    frozen = freeze_saved_model(in_dir, signature_keys, tags, allow_ops)
    check_output_kinds(output_kinds, frozen.signatures.values())  # before frozen_dir is written
    if frozen_dir is not None:
        frozen.save(frozen_dir)
    timings["freeze_s"] = time.perf_counter() - start

    if isinstance(calibration_inputs, (str, os.PathLike)):
        calibration_inputs = load_calibration_inputs(calibration_inputs, frozen.signatures)
    if isinstance(sample_inputs, (str, os.PathLike)):
        sample_inputs = load_sample_inputs(sample_inputs, frozen.signatures.values())
    if sample_inputs is None and calibration_inputs is not None and compare:
        sample_inputs = calibration_inputs
        log.info("comparing on the calibration inputs (pass sample inputs to compare on other rows)")
    parsed = parse_and_check(transform_string)
    gated = compare and gate
    if not compare:
        log.warning("not compared, so not gated: the lossy transforms' results are written unchecked")
    report = {
        "input_dir": str(in_dir),
        "output_dir": str(out_dir),
        "source_format": frozen.source_format,
        "signatures": sorted(frozen.signatures),
        "transforms": transform_string,
    }
    # An explicit min_agreement is the user's tolerance for classes and labels, on any inputs.
    tolerances = DEFAULT_TOLERANCES, GROSS_TOLERANCES
    if min_agreement is not None:
        tolerances = tuple(dataclasses.replace(t, agreement=min_agreement) for t in tolerances)
    if compare:
        report["tolerances"] = {"sample": dataclasses.asdict(tolerances[0]),
                                "generated": dataclasses.asdict(tolerances[1])}
    speed = None
    calibrated = any(step.name in CALIBRATED_TRANSFORMS and "ranges_file" not in step.params for step in parsed)
    if serving_batch_size is not None and calibration_inputs is not None and calibrated:
        from .speed_guard import OriginalTimer

        speed = OriginalTimer(in_dir, calibration_inputs, frozen.tags, serving_batch_size)
    with atomic_directory(check_output_directory(out_dir, overwrite)) as temporary:
        state = {"graph": None}

        def judge(graph_def: graph_pb2.GraphDef) -> Verdict:
            """Write the candidate where the result goes and compare it with the original."""
            timings["transform_s"] = timings.get("transform_s", 0.0) + time.perf_counter() - state.pop("since", 0.0)
            optimised = frozen.with_graph_def(graph_def)
            _check_int8_kernels(graph_def, compare, out_dir)
            clear_directory(temporary)
            _write_and_compare(
                report, timings, optimised, frozen, temporary, in_dir, sample_inputs, compare, allow_ops,
                dequantize_once, warmup_batch_sizes, compare_timeout_s, output_kinds, tolerances, chunk_bytes,
            )
            state["graph"] = graph_def
            failing = report.get("failing_outputs") or []
            ratio = None
            if (not gated or not failing) and speed is not None:
                start = time.perf_counter()
                ratio = speed.ratio(temporary)
                timings["speed_s"] = timings.get("speed_s", 0.0) + time.perf_counter() - start
            state["since"] = time.perf_counter()
            return Verdict(failing if gated else [], ratio)

        log.info("transforming: %s", transform_string)
        state["since"] = time.perf_counter()
        decision_inputs = calibration_inputs if calibration_inputs is not None else sample_inputs
        guarded = guard_transforms(
            frozen, parsed, decision_inputs, sample_inputs, tolerances[0], generated_tolerances=tolerances[1],
            output_kinds=output_kinds, calibration_inputs=calibration_inputs, judge=judge,
            serving_batch_size=serving_batch_size, timeout_s=compare_timeout_s, chunk_bytes=chunk_bytes,
        )
        if gated:
            report["gate"] = {key: value for key, value in guarded.report.items() if key not in ("calibration",
                                                                                                 "serving_batch")}
            report["gate"]["decided_on"] = _which_inputs(decision_inputs, calibration_inputs)
            report["gate"]["judged_on"] = _which_inputs(sample_inputs, None)
        if "calibration" in guarded.report:
            report["calibration"] = guarded.report["calibration"]
        if "serving_batch" in guarded.report:
            # One figure per model tried, the last the one written.
            report["serving_batch"] = guarded.report["serving_batch"]
        if not guarded.passed:
            report["timings"] = timings
            raise AgreementError(_gate_failure(guarded, report, out_dir), report)
        optimised = frozen.with_graph_def(guarded.graph_def)
    report["nodes"] = {"frozen": len(frozen.graph_def.node), "optimised": len(optimised.graph_def.node)}
    report["graph_bytes"] = {"frozen": frozen.graph_def.ByteSize(), "optimised": optimised.graph_def.ByteSize()}
    report["timings"] = timings
    log.info("wrote %s", out_dir)
    return report


def _which_inputs(inputs, calibration_inputs) -> str:
    if inputs is None:
        return "generated inputs"
    return "calibration inputs" if inputs is calibration_inputs else "sample inputs"


def _check_int8_kernels(graph_def: graph_pb2.GraphDef, compare: bool, out_dir) -> None:
    int8_ops = onednn_only_ops(graph_def)
    if int8_ops and not int8_kernels_available():
        if compare:
            raise SavedModelError(f"{missing_kernels_message(int8_ops)}; {Path(out_dir)} not written")
        log.warning("not compared, and it will not load here: %s", missing_kernels_message(int8_ops))


def _gate_failure(guarded: Guarded, report: dict, out_dir) -> str:
    """One line: the failing outputs, and what the gate sent back (or that nothing could go)."""
    gate = guarded.report
    ranked = gate["ranked"]
    if not ranked:
        tried = " (no lossy tensor or layer to send back)"
    else:
        worst = ", ".join(f"'{unit['name']}'" for unit in ranked[:5]) + (", ..." if len(ranked) > 5 else "")
        tried = f" with every lossy tensor or layer back to float ({len(ranked)}, the most harmful {worst})"
    if report.get("calibration"):
        tried += " and every calibrated layer back to float"
    return "; ".join(guarded.failing) + tried + f"; {Path(out_dir)} not written"


def _write_and_compare(
    report, timings, optimised, frozen, temporary, in_dir, sample_inputs, compare, allow_ops,
    dequantize_once, warmup_batch_sizes, compare_timeout_s, output_kinds, tolerances, chunk_bytes,
) -> None:
    start = time.perf_counter()
    converted = write_saved_model(
        optimised, temporary, dequantize_once, label=str(report["output_dir"]),
        warmup_batch_sizes=warmup_batch_sizes, warmup_samples=sample_inputs,
    )
    timings["convert_s"] = timings.get("convert_s", 0.0) + time.perf_counter() - start
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
            timeout_s=compare_timeout_s, output_kind_overrides=output_kinds, tolerances=tolerances[0],
            generated_tolerances=tolerances[1], chunk_bytes=chunk_bytes,
        )
        timings["compare_s"] = timings.get("compare_s", 0.0) + time.perf_counter() - start
        report["comparison"] = comparison
        report["min_class_agreement"] = min_class_agreement(comparison)
        report["generated_inputs"] = sorted(
            key for key, outputs in comparison.items() if any(o["inputs"] == "generated" for o in outputs.values())
        )
        report["failing_outputs"] = failing_outputs(comparison)
        report["verdict"] = "fail" if report["failing_outputs"] else "pass"
