"""Stage calibrate: the calibration file of the variants that name it as ranges_file, taken on
the frozen graph as it is at that point of their transform list, over the calibration rows."""

import argparse
from pathlib import Path

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frozen", required=True, type=Path)
    parser.add_argument("--samples", required=True, type=Path, help="the model stage's directory")
    parser.add_argument("--out", required=True, help="the calibration file (JSON: ranges, per-layer int8 errors)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    from serving_optimiser.pipeline.calibrate import calibrate, calibration_plan
    from serving_optimiser.pipeline.model import Samples
    from serving_optimiser.pipeline.params import PipelineParams

    plan = calibration_plan(PipelineParams.load(args.params), args.out)
    calibration = calibrate(args.frozen, Samples.load(args.samples).calibration, plan, args.out)
    print(f"calibrate: {', '.join(plan.transforms)} for {', '.join(plan.variants)} after {len(plan.before)} "
          f"transforms: {len(calibration.ranges)} ranges, {len(calibration.layer_errors)} layer errors over "
          f"{calibration.rows} calibration rows -> {args.out}")
    for name, error in sorted(calibration.layer_errors.items()):
        low, high = calibration.ranges.get(name, (float("nan"), float("nan")))
        print(f"  {name}: input [{low:.6g}, {high:.6g}], int8 output error {error:.4f}")


if __name__ == "__main__":
    run_stage("calibrate", main)
