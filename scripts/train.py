"""Stage train: the notebook's DNN classifier with Keras 3, deterministic, curves logged with DVCLive."""

import argparse
import sys

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--out-live", required=True, help="DVCLive directory: per-epoch curves")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    from serving_optimiser.pipeline.data import features_and_labels, read_iris_csv
    from serving_optimiser.pipeline.params import PipelineParams
    from serving_optimiser.pipeline.train import dense_weights, log_history, save_weights, train_model

    params = PipelineParams.load(args.params)
    vocabulary = params.label_vocabulary()
    train_params = params.train()

    features, labels = features_and_labels(read_iris_csv(args.train, vocabulary), vocabulary)
    print(f"train: {train_params.epochs} epochs on {len(labels)} rows", file=sys.stderr)
    model, history = train_model(
        features, labels, train_params, len(vocabulary), verbose=0
    )
    log_history(history, args.out_live)
    save_weights(dense_weights(model), args.out)
    print(f"train: final loss {history['loss'][-1]:.4f}, accuracy {history['accuracy'][-1]:.4f}", file=sys.stderr)


if __name__ == "__main__":
    run_stage("train", main)
