"""Stage latency@MODEL: one model's 100,000-row and batch-1 call times against the exported
model's, measured side by side in one process with TensorFlow's default kernels and threads (how
it would serve on this machine), and the machine they were measured on."""

import argparse
from pathlib import Path

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="a key of the 'optimise' section of params.yaml")
    parser.add_argument("--exported", required=True, type=Path)
    parser.add_argument("--saved-model", required=True, type=Path)
    parser.add_argument("--eval", required=True, type=Path)
    parser.add_argument("--out-metrics", required=True, type=Path)
    parser.add_argument("--out-details", required=True, type=Path)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    import os

    from serving_optimiser.errors import UserError
    from serving_optimiser.graph_transforms.catalogue import needs_onednn
    from serving_optimiser.pipeline import evaluate, latency
    from serving_optimiser.pipeline.data import features_and_labels, read_iris_csv, sample_around
    from serving_optimiser.pipeline.io import write_json
    from serving_optimiser.pipeline.params import load_params, require_list, section

    params = load_params(args.params)
    vocabulary = require_list(section(params, "data", args.params), "label_vocabulary", str, "data", args.params)
    evaluate_params = evaluate.EvaluateParams.from_section(section(params, "evaluate", args.params))
    latency_params = latency.LatencyParams.from_section(section(params, "latency", args.params))
    variants = section(params, "optimise", args.params)
    if args.model not in variants:
        raise UserError(f"{args.params}: no variant '{args.model}' in the 'optimise' section")
    if needs_onednn(variants[args.model]):
        # TensorFlow turns oneDNN's rewrites on by default only on CPUs with AVX-512 VNNI and
        # newer; the variant's int8 ops have no kernel without them.
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

    frame = read_iris_csv(args.eval, vocabulary)
    features, _ = features_and_labels(frame, vocabulary)
    batch = sample_around(frame, evaluate_params.batch_rows, latency_params.seed)
    single = {name: values[:1] for name, values in features.items()}

    def loader(directory: Path):
        def load():
            _, signature = evaluate.load_signature(directory, evaluate_params.signature)
            return lambda inputs: evaluate.run_signature(signature, inputs)

        return load

    models = []
    for name, directory in ((evaluate.REFERENCE, args.exported), (args.model, args.saved_model)):
        call, load_seconds = latency.timed_load(loader(directory), latency_params.load_repeats)
        models.append(latency.TimedModel(name, call, load_seconds))
    # Fidelity as this machine's kernels compute it (the evaluate stage's is pinned, the same
    # everywhere); they differ where a variant's kernels round differently per ISA (int8).
    agreement, max_dp = evaluate.fidelity(models[0].call(batch), models[1].call(batch))
    measured = latency.measure_latency(
        models, batch, single, latency_params.repeats, latency_params.single_row_calls, latency_params.seed
    )
    figures = {name: evaluate.rounded(values) for name, values in measured.items()}
    mine = figures[args.model]
    here = {"agreement_this_machine": round(agreement, 6), "max_dp_this_machine": round(max_dp, 6)}
    write_json(args.out_details, {"machine": latency.machine_info(), "measured": figures, "fidelity": here})
    # Short names and 3 decimals keep `dvc metrics show` within 120 columns (README has the legend).
    write_json(args.out_metrics, {"t100k_x": round(mine["batch_ratio"], 3), "t1_x": round(mine["batch1_p50_ratio"], 3)})
    print(
        f"latency: {args.model}: {evaluate_params.batch_rows} rows {mine['batch_ms']:.0f} ms "
        f"({mine['batch_ratio']:.3f}x), batch-1 p50 {mine['batch1_p50_ms']:.3f} ms ({mine['batch1_p50_ratio']:.3f}x)"
    )


if __name__ == "__main__":
    run_stage("latency", main, pinned=False)
