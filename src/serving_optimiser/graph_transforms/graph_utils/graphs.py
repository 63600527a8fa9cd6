"""Whole-graph helpers: name -> node and node -> consumers maps, copies that keep the library and
versions, filtering, dangling inputs, reachability and the old tool's execution order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from tensorflow.core.framework import graph_pb2, node_def_pb2

from ..errors import TransformError
from ..op_sets import MERGE_OPS
from .inputs import node_name_from_input, parse_input


def node_map(graph_def: graph_pb2.GraphDef) -> dict[str, node_def_pb2.NodeDef]:
    """Name -> node. Duplicate names are an error: every transform relies on names being keys."""
    result: dict[str, node_def_pb2.NodeDef] = {}
    for node in graph_def.node:
        if node.name in result:
            raise TransformError(f"graph has two nodes named '{node.name}'")
        result[node.name] = node
    return result


def consumers_map(graph_def: graph_pb2.GraphDef) -> dict[str, list[node_def_pb2.NodeDef]]:
    """Node name -> nodes that read it (data or control), in graph order, each once per input."""
    result: dict[str, list[node_def_pb2.NodeDef]] = {node.name: [] for node in graph_def.node}
    for node in graph_def.node:
        for input_string in node.input:
            result.setdefault(node_name_from_input(input_string), []).append(node)
    return result


def new_graph_like(graph_def: graph_pb2.GraphDef, nodes: Iterable[node_def_pb2.NodeDef] = ()) -> graph_pb2.GraphDef:
    """A GraphDef with ``nodes`` and the library and versions of ``graph_def``.

    The C++ tool dropped ``versions``; keeping them means the result loads exactly as the
    input did (deliberate difference, see docs/differences.md).
    """
    result = graph_pb2.GraphDef()
    result.node.extend(nodes)
    if graph_def.HasField("library"):
        result.library.CopyFrom(graph_def.library)
    if graph_def.HasField("versions"):
        result.versions.CopyFrom(graph_def.versions)
    return result


def copy_graph(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    result = graph_pb2.GraphDef()
    result.CopyFrom(graph_def)
    return result


def filter_nodes(graph_def: graph_pb2.GraphDef, keep: Callable[[node_def_pb2.NodeDef], bool]) -> graph_pb2.GraphDef:
    return new_graph_like(graph_def, (node for node in graph_def.node if keep(node)))


def find_invalid_inputs(graph_def: graph_pb2.GraphDef) -> list[tuple[str, str]]:
    """(node, input) pairs whose input names a node that is not in the graph."""
    names = {node.name for node in graph_def.node}
    return [
        (node.name, input_string)
        for node in graph_def.node
        for input_string in node.input
        if node_name_from_input(input_string) not in names
    ]

def reachable_names(
    nodes: Mapping[str, node_def_pb2.NodeDef],
    roots: Iterable[str],
    stop_at: Iterable[str] = (),
    missing: list[str] | None = None,
) -> set[str]:
    """Names of the nodes ``roots`` (names or input strings) reach through data and control
    inputs, roots included.

    A node named in ``stop_at`` is included but its inputs are not followed: a fed input cuts
    the graph there, as a session feed does. Names missing from ``nodes`` are skipped; pass a
    list as ``missing`` to collect them (in the order met) and word the error yourself.
    """
    stops = {node_name_from_input(name) for name in stop_at}
    pending = [node_name_from_input(root) for root in roots]
    reachable: set[str] = set()
    absent: set[str] = set()
    while pending:
        name = pending.pop()
        if name in reachable or name in absent:
            continue
        if name not in nodes:
            absent.add(name)
            if missing is not None:
                missing.append(name)
            continue
        reachable.add(name)
        if name not in stops:
            pending.extend(node_name_from_input(i) for i in nodes[name].input)
    return reachable


def remove_unreachable(
    graph_def: graph_pb2.GraphDef, outputs: Iterable[str], keep: Iterable[str] = ()
) -> graph_pb2.GraphDef:
    """Keep only nodes the outputs (or ``keep`` names) reach, through data and control inputs."""
    reachable = reachable_names(node_map(graph_def), [*outputs, *keep])
    return filter_nodes(graph_def, lambda node: node.name in reachable)


def lowered_control_flow_nodes(graph_def: graph_pb2.GraphDef, conditionals: bool = True) -> set[str]:
    """Nodes of lowered while loops (each Enter, and what reads it up to its Exit) and, with
    ``conditionals``, of lowered conditional branches (each Switch, and what reads it up to its
    Merge): their tensors are one per iteration, or dead on the untaken branch."""
    readers: dict[str, list[node_def_pb2.NodeDef]] = {}
    for node in graph_def.node:
        for input_string in node.input:
            is_control, name, _ = parse_input(input_string)
            if not is_control:
                readers.setdefault(name, []).append(node)
    starts = [node for node in graph_def.node if node.op == "Enter" or (conditionals and node.op == "Switch")]
    inside = {node.name for node in starts}
    for start in starts:
        stop = ("Exit",) if start.op == "Enter" else ("Merge", "Exit")
        stack = [start.name]
        while stack:
            for reader in readers.get(stack.pop(), []):
                if reader.name not in inside and reader.op not in stop:
                    inside.add(reader.name)
                    stack.append(reader.name)
    return inside


# ---------------------------------------------------------------------------------------------
# Topological sort, exactly as the C++ SortByExecutionOrder
# ---------------------------------------------------------------------------------------------


def sort_by_execution_order(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    """Return the graph with nodes in the old tool's execution order.

    Kahn's algorithm with a LIFO ready list: the order decides which overlapping pattern
    matches win, so it must match the C++ tool exactly.
    """
    nodes = list(graph_def.node)
    index_of = {node.name: i for i, node in enumerate(nodes)}
    pending = []
    consumers: list[list[int]] = [[] for _ in nodes]
    for node in nodes:
        if node.op in MERGE_OPS:
            pending.append(sum(1 for i in node.input if i.startswith("^")) + 1)
        else:
            pending.append(len(node.input))
    for i, node in enumerate(nodes):
        for input_string in node.input:
            source = node_name_from_input(input_string)
            if source not in index_of:
                raise TransformError(f"Node '{node.name}': Unknown input node '{input_string}'")
            consumers[index_of[source]].append(i)
    ready = [i for i, count in enumerate(pending) if count == 0]
    order: list[int] = []
    while ready:
        current = ready.pop()
        order.append(current)
        for consumer in consumers[current]:
            pending[consumer] -= 1
            if pending[consumer] == 0:
                ready.append(consumer)
    if len(order) < len(nodes):
        raise TransformError(f"{len(nodes) - len(order)} nodes in a cycle")
    return new_graph_like(graph_def, (nodes[i] for i in order))
