"""Benchmark (not a test): ``optimise_saved_model`` with the notebook's transform list on a Keras
MobileNetV2 (alpha 0.35, 96x96, random seeded weights) exported to a temporary directory.

    python scripts/bench_optimise_saved_model.py [--keep DIR]

Prints the wall time of each step, the whole run, the size ratio, node counts and the class
agreement on generated images. The target is under 60 s on 2 cores.

With ``--latency`` it also converts the frozen model three ways (float, lossless list; 8-bit
weights dequantized once at load; 8-bit weights dequantized on every call) and prints each
one's load time and batch-1 latency (median of interleaved repeats, ``tf.saved_model.load``).
"""

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

NOTEBOOK_TRANSFORMS = (
    "remove_nodes(op=Identity) fold_constants(ignore_errors=true) fold_batch_norms fold_old_batch_norms "
    "round_weights(num_steps=256) quantize_weights strip_unused_nodes sort_by_execution_order"
)


def export_mobilenet(directory: Path) -> float:
    import keras

    start = time.perf_counter()
    keras.utils.set_random_seed(1234)
    model = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=1000)
    model.export(str(directory), verbose=False)
    return time.perf_counter() - start


LOSSLESS_TRANSFORMS = (
    "remove_nodes(op=Identity) fold_constants(ignore_errors=true) fold_batch_norms fold_old_batch_norms "
    "strip_unused_nodes sort_by_execution_order"
)


def measure_latency(exported: Path, base: Path, repeats: int = 7, calls: int = 200) -> None:
    import numpy as np
    import tensorflow as tf

    from serving_optimiser.graph_transforms import TransformGraph
    from serving_optimiser.saved_model import convert_to_saved_model, freeze_saved_model

    frozen = freeze_saved_model(exported, signature_keys=["serve"])
    names = (frozen.input_node_names(), frozen.output_node_names())
    float_graph = TransformGraph(frozen.graph_def, *names, LOSSLESS_TRANSFORMS)
    quantised_graph = TransformGraph(frozen.graph_def, *names, NOTEBOOK_TRANSFORMS)
    variants = {
        "exported (variables)": (None, True),
        "float (lossless list)": (float_graph, True),
        "8-bit, dequantized once": (quantised_graph, True),
        "8-bit, Dequantize per call": (quantised_graph, False),
    }
    (input_key,) = frozen.signatures["serve"].inputs
    functions = {}
    for index, (label, (graph_def, once)) in enumerate(variants.items()):
        directory = exported if graph_def is None else base / f"latency_{index}"
        if graph_def is not None:
            convert_to_saved_model(frozen.with_graph_def(graph_def), directory, dequantize_once=once, overwrite=True)
        start = time.perf_counter()
        function = tf.saved_model.load(str(directory)).signatures["serve"]
        image = tf.constant(np.random.default_rng(0).standard_normal((1, 96, 96, 3)).astype(np.float32))
        function(**{input_key: image})
        functions[label] = (function, image, time.perf_counter() - start)
    from serving_optimiser.timing import TimedModel, call_timer, measure_side_by_side

    # Interleaved in a seeded order, ratios the median of per-round ratios: the latency stages' timing.
    models = [
        TimedModel(label, call_timer(lambda f=function, i=image: f(**{input_key: i})), load_s)
        for label, (function, image, load_s) in functions.items()
    ]
    measured = measure_side_by_side(models, [1], repeats, lambda batch: calls, seed=0)
    for label, (_, _, load_s) in functions.items():
        single = measured[label]["batches"]["1"]
        print(f"latency {label:<28} load+first call {load_s:.2f} s, batch-1 p50 {single['p50_ms']:.3f} ms "
              f"({single['ratio']:.3f} x the export)")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", help="write the exported and optimised models here instead of a temporary directory")
    parser.add_argument("--transforms", default=NOTEBOOK_TRANSFORMS)
    parser.add_argument("--latency", action="store_true", help="also measure batch-1 latency of three conversions")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="  %(message)s", stream=sys.stderr)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)

    from serving_optimiser.saved_model import optimise_saved_model

    with tempfile.TemporaryDirectory(prefix="bench_optimise_") as scratch:
        base = Path(args.keep or scratch)
        exported, optimised = base / "mobilenet_v2", base / "mobilenet_v2_optimised"
        export_s = export_mobilenet(exported)
        print(f"exported MobileNetV2 (alpha 0.35, 96x96, random weights) in {export_s:.1f} s")
        start = time.perf_counter()
        report = optimise_saved_model(exported, optimised, args.transforms, overwrite=bool(args.keep))
        wall = time.perf_counter() - start
        if args.latency:
            measure_latency(exported, base)
    sizes = report["size_bytes"]
    print(f"optimise_saved_model wall time: {wall:.1f} s (target < 60 s)")
    print("  " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in report["timings"].items()))
    print(f"size: {sizes['input'] / 1e6:.2f} MB -> {sizes['output'] / 1e6:.2f} MB, ratio {report['size_ratio']:.3f}")
    print(f"nodes: {report['nodes']['frozen']} frozen -> {report['nodes']['optimised']} optimised, "
          f"{report['dequantized_once']} weights dequantized once")
    print(f"lowest class agreement on generated images: {report['min_class_agreement']:.4f}")
    return 0 if wall < 60 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
