"""The report: every model's figures gathered from the per-model evaluate and latency stages into
one table, the batch-size curve, the plot rows, the winner per objective and per batch range, how
each model ran, and the sample predictions side by side."""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections import Counter
from pathlib import Path

from ..atomic import atomic_file
from ..errors import UserError
from .entries import REFERENCE
from .io import write_json
from .latency_figures import batch_label, headline_figures
from .machine import machine_line

# The exported model timed with TF_ENABLE_ONEDNN_OPTS=1 beside the int8 variants, where oneDNN
# is off by default (see scripts/latency.py); a row of its own, like a model.
ONEDNN_REFERENCE = "exported_onednn"
YARDSTICKS = (REFERENCE, ONEDNN_REFERENCE)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: not found (run the stage that writes it first)")
    return json.loads(path.read_text())


def _median_timings(entries: list[dict], ratio: bool) -> dict:
    """One measured entry from several stages' (the exported model is timed beside every model):
    the median of each figure; the ratio is 1 for the yardstick itself."""
    def median(values):
        return statistics.median(values)

    # The sizes every stage timed: under load, one stage's time budget can drop a size another kept.
    sizes = sorted(set.intersection(*(set(entry["batches"]) for entry in entries)), key=int)
    batches = {}
    for size in sizes:
        figures = [entry["batches"][size] for entry in entries]
        batches[size] = {key: median([f[key] for f in figures]) for key in ("p50_ms", "p99_ms", "per_row_us")}
        batches[size]["ratio"] = median([f["ratio"] for f in figures]) if ratio else 1.0
        batches[size]["calls"] = sum(f["calls"] for f in figures)
    how = Counter(entry["how"] for entry in entries).most_common(1)[0][0]
    return {"how": how, "load_s": median([e["load_s"] for e in entries]),
            "first_call_ms": median([e["first_call_ms"] for e in entries]), "batches": batches}


def _timed_record(details: dict, measured: dict, latency: dict) -> dict:
    return {**details, **headline_figures(measured), "curve": measured["batches"], "how": measured["how"],
            "machine": latency["machine"]}


def fallback_summary(gate_report: dict) -> dict:
    """What the optimise stage's gate did to a variant (``reports/optimise/<variant>.json``), in
    the few figures the report shows: units sent back per channel and to float, the share of the
    weight bytes left float, and for an auto variant the candidate it wrote."""
    gate = gate_report.get("gate") or {}
    summary = {"verdict": gate.get("verdict", "not applied")}
    sent = gate.get("sent_back", [])
    if gate.get("verdict") in ("pass", "fail"):
        summary.update(per_channel=sum(u["to"] == "per_channel" for u in sent),
                       to_float=sum(u["to"] == "float" for u in sent),
                       kept_float_share=(gate.get("weights") or {}).get("kept_float_share"))
    if "winner" in gate_report:
        summary["written"] = gate_report["winner"]
    return summary


def _fallback(summary: dict | None) -> str:
    if summary is None:
        return "—"
    written = f"{summary['written']}: " if "written" in summary else ""
    if summary["verdict"] == "not applied":
        return f"{written}no lossy step" if written else "not applied"
    share = summary.get("kept_float_share")
    kept = "" if share is None else f"; {share:.1%} of weight bytes float"
    if not summary["per_channel"] and not summary["to_float"]:
        return f"{written}as written{kept}"
    return f"{written}{summary['per_channel']} per channel, {summary['to_float']} to float{kept}"


