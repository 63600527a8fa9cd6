"""Stage evaluate@MODEL: accuracy, fidelity against the exported model, sizes and graph counts of
one model, with pinned kernels so every figure is the same on any machine. For the exported model
itself (MODEL=exported) it also writes the reference outputs every variant is compared to.
Fails, naming the model, when a variant is under the gate (params.yaml: evaluate). A variant
whose ops only oneDNN implements (quantize_matmuls) is evaluated with oneDNN's rewrites on, still
capped at AVX2, so its figures too are the same on any x86-64 machine."""

import argparse
from pathlib import Path

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="'exported' or a key of the 'optimise' section of params.yaml")
    parser.add_argument("--saved-model", required=True, type=Path)
    parser.add_argument("--optimised", type=Path, help="the variant's optimised graph, to count its nodes")
    parser.add_argument("--eval", required=True, type=Path)
    parser.add_argument("--reference", type=Path, help="the exported model's outputs (.npz), for a variant")
    parser.add_argument("--reference-details", type=Path, help="the exported model's figures, for a variant")
    parser.add_argument("--out-reference", type=Path, help="where the exported model writes its outputs")
    parser.add_argument("--out-metrics", required=True, type=Path)
    parser.add_argument("--out-details", required=True, type=Path)
    parser.add_argument("--out-signatures", required=True, type=Path)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    import json

    from serving_optimiser import runtime
    from serving_optimiser.errors import UserError
    from serving_optimiser.graph_transforms.catalogue import needs_onednn
    from serving_optimiser.pipeline import evaluate
    from serving_optimiser.pipeline.data import features_and_labels, read_iris_csv, sample_around
    from serving_optimiser.pipeline.io import atomic_file, write_json
    from serving_optimiser.pipeline.params import load_params, require_list, section

    params = load_params(args.params)
    vocabulary = require_list(section(params, "data", args.params), "label_vocabulary", str, "data", args.params)
    evaluate_params = evaluate.EvaluateParams.from_section(section(params, "evaluate", args.params))
    is_reference = args.model == evaluate.REFERENCE
    needed = ("out_reference",) if is_reference else ("reference", "reference_details")
    for flag in needed:
        if getattr(args, flag) is None:
            parser.error(f"{args.model} needs --{flag.replace('_', '-')}")
    variants = section(params, "optimise", args.params)
    if not is_reference and args.model not in variants:
        raise UserError(f"{args.params}: no variant '{args.model}' in the 'optimise' section")
    runtime.pin_kernels(onednn=not is_reference and needs_onednn(variants[args.model]))

    frame = read_iris_csv(args.eval, vocabulary)
    features, labels = features_and_labels(frame, vocabulary)
    data = {"eval": features, "batch": sample_around(frame, evaluate_params.batch_rows, evaluate_params.seed)}
    result = evaluate.evaluate_saved_model(
        args.model, args.saved_model, data, labels, vocabulary, evaluate_params, args.optimised
    )
    if is_reference:
        evaluate.save_outputs(args.out_reference, result.outputs)
    else:
        reference = json.loads(args.reference_details.read_text())
        evaluate.compare(result, evaluate.load_outputs(args.reference), reference)
        failures = evaluate.gate_failures(result.figures, evaluate_params)
        if failures:
            raise UserError(f"{args.model}: fails the gate: {'; '.join(failures)}")
    write_json(args.out_details, evaluate.rounded(result.figures))
    with atomic_file(args.out_signatures) as stream:
        stream.write(evaluate.signature_dump(args.saved_model))
    headline = evaluate.headline(result.figures)
    write_json(args.out_metrics, headline)
    print(f"evaluate: {args.model}: " + ", ".join(f"{key} {value}" for key, value in headline.items()))


if __name__ == "__main__":
    run_stage("evaluate", main, pinned=False)  # main pins, once it knows the variant
