"""The driver: ``TransformGraph`` applies a list of transforms in order, with the old tool's
call shape, handling ``ignore_errors`` and checking the graph after every step so a broken
graph is blamed on the transform that broke it."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from tensorflow.core.framework import graph_pb2

from .. import booleans
from ..errors import UserError
from . import catalogue, registry
from .calibration import Calibration
from .context import TransformContext
from .errors import TransformError
from .graph_utils import find_invalid_inputs, fix_colocation_attrs, node_name_from_input
from .parser import ParsedTransform, parse_transforms

log = logging.getLogger(__name__)


def _as_transform_string(transforms: str | Sequence[str]) -> str:
    if isinstance(transforms, str):
        return transforms
    return " ".join(transforms)


def _as_name_list(names: str | Sequence[str], what: str) -> list[str]:
    if isinstance(names, str):
        names = names.split(",") if names else []
    result = [name.strip() for name in names]
    if any(not name for name in result):
        raise TransformError(f"empty name in {what} list {list(names)!r}")
    return result


def check_transforms(parsed: list[ParsedTransform]) -> None:
    """Fail before anything runs if a name is unknown or a transform gets an argument it lacks."""
    accepted = {name: registry.get_transform(name).params for name in registry.registered_names()}
    catalogue.check_transforms(parsed, accepted)


def parse_and_check(transforms: str | Sequence[str]) -> list[ParsedTransform]:
    parsed = parse_transforms(_as_transform_string(transforms))
    check_transforms(parsed)
    return parsed


def _check_names_exist(graph_def: graph_pb2.GraphDef, names: list[str], what: str) -> None:
    present = {node.name for node in graph_def.node}
    missing = [name for name in names if node_name_from_input(name) not in present]
    if missing:
        raise TransformError(f"{what} {', '.join(repr(m) for m in missing)} not found in the graph")


def TransformGraph(
    input_graph_def: graph_pb2.GraphDef,
    inputs: str | Sequence[str],
    outputs: str | Sequence[str],
    transforms: str | Sequence[str],
) -> graph_pb2.GraphDef:
    """Apply ``transforms`` (old-tool syntax) to a copy of ``input_graph_def``.

    ``inputs``/``outputs`` are node names (a list, or one comma-separated string).
    ``transforms`` is a list of transform strings, joined with spaces as the old Python
    wrapper did, or one string. Raises TransformError with a one-line message on bad input.
    """
    parsed = parse_and_check(transforms)
    input_names = _as_name_list(inputs, "inputs")
    output_names = _as_name_list(outputs, "outputs")
    _check_names_exist(input_graph_def, input_names, "input")
    _check_names_exist(input_graph_def, output_names, "output")
    graph_def = graph_pb2.GraphDef()
    graph_def.CopyFrom(input_graph_def)
    for transform in parsed:
        graph_def = apply_transform(graph_def, transform, input_names, output_names)
    return graph_def


def apply_transform(
    graph_def: graph_pb2.GraphDef,
    transform: ParsedTransform,
    input_names: list[str],
    output_names: list[str],
    calibration: Calibration | None = None,
) -> graph_pb2.GraphDef:
    """Run one parsed transform (and, where it applies, on the function library too).

    ``calibration`` reaches the int8 transforms in place of a ``ranges_file``."""
    registered = registry.get_transform(transform.name)
    params = {k: v for k, v in transform.params.items() if k != "ignore_errors"}
    # check_transforms has refused any value parse_bool does not know.
    ignore_errors = bool(booleans.parse_bool(transform.params.get("ignore_errors", ["false"])[0]))
    context = TransformContext(transform.name, list(input_names), list(output_names), params, calibration)
    start = time.perf_counter()
    before = graph_def.SerializeToString(deterministic=True)
    try:
        result = registered.function(graph_def, context)
        if registered.on_functions and result.library.function:
            from .function_library import transform_library_functions

            result = transform_library_functions(result, registered, context)
    except UserError as error:
        # Only errors about the user's graph or params are skippable: any other exception is
        # a bug in the transform and must surface with its traceback, not leave the graph
        # silently unoptimised.
        if not ignore_errors:
            raise
        log.warning("%s: failed, graph left unchanged (ignore_errors=true): %s", transform.name, error)
        return graph_def
    # A `_class` naming a node the transform removed would stop tf.import_graph_def (the C++
    # tool left them); renaming transforms rewrite their own entries before this.
    result = fix_colocation_attrs(result)
    invalid = find_invalid_inputs(result)
    if invalid:
        node, input_string = invalid[0]
        raise TransformError(
            f"{transform.name} produced an invalid graph: node '{node}' reads '{input_string}', "
            f"which does not exist ({len(invalid)} dangling input(s))"
        )
    elapsed = time.perf_counter() - start
    # One line per transform, whether it changed the graph, only function bodies, or nothing.
    if result.SerializeToString(deterministic=True) == before:
        log.info("%s: no change (%.2f s)", transform.name, elapsed)
    else:
        log.info(
            "%s: %d -> %d nodes, %d -> %d bytes%s (%.2f s)",
            transform.name, len(graph_def.node), len(result.node),
            graph_def.ByteSize(), result.ByteSize(), _changed_parts(graph_def, result), elapsed,
        )
    return result


def _changed_parts(before: graph_pb2.GraphDef, after: graph_pb2.GraphDef) -> str:
    """``, 3 nodes rewritten, 1 of 4 functions changed``: what changed beyond the counts."""
    old_nodes = {node.name: node for node in before.node}
    new_names = [node.name for node in after.node]
    parts = []
    rewritten = sum(1 for node in after.node if node.name in old_nodes and node != old_nodes[node.name])
    if rewritten:
        parts.append(f"{rewritten} node{'' if rewritten == 1 else 's'} rewritten")
    elif set(new_names) == set(old_nodes) and new_names != [node.name for node in before.node]:
        parts.append("nodes reordered")
    old_functions = {function.signature.name: function for function in before.library.function}
    changed = sum(1 for function in after.library.function if old_functions.get(function.signature.name) != function)
    if changed:
        parts.append(f"{changed} of {len(after.library.function)} functions changed")
    return "".join(f", {part}" for part in parts)
