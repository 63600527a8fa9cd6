"""Offline charts: specs from plot rows, the inlined-Vega page and the DVC template drawn in a real
headless Chromium with the network blocked, and the static images."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from browser import CHROMIUM, SKIP_REASON, drawn, open_page

from serving_optimiser.errors import UserError
from serving_optimiser.pipeline.plots import (
    DEFAULT_CHARTS,
    Chart,
    build_specs,
    chart_spec,
    dvc_template_html,
    read_rows,
    write_plots,
)

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON)

# A name that would end the <script> element if the page did not escape it.
AWKWARD = "odd</script><b>name"
ROWS = [
    {"model": "exported", "size_bytes": 3_196_386, "batch_ratio": 1.0,
     "agreement": 1.0, "batch1_p50_ms": 0.68},
    {"model": "lossless", "size_bytes": 3_175_065, "batch_ratio": 0.99,
     "agreement": 1.0, "batch1_p50_ms": 0.66},
    {"model": "notebook", "size_bytes": 811_807, "batch_ratio": 0.98,
     "agreement": 0.9996, "batch1_p50_ms": 0.67},
    {"model": AWKWARD, "size_bytes": 811_807, "batch_ratio": 0.97,
     "agreement": 0.9995, "batch1_p50_ms": 0.70},
]
MODELS = [row["model"] for row in ROWS]
STEPS = 12
BATCH_SIZES = (1, 8, 64, 512, 100_000)
# Per row, a call's fixed cost shrinks with the batch: 500 µs / rows + 8 µs, scaled per model.
CURVE = [{"model": model, "batch_size": size, "per_row_us": (500 / size + 8) * (1 + index / 10)}
         for index, model in enumerate(MODELS) for size in BATCH_SIZES]


def write_fixture(root: Path, rows: list[dict] = ROWS) -> Path:
    (root / "metrics").mkdir(parents=True)
    (root / "metrics" / "plots.json").write_text(json.dumps(rows))
    (root / "metrics" / "batch_curve.json").write_text(json.dumps(CURVE))
    curves = root / "dvclive" / "plots" / "metrics" / "train"
    curves.mkdir(parents=True)
    (curves / "loss.tsv").write_text("step\tloss\n" + "".join(f"{s}\t{100 / (s + 1)}\n" for s in range(STEPS)))
    (curves / "accuracy.tsv").write_text("step\taccuracy\n" + "".join(f"{s}\t{s / STEPS}\n" for s in range(STEPS)))
    return root


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = write_fixture(tmp_path_factory.mktemp("plots") / "repo")
    out = root / "out"
    outputs = write_plots(DEFAULT_CHARTS, root, html_path=out / "index.html", image_dir=out,
                          dvc_template_path=out / "dvc-template.html")
    return root, out, outputs


def _chart(kind: str = "scatter", **changes) -> Chart:
    base = {"name": "c", "title": "C", "file": "rows.json", "x": "size", "y": "speed", "kind": kind}
    return Chart(**(base | changes))


# Reading rows and building specs


def test_read_rows_json_and_tsv(tmp_path):
    (tmp_path / "rows.json").write_text('[{"model": "a", "size": 1}]')
    (tmp_path / "keyed.json").write_text('{"a": {"size": 1}, "b": {"size": 2}}')
    (tmp_path / "loss.tsv").write_text("step\tloss\n0\t2.5\n1\t1.5\n")
    assert read_rows(tmp_path / "rows.json") == [{"model": "a", "size": 1}]
    assert read_rows(tmp_path / "keyed.json") == [{"model": "a", "size": 1}, {"model": "b", "size": 2}]
    assert read_rows(tmp_path / "loss.tsv") == [{"step": 0.0, "loss": 2.5}, {"step": 1.0, "loss": 1.5}]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("missing.json", None, "missing.json: plot data not found"),
        ("broken.json", "[{", "broken.json: not valid JSON"),
        ("dict.json", '{"a": 1}', "dict.json: expected a JSON list of row objects"),
        ("bad.tsv", "step\tloss\n0\tnan-ish\n", "bad.tsv: line 2, column 'loss': 'nan-ish' is not a number"),
        ("rows.yaml", "- a: 1\n", "rows.yaml: plot data must be .json, .tsv or .csv"),
    ],
    ids=["missing", "bad-json", "not-a-list", "non-numeric-tsv", "unknown-suffix"],
)
def test_read_rows_errors_name_the_file(tmp_path, name, text, message):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match="^" + str(tmp_path / message).replace("(", r"\(").replace(")", r"\)")):
        read_rows(tmp_path / name)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "chart c: rows.json has no rows"),
        ([{"model": "a", "size": 1}], "chart c: rows.json row 0 has no field 'speed' (fields: model, size)"),
        ([{"model": "a", "size": 1, "speed": "fast"}], "chart c: rows.json row 0: speed='fast' is not a finite number"),
        ([{"model": "a", "size": 1, "speed": float("nan")}], "row 0: speed=nan is not a finite number"),
        ([{"size": 1, "speed": 2}], "chart c: rows.json row 0 has no 'model' name"),
    ],
    ids=["empty", "missing-field", "string-value", "nan", "no-model"],
)
def test_bad_rows_give_one_line_errors(rows, message):
    with pytest.raises(UserError) as error:
        chart_spec(_chart(), rows)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "Bad Name"}, "chart name 'Bad Name' must be lower-case"),
        ({"kind": "pie"}, "chart c: kind 'pie' is not one of scatter, bar, line"),
        ({"kind": "bar", "x": "size"}, "chart c: a bar chart has one bar per 'model', so x must be 'model'"),
    ],
    ids=["name", "kind", "bar-x"],
)
def test_bad_chart_definitions(changes, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(")):
        _chart(**changes)


def test_duplicate_chart_names_are_refused(tmp_path):
    write_fixture(tmp_path)
    with pytest.raises(UserError, match="chart names must be unique: size_vs_latency"):
        build_specs([DEFAULT_CHARTS[0], DEFAULT_CHARTS[0]], tmp_path)


def test_scatter_colours_and_labels_by_model_with_one_domain(tmp_path):
    specs = build_specs(DEFAULT_CHARTS, write_fixture(tmp_path))
    scatter = specs["size_vs_latency"]
    assert scatter["encoding"]["color"] == {
        "field": "model", "type": "nominal", "title": "model",
        "scale": {"domain": sorted(MODELS), "scheme": "tableau20"}}
    text_layers = [layer for layer in scatter["layer"] if layer["mark"]["type"] == "text"]
    assert text_layers and all(layer["encoding"]["text"]["field"] == "model" for layer in text_layers)
    # Every row is in exactly one label layer.
    places = [row["label_place"] for row in scatter["data"]["values"]]
    assert sorted(places) == sorted(p for layer in text_layers for p in places
                                    if p == layer["transform"][0]["filter"]["equal"])
    assert specs["batch1_latency"]["encoding"]["color"]["scale"]["domain"] == sorted(MODELS)
    assert specs["training_loss"]["encoding"]["y"]["scale"] == {"type": "log"}
    assert "color" not in specs["training_loss"]["encoding"]


def test_batch_curve_is_one_line_per_model_on_log_axes(tmp_path):
    spec = build_specs(DEFAULT_CHARTS, write_fixture(tmp_path))["batch_curve"]
    assert spec["mark"] == {"type": "line", "tooltip": True, "point": True}
    assert spec["encoding"]["x"]["field"] == "batch_size" and spec["encoding"]["x"]["scale"] == {"type": "log"}
    assert spec["encoding"]["y"]["field"] == "per_row_us" and spec["encoding"]["y"]["scale"] == {"type": "log"}
    assert spec["encoding"]["color"]["field"] == "model"
    assert spec["encoding"]["color"]["scale"]["domain"] == sorted(MODELS)
    values = spec["data"]["values"]
    assert len(values) == len(MODELS) * len(BATCH_SIZES)
    lossless = [row["per_row_us"] for row in values if row["model"] == "lossless"]
    assert lossless == sorted(lossless, reverse=True)  # per-row latency falls as batches grow
    # The training curves stay plain lines: a point per epoch would hide them.
    assert build_specs(DEFAULT_CHARTS, tmp_path)["training_loss"]["mark"] == {"type": "line", "tooltip": True}


def test_labels_of_points_at_one_size_do_not_share_a_place():
    rows = [{"model": m, "size": 800_000, "speed": 1.0} for m in ("a", "b", "c")] + [
        {"model": "far", "size": 3_000_000, "speed": 0.0}]
    values = chart_spec(_chart(), rows)["data"]["values"]
    places = {row["model"]: row["label_place"] for row in values}
    assert len({places["a"], places["b"], places["c"]}) == 3
    assert places["far"].startswith("left:")  # rightmost quarter: label inside the plot


def _first_script(page: str) -> str:
    return page.split("<script>", 1)[1].split("</script>", 1)[0]


def test_page_and_template_fetch_nothing(written):
    _, _, outputs = written
    page = outputs.html.read_text()
    bundle = _first_script(page)
    assert len(bundle) > 100_000 and "window.vegaEmbed=" in bundle
    for text in (page, outputs.dvc_template.read_text()):
        assert "<script src" not in text and "cdn." not in text and "jsdelivr" not in text
        assert _first_script(text) == bundle
    assert AWKWARD not in page  # escaped inside the script element
    template = outputs.dvc_template.read_text()
    assert "{plot_divs}" in template and "{scripts}" not in template
    assert dvc_template_html(bundle) == template


def test_images_are_written_for_every_chart(written):
    _, out, outputs = written
    expected = {out / f"{chart.name}.{ext}" for chart in DEFAULT_CHARTS for ext in ("svg", "png")}
    assert set(outputs.images) == expected
    for path in expected:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") if path.suffix == ".png" else b"<svg" in data[:200], path
    assert "notebook" in (out / "size_vs_latency.svg").read_text()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # atomic writes left nothing behind


def test_failed_run_keeps_previous_outputs(written, tmp_path):
    _, out, _ = written
    before = (out / "size_vs_latency.svg").read_bytes()
    broken = tmp_path / "broken"
    write_fixture(broken)
    (broken / "metrics" / "plots.json").write_text(json.dumps([{"model": "a"}]))
    with pytest.raises(UserError, match="has no field 'size_bytes'"):
        write_plots(DEFAULT_CHARTS, broken, html_path=out / "index.html", image_dir=out)
    assert (out / "size_vs_latency.svg").read_bytes() == before


def test_script_reports_bad_data_in_one_line(tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    script = Path(__file__).resolve().parents[2] / "scripts" / "plots.py"
    result = subprocess.run([sys.executable, str(script), "--root", str(tmp_path), "--html", str(tmp_path / "i.html")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 1
    missing = tmp_path / "metrics" / "plots.json"
    assert result.stderr.strip() == f"plots: error: {missing}: plot data not found (run the pipeline first: make all)"


# In a real browser, network blocked


@needs_chromium
def test_page_draws_every_chart_offline(written):
    _, _, outputs = written
    page = open_page(outputs.html, ".chart")
    assert page.outside_requests == [] and page.console_errors == [] and page.page_errors == []
    charts = page.by_id()
    assert set(charts) == {f"chart-{chart.name}" for chart in DEFAULT_CHARTS}
    for name, chart in charts.items():
        assert chart["rendered"] and drawn(chart), (name, chart)
    for name in ("size_vs_latency", "size_vs_agreement"):
        assert charts[f"chart-{name}"]["symbols"] == len(ROWS)
        assert sorted(charts[f"chart-{name}"]["texts"]) == sorted(MODELS)  # the awkward name too, as text
    assert charts["chart-batch1_latency"]["bars"] == len(ROWS)
    assert charts["chart-training_loss"]["lines"] == 1 and charts["chart-training_accuracy"]["lines"] == 1
    assert charts["chart-batch_curve"]["lines"] == len(MODELS)  # one curve per model


@needs_chromium
def test_a_page_that_needs_a_cdn_is_reported_blank(tmp_path):
    # The harness must be able to fail: the same chart loaded the way DVC's default page loads
    # Vega (from a CDN) draws nothing here and shows up as an outside request and an error.
    spec = chart_spec(_chart(), [{"model": "a", "size": 1, "speed": 2}])
    page_path = tmp_path / "cdn.html"
    page_path.write_text(
        '<!DOCTYPE html><html><head><script src="https://cdn.jsdelivr.net/npm/vega-embed@6"></script></head>'
        f'<body><div class="chart" id="chart-c"></div><script>vegaEmbed("#chart-c", {json.dumps(spec)});</script>'
        "</body></html>"
    )
    page = open_page(page_path, ".chart", timeout_ms=20_000)
    assert page.outside_requests == ["https://cdn.jsdelivr.net/npm/vega-embed@6"]
    assert any("vegaEmbed is not defined" in error for error in page.page_errors)
    assert not drawn(page.by_id()["chart-c"])


def _dvc(cwd: Path, *args: str) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


DVC_PLOTS = """plots:
  - size_vs_agreement:
      template: scatter
      x: size_bytes
      y:
        metrics/plots.json: agreement
  - training_loss:
      template: linear
      x: step
      y:
        dvclive/plots/metrics/train/loss.tsv: loss
