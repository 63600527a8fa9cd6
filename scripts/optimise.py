"""Stage optimise: apply one named transform list from params.yaml to the frozen graph."""

import argparse

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variant", help="a key of the 'optimise' section of the params file")
    parser.add_argument("--frozen", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    from serving_optimiser.pipeline.optimise import optimise_stage
    from serving_optimiser.pipeline.params import PipelineParams

    print(optimise_stage(PipelineParams.load(args.params), args.variant, args.frozen, args.out))


if __name__ == "__main__":
    run_stage("optimise", main)
