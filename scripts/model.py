"""Stage model: the SavedModel the pipeline optimises (params.yaml's model section: the Iris export,
or your own SavedModel with sample inputs) checked against its signature, and the rows every later
stage runs on -> data/samples (model.json, calibration.npz, evaluation.npz, labels.npy)."""

import argparse
from pathlib import Path

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--saved-model", type=Path,
                        help="the import stage's SavedModel (models/imported): model.path as a SavedModel "
                        "(default: model.path itself, which must then be a SavedModel directory)")
    parser.add_argument("--out", required=True, type=Path, help="the samples directory (data/samples)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    import dataclasses

    from serving_optimiser.pipeline.model import write_samples
    from serving_optimiser.pipeline.params import PipelineParams

    params = PipelineParams.load(args.params)
    model = params.model()  # checked before TensorFlow loads
    if args.saved_model is not None:
        model = dataclasses.replace(model, path=args.saved_model)
    vocabulary = params.label_vocabulary() if model.source == "iris" else []
    spec = write_samples(model, vocabulary, args.out)
    kinds = ", ".join(f"{name} ({kind})" for name, kind in spec.kinds().items())
    print(f"model: {model.path} signature '{spec.signature}' ({', '.join(spec.input_order)} -> "
          f"{', '.join(spec.outputs)}), judged on {kinds} -> {args.out}")


if __name__ == "__main__":
    run_stage("model", main)
