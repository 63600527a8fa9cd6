"""Stage calibrate: each float MatMul's input range over the train split, run through the frozen
float graph, as the ranges_file of quantize_matmuls (the old tool's insert_logging -> run ->
freeze_requantization_ranges step, for the transform that has no RequantizationRange ops)."""

import argparse

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frozen", required=True)
    parser.add_argument("--train", required=True, help="the train split (CSV)")
    parser.add_argument("--out", required=True, help="the ranges file (JSON: {MatMul name: [min, max]})")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    from serving_optimiser.errors import UserError
    from serving_optimiser.pipeline import evaluate
    from serving_optimiser.pipeline.data import features_and_labels, read_iris_csv
    from serving_optimiser.pipeline.io import write_json
    from serving_optimiser.pipeline.params import load_params, require_list, section

    params = load_params(args.params)
    vocabulary = require_list(section(params, "data", args.params), "label_vocabulary", str, "data", args.params)
    signature_key = evaluate.EvaluateParams.from_section(section(params, "evaluate", args.params)).signature
    features, _ = features_and_labels(read_iris_csv(args.train, vocabulary), vocabulary)

    from serving_optimiser.graph_transforms.transforms.quantize_matmuls import calibrate_ranges
    from serving_optimiser.saved_model import FrozenModel

    frozen = FrozenModel.load(args.frozen)
    signature = frozen.signatures.get(signature_key)
    if signature is None:
        raise UserError(f"{args.frozen}: no signature '{signature_key}' (evaluate.signature in {args.params})")
    missing = sorted(set(signature.inputs) - set(features))
    if missing:
        raise UserError(f"{args.train}: no column for the signature input(s) {', '.join(missing)}")
    feed = {signature.inputs[key].name: features[key] for key in signature.inputs}
    ranges = calibrate_ranges(frozen.graph_def, [feed])
    write_json(args.out, {name: [low, high] for name, (low, high) in sorted(ranges.items())})
    rows = len(next(iter(features.values())))
    print(f"calibrate: input ranges of {len(ranges)} MatMuls over {rows} train rows -> {args.out}")
    for name, (low, high) in sorted(ranges.items()):
        print(f"  {name}: [{low:.6g}, {high:.6g}]")


if __name__ == "__main__":
    run_stage("calibrate", main)
