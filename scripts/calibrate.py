"""Stage calibrate: each float MatMul's and conv's input range over the calibration rows (the model
stage's), run through the frozen float graph, as the ranges_file of quantize_matmuls."""

import argparse
from pathlib import Path

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frozen", required=True, type=Path)
    parser.add_argument("--samples", required=True, type=Path, help="the model stage's directory")
    parser.add_argument("--out", required=True, help="the ranges file (JSON: {node name: [min, max]})")
    args = parser.parse_args(argv)

    from serving_optimiser.pipeline.calibrate import calibrate
    from serving_optimiser.pipeline.model import Samples

    rows = Samples.load(args.samples).calibration
    ranges = calibrate(args.frozen, rows, args.out)
    count = len(next(iter(rows.values())))
    print(f"calibrate: input ranges of {len(ranges)} MatMuls over {count} calibration rows -> {args.out}")
    for name, (low, high) in sorted(ranges.items()):
        print(f"  {name}: [{low:.6g}, {high:.6g}]")


if __name__ == "__main__":
    run_stage("calibrate", main)
