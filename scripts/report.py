"""Stage report: gather every model's figures (the evaluate and latency stages' files) into one
table, the batch-size curve, plot rows, the best model per objective and per batch range, and the
sample predictions side by side."""

import argparse
from pathlib import Path

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--details-dir", required=True, type=Path)
    parser.add_argument("--latency-details-dir", required=True, type=Path)
    parser.add_argument("--optimise-dir", type=Path, help="the optimise stage's gate reports, one per variant")
    parser.add_argument("--out-plots", required=True, type=Path)
    parser.add_argument("--out-curve", required=True, type=Path, help="plot rows: latency per row per batch size")
    parser.add_argument("--out-table", required=True, type=Path)
    parser.add_argument("--out-summary", required=True, type=Path)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    from serving_optimiser.pipeline.entries import model_names
    from serving_optimiser.pipeline.params import PipelineParams
    from serving_optimiser.pipeline.report import gather, results_table, write_report

    records = gather(model_names(PipelineParams.load(args.params)), args.details_dir, args.latency_details_dir,
                     args.optimise_dir)
    write_report(records, args.out_plots, args.out_curve, args.out_table, args.out_summary)
    print(results_table(records))


if __name__ == "__main__":
    run_stage("report", main)
