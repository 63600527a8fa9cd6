"""Name obfuscation: replace node names by short base-62 ids so a shipped graph reveals less of
the model's structure and takes fewer bytes."""

from __future__ import annotations

from collections.abc import Iterator

from tensorflow.core.framework import graph_pb2

from ..context import TransformContext
from ..errors import TransformError
from ..graph_utils import find_invalid_inputs, fix_colocation_attrs, new_graph_like, node_name_from_input, rename_nodes
from ..registry import register

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def base62(number: int) -> str:
    """``number`` written with the digits 0-9, a-z, A-Z (0 -> ``0``, 61 -> ``Z``, 62 -> ``10``)."""
    text = ""
    while True:
        number, remainder = divmod(number, len(_DIGITS))
        text = _DIGITS[remainder] + text
        if number == 0:
            return text


def _fresh_names(protected: set[str]) -> Iterator[str]:
    counter = 0
    while True:
        name = base62(counter)
        counter += 1
        if name not in protected:
            yield name


@register("obfuscate_names", "obsfucate_names")
def obfuscate_names(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Rename every node that is not a graph input or output to a short base-62 id.

    Matches: every node whose name is not literally one of the input or output names
    (``x:0`` protects nothing, as in the C++ tool).
    Produces: those nodes renamed, in graph order, to ``0``, ``1``, ..., ``Z``, ``10``, ...,
    skipping ids equal to a protected name; every input string rewritten keeping its ``^``
    and ``:port``, and every ``_class`` colocation entry ``loc:@<old>`` -> ``loc:@<new>``.
    Names inside the function library are not touched.
    Params: none. Also registered under the old misspelling ``obsfucate_names``.
    Errors: an input naming a node that is not in the graph.
    Deliberate difference: the C++ tool left ``_class`` entries under the old names, so a
    renamed TF 1 graph no longer imported.
    """
    protected = set(context.input_names) | set(context.output_names)
    fresh = _fresh_names(protected)
    new_names = {
        node.name: node.name if node.name in protected else next(fresh) for node in graph_def.node
    }
    invalid = find_invalid_inputs(graph_def)
    if invalid:
        reader, input_string = invalid[0]
        raise TransformError(
            f"obfuscate_names: node '{reader}' reads '{input_string}', "
            f"but no node is named '{node_name_from_input(input_string)}'"
        )
    result = rename_nodes(new_graph_like(graph_def, graph_def.node), new_names)
    return fix_colocation_attrs(result, new_names)
