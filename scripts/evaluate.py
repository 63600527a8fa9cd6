"""Stage evaluate: sizes, latency, accuracy and fidelity of the exported model and every variant,
written as DVC metrics (JSON), a CSV table and plot data; fails if a variant's class agreement
falls below evaluate.min_class_agreement."""

import argparse
from pathlib import Path

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exported", default="models/exported")
    parser.add_argument("--converted-dir", default="models/converted")
    parser.add_argument("--eval", default="data/prepared/eval.csv")
    parser.add_argument("--metrics", default="metrics/evaluate.json")
    parser.add_argument("--table", default="metrics/models.csv")
    parser.add_argument("--plots", default="metrics/plots.json")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    from serving_optimiser.errors import UserError
    from serving_optimiser.pipeline.data import features_and_labels, read_iris_csv, sample_around
    from serving_optimiser.pipeline.evaluate import EvaluateParams, evaluate_models, failing_variants
    from serving_optimiser.pipeline.params import load_params, require_list, section
    from serving_optimiser.pipeline.report import write_reports

    params = load_params(args.params)
    vocabulary = require_list(section(params, "data", args.params), "label_vocabulary", str, "data", args.params)
    variants = sorted(section(params, "optimise", args.params))
    evaluate_params = EvaluateParams.from_section(section(params, "evaluate", args.params))

    frame = read_iris_csv(args.eval, vocabulary)
    features, labels = features_and_labels(frame, vocabulary)
    batch = sample_around(frame, evaluate_params.batch_rows, evaluate_params.seed)
    model_dirs = {"exported": Path(args.exported)} | {v: Path(args.converted_dir) / v for v in variants}
    metrics = evaluate_models(model_dirs, features, labels, batch, evaluate_params)
    write_reports(metrics, args.metrics, args.table, args.plots)
    for name, m in metrics.items():
        print(
            f"evaluate: {name}: {m['size_total_bytes'] / 1024:.1f} KB ({m['size_total_ratio']:.3f}x), "
            f"batch {m['latency_batch_ms_median']:.0f} ms ({m['latency_batch_ratio']:.3f}x), "
            f"batch-1 p50 {m['latency_single_ms_p50']:.3f} ms ({m['latency_single_p50_ratio']:.3f}x), "
            f"accuracy {m['eval_accuracy']:.3f}, agreement {m['batch_class_agreement']:.4f}"
        )
    failing = failing_variants(metrics, evaluate_params.min_class_agreement)
    if failing:
        raise UserError(
            f"below evaluate.min_class_agreement={evaluate_params.min_class_agreement}: {', '.join(failing)}"
        )


if __name__ == "__main__":
    run_stage("evaluate", main)
