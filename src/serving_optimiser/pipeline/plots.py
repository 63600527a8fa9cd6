"""Charts of the pipeline's results that need no network: Vega-Lite specs built from plot rows,
one HTML page with Vega, Vega-Lite and vega-embed inlined, static SVG/PNG images, and an
offline HTML template for `dvc plots show/diff`.

Which charts to draw is the data structure `DEFAULT_CHARTS`: edit it when metric names change.
dvc.yaml's `plots` section is written from it (`python tests/dvc_deps.py`, see :func:`dvc_plots`).
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..atomic import atomic_file
from ..errors import UserError

# vl-convert ships several Vega-Lite releases; the newest it bundles (with Vega 6) avoids the
# "spec uses Vega v5, current version is v6" warning that an older Vega-Lite gives in the page.
VEGA_LITE_VERSION = "6.4"
SCHEMA = "https://vega.github.io/schema/vega-lite/v6.json"  # an identifier: vega-embed never fetches it
IMAGE_FORMATS = ("svg", "png")
KINDS = ("scatter", "bar", "line")

Kind = Literal["scatter", "bar", "line"]
Row = dict[str, Any]


@dataclass(frozen=True)
class Chart:
    """One chart: rows of ``file``, ``y`` against ``x``, coloured and labelled by ``by``.

    ``file`` is a JSON list of row objects, a JSON object of them keyed by model, or a TSV/CSV
    with a header (dvclive's step/value files), relative to the repo root. ``by`` names the
    field that says which model a row is (None for a single series such as the training curves).
    Scales are Vega-Lite scale types ("linear", "log"); formats are d3-format strings for the axes
    ("~s" prints 3.2M).
    """

    name: str
    title: str
    file: str
    x: str
    y: str
    kind: Kind
    by: str | None = "model"
    x_title: str | None = None
    y_title: str | None = None
    x_scale: str = "linear"
    y_scale: str = "linear"
    x_format: str | None = None
    y_format: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", self.name):
            raise UserError(f"chart name {self.name!r} must be lower-case letters, digits, '_' or '-'")
        if self.kind not in KINDS:
            raise UserError(f"chart {self.name}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "bar" and self.by != self.x:
            raise UserError(f"chart {self.name}: a bar chart has one bar per {self.by!r}, so x must be {self.by!r}")


PLOT_ROWS = "metrics/plots.json"
CURVE_ROWS = "metrics/batch_curve.json"
TRAIN_CURVES = "dvclive/plots/metrics/train"

# One chart per question the issue asks. Field names follow the evaluate stage's plot rows.
DEFAULT_CHARTS: tuple[Chart, ...] = (
    Chart(
        name="size_vs_latency",
        title="Size against 100,000-row latency",
        file=PLOT_ROWS,
        x="size_bytes",
        y="batch_ratio",
        kind="scatter",
        x_title="SavedModel size (bytes)",
        y_title="100,000-row call, ratio to exported",
        x_format="~s",
        description="Lower left is better: smaller and faster than the exported model (ratio 1).",
    ),
    Chart(
        name="size_vs_agreement",
        title="Size against class agreement",
        file=PLOT_ROWS,
        x="size_bytes",
        y="agreement",
        kind="scatter",
        x_title="SavedModel size (bytes)",
        y_title="class agreement with exported, 100,000 rows",
        x_format="~s",
        y_format=".2%",
        description="Upper left is better: smaller and still agreeing with the exported model.",
    ),
    Chart(
        name="batch1_latency",
        title="Batch-1 latency (p50) per model",
        file=PLOT_ROWS,
        x="model",
        y="batch1_p50_ms",
        kind="bar",
        x_title="model",
        y_title="batch-1 call, p50 (ms)",
    ),
    Chart(
        name="batch_curve",
        title="Latency per row against batch size",
        file=CURVE_ROWS,
        x="batch_size",
        y="per_row_us",
        kind="line",
        x_title="rows per call",
        y_title="p50 call time per row (µs)",
        x_scale="log",
        y_scale="log",
        x_format="~s",
        description="Lower is faster. Where lines cross, another model wins: the report names the winner "
        "per batch range.",
    ),
    Chart(
        name="training_loss",
        title="Training loss",
        file=f"{TRAIN_CURVES}/loss.tsv",
        x="step",
        y="loss",
        kind="line",
        by=None,
        x_title="epoch",
        y_title="loss (summed over the batch)",
        y_scale="log",
    ),
    Chart(
        name="training_accuracy",
        title="Training accuracy",
        file=f"{TRAIN_CURVES}/accuracy.tsv",
        x="step",
        y="accuracy",
        kind="line",
        by=None,
        x_title="epoch",
        y_title="accuracy on the training split",
        y_format=".0%",
    ),
)



def dvc_plots(charts: Iterable[Chart] = DEFAULT_CHARTS) -> list[dict[str, dict]]:
    """The same charts as dvc.yaml's ``plots`` entries, for `dvc plots show/diff` (tests/dvc_deps.py
    writes that section from this, so the charts are listed once). A bar chart is DVC's
    ``bar_horizontal`` (one bar per model, the figure along x); a line per model is a scatter,
    since DVC's ``linear`` template joins every row of a file into one line, across models."""
    entries = []
    for chart in charts:
        x, y, x_title, y_title = chart.x, chart.y, chart.x_title, chart.y_title
        if chart.kind == "bar":
            template = "bar_horizontal"
            x, y, x_title, y_title = y, x, y_title, x_title
        elif chart.kind == "line" and chart.by is None:
            template = "linear"
        else:
            template = "scatter"
        entry: dict[str, Any] = {"template": template, "x": x, "y": {chart.file: y}, "title": chart.title}
        entry |= {key: value for key, value in (("x_label", x_title), ("y_label", y_title)) if value}
        entries.append({chart.name: entry})
    return entries

