"""Stage export: trained weights -> SavedModel with the notebook's `predict` and `serving_default` signatures."""

import argparse

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    from serving_optimiser.pipeline.export import export_saved_model
    from serving_optimiser.pipeline.params import PipelineParams
    from serving_optimiser.pipeline.weights import load_weights

    vocabulary = PipelineParams.load(args.params).label_vocabulary()
    export_saved_model(load_weights(args.weights), args.out, vocabulary)
    print(f"export: SavedModel written to {args.out}")


if __name__ == "__main__":
    run_stage("export", main)
