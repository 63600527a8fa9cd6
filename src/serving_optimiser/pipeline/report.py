"""The report: every model's figures gathered from the per-model evaluate and latency stages into
one table, the plot rows, the winner per objective and the sample predictions side by side."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..atomic import atomic_file
from ..errors import UserError
from .evaluate import REFERENCE
from .io import write_json


def _read(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: not found (run the stage that writes it first)")
    return json.loads(path.read_text())


def gather(models: list[str], details_dir: Path, latency_details_dir: Path) -> dict[str, dict]:
    """One flat record per model, the exported model first, from the evaluate and latency stages'
    detail files (full precision)."""
    records: dict[str, dict] = {REFERENCE: _read(details_dir / f"{REFERENCE}.json")}
    records[REFERENCE].update(size_ratio=1.0, agreement=1.0, max_dp=0.0, batch_ratio=1.0, batch1_p50_ratio=1.0)
    exported_timings = []
    for name in models:
        latency = _read(latency_details_dir / f"{name}.json")
        records[name] = {**_read(details_dir / f"{name}.json"), **latency["measured"][name]}
        records[name]["machine"] = latency["machine"]
        exported_timings.append(latency["measured"][REFERENCE])
    if exported_timings:
        # The exported model is timed beside every variant: report its median over those runs.
        for key in ("batch_ms", "batch1_p50_ms", "batch1_p99_ms", "load_s", "first_call_ms"):
            records[REFERENCE][key] = sorted(t[key] for t in exported_timings)[len(exported_timings) // 2]
        # The machine line: a model timed with TensorFlow's own oneDNN setting if there is one.
        machines = [records[name]["machine"] for name in models]
        records[REFERENCE]["machine"] = next((m for m in machines if m["onednn_opts"] == "default"), machines[0])
    return records


# (objective, key, smaller is better)
OBJECTIVES = (
    ("smallest on disk", "size_bytes", True),
    ("smallest gzipped", "gzip_bytes", True),
    ("fastest at 100,000 rows", "batch_ratio", True),
    ("fastest at batch 1", "batch1_p50_ratio", True),
    ("most faithful (max |Δp| against the export)", "max_dp", True),
)


def _figure(key: str, value: float) -> str:
    if key.endswith("_bytes"):
        return f"{value / 1024:.1f} KB"
    if key.endswith("ratio"):
        return f"{value:.3f} × the export's time"
    return f"{value:.2g}"


def winners(records: dict[str, dict]) -> list[tuple[str, str, str, float]]:
    """(objective, key, best model, its figure) per objective."""
    result = []
    for objective, key, smaller in OBJECTIVES:
        # The export is the yardstick of speed and fidelity, not a contender.
        contenders = {name: r for name, r in records.items() if name != REFERENCE or key.endswith("_bytes")}
        candidates = {name: r[key] for name, r in contenders.items()}
        best = (min if smaller else max)(candidates, key=candidates.get)
        result.append((objective, key, best, candidates[best]))
    return result


def results_table(records: dict[str, dict]) -> str:
    header = (
        "| model | size KB | size ratio | gzip KB | eval accuracy | agreement (100k) | max \\|Δp\\| (100k) "
        "| 100k-row call ms | ratio | batch-1 p50 ms | ratio |"
    )
    lines = [header, "|" + "---|" * 11]
    for name, r in records.items():
        lines.append(
            f"| {name} | {r['size_bytes'] / 1024:.1f} | {r['size_ratio']:.3f} | {r['gzip_bytes'] / 1024:.1f} "
            f"| {r['eval_accuracy']:.3f} | {r['agreement']:.3%} | {r['max_dp']:.4f} "
            f"| {r.get('batch_ms', float('nan')):.0f} | {r['batch_ratio']:.3f} "
            f"| {r.get('batch1_p50_ms', float('nan')):.3f} | {r['batch1_p50_ratio']:.3f} |"
        )
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


def machine_line(machine: dict) -> str:
    threads = machine["intra_op_threads"] or "default"
    return (
        f"{machine['cpu']}, {machine['cores']} cores, {' '.join(machine['isa'])}; TensorFlow "
        f"{machine['tensorflow_version']}, oneDNN opts {machine['onednn_opts']}, "
        f"ISA cap {machine['onednn_max_cpu_isa']}, intra-op threads {threads}"
    )


def predictions_table(records: dict[str, dict]) -> str:
    """One row per model, one column per sample eval row: class (probabilities)."""
    samples = records[REFERENCE]["sample_predictions"]
    header = "| model | " + " | ".join(f"eval row {sample['row']}" for sample in samples) + " |"
    lines = [header, "|" + "---|" * (len(samples) + 1)]
    for name, record in records.items():
        cells = [
            f"{p['class']} ({', '.join(f'{v:.3f}' for v in p['probabilities'])})" for p in record["sample_predictions"]
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(records: dict[str, dict]) -> str:
    parts = ["# Results", "", results_table(records), ""]
    machine = records[REFERENCE].get("machine")
    if machine:
        parts += [f"Timings measured on: {machine_line(machine)}.", ""]
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
    parts += ["", "## Sample predictions (eval rows spread over the classes: class, probabilities)", ""]
    parts += [predictions_table(records), ""]
    return "\n".join(parts)


PLOT_FIELDS = ("size_bytes", "gzip_bytes", "agreement", "max_dp", "batch_ratio", "batch1_p50_ratio", "batch1_p50_ms")
TABLE_FIELDS = (
    "size_bytes", "size_ratio", "gzip_bytes", "eval_accuracy", "eval_rows_correct", "agreement", "max_dp",
    "eval_agreement", "eval_max_dp", "graph_nodes", "optimised_graph_nodes", "batch_ms", "batch_ratio",
    "batch1_p50_ms", "batch1_p99_ms", "batch1_p50_ratio", "load_s", "first_call_ms",
)


def write_report(records: dict[str, dict], plots_path: Path, table_path: Path, summary_path: Path) -> None:
    write_json(plots_path, [{"model": name, **{f: r.get(f) for f in PLOT_FIELDS}} for name, r in records.items()])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", *TABLE_FIELDS])
    for name, r in records.items():
        writer.writerow([name, *(r.get(f, "") for f in TABLE_FIELDS)])
    with atomic_file(table_path) as stream:
        stream.write(buffer.getvalue())
    with atomic_file(summary_path) as stream:
        stream.write(summary_markdown(records))
