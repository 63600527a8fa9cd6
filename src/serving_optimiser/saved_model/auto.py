"""``optimise_saved_model --auto``: every candidate transform list through the gate, measured side by
side against the original on this machine, and the best passing one written.

A user who wants "smaller and faster, without breaking it" should not have to try lists by hand.
The candidates are the lists this project measures (:data:`CANDIDATES`): the original as it is,
the lossless list, 8-bit weights per tensor and per channel, and, with calibration inputs,
calibrated int8 and the small-batch int8 list (no fused layer norm, int8 only where it is faster
at the serving batch size). Each goes through :func:`~serving_optimiser.saved_model.optimise.optimise_saved_model`
and so through its gate (each output judged by its kind on the sample inputs).

The rules (objective ``size`` by default, ``latency`` on request):

* ``size``: the smallest passing candidate that is not slower than the original at the serving
  batch size;
* ``latency``: the fastest passing candidate that is not bigger than the original;
* a candidate other than the original must win by at least :data:`MIN_GAIN` (5 %) in the
  objective, measured as a ratio to the original (latency over interleaved rounds in one
  process), or the original is written, converted through the lossless list.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._files import check_output_directory, directory_size
from .candidates import CANDIDATES, LOSSLESS
from .errors import SavedModelError

log = logging.getLogger(__name__)

OBJECTIVES = ("size", "latency")
MIN_GAIN = 0.05  # a candidate must beat the original by 5 % in the objective, or the original wins

ORIGINAL = "original"


@dataclass
class Candidate:
    """One candidate's figures: its size and time as ratios to the original's, its worst output
    (the figure closest to, or furthest past, its tolerance) and the gate's verdict."""

    name: str
    transforms: tuple[str, ...] = ()
    verdict: str = "pass"
    reason: str = ""
    size_ratio: float = 1.0
    time_ratio: float | None = 1.0
    worst_output: str = ""
    directory: Path | None = None
    report: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def row(self) -> dict:
        return {"name": self.name, "verdict": self.verdict, "reason": self.reason, "size_ratio": self.size_ratio,
                "time_ratio": self.time_ratio, "worst_output": self.worst_output, "transforms": list(self.transforms)}


def worst_output(report: Mapping) -> str:
    """The output whose headline figure is closest to (or furthest past) its tolerance, as
    ``signature/output kind metric value``; empty without a comparison."""
    worst, worst_margin = "", -np.inf
    for key, outputs in sorted((report.get("comparison") or {}).items()):
        for name, figures in sorted(outputs.items()):
            value, tolerance = figures.get("value"), figures.get("tolerance")
            if value is None or tolerance is None or "checks" not in figures:
                continue
            at_least = figures["checks"][0]["op"] == ">="
            # How much of the allowance is used: 1.0 at the bound, more past it.
            used = (1 - value) / max(1 - tolerance, 1e-12) if at_least else value / max(tolerance, 1e-12)
            if used > worst_margin:
                worst_margin = used
                shown = f"{value:.4%}" if at_least else f"{value:.4g}"
                worst = f"{key}/{name} {figures['kind']} {figures['metric']} {shown}"
    return worst


def choose(candidates: Sequence[Candidate], objective: str) -> Candidate:
    """The winner by the rules of the module docstring; the original when nothing wins by
    :data:`MIN_GAIN`."""
    if objective not in OBJECTIVES:
        raise SavedModelError(f"objective '{objective}' is unknown (expected {', '.join(OBJECTIVES)})")
    original = next(c for c in candidates if c.name == ORIGINAL)
    passing = [c for c in candidates if c.passed and c.name != ORIGINAL and c.time_ratio is not None]
    if objective == "size":
        fit = [c for c in passing if c.time_ratio <= 1.0 and c.size_ratio <= 1.0 - MIN_GAIN]
        key = lambda c: (c.size_ratio, c.time_ratio)  # noqa: E731 - one line reads better here
    else:
        fit = [c for c in passing if c.size_ratio <= 1.0 and c.time_ratio <= 1.0 - MIN_GAIN]
        key = lambda c: (c.time_ratio, c.size_ratio)  # noqa: E731
    return min(fit, key=key) if fit else original


