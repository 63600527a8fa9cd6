"""Stage latency@MODEL (and latency_peer@PEER): one model's 100,000-row and batch-1 call times
against the exported model's, measured side by side in one process with TensorFlow's default
kernels and threads (how it would serve on this machine), the machine they were measured on, and
the model's fidelity as this machine's kernels compute it."""

import argparse
from pathlib import Path

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="a key of 'optimise' or of 'peers.variants' in params.yaml")
    parser.add_argument("--exported", required=True, type=Path)
    parser.add_argument("--model-path", required=True, type=Path, help="a SavedModel or a peer artefact's directory")
    parser.add_argument("--eval", required=True, type=Path)
    parser.add_argument("--out-metrics", required=True, type=Path)
    parser.add_argument("--out-details", required=True, type=Path)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    import os

    from serving_optimiser.pipeline import evaluate, latency
    from serving_optimiser.pipeline.data import features_and_labels, read_iris_csv, sample_around
    from serving_optimiser.pipeline.io import write_json
    from serving_optimiser.pipeline.params import load_params, require_list, section

    params = load_params(args.params)
    vocabulary = require_list(section(params, "data", args.params), "label_vocabulary", str, "data", args.params)
    evaluate_params = evaluate.EvaluateParams.from_section(section(params, "evaluate", args.params))
    latency_params = latency.LatencyParams.from_section(section(params, "latency", args.params))
    model = evaluate.ModelEntry.find(params, args.model, args.params)
    if model.needs_onednn:
        # The variant's int8 ops have no kernel without oneDNN's rewrites, which TensorFlow turns
        # on by default only on CPUs with AVX-512 VNNI and newer (machine_info records it).
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"

    frame = read_iris_csv(args.eval, vocabulary)
    features, _ = features_and_labels(frame, vocabulary)
    batch = sample_around(frame, evaluate_params.batch_rows, latency_params.seed)
    single = {name: values[:1] for name, values in features.items()}

    models = []
    for name, path in ((evaluate.REFERENCE, args.exported), (args.model, args.model_path)):
        predictor, load_seconds = latency.timed_load(
            lambda name=name, path=path: evaluate.load_model(
                name, path, vocabulary, evaluate_params.signature, model.threads
            ),
            latency_params.load_repeats,
        )
        models.append(latency.TimedModel(name, predictor, load_seconds))
    # Fidelity as this machine's kernels compute it (the evaluate stage's is pinned, the same
    # everywhere); they differ where kernels round differently per ISA (int8, the peer runtimes).
    agreement, max_dp = evaluate.fidelity(models[0].call(batch), models[1].call(batch))
    measured = latency.measure_latency(
        models, batch, single, latency_params.repeats, latency_params.single_row_calls, latency_params.seed
    )
    figures = {name: evaluate.rounded(values) for name, values in measured.items()}
    mine = figures[args.model]
    here = {"agreement_this_machine": round(agreement, 6), "max_dp_this_machine": round(max_dp, 6)}
    machine = latency.machine_info() | {"peer_runtime_threads": model.threads}
    write_json(args.out_details, {"machine": machine, "measured": figures, "fidelity": here})
    # Short names and 3 decimals keep `dvc metrics show` within 120 columns (README has the legend).
    write_json(args.out_metrics, {"t100k_x": round(mine["batch_ratio"], 3), "t1_x": round(mine["batch1_p50_ratio"], 3)})
    print(
        f"latency: {args.model}: {evaluate_params.batch_rows} rows {mine['batch_ms']:.0f} ms "
        f"({mine['batch_ratio']:.3f}x), batch-1 p50 {mine['batch1_p50_ms']:.3f} ms ({mine['batch1_p50_ratio']:.3f}x)"
    )


if __name__ == "__main__":
    run_stage("latency", main, pinned=False)
