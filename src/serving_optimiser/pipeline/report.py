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
