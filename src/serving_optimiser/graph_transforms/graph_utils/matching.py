"""The old tool's op-type pattern matcher (``A|B`` alternatives, ``*`` wildcard, nested inputs)
and its replace helper, which keeps a match as it was when a replacement drops a node read from
outside it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

from tensorflow.core.framework import graph_pb2, node_def_pb2

from .graphs import consumers_map, new_graph_like, node_map, sort_by_execution_order
from .inputs import data_inputs, node_name_from_input


@dataclass
class OpTypePattern:
    """``op`` is ``*`` or ``A|B|C``; ``inputs`` are child patterns for the non-control inputs."""

    op: str
    inputs: list[OpTypePattern] = field(default_factory=list)

    def matches_op(self, op: str) -> bool:
        return self.op == "*" or op in self.op.split("|")


def pattern(op: str, *inputs: OpTypePattern) -> OpTypePattern:
    """Shorthand: ``pattern("Mul", pattern("Conv2D|MatMul", ANY, CONST), CONST)``."""
    return OpTypePattern(op, list(inputs))


@dataclass
class NodeMatch:
    node: node_def_pb2.NodeDef
    inputs: list[NodeMatch] = field(default_factory=list)

    def all_nodes(self) -> list[node_def_pb2.NodeDef]:
        """Matched nodes breadth-first from the root, each once (the C++ MatchedNodesAsArray)."""
        found: set[str] = set()
        result = []
        current = [self]
        while current:
            following = []
            for match in current:
                if match.node.name in found:
                    continue
                found.add(match.node.name)
                result.append(match.node)
                following.extend(match.inputs)
            current = following
        return result

    def names(self) -> set[str]:
        return {node.name for node in self.all_nodes()}


class GraphMatcher:
    """Finds non-overlapping matches of a pattern, walking nodes in execution order."""

    def __init__(self, graph_def: graph_pb2.GraphDef):
        self.sorted_graph = sort_by_execution_order(graph_def)
        self.nodes = node_map(self.sorted_graph)

    def matches(self, op_pattern: OpTypePattern) -> list[NodeMatch]:
        matched: set[str] = set()
        result = []
        for node in self.sorted_graph.node:
            if node.name in matched:
                continue
            match = self._match(node, op_pattern, matched)
            if match is not None:
                matched |= match.names()
                result.append(match)
        return result

    def _match(self, node: node_def_pb2.NodeDef, op_pattern: OpTypePattern, matched: set[str]) -> NodeMatch | None:
        if node.name in matched or not op_pattern.matches_op(node.op):
            return None
        match = NodeMatch(node)
        if not op_pattern.inputs:
            return match
        inputs = data_inputs(node)
        if len(inputs) != len(op_pattern.inputs):
            return None
        for input_string, input_pattern in zip(inputs, op_pattern.inputs):
            input_node = self.nodes.get(node_name_from_input(input_string))
            if input_node is None:
                return None
            input_match = self._match(input_node, input_pattern, matched)
            if input_match is None:
                return None
            match.inputs.append(input_match)
        return match


ReplacementGenerator = Callable[[NodeMatch, set[str], set[str]], list[node_def_pb2.NodeDef]]


def replace_matching_op_types(
    graph_def: graph_pb2.GraphDef,
    op_pattern: OpTypePattern,
    generator: ReplacementGenerator,
    allow_inconsistencies: bool = False,
) -> tuple[graph_pb2.GraphDef, int]:
    """Replace every match of ``op_pattern`` by the nodes ``generator`` returns.

    ``generator(match, input_nodes, output_nodes)`` gets the names of matched nodes fed from
    outside the match and of those read from outside it. Unless ``allow_inconsistencies``, a
    replacement that drops an externally read node is cancelled and the match is kept as it
    was. New nodes go where the match root was in the original order. Returns the new graph
    and how many matches were replaced.
    """
    matches = GraphMatcher(graph_def).matches(op_pattern)
    by_root = {match.node.name: match for match in matches}
    matched_names: set[str] = set()
    for match in matches:
        matched_names |= match.names()
    consumers = consumers_map(graph_def)
    output_nodes_list: list[node_def_pb2.NodeDef] = []
    replaced = 0
    for node in graph_def.node:
        match = by_root.get(node.name)
        if match is None:
            if node.name not in matched_names:
                output_nodes_list.append(node)
            continue
        match_nodes = {n.name: n for n in match.all_nodes()}
        input_nodes = {
            n.name for n in match_nodes.values() if any(node_name_from_input(i) not in match_nodes for i in n.input)
        }
        output_nodes = {
            name
            for name in match_nodes
            if any(consumer.name not in match_nodes for consumer in consumers.get(name, []))
        }
        new_nodes = [copy.deepcopy(n) for n in generator(match, input_nodes, output_nodes)]
        new_names = {n.name for n in new_nodes}
        if not allow_inconsistencies and not output_nodes <= new_names:
            output_nodes_list.extend(copy.deepcopy(n) for n in match.all_nodes())
        else:
            output_nodes_list.extend(new_nodes)
            replaced += 1
    return new_graph_like(graph_def, output_nodes_list), replaced
