"""Print the evaluate stage's figures as a markdown table (exported model and every variant)."""

import argparse
import json
import sys
from pathlib import Path

from serving_optimiser.pipeline.report import results_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--metrics", default="metrics/evaluate.json")
    args = parser.parse_args()
    path = Path(args.metrics)
    if not path.is_file():
        print(f"show_results: {path} not found (run `make all` first)", file=sys.stderr)
        return 1
    print(results_table(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
