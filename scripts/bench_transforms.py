"""Benchmark: how long the notebook's transform list takes on a frozen Iris DNN (target < 2 s)
and on a frozen Keras MobileNetV2, alpha 0.35, 96x96 (target < 20 s), each the median of
several runs, with the graphs' sizes before and after.

    python scripts/bench_transforms.py [--runs 3] [--check]

``--check`` exits with status 1 when a median misses its target.
"""

import argparse
import statistics
import sys
import time

from serving_optimiser.runtime import quiet_tensorflow


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per graph (the median is reported)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a median misses its target")
    args = parser.parse_args(argv)

    quiet_tensorflow()
    from model_builders import sample_graphs
    from serving_optimiser.graph_transforms import TransformGraph

    transforms = list(sample_graphs.NOTEBOOK_TRANSFORMS)
    print(f"transforms: {' '.join(transforms)}")
    benchmarks = [
        # The notebook passed no inputs, and the probabilities as output.
        ("iris_dnn", sample_graphs.frozen_iris_dnn, [], [sample_graphs.IRIS_OUTPUT], 2.0),
        (
            "mobilenet_v2_0.35_96", sample_graphs.frozen_mobilenet_v2,
            [sample_graphs.MOBILENET_INPUT], [sample_graphs.MOBILENET_OUTPUT], 20.0,
        ),
    ]
    missed = []
    for name, build, inputs, outputs, target in benchmarks:
        graph_def = build()
        timings = []
        for _ in range(args.runs):
            start = time.perf_counter()
            result = TransformGraph(graph_def, inputs, outputs, transforms)
            timings.append(time.perf_counter() - start)
        median = statistics.median(timings)
        before, after = graph_def.ByteSize(), result.ByteSize()
        verdict = "ok" if median < target else "SLOW"
        if median >= target:
            missed.append(name)
        print(
            f"{name}: median {median:.2f} s of {args.runs} runs (runs: {', '.join(f'{t:.2f}' for t in timings)}; "
            f"target < {target:.0f} s: {verdict}); {len(graph_def.node)} -> {len(result.node)} nodes, "
            f"{before} -> {after} bytes ({after / before:.3f} x)"
        )
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
