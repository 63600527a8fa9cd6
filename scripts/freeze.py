"""Stage freeze: SavedModel -> frozen GraphDef (every variable a constant, all signature outputs kept),
plus the notebook's graph summary before and after freezing."""

import argparse

from serving_optimiser.pipeline.stage import run_stage


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--saved-model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--out-summary", required=True)
    args = parser.parse_args(argv)

    from serving_optimiser.pipeline.describe import describe_graph, saved_model_graph_def
    from serving_optimiser.pipeline.io import write_json
    from serving_optimiser.saved_model import freeze_saved_model

    frozen = freeze_saved_model(args.saved_model)
    frozen.save(args.out)
    summary = {
        "exported": describe_graph(saved_model_graph_def(args.saved_model)),
        "frozen": describe_graph(frozen.graph_def),
    }
    write_json(args.out_summary, summary)
    print(
        f"freeze: {summary['exported']['total_nodes']} -> {summary['frozen']['total_nodes']} nodes, "
        f"{summary['frozen']['variable_count']} variables left -> {args.out}"
    )


if __name__ == "__main__":
    run_stage("freeze", main)
