"""Stage import_model: the model the pipeline optimises as a SavedModel in models/imported (a
SavedModel directory copied, or a Keras .keras / .h5 file exported with a serving_default
signature) and reports/imported.json saying which."""

import argparse
from pathlib import Path

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-path", required=True, type=Path, help="params.yaml's model.path")
    parser.add_argument("--out", required=True, type=Path, help="the SavedModel directory to write")
    parser.add_argument("--out-report", required=True, type=Path, help="what was imported, as JSON")
    args = parser.parse_args(argv)

    from serving_optimiser.pipeline.imported import import_stage

    print(import_stage(args.model_path, args.out, args.out_report))


if __name__ == "__main__":
    run_stage("import_model", main)
