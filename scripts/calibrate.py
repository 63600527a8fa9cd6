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

    from serving_optimiser.pipeline.calibrate import calibrate_stage
    from serving_optimiser.pipeline.params import PipelineParams

    print(calibrate_stage(PipelineParams.load(args.params), args.frozen, args.samples, args.out))


if __name__ == "__main__":
    run_stage("calibrate", main)
