"""Stage freeze: SavedModel -> frozen GraphDef (every variable a constant, all signature outputs kept),
plus the notebook's graph summary before and after freezing."""

import argparse
from pathlib import Path

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--saved-model", required=True)
    parser.add_argument("--samples", required=True, type=Path, help="the model stage's directory (its signature)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--out-summary", required=True)
    args = parser.parse_args(argv)

    from serving_optimiser.pipeline.freeze import freeze_stage

    print(freeze_stage(args.saved_model, args.samples, args.out, args.out_summary))


if __name__ == "__main__":
    run_stage("freeze", main)