def gather(models: list[str], details_dir: Path, latency_details_dir: Path,
           optimise_dir: Path | None = None) -> dict[str, dict]:
    """One flat record per model, the exported model first (and the export with oneDNN forced on,
    where it was timed), from the evaluate and latency stages' detail files (full precision), and
    for each variant what the optimise stage's gate did (``optimise_dir``)."""
    exported = _read(details_dir / f"{REFERENCE}.json")
    exported.update(size_ratio=1.0, max_dp=0.0)
    timed: dict[str, dict] = {}
    yardsticks: dict[str, list[dict]] = {name: [] for name in YARDSTICKS}
    last_latency = None
    unsupported: dict[str, str] = {}
    for name in models:
        details = _read(details_dir / f"{name}.json")
        if "unsupported" in details:
            unsupported[name] = details["unsupported"]
            continue
        latency = _read(latency_details_dir / f"{name}.json")
        timed[name] = _timed_record(details, latency["measured"][name], latency)
        if optimise_dir is not None and (optimise_dir / f"{name}.json").is_file():
            timed[name]["fallback"] = fallback_summary(_read(optimise_dir / f"{name}.json"))
        # The export's own times from the same process and rounds as this model's: the yardstick
        # of its ratios, shown beside its times so that each row adds up on its own.
        yardstick = headline_figures(latency["measured"][REFERENCE])
        timed[name]["export_batch_ms"] = yardstick["batch_ms"]
        timed[name]["export_batch1_p50_ms"] = yardstick["batch1_p50_ms"]
        for yardstick in YARDSTICKS:
            if yardstick in latency["measured"]:
                yardsticks[yardstick].append(latency["measured"][yardstick])
        last_latency = latency
    # The peers whose converters cannot convert this model: one line each in the summary.
    exported["unsupported"] = unsupported
    # The export against itself, in the figures the other models have (class agreement only for a
    # model with a class output).
    if any("agreement" in record for record in timed.values()) or not timed:
        exported["agreement"] = 1.0
    if any("max_rel_diff" in record for record in timed.values()):
        exported["max_rel_diff"] = 0.0
    records: dict[str, dict] = {REFERENCE: exported}
    if last_latency is None:
        exported.update(batch_ratio=1.0, batch1_p50_ratio=1.0)
        return records
    not_timed = [latency.get("batch_sizes_not_timed") for latency in (last_latency,) if latency]
    if not_timed and not_timed[0]:
        exported["batch_sizes_not_timed"] = not_timed[0]
    # The machine line: the exported model's (every stage records the same machine file).
    records[REFERENCE] = _timed_record(exported, _median_timings(yardsticks[REFERENCE], ratio=False), last_latency)
    if yardsticks[ONEDNN_REFERENCE]:
        # The same float function as the export (its fidelity figures are the export's, by definition).
        records[ONEDNN_REFERENCE] = _timed_record(
            {**exported}, _median_timings(yardsticks[ONEDNN_REFERENCE], ratio=True), last_latency
        )
    records.update(timed)
    return records


# (objective, key, smaller is better)
OBJECTIVES = (
    ("smallest on disk", "size_bytes", True),
    ("smallest gzipped", "gzip_bytes", True),
    ("fastest at the largest batch", "batch_ratio", True),
    ("fastest at the smallest batch", "batch1_p50_ratio", True),
    ("most faithful (max |Δp| against the export)", "max_dp", True),
)


def _figure(key: str, value: float) -> str:
    if key.endswith("_bytes"):
        return f"{value / 1024:.1f} KB"
    if key.endswith("ratio"):
        return f"{value:.3f} × the export's time"
    return f"{value:.2g}"


def _sizes(records: dict[str, dict]) -> list[str]:
    curve = records[REFERENCE].get("curve") or {}
    return sorted(curve, key=int)


def _objective(records: dict[str, dict], objective: str) -> str:
    sizes = _sizes(records)
    if not sizes:
        return objective
    if objective == "fastest at the largest batch":
        return f"fastest at {int(sizes[-1]):,} rows"
    if objective == "fastest at the smallest batch":
        return "fastest at batch 1" if sizes[0] == "1" else f"fastest at {int(sizes[0]):,} rows"
    return objective


def winners(records: dict[str, dict]) -> list[tuple[str, str, str, float]]:
    """(objective, key, best model, its figure) per objective."""
    result = []
    for objective, key, smaller in OBJECTIVES:
        # The export is the yardstick of speed and fidelity, not a contender.
        contenders = {name: r for name, r in records.items()
                      if (name not in YARDSTICKS or key.endswith("_bytes")) and key in r and passes_gate(r)}
        if not contenders:
            continue
        candidates = {name: r[key] for name, r in contenders.items() if name != ONEDNN_REFERENCE}
        best = (min if smaller else max)(candidates, key=candidates.get)
        result.append((_objective(records, objective), key, best, candidates[best]))
    return result


def passes_gate(record: dict) -> bool:
    """A model that failed the gate, or whose lossy transforms changed nothing on this model, is
    reported, never recommended."""
    return record.get("gate", {}).get("verdict") != "fail" and "no_change" not in record


def is_saved_model(record: dict) -> bool:
    """A TensorFlow SavedModel (the evaluate stage counted its graph), not a peer artefact."""
    return "graph_nodes" in record


def _range(sizes: list[str]) -> str:
    low, high = int(sizes[0]), int(sizes[-1])
    return f"{low:,} row{'s' if high > 1 else ''}" if low == high else f"{low:,}–{high:,} rows"