"""


@pytest.mark.slow
@needs_chromium
def test_dvc_plots_show_with_the_template_config_draws_offline(written, tmp_path):
    _, _, outputs = written
    # Without the awkward name: DVC pastes plot data into its page unescaped, so "</script>" in
    # a model name breaks DVC's page whatever the template.
    repo = write_fixture(tmp_path / "repo", [row for row in ROWS if row["model"] != AWKWARD])
    (repo / "dvc.yaml").write_text(DVC_PLOTS)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _dvc(repo, "init", "-q")
    _dvc(repo, "plots", "show", "-o", "cdn_plots")
    # The line the README gives, relative to .dvc/ as DVC resolves it.
    _dvc(repo, "config", "plots.html_template", os.path.relpath(outputs.dvc_template, repo / ".dvc"))
    _dvc(repo, "plots", "show", "-o", "offline_plots")

    offline = open_page(repo / "offline_plots" / "index.html", "body > div[id]")
    assert offline.outside_requests == [] and offline.console_errors == [] and offline.page_errors == []
    assert len(offline.containers) == 2
    assert all(drawn(container) for container in offline.containers), offline.containers

    default = open_page(repo / "cdn_plots" / "index.html", "body > div[id]", timeout_ms=20_000)
    assert default.outside_requests and not any(drawn(container) for container in default.containers)


def test_charts_without_data_in_this_run_are_skipped_with_a_line(tmp_path):
    """A user's model has no training curves and, without a class output, no class agreement:
    those charts are left out, saying why; a chart with some bad rows still fails."""
    from serving_optimiser.pipeline.plots import DEFAULT_CHARTS, build_specs, drawable_charts

    (tmp_path / "metrics").mkdir()
    rows = [{"model": name, "size_bytes": size, "agreement": None, "max_dp": 0.01, "batch_ratio": 0.9,
             "batch1_p50_ratio": 1.0, "batch1_p50_ms": 0.5} for name, size in (("exported", 100), ("int8", 30))]
    (tmp_path / "metrics" / "plots.json").write_text(json.dumps(rows))
    (tmp_path / "metrics" / "batch_curve.json").write_text(json.dumps(
        [{"model": "exported", "batch_size": 1, "per_row_us": 5.0, "p50_ms": 0.005, "ratio": 1.0}]))
    charts, skipped = drawable_charts(DEFAULT_CHARTS, tmp_path)
    assert sorted(chart.name for chart in charts) == ["batch1_latency", "batch_curve", "size_vs_latency"]
    assert "size_vs_agreement: no model has a value for agreement in metrics/plots.json" in skipped
    assert any(line.startswith("training_loss: no dvclive/") for line in skipped)
    (tmp_path / "metrics" / "batch_curve.json").unlink()  # a metrics file missing is an error, not a skip
    assert "batch_curve" in [chart.name for chart in drawable_charts(DEFAULT_CHARTS, tmp_path)[0]]
    (tmp_path / "metrics" / "batch_curve.json").write_text(json.dumps(
        [{"model": "exported", "batch_size": 1, "per_row_us": 5.0, "p50_ms": 0.005, "ratio": 1.0}]))
    assert set(build_specs(charts, tmp_path)) == {"batch1_latency", "batch_curve", "size_vs_latency"}
    rows[1]["agreement"] = 0.99  # one model has it, one has not: that is broken data, not a missing chart
    (tmp_path / "metrics" / "plots.json").write_text(json.dumps(rows))
    charts, _ = drawable_charts(DEFAULT_CHARTS, tmp_path)
    with pytest.raises(UserError, match="row 0: agreement=None is not a finite number"):
        build_specs(charts, tmp_path)
