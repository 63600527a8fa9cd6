"""How far the evaluation's figures can move between CPUs that slice a 512-deep sum differently.

The evaluate stages run the exported Iris model through TensorFlow, whose matmuls slice their
depth by the CPU's cache sizes when a call runs on one thread (an Intel Xeon with a 48 KiB L1d may
sum 512 products in one slice where an AMD EPYC with 32 KiB sums two of 256; see
docs/reproducibility.md). This script computes the trained model's probabilities on the
evaluation data both ways, as fixed-order float32 sums in NumPy (one 512-deep running sum against
two 256-deep running sums added), and prints the largest difference of the probabilities, the
rows whose class flips, and so the digit to which the committed agreement, max |Δp| and accuracy
figures are stable.

    python scripts/bench_slicing.py [--weights models/weights.npz] [--samples data/samples]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

CHUNK_ROWS = 2048  # rows per running-sum pass: small enough to stay in cache


def running_sums(inputs: np.ndarray, kernel: np.ndarray, slice_depth: int) -> np.ndarray:
    """``inputs @ kernel`` as float32 running sums over the depth, ``slice_depth`` products per
    slice, the slices' totals added left to right."""
    depth = kernel.shape[0]
    total = np.zeros((inputs.shape[0], kernel.shape[1]), np.float32)
    for start in range(0, depth, slice_depth):
        partial = np.zeros_like(total)
        for k in range(start, min(start + slice_depth, depth)):
            partial += inputs[:, k : k + 1] * kernel[k]
        total = partial if start == 0 else total + partial
    return total


def probabilities(features: np.ndarray, weights: list[tuple[np.ndarray, np.ndarray]], slice_depth: int) -> np.ndarray:
    out = []
    for start in range(0, len(features), CHUNK_ROWS):
        net = features[start : start + CHUNK_ROWS]
        for index, (kernel, bias) in enumerate(weights):
            net = running_sums(net, kernel, slice_depth) + bias
            if index < len(weights) - 1:
                net = np.maximum(net, np.float32(0))
        shifted = net - net.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        out.append(exp / exp.sum(axis=1, keepdims=True))
    return np.concatenate(out)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="models/weights.npz")
    parser.add_argument("--samples", default="data/samples")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rows", type=int, default=None, help="only the first ROWS of the batch (quicker)")
    args = parser.parse_args(argv)

    from serving_optimiser.pipeline.data import FEATURE_NAMES
    from serving_optimiser.pipeline.figures import evaluation_data
    from serving_optimiser.pipeline.model import Samples
    from serving_optimiser.pipeline.params import PipelineParams
    from serving_optimiser.pipeline.weights import load_weights

    weights = [(k.astype(np.float32), b.astype(np.float32)) for k, b in load_weights(args.weights)]
    data = evaluation_data(Samples.load(args.samples), PipelineParams.load(args.params).evaluate())
    for name, rows in data.items():
        features = np.stack([rows[key] for key in FEATURE_NAMES], axis=1).astype(np.float32)
        if args.rows:
            features = features[: args.rows]
        one_slice = probabilities(features, weights, 512)
        two_slices = probabilities(features, weights, 256)
        diff = float(np.abs(one_slice - two_slices).max())
        flips = int(np.count_nonzero(one_slice.argmax(1) != two_slices.argmax(1)))
        margin = np.sort(one_slice, axis=1)
        closest = float((margin[:, -1] - margin[:, -2]).min())
        print(
            f"{name}: {len(features)} rows, max |Δp| between 1 x 512 and 2 x 256 sums {diff:.3g}, "
            f"class flips {flips} ({100 * flips / len(features):.4f} %), smallest top-2 margin {closest:.3g}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
