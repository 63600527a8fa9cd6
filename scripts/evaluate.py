"""Stage evaluate@MODEL (and evaluate_peer@PEER): accuracy, fidelity against the exported model,
sizes and graph counts of one model, with pinned kernels so the figures are the same on any
machine. For the exported model itself (MODEL=exported) it also writes the reference outputs every
other model is compared to. Fails, naming the model, when it is under the gate (params.yaml:
evaluate) or its outputs are broken (NaN/Inf, wrong shape). A variant whose ops only oneDNN
implements (quantize_matmuls) runs with oneDNN's rewrites on, still capped at AVX2."""

import argparse
from pathlib import Path

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="'exported', a key of 'optimise' or of 'peers.variants' in params.yaml")
    parser.add_argument("--model-path", required=True, type=Path, help="a SavedModel or a peer artefact's directory")
    parser.add_argument("--optimised", type=Path, help="the variant's optimised graph, to count its nodes")
    parser.add_argument("--eval", required=True, type=Path)
    parser.add_argument("--reference", type=Path, help="the exported model's outputs (.npz), for other models")
    parser.add_argument("--reference-details", type=Path, help="the exported model's figures, for other models")
    parser.add_argument("--out-reference", type=Path, help="where the exported model writes its outputs")
    parser.add_argument("--out-metrics", required=True, type=Path)
    parser.add_argument("--out-details", required=True, type=Path)
    parser.add_argument("--out-signatures", type=Path, help="saved_model_cli's description (SavedModels only)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    import json

    from serving_optimiser import runtime
    from serving_optimiser.atomic import atomic_file
    from serving_optimiser.errors import UserError
    from serving_optimiser.pipeline import evaluate
    from serving_optimiser.pipeline.data import features_and_labels, read_iris_csv, sample_around
    from serving_optimiser.pipeline.io import write_json
    from serving_optimiser.pipeline.params import load_params, require_list, section

    params = load_params(args.params)
    vocabulary = require_list(section(params, "data", args.params), "label_vocabulary", str, "data", args.params)
    evaluate_params = evaluate.EvaluateParams.from_section(section(params, "evaluate", args.params))
    model = evaluate.ModelEntry.find(params, args.model, args.params)
    needed = ("out_reference",) if model.is_reference else ("reference", "reference_details")
    for flag in needed:
        if getattr(args, flag) is None:
            parser.error(f"{args.model} needs --{flag.replace('_', '-')}")
    runtime.pin_kernels(onednn=model.needs_onednn)

    frame = read_iris_csv(args.eval, vocabulary)
    features, labels = features_and_labels(frame, vocabulary)
    data = {"eval": features, "batch": sample_around(frame, evaluate_params.batch_rows, evaluate_params.seed)}
    result = evaluate.evaluate_model(
        args.model, args.model_path, data, labels, vocabulary, evaluate_params, model.threads, args.optimised
    )
    if model.is_reference:
        evaluate.save_outputs(args.out_reference, result.outputs)
    else:
        reference = json.loads(args.reference_details.read_text())
        evaluate.compare(result, evaluate.load_outputs(args.reference), reference)
        failures = evaluate.gate_failures(result.figures, evaluate_params)
        if failures:
            raise UserError(f"{args.model}: fails the gate: {'; '.join(failures)}")
    write_json(args.out_details, evaluate.rounded(result.figures))
    if args.out_signatures is not None:
        with atomic_file(args.out_signatures) as stream:
            stream.write(evaluate.signature_dump(args.model_path))
    headline = evaluate.headline(result.figures)
    write_json(args.out_metrics, headline)
    print(f"evaluate: {args.model}: " + ", ".join(f"{key} {value}" for key, value in headline.items()))


if __name__ == "__main__":
    run_stage("evaluate", main, pinned=False)  # main pins, once it knows the model
