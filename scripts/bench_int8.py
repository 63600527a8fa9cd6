"""Benchmark: int8 compute against float, per layer, for the whole Iris model and for MobileNetV2.

Per layer: one 100000x512 @ 512x512 MatMul + bias + ReLU, as a GraphDef run in a v1 Session.
Whole model: the notebook's Iris DNN (4 inputs -> 4 x 512 ReLU -> 3 logits, fitted weights from
``sample_graphs.fit_iris_weights``), exported, frozen, optimised with each transform list,
converted (dequantize_once) and loaded with ``tf.saved_model.load``; the ``predict`` signature
on 100,000 rows and batch-1. MobileNetV2: the sample graphs at two widths, float against
quantize_convs + quantize_matmuls with calibrated ranges, logits on one batch of smooth random
images, top-1 and top-5 agreement. All candidates are timed in the same process, in interleaved
rounds (seeded random order); a ratio is the median of per-round ratios to float.

    python scripts/bench_int8.py [--rounds 7] [--single-calls 200]

Set ONEDNN_MAX_CPU_ISA=AVX2 to emulate a CPU without AVX-512 VNNI.
"""

import argparse
import functools
import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from serving_optimiser.runtime import quiet_tensorflow

PREPARE = ["remove_nodes(op=Identity)", "fold_constants(ignore_errors=true)"]
FINISH = ["strip_unused_nodes", "sort_by_execution_order"]
# Whole-model candidates: (name, transforms); {ranges} is replaced by the calibration file.
MODEL_VARIANTS = [
    ("float", PREPARE + FINISH),
    ("quantize_weights", [*PREPARE, "quantize_weights", *FINISH]),
    ("quantize_nodes", [*PREPARE, "quantize_nodes", *FINISH]),
    ("quantize_matmuls", [*PREPARE, "quantize_matmuls", *FINISH]),
    ("quantize_matmuls_calibrated", [*PREPARE, "quantize_matmuls(ranges_file={ranges})", *FINISH]),
]


def ratios(times: dict[str, list[float]], reference: str = "float") -> dict[str, float]:
    from serving_optimiser.timing import round_ratio

    return {name: round_ratio([[a] for a in t], [[b] for b in times[reference]]) for name, t in times.items()}


def interleaved(candidates: dict, rounds: int, seed: int) -> dict[str, list[float]]:
    """candidate name -> per-round seconds of ``call()``; every round runs all, in a seeded random
    order (serving_optimiser.timing, as the latency stages do)."""
    from serving_optimiser.timing import TimedModel, call_timer, interleaved_rounds

    models = [TimedModel(name, call_timer(call), 0.0) for name, call in candidates.items()]
    times = interleaved_rounds(models, 0, 1, rounds, np.random.default_rng(seed))
    return {name: [seconds[0] for seconds in per_round] for name, per_round in times.items()}


