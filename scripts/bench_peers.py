"""Side-by-side figures of the exported SavedModel and its peer artefacts in one process, each with
the same number of threads: size, gzip size, load time, one call on 100,000 rows, batch-1 p50/p99,
and class agreement / max |probability difference| against the SavedModel on that batch.

Not a pipeline stage: a measurement to run by hand after the convert_peer stages, e.g.
    python scripts/bench_peers.py --exported models/exported --peers-dir models/peers
Rounds interleave the models in a seeded random order; ratios are medians of per-round ratios to
the SavedModel timed in the same round, as evaluate does.
"""

import argparse
import json
import sys
from pathlib import Path

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exported", default="models/exported")
    parser.add_argument("--peers-dir", default="models/peers", help="one sub-directory per peer artefact")
    parser.add_argument("--data", default="data/prepared/eval.csv", help="rows the batch is drawn around")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--single-calls", type=int, default=1400, help="batch-1 calls per model, over all rounds")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    import statistics

    import numpy as np

    from serving_optimiser.runtime import native_output_silenced

    with native_output_silenced():
        import tensorflow as tf

        # Thread pools are fixed when TensorFlow first runs an op: set them before loading anything.
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)

    from serving_optimiser.errors import UserError
    from serving_optimiser.peers.predictor import load_predictor
    from serving_optimiser.pipeline.data import read_iris_csv, sample_around
    from serving_optimiser.pipeline.machine import describe_machine
    from serving_optimiser.pipeline.params import PipelineParams
    from serving_optimiser.pipeline.sizes import gzip_size
    from serving_optimiser.saved_model.compare import compare_outputs
    from serving_optimiser.timing import TimedModel, interleaved_rounds, local_timer, round_ratio

    vocabulary = PipelineParams.load(args.params).label_vocabulary()
    peers_dir = Path(args.peers_dir)
    if not peers_dir.is_dir():
        raise UserError(f"{peers_dir}: no such directory (run the convert_peer stages first)")
    directories = {"tf_exported": Path(args.exported)} | {p.name: p for p in sorted(peers_dir.iterdir()) if p.is_dir()}
    predictors = {
        name: load_predictor(path, threads=args.threads, label_vocabulary=vocabulary, signature="predict")
        for name, path in directories.items()
    }
    frame = read_iris_csv(args.data, vocabulary)
    batch = sample_around(frame, args.batch_rows, args.seed)
    single = {name: values[:1] for name, values in batch.items()}

    outputs = {}
    for name, predictor in predictors.items():
        outputs[name] = predictor.checked(batch, vocabulary)
        for _ in range(20):
            predictor(single)
    # The latency stages' way of timing (serving_optimiser.timing): rounds in a seeded order, ratios
    # the median of per-round ratios to the export.
    inputs = {args.batch_rows: batch, 1: single}
    models = [TimedModel(name, local_timer(predictor, inputs), predictor.load_seconds)
              for name, predictor in predictors.items()]
    names = list(predictors)
    rng = np.random.default_rng(args.seed)
    batch_times = interleaved_rounds(models, args.batch_rows, 1, args.rounds, rng)
    print(f"bench_peers: {args.rounds} rounds of one {args.batch_rows}-row call done", file=sys.stderr)
    calls = max(1, args.single_calls // args.rounds)
    single_times = interleaved_rounds(models, 1, calls, args.rounds, rng)

    reference = outputs["tf_exported"]
    rounds = f"{args.rounds} rounds, {calls * args.rounds} batch-1 calls"
    print(f"CPU: {json.dumps(describe_machine())}; {args.threads} peer runtime threads; {rounds}")
    header = (
        f"{'artefact':<20} {'bytes':>10} {'gzip':>10} {'load s':>7} {'100k ms':>8} {'ratio':>6} "
        f"{'b1 p50 ms':>9} {'b1 p99 ms':>9} {'ratio':>6} {'agree':>8} {'max|dp|':>9}"
    )
    print(header)
    for name in names:
        path = directories[name]
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        singles = np.concatenate(single_times[name]) * 1000
        batch_ratio = round_ratio(batch_times[name], batch_times["tf_exported"])
        p50_ratio = round_ratio(single_times[name], single_times["tf_exported"])
        # The comparison optimise_saved_model and the evaluate stages report (saved_model.compare).
        agreement = compare_outputs(reference["class_ids"], outputs[name]["class_ids"])["class_agreement"]
        max_diff = compare_outputs(reference["probabilities"], outputs[name]["probabilities"])["max_abs_diff"]
        print(
            f"{name:<20} {size:>10} {gzip_size(path):>10} {predictors[name].load_seconds:>7.3f} "
            f"{statistics.median(np.concatenate(batch_times[name])) * 1000:>8.1f} {batch_ratio:>6.3f} "
            f"{np.percentile(singles, 50):>9.4f} {np.percentile(singles, 99):>9.4f} {p50_ratio:>6.3f} "
            f"{agreement:>8.5f} {max_diff:>9.2e}"
        )


if __name__ == "__main__":
    run_stage("bench_peers", main)
