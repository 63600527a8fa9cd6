"""``summarize_graph``: print a summary of a GraphDef file (likely inputs and outputs,
variables, parameter counts, op types), as the old Graph Transform Tool's summarize_graph did.

Example:

    summarize_graph --in_graph=frozen.pb --print_structure

Exit codes: 0 done; 1 error (one line on stderr); 2 bad usage; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from .. import runner
from .common import ToolArgumentParser, parse_bool

PROG = "summarize_graph"


def build_parser() -> argparse.ArgumentParser:
    parser = ToolArgumentParser(prog=PROG, description="Summarize a GraphDef file.", docstring=__doc__)
    parser.add_argument("--in_graph", required=True, help="GraphDef file (binary, or text if .pbtxt)")
    parser.add_argument(
        "--print_structure", nargs="?", const=True, default=False, type=parse_bool, metavar="BOOL",
        help="also print every node, in execution order, with its inputs",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> None:
        from ..graph_transforms.errors import TransformError
        from ..graph_transforms.graph_io import load_graph_def

        if not args.in_graph:
            raise TransformError("--in_graph is required")
        graph_def = load_graph_def(args.in_graph)  # a missing file is reported before TensorFlow loads
        from ..graph_transforms.summary import summarize_graph

        text = summarize_graph(graph_def, args.in_graph, args.print_structure)
        sys.stdout.write(text)

    return runner.run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
