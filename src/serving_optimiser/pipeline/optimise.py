"""The optimise stage: one named variant of the params file on the frozen model, through the gate.

A variant is a transform list, or ``{objective: size}``: the ``auto`` variant, which tries the
library's candidate lists (:mod:`serving_optimiser.saved_model.candidates`: lossless, 8-bit
weights per tensor and per channel) and writes the smallest that passes the gate, when it is at
least :data:`~serving_optimiser.saved_model.auto.MIN_GAIN` (5 %) smaller than the frozen model,
else the lossless list's result. It is ``optimise_saved_model --auto --objective size`` without
the timing: on a machine-independent measure (the optimised graph's bytes) its bytes stay the
same on every machine. The calibrated int8 candidates are left out: their weights are 8-bit as
``quantize_weights``' are, so they are never 5 % smaller than those, and they would make the
variant need oneDNN.

With ``evaluate.fallback`` on (the default), a list holding lossy transforms goes through the gate
(:mod:`.fallback`): decided on the calibration split, judged on the evaluation batch. What it did
is written to the gate report (``reports/optimise/<variant>.json``), which the report stage reads.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import UserError
from .params import PipelineParams

log = logging.getLogger(__name__)


def _checked_steps(params: PipelineParams, variant: str, transforms: list[str]):
    from ..graph_transforms.catalogue import check_transforms
    from ..graph_transforms.errors import TransformError
    from ..graph_transforms.parser import parse_transforms

    try:
        steps = parse_transforms(" ".join(transforms))
        check_transforms(steps)
    except TransformError as error:
        raise UserError(f"{params.path}: 'optimise.{variant}': {error}") from None
    return steps


def _is_lossy(steps) -> bool:
    from ..graph_transforms.catalogue import lossy_transforms

    return any(step.name in lossy_transforms() for step in steps)


def optimise_stage(params: PipelineParams, variant: str, frozen_dir: str | os.PathLike,
                   out: str | os.PathLike, samples_dir: str | os.PathLike | None = None,
                   gate_out: str | os.PathLike | None = None) -> str:
    """Apply ``optimise.<variant>`` to the frozen model in ``frozen_dir``, write ``out`` and (with
    ``gate_out``) the gate report. The transform lists are checked before TensorFlow loads, so a
    typo in the params file is reported at once, naming the file and the variant. The gate
    needs ``samples_dir`` (the model stage's samples); without it the list runs unguarded.
    Returns the stage's summary lines."""
    objective = params.auto_objective(variant)
    lists = params.auto_candidates(variant) if objective is not None else {variant: params.transforms(variant)}
    steps = {name: _checked_steps(params, variant, transforms) for name, transforms in lists.items()}
    fallback = params.evaluate().fallback and samples_dir is not None
    from ..saved_model import FrozenModel

    frozen = FrozenModel.load(frozen_dir)
    if objective is not None:
        graph_def, report, lines = _auto(params, variant, frozen, lists, steps, samples_dir if fallback else None)
    elif fallback and _is_lossy(steps[variant]):
        from .fallback import gate_summary, guarded_variant
        from .model import Samples

        guarded = guarded_variant(frozen, lists[variant], Samples.load(samples_dir), params)
        graph_def, report = guarded.graph_def, {"gate": guarded.report}
        lines = [gate_summary(guarded.report)]
    else:
        from ..graph_transforms import TransformGraph

        graph_def = TransformGraph(frozen.graph_def, frozen.input_node_names(), frozen.output_node_names(),
                                   lists[variant])
        why = "no lossy transform in the list" if not _is_lossy(steps[variant]) else "evaluate.fallback is off"
        report, lines = {"gate": {"verdict": "not applied", "why": why}}, []
    frozen.with_graph_def(graph_def).save(out)
    if gate_out is not None:
        from .io import write_json

        write_json(gate_out, {"variant": variant, **report})
    head = f"optimise: {variant}: {frozen.graph_def.ByteSize()} -> {graph_def.ByteSize()} bytes -> {out}"
    return "\n".join([head, *(f"  {line}" for line in lines)])


def _auto(params: PipelineParams, variant: str, frozen, lists: dict[str, list[str]], steps,
          samples_dir: str | os.PathLike | None):
    """Every candidate through the gate; the smallest passing one by the size rule."""
    import tempfile

    from ..graph_transforms import TransformGraph
    from ..saved_model.auto import MIN_GAIN
    from ..saved_model.candidates import LOSSLESS

    original_bytes = frozen.graph_def.ByteSize()
    rows, graphs = [], {}
    with tempfile.TemporaryDirectory(prefix="optimise-auto-") as scratch:
        judge = None
        if samples_dir is not None:
            from .fallback import PipelineJudge
            from .model import Samples

            samples = Samples.load(samples_dir)
            judge = PipelineJudge(frozen, samples, params, Path(scratch))
        for name, transforms in lists.items():
            if judge is None:
                if _is_lossy(steps[name]):
                    rows.append({"name": name, "verdict": "skipped", "why": "evaluate.fallback is off: "
                                 "a lossy candidate cannot be judged", "transforms": transforms})
                    continue
                graph_def, gate = TransformGraph(frozen.graph_def, frozen.input_node_names(),
                                                 frozen.output_node_names(), transforms), None
                verdict = "pass"
            else:
                from .fallback import guarded_variant

                guarded = guarded_variant(frozen, transforms, samples, params, judge)
                graph_def, gate, verdict = guarded.graph_def, guarded.report, guarded.report["verdict"]
            graphs[name] = graph_def
            rows.append({"name": name, "verdict": verdict, "size_ratio": graph_def.ByteSize() / original_bytes,
                         "transforms": transforms, "gate": gate})
    passing = [row for row in rows if row["verdict"] == "pass" and row["name"] != LOSSLESS
               and row["size_ratio"] <= 1.0 - MIN_GAIN]
    winner = min(passing, key=lambda row: row["size_ratio"])["name"] if passing else LOSSLESS
    if winner not in graphs:
        raise UserError(f"{params.path}: 'optimise.{variant}': the lossless candidate failed on this model")
    lines = []
    for row in rows:
        figure = f"{row['size_ratio']:.3f} x the bytes" if "size_ratio" in row else row["why"]
        mark = " <- written" if row["name"] == winner else ""
        lines.append(f"auto: {row['name']}: {row['verdict']}, {figure}{mark}")
    report = {"objective": "size", "min_gain": MIN_GAIN, "winner": winner, "candidates": rows,
              "gate": next(row["gate"] for row in rows if row["name"] == winner)}
    return graphs[winner], report, lines
