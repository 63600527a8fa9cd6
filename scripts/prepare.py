"""Stage prepare: data/iris.csv -> stratified, seeded train/eval split."""

import argparse
from pathlib import Path

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    from serving_optimiser.atomic import atomic_directory
    from serving_optimiser.pipeline.data import read_iris_csv, stratified_split
    from serving_optimiser.pipeline.params import PipelineParams, require

    params = PipelineParams.load(args.params)
    vocabulary = params.label_vocabulary()
    prepare = params.section("prepare")
    eval_fraction = float(require(prepare, "eval_fraction", float, "prepare", params.path))
    seed = require(prepare, "seed", int, "prepare", params.path)

    frame = read_iris_csv(args.data, vocabulary)
    train, evaluation = stratified_split(frame, eval_fraction, seed)
    with atomic_directory(args.out_dir) as out:
        train.to_csv(Path(out) / "train.csv", index=False)
        evaluation.to_csv(Path(out) / "eval.csv", index=False)
    print(f"prepare: {len(train)} train rows, {len(evaluation)} eval rows -> {args.out_dir}")


if __name__ == "__main__":
    run_stage("prepare", main)
