"""What serving the int8 variant gains on a CPU whose oneDNN default is off (AVX2-only x86, AMD
Zen 2/3, Intel Skylake-SP and older): the float export as TensorFlow serves it there by default
(oneDNN's rewrites off), the export with TF_ENABLE_ONEDNN_OPTS=1, and the int8 model (which
needs it), at a large batch and at batch 1.

The oneDNN setting is fixed per process, so each configuration runs in a child process of its
own, all three alive at once; the rounds interleave them in a seeded random order, and ratios are
medians of per-round ratios to the default-off export, as the latency stages do. On a CPU whose
default is on (VNNI, BF16, AMX), TF_ENABLE_ONEDNN_OPTS=0 emulates the off default and
``--isa AVX2`` (ONEDNN_MAX_CPU_ISA) the AVX2 kernels.

Not a pipeline stage: a measurement to run by hand after `make all`, e.g.
    python scripts/bench_onednn_default.py --exported models/exported --int8 models/converted/int8 --isa AVX2
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from serving_optimiser.pipeline.stage import run_stage

CONFIGURATIONS = (("export, oneDNN off (default there)", "exported", "0"), ("export, oneDNN on", "exported", "1"),
                  ("int8, oneDNN on", "int8", "1"))


def child(model_dir: str, data: str, rows: int, seed: int) -> None:
    """Load one model, warm it up, then time what the parent asks for, one JSON line per answer."""
    from serving_optimiser.runtime import quiet_tensorflow

    quiet_tensorflow()
    import tensorflow as tf

    from serving_optimiser.pipeline.data import read_iris_csv, sample_around

    predict = tf.saved_model.load(model_dir).signatures["predict"]
    batch = {k: tf.constant(v) for k, v in sample_around(read_iris_csv(data), rows, seed).items()}
    single = {k: v[:1] for k, v in batch.items()}

    def timed(features) -> float:
        start = time.perf_counter()
        predict(**features)["probabilities"].numpy()
        return time.perf_counter() - start

    for _ in range(3):
        timed(batch)
    for _ in range(50):
        timed(single)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        kind, count = line.split()
        seconds = [timed(batch if kind == "batch" else single) for _ in range(int(count))]
        print(json.dumps({"seconds": statistics.median(seconds)}), flush=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exported", default="models/exported")
    parser.add_argument("--int8", default="models/converted/int8")
    parser.add_argument("--data", default="data/prepared/eval.csv", help="rows the batch is drawn around")
    parser.add_argument("--isa", help="ONEDNN_MAX_CPU_ISA for every child (e.g. AVX2); default: the CPU's own")
    parser.add_argument("--batch-rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--single-calls", type=int, default=100, help="batch-1 calls per model per round")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.data, args.batch_rows, args.seed)
        return

    import numpy as np

    from serving_optimiser.pipeline.machine import describe_machine, machine_line

    paths = {"exported": args.exported, "int8": args.int8}
    children = []
    for _, model, onednn in CONFIGURATIONS:
        env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn, "TF_CPP_MIN_LOG_LEVEL": "3"}
        if args.isa:
            env["ONEDNN_MAX_CPU_ISA"] = args.isa
        command = [sys.executable, __file__, "--child", paths[model], "--data", args.data,
                   "--batch-rows", str(args.batch_rows), "--seed", str(args.seed)]
        children.append(subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    for process in children:
        json.loads(process.stdout.readline())

    def ask(process, request: str) -> float:
        process.stdin.write(request + "\n")
        process.stdin.flush()
        return json.loads(process.stdout.readline())["seconds"]

    rng = np.random.default_rng(args.seed)
    times = {"batch": [[] for _ in children], "single": [[] for _ in children]}
    for round_index in range(args.rounds):
        for kind, request in (("batch", "batch 1"), ("single", f"single {args.single_calls}")):
            for index in rng.permutation(len(children)):
                times[kind][index].append(ask(children[index], request))
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    for process in children:
        process.stdin.close()
        process.wait()

    print(f"CPU: {machine_line(describe_machine())}; children: ONEDNN_MAX_CPU_ISA={args.isa or 'default'}")
    print(f"{'configuration':<36} {args.batch_rows}-row ms   ratio   batch-1 p50 ms   ratio")
    for index, (label, _, _) in enumerate(CONFIGURATIONS):
        ratios = {kind: statistics.median(a / b for a, b in zip(times[kind][index], times[kind][0], strict=True))
                  for kind in times}
        print(f"{label:<36} {statistics.median(times['batch'][index]) * 1000:>12.0f} {ratios['batch']:>7.3f} "
              f"{statistics.median(times['single'][index]) * 1000:>16.3f} {ratios['single']:>7.3f}")


if __name__ == "__main__":
    run_stage("bench_onednn_default", main, pinned=False)
