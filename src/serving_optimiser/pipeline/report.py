"""Writing evaluate's results: DVC metrics JSON, a CSV table, and plot rows."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .io import atomic_file, write_json

PLOT_FIELDS = ("size_total_bytes", "latency_batch_ms_median", "latency_single_ms_p50", "batch_class_agreement")


def write_reports(metrics: dict[str, dict[str, float]], metrics_path, table_path, plots_path) -> None:
    write_json(metrics_path, metrics)
    columns = sorted({key for m in metrics.values() for key in m})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", *columns])
    for name, m in metrics.items():
        writer.writerow([name, *(m.get(c, "") for c in columns)])
    with atomic_file(Path(table_path)) as stream:
        stream.write(buffer.getvalue())
    rows = [{"model": name, **{f: m[f] for f in PLOT_FIELDS}} for name, m in metrics.items()]
    write_json(plots_path, rows)


def results_table(metrics: dict[str, dict[str, float]]) -> str:
    """A markdown table of the figures that matter, one row per model, ratios against ``exported``."""
    header = (
        "| model | size KB | size ratio | 100k-row call ms | ratio | batch-1 p50 ms | ratio | eval accuracy "
        "| class agreement (100k) | max abs prob diff (100k) |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for name, m in metrics.items():
        lines.append(
            f"| {name} | {m['size_total_bytes'] / 1024:.1f} | {m['size_total_ratio']:.3f} "
            f"| {m['latency_batch_ms_median']:.0f} | {m['latency_batch_ratio']:.3f} "
            f"| {m['latency_single_ms_p50']:.3f} | {m['latency_single_p50_ratio']:.3f} "
            f"| {m['eval_accuracy']:.3f} | {m['batch_class_agreement']:.4%} | {m['batch_max_abs_prob_diff']:.4f} |"
        )
    return "\n".join(lines)