def layer_benchmark(rounds: int) -> None:
    import tensorflow as tf

    from serving_optimiser.graph_transforms import TransformGraph
    from serving_optimiser.graph_transforms.transforms.quantize_matmuls import calibrate_ranges
    from serving_optimiser.saved_model.compare import compare_outputs

    rng = np.random.default_rng(0)
    rows, width = 100_000, 512
    kernel = rng.uniform(-0.1, 0.1, (width, width)).astype(np.float32)
    bias = rng.normal(0.0, 0.05, width).astype(np.float32)
    activations = np.maximum(rng.normal(0.5, 1.0, (rows, width)), 0.0).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        inputs = tf.compat.v1.placeholder(tf.float32, [None, width], name="activations")
        relu = tf.nn.relu(inputs, name="previous_relu")  # as inside the model: the input is a ReLU's output
        tf.nn.relu(tf.nn.bias_add(tf.matmul(relu, tf.constant(kernel)), tf.constant(bias)), name="out")
    float_graph = graph.as_graph_def()
    with tempfile.TemporaryDirectory() as scratch:
        ranges_path = Path(scratch) / "ranges.json"
        ranges_path.write_text(json.dumps(calibrate_ranges(float_graph, [{"activations": activations[:10_000]}])))
        lists = {
            "float": [],
            "quantize_weights": ["quantize_weights"],
            "quantize_nodes": ["quantize_nodes", "strip_unused_nodes"],
            "quantize_matmuls": ["quantize_matmuls"],
            "quantize_matmuls_calibrated": [f"quantize_matmuls(ranges_file={ranges_path})"],
        }
        graphs = {name: TransformGraph(float_graph, ["activations"], ["out"], t) for name, t in lists.items()}
    sessions, results = {}, {}
    config = tf.compat.v1.ConfigProto()
    for name, graph_def in graphs.items():
        graph = tf.Graph()
        with graph.as_default():
            tf.graph_util.import_graph_def(graph_def, name="")
        session = tf.compat.v1.Session(graph=graph, config=config)
        results[name] = session.run("out:0", {"activations:0": activations})  # warm-up, and the numerics
        sessions[name] = session
    calls = {name: (lambda s=s: s.run("out:0", {"activations:0": activations})) for name, s in sessions.items()}
    times = interleaved(calls, rounds, seed=1)
    print(f"\nPer layer: [{rows}, {width}] @ [{width}, {width}] + bias + ReLU, {rounds} interleaved rounds")
    print(f"  {'candidate':30s} {'median s':>9s} {'x float':>8s} {'max |err|':>10s}")
    layer_ratios = ratios(times)
    for name in graphs:
        error = compare_outputs(results["float"], results[name])["max_abs_diff"]
        print(f"  {name:30s} {statistics.median(times[name]):9.3f} {layer_ratios[name]:8.3f} {error:10.4f}")
    for session in sessions.values():
        session.close()