def _number(text: str, path: Path, line: int, column: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{path}: line {line}, column {column!r}: {text!r} is not a number") from None


def read_rows(path: str | os.PathLike) -> list[Row]:
    """Rows of a JSON list of objects (or object of objects keyed by model), or of a TSV/CSV whose
    columns are all numeric."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: plot data not found (run the pipeline first: make all)")
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: not valid JSON ({error})") from None
        # Also {model: {field: value}} (an object keyed by model): each entry becomes a row whose
        # "model" is its key, so a chart can point at either shape.
        if isinstance(rows, dict) and rows and all(isinstance(row, dict) for row in rows.values()):
            rows = [{"model": name} | row for name, row in rows.items()]
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise UserError(f"{path}: expected a JSON list of row objects or an object of them keyed by model")
        return rows
    if path.suffix in (".tsv", ".csv"):
        with path.open(newline="") as stream:
            reader = csv.DictReader(stream, delimiter="\t" if path.suffix == ".tsv" else ",")
            return [
                {key: _number(value, path, reader.line_num, key) for key, value in row.items()} for row in reader
            ]
    raise UserError(f"{path}: plot data must be .json, .tsv or .csv")


def _check_rows(chart: Chart, rows: Sequence[Row]) -> None:
    if not rows:
        raise UserError(f"chart {chart.name}: {chart.file} has no rows")
    numeric = [chart.y] if chart.kind == "bar" else [chart.x, chart.y]
    for index, row in enumerate(rows):
        for key in numeric:
            if key not in row:
                fields = ", ".join(sorted(row))
                raise UserError(f"chart {chart.name}: {chart.file} row {index} has no field {key!r} (fields: {fields})")
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise UserError(f"chart {chart.name}: {chart.file} row {index}: {key}={value!r} is not a finite number")
        if chart.by is not None and not isinstance(row.get(chart.by), str):
            raise UserError(f"chart {chart.name}: {chart.file} row {index} has no {chart.by!r} name")


LABEL_OFFSETS = (0, 13, -13)  # pixels: a label's own line, then below, then above its point


def _label_places(rows: Sequence[Row], x: str, y: str) -> list[str]:
    """Where each point's label goes, as "SIDE:DY": to the right of the point, or to its left
    in the rightmost quarter (so it stays inside the plot); and a line lower or higher when an
    earlier label on the same side would sit on top of it (variants of one size, or models with
    the same agreement, otherwise print their names over each other)."""

    def scaled(key: str) -> list[float]:
        values = [float(row[key]) for row in rows]
        low, span = min(values), (max(values) - min(values)) or 1.0
        return [(value - low) / span for value in values]

    xs, ys = scaled(x), scaled(y)
    places: list[str] = [""] * len(rows)
    taken: list[tuple[float, float, str, int]] = []
    for index in sorted(range(len(rows)), key=lambda i: (-ys[i], xs[i])):
        side = "left" if xs[index] > 0.75 else "right"
        crowded = {dy for nx, ny, other, dy in taken
                   if other == side and abs(nx - xs[index]) < 0.3 and abs(ny - ys[index]) < 0.06}
        dy = next((offset for offset in LABEL_OFFSETS if offset not in crowded), LABEL_OFFSETS[0])
        taken.append((xs[index], ys[index], side, dy))
        places[index] = f"{side}:{dy}"
    return places


def _axis(field_name: str, title: str | None, scale: str, number_format: str | None, zero: bool,
          padding: int = 0) -> dict:
    axis: dict[str, Any] = {"field": field_name, "type": "quantitative", "title": title or field_name}
    axis["scale"] = {"type": scale} if scale != "linear" else {"zero": zero}
    if padding:
        axis["scale"]["padding"] = padding  # pixels, so points at the extremes do not sit on an axis
    if number_format:
        axis["axis"] = {"format": number_format}
    return axis


def chart_spec(chart: Chart, rows: Sequence[Row], models: Sequence[str] = ()) -> dict:
    """The Vega-Lite spec of ``chart`` with ``rows`` inlined.

    ``models`` fixes the colour of each model across charts (one shared domain).
    """
    _check_rows(chart, rows)
    values = [dict(row) for row in rows]
    spec: dict[str, Any] = {
        "$schema": SCHEMA,
        "title": chart.title,
        "description": chart.description or chart.title,
        "width": 420,
        "height": 280,
        "data": {"values": values},
    }
    colour: dict[str, Any] | None = None
    if chart.by is not None:
        domain = list(models) or sorted({row[chart.by] for row in rows})
        # 20 colours: the shipped run has 12 models, more than the default palette's 10.
        scale = {"domain": domain, "scheme": "tableau20"}
        colour = {"field": chart.by, "type": "nominal", "title": chart.by, "scale": scale}
    y = _axis(chart.y, chart.y_title, chart.y_scale, chart.y_format, zero=chart.kind == "bar")
    tooltip = [{"field": name, "type": "nominal" if name == chart.by else "quantitative"}
               for name in dict.fromkeys(n for n in (chart.by, chart.x, chart.y) if n)]

    if chart.kind == "line":
        x = _axis(chart.x, chart.x_title, chart.x_scale, chart.x_format, zero=True)
        # One line per model gets a point per measurement (the curves have a few points each).
        spec["mark"] = {"type": "line", "tooltip": True} | ({"point": True} if colour else {})
        spec["encoding"] = {"x": x, "y": y} | ({"color": colour} if colour else {})
        return spec

    if chart.kind == "bar":
        x = {"field": chart.x, "type": "nominal", "title": chart.x_title or chart.x, "sort": colour["scale"]["domain"],
             "axis": {"labelAngle": 0}}
        value_format = chart.y_format or ".3~f"
        spec["encoding"] = {"x": x, "y": y, "color": colour, "tooltip": tooltip}
        spec["layer"] = [
            {"mark": {"type": "bar"}},
            {"mark": {"type": "text", "dy": -6, "baseline": "bottom"},
             "encoding": {"text": {"field": chart.y, "type": "quantitative", "format": value_format},
                          "color": {"value": "black"}}},
        ]
        return spec

    places = _label_places(values, chart.x, chart.y)
    for value, place in zip(values, places):
        value["label_place"] = place
    x = _axis(chart.x, chart.x_title, chart.x_scale, chart.x_format, zero=False, padding=20)
    y = _axis(chart.y, chart.y_title, chart.y_scale, chart.y_format, zero=False, padding=20)
    encoding: dict[str, Any] = {"x": x, "y": y, "tooltip": tooltip}
    if colour:
        encoding["color"] = colour
    layers: list[dict] = [{"mark": {"type": "point", "filled": True, "size": 90}}]
    if chart.by is not None:
        # Vega-Lite cannot encode a text mark's align or dy from data: one layer per place in use.
        for place in sorted(set(places)):
            side, dy = place.split(":")
            layers.append({
                "transform": [{"filter": {"field": "label_place", "equal": place}}],
                "mark": {"type": "text", "align": "left" if side == "right" else "right",
                         "dx": 8 if side == "right" else -8, "dy": int(dy), "fontSize": 11},
                "encoding": {"text": {"field": chart.by, "type": "nominal"}},
            })
    spec["encoding"] = encoding
    spec["layer"] = layers
    return spec


def drawable_charts(charts: Iterable[Chart], root: str | os.PathLike = ".") -> tuple[list[Chart], list[str]]:
    """The charts whose data this run has, and a line for each one it has not: a model the
    pipeline did not train has no training curves, and one without a class output no class
    agreement (every row's value null). Anything else wrong or missing still fails the chart."""
    drawn, skipped = [], []
    for chart in charts:
        path = Path(root) / chart.file
        if not path.is_file() and chart.file.startswith(TRAIN_CURVES):
            skipped.append(f"{chart.name}: no {chart.file} in this run (a model the pipeline did not train)")
            continue
        if not path.is_file():
            drawn.append(chart)  # build_specs names the missing file
            continue
        if path.suffix == ".json":
            rows = read_rows(path)
            if rows and all(row.get(chart.y) is None for row in rows):
                skipped.append(f"{chart.name}: no model has a value for {chart.y} in {chart.file}")
                continue
        drawn.append(chart)
    return drawn, skipped


def build_specs(charts: Iterable[Chart], root: str | os.PathLike = ".") -> dict[str, dict]:
    """Vega-Lite spec of every chart, keyed by chart name, reading each data file once."""
    charts = list(charts)
    names = [chart.name for chart in charts]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UserError(f"chart names must be unique: {', '.join(duplicates)}")
    cache: dict[str, list[Row]] = {}
    for chart in charts:
        if chart.file not in cache:
            cache[chart.file] = read_rows(Path(root) / chart.file)
    models = sorted({row[c.by] for c in charts if c.by for row in cache[c.file] if isinstance(row.get(c.by), str)})
    return {chart.name: chart_spec(chart, cache[chart.file], models) for chart in charts}


def _script_json(data: Any) -> str:
    """JSON safe inside a <script> element: "</script>" in a model name must not close it."""
    return json.dumps(data, sort_keys=True).replace("</", "<\\/").replace("<!--", "<\\!--")


def _script(javascript: str) -> str:
    if "</script" in javascript.lower():
        raise UserError("the Vega bundle contains '</script' and cannot be inlined")
    return f"<script>{javascript}</script>"


def javascript_bundle() -> str:
    """Vega, Vega-Lite and vega-embed in one script that sets window.vega, vegaLite, vegaEmbed."""
    import vl_convert

    return vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)


PAGE_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
.chart-block { margin-bottom: 2.5em; }
.source { color: #666; font-size: 0.85em; }
"""

# Marks each container when its chart has drawn, and logs a console error naming the chart when
# it has not, so a person (and the browser test) can tell a blank chart from a slow one.
EMBED_SCRIPT = """
(function () {
  const specs = %s;
  for (const [name, spec] of Object.entries(specs)) {
    const element = document.getElementById("chart-" + name);
    vegaEmbed(element, spec, {renderer: "svg", actions: false})
      .then(() => { element.dataset.rendered = "true"; })
      .catch((error) => { element.dataset.error = String(error); console.error("chart " + name + ": " + error); });
  }
})();
"""


def page_html(specs: Mapping[str, dict], bundle: str, charts: Sequence[Chart] = (), title: str = "Plots") -> str:
    """One self-contained HTML page drawing every spec; ``bundle`` is inlined, nothing is fetched."""
    sources = {chart.name: chart for chart in charts}
    blocks = []
    for name in specs:
        chart = sources.get(name)
        caption = ""
        if chart is not None:
            text = f"{chart.description} " if chart.description else ""
            caption = f'<p class="source">{html.escape(text)}Data: <code>{html.escape(chart.file)}</code></p>'
        blocks.append(
            f'<div class="chart-block"><div class="chart" id="chart-{name}" data-chart="{name}"></div>{caption}</div>'
        )
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{PAGE_STYLE}</style>",
        _script(bundle),
        "</head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
        *blocks,
        _script(EMBED_SCRIPT % _script_json(dict(specs))),
        "</body>",
        "</html>",
        "",
    ])


def dvc_template_html(bundle: str) -> str:
    """An HTML template for `dvc plots show/diff --html-template`: DVC fills {plot_divs} with
    divs whose scripts call vegaEmbed. It has no {scripts} placeholder, so DVC's CDN script tags
    are dropped and the inlined bundle is used instead."""
    for placeholder in ("{plot_divs}", "{scripts}", "{refresh_tag}"):
        if placeholder in bundle:
            raise UserError(f"the Vega bundle contains DVC's placeholder {placeholder} and cannot be used")
    return "\n".join([
        "<!DOCTYPE html>",
        "<html>",
        "<head>",
        '<meta charset="utf-8">',
        "{refresh_tag}",
        "<title>DVC plots</title>",
        _script(bundle),
        "<style>table { border-spacing: 15px; }</style>",
        "</head>",
        "<body>",
        "{plot_divs}",
        "</body>",
        "</html>",
        "",
    ])


def write_text(target: str | os.PathLike, text: str) -> Path:
    with atomic_file(target) as stream:
        stream.write(text)
    return Path(target)


def write_images(specs: Mapping[str, dict], out_dir: str | os.PathLike, formats: Sequence[str] = IMAGE_FORMATS,
                 png_scale: float = 2.0) -> list[Path]:
    """One image per chart and format (``out_dir/NAME.svg``, ``NAME.png``), each written atomically."""
    import vl_convert

    unknown = sorted(set(formats) - set(IMAGE_FORMATS))
    if unknown:
        raise UserError(f"image format {', '.join(unknown)} is not one of {', '.join(IMAGE_FORMATS)}")
    written = []
    for name, spec in specs.items():
        for image_format in formats:
            target = Path(out_dir) / f"{name}.{image_format}"
            if image_format == "svg":
                data: str | bytes = vl_convert.vegalite_to_svg(spec, vl_version=VEGA_LITE_VERSION)
            else:
                data = vl_convert.vegalite_to_png(spec, vl_version=VEGA_LITE_VERSION, scale=png_scale)
            with atomic_file(target, "w" if isinstance(data, str) else "wb") as stream:
                stream.write(data)
            written.append(target)
    return written


@dataclass
class PlotOutputs:
    html: Path | None = None
    dvc_template: Path | None = None
    images: list[Path] = field(default_factory=list)


def write_plots(
    charts: Sequence[Chart] = DEFAULT_CHARTS,
    root: str | os.PathLike = ".",
    html_path: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    formats: Sequence[str] = IMAGE_FORMATS,
    dvc_template_path: str | os.PathLike | None = None,
    title: str = "Plots",
) -> PlotOutputs:
    """Read the data, then write whichever of the page, the images and DVC's template are asked for."""
    specs = build_specs(charts, root)
    outputs = PlotOutputs()
    bundle = javascript_bundle() if html_path is not None or dvc_template_path is not None else ""
    if html_path is not None:
        outputs.html = write_text(html_path, page_html(specs, bundle, charts, title))
    if dvc_template_path is not None:
        outputs.dvc_template = write_text(dvc_template_path, dvc_template_html(bundle))
    if image_dir is not None:
        outputs.images = write_images(specs, image_dir, formats)
    return outputs
