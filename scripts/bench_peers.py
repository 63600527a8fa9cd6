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
import time
from pathlib import Path

from serving_optimiser.pipeline.stage import run_stage


def timed(predictor, features) -> float:
    start = time.perf_counter()
    predictor(features)
    return time.perf_counter() - start


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
    from serving_optimiser.peers import load_predictor
    from serving_optimiser.pipeline.data import read_iris_csv, sample_around
    from serving_optimiser.pipeline.evaluate import gzip_size
    from serving_optimiser.pipeline.machine import describe_machine
    from serving_optimiser.pipeline.params import load_params, require_list, section

    vocabulary = require_list(section(load_params(args.params), "data", args.params), "label_vocabulary", str, "data")
    peers_dir = Path(args.peers_dir)
    if not peers_dir.is_dir():
        raise UserError(f"{peers_dir}: no such directory (run the convert_peer stages first)")
    directories = {"tf_exported": Path(args.exported)} | {p.name: p for p in sorted(peers_dir.iterdir()) if p.is_dir()}
    predictors = {
        name: load_predictor(path, threads=args.threads, label_vocabulary=vocabulary)
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
    names = list(predictors)
    rng = np.random.default_rng(args.seed)
    batch_times = {name: [] for name in names}
    single_times = {name: [] for name in names}
    for round_index in range(args.rounds):
        for index in rng.permutation(len(names)):
            batch_times[names[index]].append(timed(predictors[names[index]], batch))
        print(f"bench_peers: {args.batch_rows}-row round {round_index + 1}/{args.rounds}", file=sys.stderr)
    calls = max(1, args.single_calls // args.rounds)
    for _ in range(args.rounds):
        for index in rng.permutation(len(names)):
            predictor = predictors[names[index]]
            single_times[names[index]].append([timed(predictor, single) for _ in range(calls)])

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
        batch_ratio = statistics.median(a / b for a, b in zip(batch_times[name], batch_times["tf_exported"]))
        p50_ratio = statistics.median(
            float(np.median(a)) / float(np.median(b)) for a, b in zip(single_times[name], single_times["tf_exported"])
        )
        agreement = float(np.mean(outputs[name]["class_ids"] == reference["class_ids"]))
        max_diff = float(np.max(np.abs(outputs[name]["probabilities"] - reference["probabilities"])))
        print(
            f"{name:<20} {size:>10} {gzip_size(path):>10} {predictors[name].load_seconds:>7.3f} "
            f"{statistics.median(batch_times[name]) * 1000:>8.1f} {batch_ratio:>6.3f} "
            f"{np.percentile(singles, 50):>9.4f} {np.percentile(singles, 99):>9.4f} {p50_ratio:>6.3f} "
            f"{agreement:>8.5f} {max_diff:>9.2e}"
        )


if __name__ == "__main__":
    run_stage("bench_peers", main)
