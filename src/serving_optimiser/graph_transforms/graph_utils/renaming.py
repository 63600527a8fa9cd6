"""Renaming: rewriting every node's inputs through a rename map (keeping ``^`` and ``:port``),
renaming nodes with every reference to them, and keeping ``_class`` colocation entries right.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tensorflow.core.framework import graph_pb2

from ..errors import TransformError
from .graphs import copy_graph
from .inputs import canonical_input_name, node_name_from_input, parse_input


def rename_node_inputs(
    graph_def: graph_pb2.GraphDef,
    renames: Mapping[str, str],
    nodes_to_ignore: Iterable[str] = (),
    follow_chains: bool = True,
) -> graph_pb2.GraphDef:
    """A copy of ``graph_def`` whose inputs are rewritten through ``renames`` (``from -> to``).

    A ``from`` ending in ``:*`` renames the node whatever the port: ``^`` and ``:port`` stay as
    the input wrote them (``x:*`` -> ``y`` turns ``^x`` into ``^y``, ``x:1`` into ``y:1``, ``x:0``
    into ``y:0``). Any other ``from`` matches inputs with the same canonical form (``x`` matches
    ``x`` and ``x:0`` but not ``^x``, which ``^x`` matches) and the input becomes ``to`` as
    written. Inputs of ``nodes_to_ignore`` are left alone.

    With ``follow_chains`` (the C++ ``RenameNodeInputs``), a renamed input is looked up again
    until no rename applies, and a cycle is an error; without it every input is renamed at
    most once, all at once, so swapped names and new names that were old ones stay right.
    """
    ignore = set(nodes_to_ignore)
    by_node: dict[str, list[tuple[str, str]]] = {}
    for source, target in renames.items():
        source_node = source[:-2] if source.endswith(":*") else node_name_from_input(source)
        by_node.setdefault(source_node, []).append((source, target))
    result = copy_graph(graph_def)
    for node in result.node:
        if node.name in ignore:
            continue
        new_inputs = []
        for input_string in node.input:
            visited: set[str] = set()
            current = input_string
            while True:
                replacement, name = _renamed_once(current, by_node)
                if replacement is None or replacement == current:
                    break
                if name in visited:
                    raise TransformError(f"RenameNodeInputs argument contains a cycle for {name}")
                visited.add(name)
                current = replacement
                if not follow_chains:
                    break
            new_inputs.append(current)
        del node.input[:]
        node.input.extend(new_inputs)
    return result


def _renamed_once(input_string: str, by_node: dict[str, list[tuple[str, str]]]) -> tuple[str | None, str]:
    """(the first rename of ``input_string``, or None; the node name it reads)."""
    is_control, name, _ = parse_input(input_string)
    for source, target in by_node.get(name, []):
        if source.endswith(":*"):
            prefix = "^" if is_control else ""
            return f"{prefix}{target}{input_string[len(prefix) + len(name):]}", name
        if canonical_input_name(source) == canonical_input_name(input_string):
            return target, name
    return None, name


def rename_nodes(graph_def: graph_pb2.GraphDef, renames: Mapping[str, str]) -> graph_pb2.GraphDef:
    """A copy of ``graph_def`` with each node ``old`` in ``renames`` called ``renames[old]`` and every
    input naming it rewritten, keeping its ``^`` and ``:port`` as written.

    All renames apply at once (``{a: b, b: a}`` swaps two nodes). ``_class`` colocation entries
    are not touched: pass the same map to ``fix_colocation_attrs`` for that.
    """
    result = rename_node_inputs(
        graph_def, {f"{old}:*": new for old, new in renames.items()}, follow_chains=False
    )
    for node in result.node:
        node.name = renames.get(node.name, node.name)
    return result


# ---------------------------------------------------------------------------------------------
# Colocation attrs: _class = ["loc:@<node>", ...]
# ---------------------------------------------------------------------------------------------

COLOCATION_PREFIX = b"loc:@"


def fix_colocation_attrs(graph_def: graph_pb2.GraphDef, renames: dict[str, str] | None = None) -> graph_pb2.GraphDef:
    """Keep every ``_class`` colocation entry naming a node of the graph.

    TF 1 graphs pin nodes together with ``_class: ["loc:@<node>", ...]`` and
    ``tf.import_graph_def`` rejects an entry naming a node the graph lacks. Each ``loc:@old``
    becomes ``loc:@<renames[old]>`` (``renames`` maps old to new names in one step, all at
    once, so swapped names stay right); then entries naming no node of ``graph_def`` and
    repeated entries are dropped, and a ``_class`` left empty is deleted. Entries without the
    ``loc:@`` prefix are kept. Function bodies are left alone: TF does not check them.
    Returns ``graph_def`` itself when nothing needs changing, else a fixed copy.
    """
    by_old = {old.encode(): new.encode() for old, new in (renames or {}).items()}
    names = {node.name.encode() for node in graph_def.node}
    changes: dict[int, list[bytes]] = {}
    for index, node in enumerate(graph_def.node):
        if "_class" not in node.attr:
            continue
        entries = list(node.attr["_class"].list.s)
        fixed: list[bytes] = []
        for entry in entries:
            if entry.startswith(COLOCATION_PREFIX):
                target = entry[len(COLOCATION_PREFIX) :]
                target = by_old.get(target, target)
                if target not in names:
                    continue
                entry = COLOCATION_PREFIX + target
            if entry not in fixed:
                fixed.append(entry)
        if fixed != entries:
            changes[index] = fixed
    if not changes:
        return graph_def
    result = copy_graph(graph_def)
    for index, fixed in changes.items():
        attrs = result.node[index].attr
        if fixed:
            del attrs["_class"].list.s[:]
            attrs["_class"].list.s.extend(fixed)
        else:
            del attrs["_class"]
    return result