def batch_winners(records: dict[str, dict], keep=lambda name, record: True) -> list[tuple[list[str], str, list[float]]]:
    """Consecutive timed batch sizes grouped by their fastest contender (lowest ratio to the
    export): (sizes, model, its ratios at those sizes)."""
    groups: list[tuple[list[str], str, list[float]]] = []
    for size in _sizes(records):
        contenders = {name: r["curve"][size]["ratio"] for name, r in records.items()
                      if name not in YARDSTICKS and "curve" in r and keep(name, r) and passes_gate(r)}
        if not contenders:
            continue
        best = min(contenders, key=contenders.get)
        if groups and groups[-1][1] == best:
            groups[-1][0].append(size)
            groups[-1][2].append(contenders[best])
        else:
            groups.append(([size], best, [contenders[best]]))
    return groups


def _ratios(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.3f} ×" if f"{low:.3f}" == f"{high:.3f}" else f"{low:.3f}–{high:.3f} ×"


def which_to_serve(records: dict[str, dict]) -> list[str]:
    """Markdown bullets: the winner per batch range, overall and among SavedModels, and what
    oneDNN setting the comparison ran under."""
    choices = (
        ("any runtime", lambda name, r: True),
        ("a TensorFlow SavedModel (TF Serving, the same signatures)", lambda name, r: is_saved_model(r)),
        ("the float function within float rounding (max |Δp| ≤ 1e-5)", lambda name, r: r["max_dp"] <= 1e-5),
    )
    lines = []
    for label, keep in choices:
        groups = batch_winners(records, keep)
        if groups:
            picks = "; ".join(f"{_range(sizes)}: **{name}** ({_ratios(ratios)})" for sizes, name, ratios in groups)
            lines.append(f"- {label}: {picks}")
    exported = records[REFERENCE]
    if ONEDNN_REFERENCE in records:
        forced = records[ONEDNN_REFERENCE]
        lines.append(
            f"- oneDNN is off by default on this CPU: every ratio is against the export as TensorFlow runs it "
            f"by default ({exported['how']}); the int8 variants ran with TF_ENABLE_ONEDNN_OPTS=1, and the float "
            f"export with it set takes {_ratios([forced['batch_ratio']])} the default's time at "
            f"{int(_sizes(records)[-1]):,} rows and {_ratios([forced['batch1_p50_ratio']])} at "
            f"{int(_sizes(records)[0]):,} (row {ONEDNN_REFERENCE})"
        )
    elif "how" in exported:
        lines.append(f"- every TensorFlow model ran as TensorFlow runs by default here: {exported['how']}")
    return lines


def results_table(records: dict[str, dict]) -> str:
    sizes = _sizes(records)
    big = batch_label(int(sizes[-1])) if sizes else "100k"
    small = batch_label(int(sizes[0])) if sizes else "1"
    relative = any("max_rel_diff" in r for r in records.values())
    capped = [r["batch_rows"] for r in records.values() if "batch_rows" in r]
    rows = batch_label(capped[0]) if capped else "100k"
    header = (
        f"| model | size KB | size ratio | gzip KB | eval accuracy | agreement ({rows}) | max \\|Δp\\| ({rows}) "
        + ("| max \\|Δ\\| / range " if relative else "")
        + f"| {big}-row call ms: model / export | ratio | batch-{small} p50 ms: model / export | ratio |"
    )
    lines = [header, "|" + "---|" * (12 if relative else 11)]
    for label, r in records.items():
        name = f"{label} (no change on this model)" if "no_change" in r else label
        if r.get("gate", {}).get("verdict") == "fail":
            name += " (fails the gate)"
        accuracy = f"{r['eval_accuracy']:.3f}" if "eval_accuracy" in r else "—"
        agreement = f"{r['agreement']:.3%}" if "agreement" in r else "—"
        lines.append(
            f"| {name} | {r['size_bytes'] / 1024:.1f} | {r['size_ratio']:.3f} | {r['gzip_bytes'] / 1024:.1f} "
            f"| {accuracy} | {agreement} | {r['max_dp']:.4f} "
            + (f"| {r['max_rel_diff']:.4%} " if relative else "")
            + f"| {_pair(r, 'batch_ms', '.0f')} | {r.get('batch_ratio', float('nan')):.3f} "
            f"| {_pair(r, 'batch1_p50_ms', '.3f')} | {r.get('batch1_p50_ratio', float('nan')):.3f} |"
        )
    return "\n".join(lines)


