"""Benchmark: the published PReLU face networks (mtcnn RNet and ONet) in float and in calibrated int8,
side by side in one process, with the count of int8 layers and agreement with float.

    python scripts/bench_int8_fusions.py [--models mtcnn_rnet,mtcnn_onet] [--batch-sizes 1,16,64]
        [--rounds 7] [--keep DIR]

int8 is the model through ``optimise_saved_model`` with the bench's int8 list
(``model_builders.int8_models.INT8_TRANSFORMS``), calibrated on the model's own 32 sample rows (published_models);
agreement is measured on the same rows (the only realistic rows the package ships). Per batch
size: median call time of float and int8 over interleaved rounds (a row tiled to the batch), and
their ratio. Set ONEDNN_MAX_CPU_ISA=AVX2 TF_ENABLE_ONEDNN_OPTS=1 to emulate an AVX2-only CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from serving_optimiser.runtime import quiet_tensorflow


def int8_layers(saved_model: Path) -> Counter:
    """The int8 layer ops (quantize_matmuls' and quantize_convs') in the SavedModel, by op type."""
    from serving_optimiser.graph_transforms.transforms._int8 import INT8_LAYER_OPS
    from serving_optimiser.saved_model.onednn import SELF_CHECK_SCOPE
    from serving_optimiser.saved_model.reader import read_meta_graph

    graph = read_meta_graph(saved_model).graph_def
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    # Not the load-time self-check's probe, which is no layer.
    return Counter(node.op for node in nodes
                   if node.op in INT8_LAYER_OPS and not node.name.startswith(SELF_CHECK_SCOPE))


def timed(function, feed, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        function(**feed)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mtcnn_rnet,mtcnn_onet", help="comma-separated published models")
    parser.add_argument("--batch-sizes", default="1,16,64", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--calls", type=int, default=20, help="calls per round and candidate")
    parser.add_argument("--gate", action="store_true",
                        help="let optimise_saved_model's gate send layers back to float (default: every eligible "
                             "layer int8; on RNet the gate sends all back: the box's rms difference is over 1 %%)")
    parser.add_argument("--keep", help="write the int8 models here instead of a temporary directory")
    args = parser.parse_args(argv)
    quiet_tensorflow()
    import tensorflow as tf

    from model_builders.int8_models import INT8_TRANSFORMS, SIGNATURE
    from published_models import load
    from serving_optimiser.graph_transforms.transforms._int8 import int8_kernels_available
    from serving_optimiser.pipeline.machine import describe_machine, machine_line
    from serving_optimiser.saved_model import optimise_saved_model
    from serving_optimiser.saved_model.compare import compare_outputs

    machine = describe_machine()
    print(f"CPU: {machine_line(machine)}; environment {json.dumps(machine['environment'])}", flush=True)
    if not int8_kernels_available():
        print("oneDNN's int8 kernels do not run in this process: set TF_ENABLE_ONEDNN_OPTS=1 (x86-64 only)")
        return 1
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_int8_fusions_"))
    rng = np.random.default_rng(0)
    for name in args.models.split(","):
        model = load(name)
        directory = base / name / "int8"
        optimise_saved_model(model.saved_model, directory, INT8_TRANSFORMS, signature_keys=[SIGNATURE],
                             overwrite=True, calibration_inputs={SIGNATURE: model.inputs},
                             sample_inputs={SIGNATURE: model.inputs}, gate=args.gate)
        layers = int8_layers(directory)
        functions = {"float": tf.saved_model.load(str(model.saved_model)).signatures[SIGNATURE],
                     "int8": tf.saved_model.load(str(directory)).signatures[SIGNATURE]}
        answers = {key: {k: v.numpy() for k, v in f(**{k: tf.constant(v) for k, v in model.inputs.items()}).items()}
                   for key, f in functions.items()}
        notes = []
        for output in answers["float"]:
            # Each output judged by its declared kind, as optimise_saved_model and the pipeline judge it.
            compared = compare_outputs(answers["float"][output], answers["int8"][output], model.outputs[output].kind)
            value = "-" if compared["value"] is None else f"{compared['value']:.4g}"
            notes.append(f"{output} ({compared['kind']}) {compared['metric']} {value} "
                         f"{compared['verdict']}, max |diff| {compared['max_abs_diff']:.4f}")
        kinds = ", ".join(f"{op} x{count}" for op, count in sorted(layers.items()))
        print(f"{name}: int8 layers {sum(layers.values())} ({kinds}); " + "; ".join(notes), flush=True)
        for batch in batch_sizes:
            rows = rng.integers(0, model.rows, batch)
            feed = {k: tf.constant(v[rows]) for k, v in model.inputs.items()}
            for function in functions.values():  # warm-up: oneDNN builds its primitives per shape
                function(**feed)
            medians: dict[str, list[float]] = {key: [] for key in functions}
            ratios = []
            for _ in range(args.rounds):
                order = list(functions)
                rng.shuffle(order)
                per_round = {key: statistics.median(timed(functions[key], feed, args.calls)) for key in order}
                for key, value in per_round.items():
                    medians[key].append(value)
                ratios.append(per_round["int8"] / per_round["float"])
            float_ms, int8_ms = (statistics.median(medians[key]) * 1e3 for key in ("float", "int8"))
            print(f"{name} batch {batch}: float {float_ms:.3f} ms, int8 {int8_ms:.3f} ms, int8 / float "
                  f"{statistics.median(ratios):.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
