"""Print the report stage's summary: every model's figures, the best per objective, the machine."""

import argparse
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--summary", default="reports/summary.md")
    args = parser.parse_args()
    path = Path(args.summary)
    if not path.is_file():
        print(f"show_results: {path} not found (run `make all` first)", file=sys.stderr)
        return 1
    print(path.read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
