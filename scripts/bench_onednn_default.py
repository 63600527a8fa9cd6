"""What serving the int8 variant gains on a CPU whose oneDNN default is off (AVX2-only x86, AMD
Zen 2/3, Intel Skylake-SP and older): the float export as TensorFlow serves it there by default
(oneDNN's rewrites off), the export with TF_ENABLE_ONEDNN_OPTS=1, and the int8 model (which
needs it), at a large batch and at batch 1.

The oneDNN setting is fixed per process, so each configuration runs in a child process of its
own (the latency stages' worker, serving_optimiser.pipeline.latency.WorkerModel), all three alive
at once; the rounds interleave them in a seeded random order and ratios are medians of per-round
ratios to the default-off export: the latency stages' timing, serving_optimiser.timing. On a CPU whose
default is on (VNNI, BF16, AMX), TF_ENABLE_ONEDNN_OPTS=0 emulates the off default and
``--isa AVX2`` (ONEDNN_MAX_CPU_ISA) the AVX2 kernels.

Not a pipeline stage: a measurement to run by hand after `make all`, e.g.
    python scripts/bench_onednn_default.py --exported models/exported --int8 models/converted/int8 --isa AVX2
"""

import argparse
import os

from serving_optimiser.pipeline.stage import run_stage

CONFIGURATIONS = (("export, oneDNN off (default there)", "exported", "0"), ("export, oneDNN on", "exported", "1"),
                  ("int8, oneDNN on", "int8", "1"))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exported", default="models/exported")
    parser.add_argument("--int8", default="models/converted/int8")
    parser.add_argument("--samples", default="data/samples", help="the model stage's rows, the batch is drawn around")
    parser.add_argument("--isa", help="ONEDNN_MAX_CPU_ISA for every child (e.g. AVX2); default: the CPU's own")
    parser.add_argument("--batch-rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--single-calls", type=int, default=100, help="batch-1 calls per model per round")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    from pathlib import Path

    from serving_optimiser.pipeline.latency import WorkerModel
    from serving_optimiser.pipeline.machine import describe_machine, machine_line
    from serving_optimiser.timing import TimedModel, measure_side_by_side

    paths = {"exported": Path(args.exported), "int8": Path(args.int8)}
    workers = []
    try:
        for _, model, onednn in CONFIGURATIONS:
            env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn, "TF_CPP_MIN_LOG_LEVEL": "3"}
            if args.isa:
                env["ONEDNN_MAX_CPU_ISA"] = args.isa
            workers.append(WorkerModel(paths[model], Path(args.samples), args.batch_rows, args.seed, env))
        models = [TimedModel(label, worker.timer, worker.load_seconds)
                  for (label, _, _), worker in zip(CONFIGURATIONS, workers, strict=True)]
        calls = {1: args.single_calls, args.batch_rows: 1}
        measured = measure_side_by_side(models, sorted(calls), args.rounds, calls.get, args.seed)
    finally:
        for worker in workers:
            worker.close()

    print(f"CPU: {machine_line(describe_machine())}; children: ONEDNN_MAX_CPU_ISA={args.isa or 'default'}")
    print(f"{'configuration':<36} {args.batch_rows}-row ms   ratio   batch-1 p50 ms   ratio")
    for label, _, _ in CONFIGURATIONS:
        batch, single = measured[label]["batches"][str(args.batch_rows)], measured[label]["batches"]["1"]
        print(f"{label:<36} {batch['p50_ms']:>12.0f} {batch['ratio']:>7.3f} "
              f"{single['p50_ms']:>16.3f} {single['ratio']:>7.3f}")


if __name__ == "__main__":
    run_stage("bench_onednn_default", main, pinned=False)
