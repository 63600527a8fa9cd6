"""Stage optimise: apply one named variant from params.yaml to the frozen graph, through the gate."""

import argparse

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variant", help="a key of the 'optimise' section of the params file")
    parser.add_argument("--frozen", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", help="the model stage's samples: the gate decides and judges on them")
    parser.add_argument("--out-gate", help="where to write what the gate did (JSON)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    from serving_optimiser import runtime
    from serving_optimiser.pipeline.entries import ModelEntry
    from serving_optimiser.pipeline.optimise import optimise_stage
    from serving_optimiser.pipeline.params import PipelineParams

    params = PipelineParams.load(args.params)
    params.transforms(args.variant)  # a missing or malformed list is named before anything loads
    # The gate runs the variant as the evaluate stage will: pinned kernels, oneDNN on for int8 ops.
    runtime.pin_kernels(onednn=ModelEntry.find(params, args.variant).needs_onednn)
    print(optimise_stage(params, args.variant, args.frozen, args.out, args.samples, args.out_gate))


if __name__ == "__main__":
    run_stage("optimise", main, pinned=False)  # main pins, once it knows the variant
