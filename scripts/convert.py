"""Stage convert: one optimised GraphDef -> SavedModel with the exported model's signatures and outputs."""

import argparse

from serving_optimiser.errors import UserError
from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variant", help="a key of the 'optimise' section of the params file")
    parser.add_argument("--optimised", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    from serving_optimiser.pipeline.params import PipelineParams, require, require_list
    from serving_optimiser.saved_model import FrozenModel, convert_to_saved_model

    params = PipelineParams.load(args.params)
    convert = params.section("convert")
    dequantize_once = require(convert, "dequantize_once", bool, "convert", params.path)
    warmup_batch_sizes = require_list(convert, "warmup_batch_sizes", int, "convert", params.path)
    if any(size < 1 for size in warmup_batch_sizes):
        raise UserError(f"{params.path}: 'convert.warmup_batch_sizes' must hold positive integers")
    convert_to_saved_model(
        FrozenModel.load(args.optimised), args.out, dequantize_once=dequantize_once,
        warmup_batch_sizes=warmup_batch_sizes,
    )
    print(f"convert: {args.variant} -> {args.out}")


if __name__ == "__main__":
    run_stage("convert", main)
