"""Benchmark (not a test): the model zoo of ``model_builders.zoo`` through ``optimise_saved_model``
with the lossless and the quantize_weights lists.

    python scripts/bench_zoo.py [--models resnet50,lstm] [--rounds 7] [--batch 256] [--keep DIR]

Per model and list it prints: the size ratio (converted directory / exported directory), the
lowest class agreement and the largest max |Δ| over the outputs, relative to that output's
range (max - min of the original's values) on the model's held-out inputs, the wall time of
``optimise_saved_model``, and the latency ratio, converted over original, at a large batch (the
held-out rows) and at batch 1. The original and both conversions are loaded with
``tf.saved_model.load`` in this process and timed in interleaved rounds (a seeded random order
each round); a ratio is the median of the per-round ratios. The CPU line (the machine module's)
comes first. A model that fails to build or optimise is reported in one line and the others go
on.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from serving_optimiser.runtime import quiet_tensorflow

SINGLE_CALLS = 30  # batch-1 calls per candidate per round (the median of them is the round's time)
BATCH_CALLS = 3  # large-batch calls per candidate per round
COMPARE_TIMEOUT_S = 300.0


def latency_ratios(functions: dict, feeds: dict, rounds: int, calls: int, seed: int) -> tuple[dict, float]:
    """Candidate -> median over rounds of (its median call / the original's in that round), and the
    original's median time: the latency stages' timing (serving_optimiser.timing)."""
    from serving_optimiser.timing import TimedModel, call_timer, interleaved_rounds, round_ratio

    models = [TimedModel(name, call_timer(lambda f=function: f(**feeds)), 0.0) for name, function in functions.items()]
    for model in models:  # first calls build kernels and oneDNN primitives
        model.timer(0, 2)
    times = interleaved_rounds(models, 0, calls, rounds, np.random.default_rng(seed))
    ratios = {name: round_ratio(times[name], times["original"]) for name in times}
    return ratios, statistics.median(float(np.median(round_times)) for round_times in times["original"])


def relative_difference(expected: dict, actual: dict) -> float:
    """The largest max |Δ| / range over the float outputs (class ids are the agreement's), from the
    one comparison module's regression metric (saved_model.output_kinds)."""
    from serving_optimiser.saved_model.output_kinds import regression_errors

    return max((regression_errors(value, actual[name])[1] for name, value in expected.items()
                if value.dtype.kind == "f"), default=0.0)


def bench_model(name: str, base: Path, rounds: int, batch: int) -> list[dict]:
    import tensorflow as tf

    from model_builders.zoo import LISTS, MODELS, signature_inputs
    from serving_optimiser.saved_model import optimise_saved_model
    from serving_optimiser.saved_model.auto import worst_output

    original = base / name
    start = time.perf_counter()
    built = MODELS[name].build(str(original))
    print(f"{name} ({MODELS[name].summary}): built in {time.perf_counter() - start:.1f} s, "
          f"accuracy {built.accuracy:.3f} on its held-out rows",
          flush=True)
    samples = signature_inputs(original, {k: v[:batch] for k, v in built.inputs.items()})
    rows = []
    for list_name, transforms in LISTS.items():
        start = time.perf_counter()
        report = optimise_saved_model(original, base / f"{name}.{list_name}", transforms, sample_inputs=samples,
                                      compare_timeout_s=COMPARE_TIMEOUT_S, overwrite=True)
        rows.append({"model": name, "list": list_name, "size_ratio": report["size_ratio"],
                     "size_mb": report["size_bytes"]["input"] / 1e6, "agreement": report["min_class_agreement"],
                     # Each output judged by its kind in optimise_saved_model's comparison: the one
                     # closest to (or furthest past) its tolerance.
                     "worst_output": worst_output(report) or "-",
                     "optimise_s": time.perf_counter() - start})
    key = "serving_default"
    functions = {"original": tf.saved_model.load(str(original)).signatures[key]}
    for list_name in LISTS:
        functions[list_name] = tf.saved_model.load(str(base / f"{name}.{list_name}")).signatures[key]
    feeds = {n: tf.constant(v) for n, v in samples[key].items()}
    single = {n: tf.constant(v[:1]) for n, v in samples[key].items()}
    expected = {k: v.numpy() for k, v in functions["original"](**feeds).items()}
    large, large_ms = latency_ratios(functions, feeds, rounds, BATCH_CALLS, seed=1)
    one, one_ms = latency_ratios(functions, single, rounds, SINGLE_CALLS, seed=2)
    for row in rows:
        actual = {k: v.numpy() for k, v in functions[row["list"]](**feeds).items()}
        row |= {"relative_diff": relative_difference(expected, actual), "latency_ratio_batch": large[row["list"]],
                "latency_ratio_1": one[row["list"]], "original_ms_batch": 1000 * large_ms,
                "original_ms_1": 1000 * one_ms, "batch": len(next(iter(feeds.values())))}
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated model names (default: all)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--batch", type=int, default=256, help="rows of the large batch (at most 256)")
    parser.add_argument("--keep", help="write the models here instead of a temporary directory")
    args = parser.parse_args(argv)
    quiet_tensorflow()
    from model_builders.zoo import MODELS
    from serving_optimiser.pipeline.machine import describe_machine, machine_line
    from serving_optimiser.runtime import kernel_settings

    names = args.models.split(",") if args.models else list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    print(f"CPU: {machine_line(describe_machine())}; threads {json.dumps(kernel_settings())}", flush=True)
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="bench_zoo_") as scratch:
        base = Path(args.keep or scratch)
        for name in names:
            try:
                rows += bench_model(name, base, args.rounds, args.batch)
            except Exception as error:  # noqa: BLE001 - one line per failed model, the others go on
                failures.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0]}")
                print(f"{name}: FAILED: {failures[-1]}", flush=True)
    print()
    print(f"| model | list | size MB | size ratio | class agreement | worst output (kind, metric) "
          f"| max abs diff / range | optimise s | original ms @{args.batch} / @1 | latency ratio @{args.batch} "
          f"| latency ratio @1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        agreement = "-" if row["agreement"] is None else f"{100 * row['agreement']:.2f} %"
        print(f"| {row['model']} | {row['list']} | {row['size_mb']:.2f} | {row['size_ratio']:.3f} | {agreement} "
              f"| {row['worst_output']} | {row['relative_diff']:.1e} | {row['optimise_s']:.1f} "
              f"| {row['original_ms_batch']:.1f} / {row['original_ms_1']:.2f} "
              f"| {row['latency_ratio_batch']:.3f} | {row['latency_ratio_1']:.3f} |")
    for failure in failures:
        print(f"FAILED {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
