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
    parser.add_argument("model", help="'exported', a key of 'optimise' or of 'peers.variants' in the params file")
    parser.add_argument("--model-path", required=True, type=Path, help="a SavedModel or a peer artefact's directory")
    parser.add_argument("--optimised", type=Path, help="the variant's optimised graph, to count its nodes")
    parser.add_argument("--samples", required=True, type=Path, help="the model stage's directory")
    parser.add_argument("--reference", type=Path, help="the exported model's outputs (.npz), for other models")
    parser.add_argument("--reference-details", type=Path, help="the exported model's figures, for other models")
    parser.add_argument("--out-reference", type=Path, help="where the exported model writes its outputs")
    parser.add_argument("--out-metrics", required=True, type=Path)
    parser.add_argument("--out-details", required=True, type=Path)
    parser.add_argument("--out-signatures", type=Path, help="saved_model_cli's description (SavedModels only)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    from serving_optimiser import runtime
    from serving_optimiser.pipeline.entries import ModelEntry
    from serving_optimiser.pipeline.evaluate import evaluate_stage
    from serving_optimiser.pipeline.params import PipelineParams

    params = PipelineParams.load(args.params)
    evaluate_params = params.evaluate()
    entry = ModelEntry.find(params, args.model)
    needed = ("out_reference",) if entry.is_reference else ("reference", "reference_details")
    for flag in needed:
        if getattr(args, flag) is None:
            parser.error(f"{args.model} needs --{flag.replace('_', '-')}")
    runtime.pin_kernels(onednn=entry.needs_onednn)
    print(evaluate_stage(
        entry, args.model_path, args.samples, evaluate_params, args.out_metrics, args.out_details,
        optimised=args.optimised, reference=args.reference, reference_details=args.reference_details,
        out_reference=args.out_reference, out_signatures=args.out_signatures,
    ))


if __name__ == "__main__":
    run_stage("evaluate", main, pinned=False)  # main pins, once it knows the model