def auto_optimise(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    sample_inputs,
    calibration_inputs=None,
    objective: str = "size",
    serving_batch_size: int = 1,
    overwrite: bool = False,
    **options,
) -> dict:
    """Try every candidate on ``in_dir``, write the winner to ``out_dir``; returns the report:
    ``{"objective", "serving_batch_size", "winner", "candidates": [row, ...]}``.

    ``sample_inputs`` (required: the gate judges on them) and ``calibration_inputs`` are as
    :func:`~serving_optimiser.saved_model.optimise.optimise_saved_model` takes them; ``options``
    pass on to it (signature keys, tags, allow_ops, ...).
    """
    from ..graph_transforms.transforms._int8 import int8_kernels_available
    from .optimise import optimise_saved_model
    from .speed_guard import OriginalTimer

    if objective not in OBJECTIVES:
        raise SavedModelError(f"objective '{objective}' is unknown (expected {', '.join(OBJECTIVES)})")
    if sample_inputs is None:
        raise SavedModelError("--auto judges every candidate on your data: it needs sample inputs")
    if not serving_batch_size >= 1:
        raise SavedModelError(f"serving_batch_size must be at least 1, found {serving_batch_size}")
    out_dir = Path(out_dir)
    check_output_directory(out_dir, overwrite)
    original_size = directory_size(in_dir)
    candidates = [Candidate(ORIGINAL)]
    work = Path(tempfile.mkdtemp(prefix=".auto-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        timer = None
        for name, (transforms, calibrated, speed_guarded) in CANDIDATES.items():
            candidate = Candidate(name, transforms)
            candidates.append(candidate)
            if calibrated and calibration_inputs is None:
                candidate.verdict, candidate.reason, candidate.time_ratio = "skipped", "needs calibration inputs", None
                continue
            if calibrated and not int8_kernels_available():
                candidate.verdict, candidate.time_ratio = "skipped", None
                candidate.reason = "its int8 ops need oneDNN, off in this process: set TF_ENABLE_ONEDNN_OPTS=1"
                continue
            directory = work / name
            try:
                candidate.report = optimise_saved_model(
                    in_dir, directory, list(transforms), sample_inputs=sample_inputs,
                    calibration_inputs=calibration_inputs if calibrated else None,
                    serving_batch_size=serving_batch_size if speed_guarded else None, **options,
                )
            except SavedModelError as error:
                candidate.verdict, candidate.reason, candidate.time_ratio = "fail", str(error), None
                candidate.report = getattr(error, "report", {}) or {}
                candidate.worst_output = worst_output(candidate.report)
                log.info("auto: %s fails: %s", name, error)
                continue
            candidate.directory = directory
            candidate.size_ratio = directory_size(directory) / original_size
            candidate.worst_output = worst_output(candidate.report)
            if timer is None:
                tags = options.get("tags", ("serve",))
                timer = OriginalTimer(in_dir, _loaded(sample_inputs, in_dir, tags, candidate.report), tags,
                                      serving_batch_size)
            candidate.time_ratio = timer.ratio(directory)
            log.info("auto: %s: %.3f x the size, %.3f x the time at batch %d", name, candidate.size_ratio,
                     candidate.time_ratio, serving_batch_size)
        winner = choose(candidates, objective)
        if winner.name == ORIGINAL:
            # The original, as it is, converted through the lossless list (the same function).
            lossless = next(c for c in candidates if c.name == LOSSLESS)
            if not lossless.passed or lossless.directory is None:
                raise SavedModelError(f"auto: the lossless list failed on this model ({lossless.reason}); "
                                      f"{out_dir} not written")
            written = lossless
        else:
            written = winner
        if overwrite and out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(written.directory, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "objective": objective,
        "serving_batch_size": serving_batch_size,
        "winner": winner.name,
        "written": written.name,
        "min_gain": MIN_GAIN,
        "candidates": [c.row() for c in candidates],
    }


def _loaded(sample_inputs, in_dir, tags, report: Mapping) -> Mapping[str, Mapping[str, np.ndarray]]:
    """Sample inputs by signature key, as the timer takes them (an .npz path read once, for the
    signatures the candidate kept)."""
    if not isinstance(sample_inputs, str | os.PathLike):
        return sample_inputs
    from .compare import load_sample_inputs
    from .reader import as_tags, read_meta_graph, signature_info_from_proto

    meta_graph = read_meta_graph(str(in_dir), list(as_tags(tags)))
    keys = report.get("signatures") or sorted(meta_graph.signature_def)
    return load_sample_inputs(sample_inputs, [signature_info_from_proto(key, meta_graph.signature_def[key])
                                              for key in keys])


def candidates_table(report: Mapping) -> str:
    """The candidates side by side: size ratio, time ratio at the serving batch size on this
    machine, the worst output, the verdict, and which was written."""
    batch = report["serving_batch_size"]
    lines = [f"{'candidate':<26} {'size':>7} {f'time@{batch}':>9}  verdict  worst output"]
    for row in report["candidates"]:
        time = "—" if row["time_ratio"] is None else f"{row['time_ratio']:.3f}x"
        mark = " <- written" if row["name"] == report["written"] else ""
        reason = f" ({row['reason']})" if row["verdict"] != "pass" and row["reason"] else ""
        lines.append(f"{row['name']:<26} {row['size_ratio']:>6.3f}x {time:>9}  {row['verdict']:<7}  "
                     f"{row['worst_output']}{reason}{mark}")
    winner = report["winner"]
    lines.append(f"objective {report['objective']}: {winner}" + (
        " (no candidate wins by 5 %: the original, through the lossless list)" if winner == ORIGINAL else ""))
    return "\n".join(lines)
