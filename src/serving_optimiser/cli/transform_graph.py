"""``transform_graph``: apply Graph Transform Tool transforms to a GraphDef file, with the old
tool's flags.

Example:

    transform_graph --in_graph=frozen.pb --out_graph=optimised.pb \\
        --inputs=sepal_length,sepal_width --outputs=dnn/head/predictions/probabilities \\
        --transforms='remove_nodes(op=Identity) fold_constants(ignore_errors=true) quantize_weights'

The input is read as a binary GraphDef (text format if that fails, or if the name ends in
.pbtxt); the output is written in text format with --output_as_text or a .pbtxt name,
otherwise binary. Transforms use the old tool's syntax; `transform_graph --list` shows them
all with their arguments and defaults.

Exit codes: 0 done; 1 error (one line on stderr; the output file is only written, atomically,
when every transform succeeded); 2 bad usage; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from .. import runner, runtime
from .common import ToolArgumentParser, parse_bool

PROG = "transform_graph"


class _ListTransforms(argparse.Action):
    """``--list``: print every transform and exit, before required flags are checked (like --help)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        runtime.quiet_tensorflow()  # the registry imports TensorFlow
        from ..graph_transforms.registry import transform_listing

        sys.stdout.write(transform_listing())
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = ToolArgumentParser(
        prog=PROG, description="Apply Graph Transform Tool transforms to a GraphDef file.", docstring=__doc__
    )
    parser.add_argument("--in_graph", required=True, help="input GraphDef file (binary, or text if .pbtxt)")
    parser.add_argument("--out_graph", required=True, help="output GraphDef file")
    parser.add_argument("--inputs", default="", help="comma-separated input node names")
    parser.add_argument("--outputs", default="", help="comma-separated output node names")
    parser.add_argument("--transforms", required=True, help="the transforms to apply, in order (old tool's syntax)")
    parser.add_argument(
        "--list", action=_ListTransforms, help="list every transform with its arguments and defaults, then exit"
    )
    parser.add_argument(
        "--output_as_text", nargs="?", const=True, default=False, type=parse_bool, metavar="BOOL",
        help="write the output in text format (also implied by an out_graph ending in .pbtxt)",
    )
    return parser


def _names(text: str) -> list[str]:
    return text.split(",") if text else []


def transform_graph_file(
    in_graph: str, out_graph: str, inputs: str, outputs: str, transforms: str, output_as_text: bool = False
) -> None:
    """Read ``in_graph``, apply ``transforms``, write ``out_graph``. Raises TransformError.

    The transform list and the input file are checked before TensorFlow is imported (~5 s), so
    a typo is reported at once.
    """
    from ..graph_transforms.catalogue import check_transforms
    from ..graph_transforms.errors import TransformError
    from ..graph_transforms.graph_io import load_graph_def, save_graph_def
    from ..graph_transforms.parser import parse_transforms

    for flag, value in (("in_graph", in_graph), ("out_graph", out_graph)):
        if not value:
            raise TransformError(f"--{flag} is required")
    parsed = parse_transforms(transforms)
    if not parsed:
        raise TransformError("--transforms is empty: you must specify at least one transform")
    check_transforms(parsed)
    graph_def = load_graph_def(in_graph)  # reads the file before it imports TensorFlow
    from ..graph_transforms import TransformGraph

    result = TransformGraph(graph_def, _names(inputs), _names(outputs), transforms)
    save_graph_def(result, out_graph, as_text=True if output_as_text else None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> None:
        transform_graph_file(
            args.in_graph, args.out_graph, args.inputs, args.outputs, args.transforms, args.output_as_text
        )

    return runner.run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
