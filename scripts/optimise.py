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

    from serving_optimiser.errors import UserError
    from serving_optimiser.graph_transforms.catalogue import check_transforms
    from serving_optimiser.graph_transforms.errors import TransformError
    from serving_optimiser.graph_transforms.parser import parse_transforms
    from serving_optimiser.pipeline.params import PipelineParams

    params = PipelineParams.load(args.params)
    transforms = params.transforms(args.variant)
    try:  # before TensorFlow loads: a typo in the params file is reported at once
        check_transforms(parse_transforms(" ".join(transforms)))
    except TransformError as error:
        raise UserError(f"{params.path}: 'optimise.{args.variant}': {error}") from None
    from serving_optimiser.graph_transforms import TransformGraph
    from serving_optimiser.saved_model import FrozenModel

    frozen = FrozenModel.load(args.frozen)
    optimised = TransformGraph(frozen.graph_def, frozen.input_node_names(), frozen.output_node_names(), transforms)
    frozen.with_graph_def(optimised).save(args.out)
    print(f"optimise: {args.variant}: {frozen.graph_def.ByteSize()} -> {optimised.ByteSize()} bytes -> {args.out}")


if __name__ == "__main__":
    run_stage("optimise", main)