def model_benchmark(rounds: int, single_calls: int) -> None:
    import tensorflow as tf

    from model_builders import sample_graphs
    from serving_optimiser.graph_transforms import TransformError, TransformGraph
    from serving_optimiser.graph_transforms.transforms.quantize_matmuls import calibrate_ranges
    from serving_optimiser.pipeline.export import export_saved_model
    from serving_optimiser.pipeline.sizes import gzip_size
    from serving_optimiser.saved_model import SavedModelError, convert_to_saved_model, freeze_saved_model
    from serving_optimiser.saved_model.compare import compare_outputs

    weights = sample_graphs.fit_iris_weights(seed=0)
    features, _ = sample_graphs.iris_samples(100_000, seed=7)
    calibration, _ = sample_graphs.iris_samples(2048, seed=3)  # stands in for the train split
    single = {name: tf.constant(values[:1]) for name, values in features.items()}
    batch = {name: tf.constant(values) for name, values in features.items()}
    models, outputs, sizes = {}, {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        export_saved_model(weights, scratch / "exported")
        frozen = freeze_saved_model(scratch / "exported")
        inputs, output_names = frozen.input_node_names(), frozen.output_node_names()
        prepared = TransformGraph(frozen.graph_def, inputs, output_names, PREPARE)
        ranges = calibrate_ranges(prepared, [{name: calibration[name] for name in sample_graphs.IRIS_FEATURES}])
        (scratch / "ranges.json").write_text(json.dumps(ranges))
        for name, transforms in MODEL_VARIANTS:
            transforms = [t.format(ranges=scratch / "ranges.json") for t in transforms]
            try:
                optimised = TransformGraph(frozen.graph_def, inputs, output_names, transforms)
                convert_to_saved_model(frozen.with_graph_def(optimised), scratch / name)
                loaded = tf.saved_model.load(str(scratch / name))
            except (TransformError, SavedModelError, tf.errors.OpError, ValueError) as error:
                # A candidate that fails is reported, not fatal.
                print(f"{name}: failed: {type(error).__name__}: {str(error).splitlines()[0]}")
                continue
            models[name] = loaded
            sizes[name] = (sum(p.stat().st_size for p in (scratch / name).rglob("*") if p.is_file()),
                           gzip_size(scratch / name))
        signatures = {name: model.signatures["predict"] for name, model in models.items()}
        for name, signature in signatures.items():
            signature(**single)
            outputs[name] = {k: v.numpy() for k, v in signature(**batch).items()}

        def call(signature, tensors, times=1):
            for _ in range(times):
                for value in signature(**tensors).values():
                    value.numpy()

        batch_times = interleaved({n: (lambda s=s: call(s, batch)) for n, s in signatures.items()}, rounds, 2)
        per_round = max(1, single_calls // rounds)
        single_times = interleaved(
            {n: (lambda s=s: call(s, single, per_round)) for n, s in signatures.items()}, rounds, 3
        )
    batch_ratios, single_ratios = ratios(batch_times), ratios(single_times)
    reference = outputs["float"]
    print(f"\nWhole model (Iris DNN 4 -> 4 x 512 -> 3, SavedModel, predict signature), {rounds} interleaved rounds")
    print(f"  {'candidate':30s} {'100k s':>7s} {'x float':>8s} {'batch-1 ms':>10s} {'x float':>8s} "
          f"{'size B':>9s} {'x float':>8s} {'gzip x':>7s} {'agree':>8s} {'max|dp|':>8s}")
    for name in signatures:
        agreement = compare_outputs(reference["class_ids"], outputs[name]["class_ids"])["class_agreement"]
        max_diff = compare_outputs(reference["probabilities"], outputs[name]["probabilities"])["max_abs_diff"]
        size, gz = sizes[name]
        print(f"  {name:30s} {statistics.median(batch_times[name]):7.3f} {batch_ratios[name]:8.3f} "
              f"{statistics.median(single_times[name]) / per_round * 1000:10.3f} {single_ratios[name]:8.3f} "
              f"{size:9d} {size / sizes['float'][0]:8.3f} {gz / sizes['float'][1]:7.3f} "
              f"{agreement * 100:7.3f}% {max_diff:8.4f}")


# MobileNetV2 sample graphs: (alpha, image size, batch). Random weights and batch-norm statistics.
MOBILENETS = [(0.35, 96, 64), (1.0, 224, 16)]


def mobilenet_benchmark(rounds: int) -> None:
    """Float against quantize_convs (+ quantize_matmuls for the classifier), calibrated on other images."""
    import tensorflow as tf

    from model_builders import sample_graphs
    from serving_optimiser.graph_transforms import TransformGraph
    from serving_optimiser.graph_transforms.transforms.quantize_matmuls import calibrate_ranges
    from serving_optimiser.saved_model.compare import compare_outputs

    print(f"\nMobileNetV2 (frozen Keras, random weights, fold_batch_norms), {rounds} interleaved rounds; "
          "ranges calibrated on 2 batches of other images")
    print(f"  {'model':22s} {'batch':>5s} {'float ms':>9s} {'int8 ms':>8s} {'x float':>8s} {'top-1':>7s} "
          f"{'top-5':>7s} {'max|dlogit|/max':>16s} {'int8 convs':>10s}")
    for alpha, size, batch in MOBILENETS:
        graph = sample_graphs.frozen_mobilenet_v2(seed=0, alpha=alpha, size=size)
        inputs, outputs = [sample_graphs.MOBILENET_INPUT], [sample_graphs.MOBILENET_OUTPUT]
        prepared = TransformGraph(graph, inputs, outputs, [*PREPARE, "fold_batch_norms", *FINISH])
        logits = f"{sample_graphs.mobilenet_logits(prepared)}:0"
        calibration = [{inputs[0]: sample_graphs.mobilenet_images(batch, seed, size)} for seed in (1, 2)]
        images = sample_graphs.mobilenet_images(batch, 7, size)
        with tempfile.TemporaryDirectory() as scratch:
            ranges_path = Path(scratch) / "ranges.json"
            ranges_path.write_text(json.dumps(calibrate_ranges(prepared, calibration)))
            int8 = TransformGraph(prepared, inputs, outputs, [f"quantize_convs(ranges_file={ranges_path})",
                                                              f"quantize_matmuls(ranges_file={ranges_path})"])
        sessions, results = {}, {}
        for name, graph_def in (("float", prepared), ("int8", int8)):
            imported = tf.Graph()
            with imported.as_default():
                tf.graph_util.import_graph_def(graph_def, name="")
            sessions[name] = tf.compat.v1.Session(graph=imported)
            results[name] = sessions[name].run(logits, {f"{inputs[0]}:0": images})
        feed = {f"{inputs[0]}:0": images}
        calls = {n: functools.partial(s.run, logits, feed) for n, s in sessions.items()}
        times = interleaved(calls, rounds, seed=4)
        expected, actual = results["float"], results["int8"]
        compared = compare_outputs(expected, actual)
        top5 = np.argsort(-expected, axis=1)[:, :5]
        top5_hits = np.mean([row in top for row, top in zip(actual.argmax(1), top5)])
        quantised = sum(n.op.startswith("QuantizedConv2D") or n.op.startswith("QuantizedDepthwise") for n in int8.node)
        convs = sum(n.op in ("Conv2D", "DepthwiseConv2dNative") for n in prepared.node)
        print(f"  {f'alpha {alpha}, {size}x{size}':22s} {batch:5d} {statistics.median(times['float']) * 1e3:9.1f} "
              f"{statistics.median(times['int8']) * 1e3:8.1f} {ratios(times)['int8']:8.3f} "
              f"{compared['class_agreement'] * 100:6.1f}% {top5_hits * 100:6.1f}% "
              f"{compared['max_abs_diff'] / np.abs(expected).max():16.4f} {quantised:4d} of {convs}")
        for session in sessions.values():
            session.close()


WIDE_MLP = (784, 1024, 1024, 10)
GUARD_BATCHES = (1, 16, 64)


def _save_wide_mlp(directory: Path, seed: int) -> None:
    """784 -> 1024 -> 1024 -> 10 ReLU MLP, He-initialised seeded weights, as a tf.Module SavedModel."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)

    class WideMLP(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            pairs = list(itertools.pairwise(WIDE_MLP))
            self.kernels = [tf.Variable(rng.normal(0, (2 / a) ** 0.5, (a, b)).astype(np.float32)) for a, b in pairs]
            self.biases = [tf.Variable(rng.normal(0, 0.1, b).astype(np.float32)) for _, b in pairs]

        @tf.function(input_signature=[tf.TensorSpec([None, WIDE_MLP[0]], tf.float32)])
        def __call__(self, x):
            for index, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
                x = tf.matmul(x, kernel) + bias
                if index < len(self.kernels) - 1:
                    x = tf.nn.relu(x)
            return {"probabilities": tf.nn.softmax(x)}

    module = WideMLP()
    tf.saved_model.save(module, str(directory), signatures={"serving_default": module.__call__})


def batch_guard_benchmark(rounds: int) -> None:
    """What int8 costs at small batches, and what the speed guard (--serving-batch-size) keeps."""
    import tensorflow as tf

    from serving_optimiser.saved_model import optimise_saved_model
    from serving_optimiser.saved_model.compare import compare_outputs

    rng = np.random.default_rng(11)
    calibration = {"serving_default": {"x": rng.uniform(0, 1, (512, WIDE_MLP[0])).astype(np.float32)}}
    held_out = rng.uniform(0, 1, (1024, WIDE_MLP[0])).astype(np.float32)
    lists = {"dynamic": "quantize_matmuls", "calibrated": "quantize_matmuls"}
    print(f"\nBatch size and the speed guard: wide MLP {' -> '.join(map(str, WIDE_MLP))}, SavedModels through "
          f"optimise_saved_model, {rounds} interleaved rounds per batch size; 'guarded@B' is calibrated with "
          "--serving-batch-size B")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        _save_wide_mlp(scratch / "float", seed=5)
        prefix = "remove_nodes(op=Identity) fold_constants(ignore_errors=true) "
        for name, transform in lists.items():
            optimise_saved_model(scratch / "float", scratch / name, prefix + transform, compare=False,
                                 calibration_inputs=calibration if name == "calibrated" else None)
        for batch in GUARD_BATCHES:
            report = optimise_saved_model(scratch / "float", scratch / f"guarded@{batch}", prefix + "quantize_matmuls",
                                          compare=False, calibration_inputs=calibration, serving_batch_size=batch)
            step = report["calibration"][0]
            kept = len(step["float_by_speed"])
            layer_ratios = ", ".join(f"{r:.2f}" for _, r in sorted(step["layer_time_ratios"].items()))
            tries = " -> ".join(f"{r:.2f}" for r in report["serving_batch"]["time_ratios"])
            print(f"  guarded@{batch}: each layer alone, int8/float at batch {batch}: {layer_ratios}; whole model "
                  f"over the original, per try: {tries}; {kept} of {len(step['layer_time_ratios'])} sent back to float")
        models = {name: tf.saved_model.load(str(scratch / name)).signatures["serving_default"]
                  for name in ("float", *lists, *(f"guarded@{b}" for b in GUARD_BATCHES))}
        reference = models["float"](x=tf.constant(held_out))["probabilities"].numpy()
        agreement = {name: compare_outputs(reference, f(x=tf.constant(held_out))["probabilities"].numpy())
                     ["class_agreement"] for name, f in models.items()}
        print(f"  {'candidate':14s} " + " ".join(f"{f'x float @{b}':>11s}" for b in GUARD_BATCHES)
              + f" {'agree':>8s}")
        table = {name: [] for name in models}
        for batch in GUARD_BATCHES:
            x = tf.constant(held_out[:batch])
            calls = max(1, 2048 // batch // rounds)
            candidates = {name: (lambda f=f, x=x, calls=calls: [f(x=x)["probabilities"].numpy() for _ in range(calls)])
                          for name, f in models.items()}
            for call in candidates.values():
                call()
            for name, ratio in ratios(interleaved(candidates, rounds, seed=batch)).items():
                table[name].append(ratio)
        for name, row in table.items():
            print(f"  {name:14s} " + " ".join(f"{r:11.3f}" for r in row) + f" {agreement[name] * 100:7.2f}%")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--single-calls", type=int, default=210, help="batch-1 calls per candidate in all")
    parser.add_argument("--skip-layer", action="store_true", help="no per-layer benchmark")
    parser.add_argument("--skip-mobilenet", action="store_true", help="no MobileNetV2 (quantize_convs) benchmark")
    parser.add_argument("--only-batch-guard", action="store_true",
                        help="only the batch-size / speed-guard benchmark on the wide MLP")
    args = parser.parse_args(argv)
    quiet_tensorflow()
    from serving_optimiser.graph_transforms.transforms.quantize_matmuls import int8_kernels_available
    from serving_optimiser.pipeline.machine import describe_machine

    print("CPU:", json.dumps(describe_machine()))
    if not int8_kernels_available():
        print("this TensorFlow has no working int8 MatMul kernel (oneDNN off or a non-x86 build): nothing to time")
        return 1
    if args.only_batch_guard:
        batch_guard_benchmark(args.rounds)
        return 0
    if not args.skip_layer:
        layer_benchmark(args.rounds)
    model_benchmark(args.rounds, args.single_calls)
    if not args.skip_mobilenet:
        mobilenet_benchmark(args.rounds)
    batch_guard_benchmark(args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