def _pair(record: dict, key: str, spec: str) -> str:
    """A model's time and, where it was timed beside the export, the export's time in the same
    process (``233 / 789``): the two the ratio divides."""
    own = format(record.get(key, float("nan")), spec)
    export = record.get(f"export_{key}")
    return own if export is None else f"{own} / {format(export, spec)}"


def _judged(judged: dict) -> str:
    value = judged["value"]
    figure = "—" if value is None else (f"{value:.3%}" if judged["metric"].endswith("agreement") else f"{value:.4f}")
    op = next((c["op"] for c in judged["checks"] if c["metric"] == judged["metric"]), "")
    return f"{judged['kind']}: {judged['metric'].replace('_', ' ')} {figure} ({op} {judged['tolerance']:g})"


def verdicts_table(records: dict[str, dict]) -> str:
    """The gate per model and output: each output's kind, headline metric against its tolerance,
    and the verdict; the failures named (a failing model is a result, not a stopped run)."""
    outputs = sorted({name for r in records.values() for name in r.get("outputs", {})})
    if not outputs:
        return ""
    lines = ["| model | gate | fallback (optimise stage) | " + " | ".join(outputs) + " |",
             "|" + "---|" * (len(outputs) + 3)]
    for name, r in records.items():
        if "outputs" not in r:
            continue
        cells = [f"{_judged(r['outputs'][key])} **{r['outputs'][key]['verdict']}**" if key in r["outputs"] else "—"
                 for key in outputs]
        verdict = r.get("gate", {}).get("verdict", "pass")
        lines.append(f"| {name} | {'**fail**' if verdict == 'fail' else 'pass'} | {_fallback(r.get('fallback'))} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def cold_start_table(records: dict[str, dict]) -> str:
    """Load and first call (cold, right after the load) apart from the warm batch-1 figures."""
    lines = [
        "| model | load s | first call ms (cold) | warm batch-1 p50 ms | warm batch-1 p99 ms | first / warm p50 |",
        "|" + "---|" * 6,
    ]
    for name, r in records.items():
        if "first_call_ms" not in r:
            continue
        cold, warm = r["first_call_ms"], r["batch1_p50_ms"]
        lines.append(
            f"| {name} | {r['load_s']:.3f} | {cold:.2f} | {warm:.3f} | {r['batch1_p99_ms']:.3f} "
            f"| {cold / warm:.0f} × |"
        )
    return "\n".join(lines)


def curve_table(records: dict[str, dict]) -> str:
    """Microseconds per row (p50 call / rows) and the ratio to the export, per model and batch size."""
    sizes = _sizes(records)
    header = "| model | " + " | ".join(f"batch {int(size):,}" for size in sizes) + " |"
    lines = [header, "|" + "---|" * (len(sizes) + 1)]
    for name, r in records.items():
        if "curve" not in r:
            continue
        cells = [f"{r['curve'][size]['per_row_us']:.3g} ({r['curve'][size]['ratio']:.2f} ×)" for size in sizes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def how_they_ran(records: dict[str, dict]) -> list[str]:
    """One bullet per way of running (runtime, oneDNN setting), naming its models."""
    groups: dict[str, list[str]] = {}
    for name, r in records.items():
        if "how" in r:
            groups.setdefault(r["how"], []).append(name)
    return [f"- {how}: {', '.join(names)}" for how, names in groups.items()]


def _prediction(sample: dict) -> str:
    """``class (v, v, ...)`` of one sample prediction (the values: the diff output's, e.g. probabilities)."""
    values = next(value for key, value in sample.items() if key not in ("row", "class"))
    shown = f"({', '.join(f'{v:.3f}' for v in values)})"
    return f"{sample['class']} {shown}" if "class" in sample else shown


def predictions_table(records: dict[str, dict]) -> str:
    """One row per model, one column per sample eval row: class (probabilities)."""
    samples = records[REFERENCE]["sample_predictions"]
    header = "| model | " + " | ".join(f"eval row {sample['row']}" for sample in samples) + " |"
    lines = [header, "|" + "---|" * (len(samples) + 1)]
    for name, record in records.items():
        if name == ONEDNN_REFERENCE:
            continue
        cells = [_prediction(p) for p in record["sample_predictions"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(records: dict[str, dict]) -> str:
    parts = ["# Results", "", results_table(records), ""]
    machine = records[REFERENCE].get("machine")
    if machine:
        parts += [f"Timings measured on: {machine_line(machine)}.", ""]
    skipped = records[REFERENCE].get("batch_sizes_not_timed")
    if skipped:
        reasons = (
            (skipped.get("over_max_call_bytes"), f"input over latency.max_call_bytes={skipped['max_call_bytes']}"),
            (skipped.get("over_max_stage_seconds"),
             f"rounds over latency.max_stage_seconds={skipped['max_stage_seconds']:g}"),
        )
        parts += ["Batch sizes not timed: "
                  + "; ".join(f"{', '.join(map(str, sizes))} ({why})" for sizes, why in reasons if sizes) + ".", ""]
    verdicts = verdicts_table(records)
    if verdicts:
        # Only a failing verdict: a variant that changed nothing passes, though it is never recommended.
        failing = [name for name, r in records.items() if r.get("gate", {}).get("verdict") == "fail"]
        parts += ["## The gate, by output kind", "",
                  "Each compared output judged by what it means (class, label, multi-label, regression) "
                  "against the export on the batch; a model that fails is listed, never recommended"
                  + (f" (failing: {', '.join(failing)})" if failing else "") + ".", "", verdicts, ""]
    parts += [
        "## Cold start and warm calls",
        "",
        "The first call after loading pays for building the kernels' state at that input shape (oneDNN's "
        "primitives); TF Serving replays each converted model's warm-up records "
        "(assets.extra/tf_serving_warmup_requests) at load, so its first request is a warm one.",
        "",
        cold_start_table(records),
        "",
        "## Best per objective",
        "",
    ]
    parts += [f"- {objective}: **{name}** ({_figure(key, value)})" for objective, key, name, value in winners(records)]
    if _sizes(records):
        parts += ["", "## Which to serve, by batch size", "",
                  "The fastest model at each timed batch size (ratio to the export's time, same process), "
                  "consecutive sizes with the same winner merged:", ""]
        parts += which_to_serve(records)
        parts += ["", "## Latency per row against batch size (µs per row, p50; ratio to the export)", ""]
        parts += [curve_table(records), ""]
        parts += ["## How each model ran", ""]
        parts += how_they_ran(records)
    unsupported = records[REFERENCE].get("unsupported") or {}
    if unsupported:
        parts += ["", "## Peers that cannot convert this model", ""]
        parts += [f"- {name}: {reason}" for name, reason in sorted(unsupported.items())]
    parts += ["", "## Sample predictions (eval rows spread over the classes: class, probabilities)", ""]
    parts += [predictions_table(records), ""]
    return "\n".join(parts)


PLOT_FIELDS = ("size_bytes", "gzip_bytes", "agreement", "max_dp", "batch_ratio", "batch1_p50_ratio", "batch1_p50_ms")
TABLE_FIELDS = (
    "size_bytes", "size_ratio", "gzip_bytes", "eval_accuracy", "eval_rows_correct", "agreement", "max_dp",
    "eval_agreement", "eval_max_dp", "graph_nodes", "optimised_graph_nodes", "batch_ms", "batch_ratio",
    "batch1_p50_ms", "batch1_p99_ms", "batch1_p50_ratio", "load_s", "first_call_ms",
)


def curve_rows(records: dict[str, dict]) -> list[dict]:
    """One plot row per model and batch size: the curve's points."""
    return [
        {"model": name, "batch_size": int(size), "per_row_us": point["per_row_us"], "p50_ms": point["p50_ms"],
         "ratio": point["ratio"]}
        for name, r in records.items() if "curve" in r
        for size, point in sorted(r["curve"].items(), key=lambda item: int(item[0]))
    ]


def write_report(records: dict[str, dict], plots_path: Path, curve_path: Path, table_path: Path,
                 summary_path: Path) -> None:
    write_json(plots_path, [{"model": name, **{f: r.get(f) for f in PLOT_FIELDS}} for name, r in records.items()])
    write_json(curve_path, curve_rows(records))
    sizes = _sizes(records)
    curve_fields = [f"{kind}_{batch_label(int(size))}" for size in sizes for kind in ("per_row_us", "ratio")]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", *TABLE_FIELDS, *curve_fields, "how"])
    for name, r in records.items():
        curve = [r["curve"][size][kind] if "curve" in r else "" for size in sizes for kind in ("per_row_us", "ratio")]
        writer.writerow([name, *(r.get(f, "") for f in TABLE_FIELDS), *curve, r.get("how", "")])
    with atomic_file(table_path) as stream:
        stream.write(buffer.getvalue())
    with atomic_file(summary_path) as stream:
        stream.write(summary_markdown(records))
