"""Charts that render offline: an HTML page with Vega inlined, SVG/PNG images of each chart, and
an offline HTML template for `dvc plots show/diff`. The charts are plots.DEFAULT_CHARTS."""

import argparse

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=".", help="directory the charts' data paths are relative to")
    parser.add_argument("--html", default="docs/plots/index.html", help="the page (Vega inlined, about 1 MB)")
    parser.add_argument("--image-dir", default="docs/plots", help="NAME.svg and NAME.png per chart")
    parser.add_argument("--formats", default="svg,png", help="comma-separated image formats (svg, png)")
    parser.add_argument("--dvc-template", default="build/dvc-plots-template.html",
                        help="offline template for dvc plots show/diff --html-template")
    parser.add_argument("--template-only", action="store_true", help="write only the DVC template (needs no data)")
    args = parser.parse_args(argv)

    from serving_optimiser.pipeline.plots import (
        DEFAULT_CHARTS,
        drawable_charts,
        dvc_template_html,
        javascript_bundle,
        write_plots,
        write_text,
    )

    if args.template_only:
        write_text(args.dvc_template, dvc_template_html(javascript_bundle()))
        print(f"plots: {args.dvc_template}")
        return
    formats = [name.strip() for name in args.formats.split(",") if name.strip()]
    charts, skipped = drawable_charts(DEFAULT_CHARTS, args.root)
    for line in skipped:
        print(f"plots: skipped {line}")
    outputs = write_plots(charts, root=args.root, html_path=args.html, image_dir=args.image_dir, formats=formats,
                          dvc_template_path=args.dvc_template, title="serving_optimiser: results of the pipeline")
    for path in [outputs.html, *outputs.images, outputs.dvc_template]:
        print(f"plots: {path}")


if __name__ == "__main__":
    run_stage("plots", main)
