"""GraphDef helpers shared by every transform: input-name parsing, node maps, Const <-> array,
the old tool's topological sort, its op-type pattern matcher and its replace/rename helpers.

Transforms never parse input strings themselves; they use the functions here so that the
subtle conventions of the C++ tool (``^ctrl``, ``name:port``, canonical ``name:0``) live in
one place.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from tensorflow.core.framework import (
    attr_value_pb2,
    function_pb2,
    graph_pb2,
    node_def_pb2,
    op_def_pb2,
    tensor_pb2,
    types_pb2,
)
from tensorflow.python.framework import tensor_util

from .errors import TransformError
from .op_sets import MERGE_OPS

# ---------------------------------------------------------------------------------------------
# Input strings: "[^]node[:port]"
# ---------------------------------------------------------------------------------------------


def parse_input(input_string: str) -> tuple[bool, str, int]:
    """Split an input string into (is_control, node_name, port).

    Like the C++ ``NodeNamePartsFromInput``: a missing port is 0, and only a trailing
    ``:<digits>`` counts as a port, so names containing other colons survive.
    """
    is_control = input_string.startswith("^")
    name = input_string[1:] if is_control else input_string
    port = 0
    head, sep, tail = name.rpartition(":")
    if sep and tail.isdigit():
        name, port = head, int(tail)
    return is_control, name, port


def node_name_from_input(input_string: str) -> str:
    """The node name an input string refers to, without ``^`` or ``:port``."""
    return parse_input(input_string)[1]


def is_control_input(input_string: str) -> bool:
    return input_string.startswith("^")


def canonical_input_name(input_string: str) -> str:
    """``x`` -> ``x:0``, ``^x`` -> ``^x:0``, ``x:1`` unchanged."""
    is_control, name, port = parse_input(input_string)
    return f"{'^' if is_control else ''}{name}:{port}"


def tensor_name(node_name: str, port: int = 0) -> str:
    """How a data input to ``port`` of ``node_name`` is written (port 0 omitted)."""
    return node_name if port == 0 else f"{node_name}:{port}"


def data_inputs(node: node_def_pb2.NodeDef) -> list[str]:
    return [i for i in node.input if not i.startswith("^")]


def control_inputs(node: node_def_pb2.NodeDef) -> list[str]:
    return [i for i in node.input if i.startswith("^")]


# ---------------------------------------------------------------------------------------------
# Maps and copies
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Const nodes <-> numpy arrays
# ---------------------------------------------------------------------------------------------


def const_value(node: node_def_pb2.NodeDef) -> np.ndarray:
    """The numpy value of a Const node (error naming the node if it has none)."""
    if node.op != "Const" or "value" not in node.attr:
        raise TransformError(f"node '{node.name}' ({node.op}) is not a Const with a value")
    return tensor_util.MakeNdarray(node.attr["value"].tensor)


def make_const_node(
    name: str, value: np.ndarray | float | int, dtype: int | None = None, device: str = ""
) -> node_def_pb2.NodeDef:
    """A Const with only ``dtype`` and ``value`` attrs, as the C++ tool built them."""
    array = np.asarray(value)
    tensor = tensor_util.make_tensor_proto(array, dtype=dtype, shape=array.shape)
    node = node_def_pb2.NodeDef(name=name, op="Const")
    if device:
        node.device = device
    node.attr["dtype"].type = tensor.dtype
    node.attr["value"].tensor.CopyFrom(tensor)
    return node


def make_tensor_proto(value: np.ndarray, dtype: int | None = None) -> tensor_pb2.TensorProto:
    array = np.asarray(value)
    return tensor_util.make_tensor_proto(array, dtype=dtype, shape=array.shape)


def make_node(
    op: str, name: str, inputs: Sequence[str] = (), attrs: dict | None = None, device: str = ""
) -> node_def_pb2.NodeDef:
    """A NodeDef from plain values: attrs given as ints are dtypes only for keys in DTYPE_ATTRS."""
    node = node_def_pb2.NodeDef(op=op, name=name, input=list(inputs), device=device)
    for key, value in (attrs or {}).items():
        set_attr(node, key, value)
    return node


DTYPE_ATTRS = frozenset(
    {
        "T",
        "dtype",
        "DstT",
        "SrcT",
        "Tidx",
        "Tinput",
        "Tfilter",
        "out_type",
        "Toutput",
        "T1",
        "T2",
        "Tpaddings",
        "Tshape",
        "Tblock_shape",
        "Tcrops",
        "U",
        "Tkey",
        "Tval",
        "Tin",
        "Tout",
        "Tactivation",
        "Tindices",
        "Tparams",
        "Taxis",
        "Tmultiples",
        "TI",
    }
)


def set_attr(node: node_def_pb2.NodeDef, key: str, value) -> None:
    """Set an attr from a Python value, a DType enum (for dtype keys) or an AttrValue."""
    attr = node.attr[key]
    if isinstance(value, attr_value_pb2.AttrValue):
        attr.CopyFrom(value)
    elif isinstance(value, bool):
        attr.b = value
    elif isinstance(value, int) and key in DTYPE_ATTRS:
        attr.type = value
    elif isinstance(value, int):
        attr.i = value
    elif isinstance(value, float):
        attr.f = value
    elif isinstance(value, str):
        attr.s = value.encode()
    elif isinstance(value, bytes):
        attr.s = value
    elif isinstance(value, tensor_pb2.TensorProto):
        attr.tensor.CopyFrom(value)
    elif isinstance(value, (list, tuple)):
        if all(isinstance(v, bool) for v in value):
            attr.list.b.extend(value)
        elif all(isinstance(v, int) for v in value) and key in DTYPE_ATTRS | {"U"}:
            attr.list.type.extend(value)
        elif all(isinstance(v, int) for v in value):
            attr.list.i.extend(value)
        elif all(isinstance(v, float) for v in value):
            attr.list.f.extend(value)
        else:
            attr.list.s.extend(v.encode() if isinstance(v, str) else v for v in value)
    else:
        raise TypeError(f"cannot store {value!r} in attr '{key}'")


def dtype_name(dtype_enum: int) -> str:
    """TF's lowercase type name, as the old tool printed it (``float``, ``int32``)."""
    if dtype_enum == types_pb2.DT_INVALID:
        return "invalid"
    from tensorflow.python.framework import dtypes

    try:
        return dtypes.as_dtype(dtype_enum).name
    except TypeError:
        return f"unknown({dtype_enum})"


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


# ---------------------------------------------------------------------------------------------
# Pattern matching
# ---------------------------------------------------------------------------------------------


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


def rename_node_inputs(
    graph_def: graph_pb2.GraphDef, renames: dict[str, str], nodes_to_ignore: Iterable[str] = ()
) -> graph_pb2.GraphDef:
    """Rewrite inputs through ``renames`` (``from -> to``), following chains.

    A ``from`` ending in ``:*`` renames the node whatever the port, keeping the input's own
    ``^`` and ``:port``; otherwise canonical forms must match and the input becomes ``to``.
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
                is_control, name, _ = parse_input(current)
                replacement = None
                for source, target in by_node.get(name, []):
                    if source.endswith(":*"):
                        prefix = "^" if is_control else ""
                        suffix = current[len(prefix) + len(name) :]
                        replacement = f"{prefix}{target}{suffix}"
                        break
                    if canonical_input_name(source) == canonical_input_name(current):
                        replacement = target
                        break
                if replacement is None or replacement == current:
                    break
                if name in visited:
                    raise TransformError(f"RenameNodeInputs argument contains a cycle for {name}")
                visited.add(name)
                current = replacement
            new_inputs.append(current)
        del node.input[:]
        node.input.extend(new_inputs)
    return result


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


# ---------------------------------------------------------------------------------------------
# Op definitions: the graph's function library, then TF's op registry
# ---------------------------------------------------------------------------------------------


def library_signatures(library: function_pb2.FunctionDefLibrary) -> dict[str, op_def_pb2.OpDef]:
    """Function name -> signature, for nodes that call a library function as their op."""
    return {function.signature.name: function.signature for function in library.function}


def lookup_op_def(
    op: str, library: function_pb2.FunctionDefLibrary | Mapping[str, op_def_pb2.OpDef] | None = None
) -> op_def_pb2.OpDef | None:
    """The OpDef of ``op``: a library function's signature first, else TF's op registry.

    The library comes first because that is how TensorFlow resolves a node's op
    (``FunctionLibraryDefinition::LookUp``); TF refuses a function named like a registered op,
    so the order only matters for graphs TF would not load. ``library`` is a
    FunctionDefLibrary or a name -> signature map from ``library_signatures`` (cheaper when
    looking up many nodes). Returns None when neither knows the op (callers raise with their
    own context).
    """
    from tensorflow.python.framework import op_def_registry

    if library is not None:
        signatures = library_signatures(library) if isinstance(library, function_pb2.FunctionDefLibrary) else library
        if op in signatures:
            return signatures[op]
    return op_def_registry.get(op)


def arg_types(
    node: node_def_pb2.NodeDef,
    op_def: op_def_pb2.OpDef,
    args: Iterable[op_def_pb2.OpDef.ArgDef] | None = None,
    unresolved_type: int | None = None,
) -> list[tuple[str, list[int]]]:
    """(arg name, dtypes of the tensors it holds) for each of ``args`` of ``node``.

    ``args`` defaults to the OpDef's output args; pass ``op_def.input_arg`` for the inputs.
    Type attrs, ``number_attr`` repeats and ``type_list_attr`` lists are read from the node,
    falling back to the OpDef's defaults; ref types are kept (``DT_X_REF``). Raises
    TransformError when one cannot be resolved, except that a missing single-type attr gives
    ``unresolved_type`` when that is set: counting tensors (to number ports) needs no types.
    """
    defaults = {attr.name: attr.default_value for attr in op_def.attr if attr.HasField("default_value")}

    def attr_value(key: str) -> attr_value_pb2.AttrValue:
        if key in node.attr:
            return node.attr[key]
        if key in defaults:
            return defaults[key]
        raise TransformError(f"node '{node.name}' ({node.op}) has no attr '{key}' to type its arguments")

    result: list[tuple[str, list[int]]] = []
    for arg in op_def.output_arg if args is None else args:
        if arg.type_list_attr:
            types = list(attr_value(arg.type_list_attr).list.type)
        else:
            if arg.type == types_pb2.DT_INVALID and not arg.type_attr:
                raise TransformError(f"argument '{arg.name}' of op '{op_def.name}' has no type")
            if arg.type:
                base = arg.type
            elif unresolved_type is not None and arg.type_attr not in node.attr and arg.type_attr not in defaults:
                base = unresolved_type
            else:
                base = attr_value(arg.type_attr).type
            count = attr_value(arg.number_attr).i if arg.number_attr else 1
            types = [base] * count
        if arg.is_ref:
            types = [t + 100 if 0 < t < 100 else t for t in types]  # DT_X_REF == DT_X + 100
        result.append((arg.name, types))
    return result


def output_types(node: node_def_pb2.NodeDef, op_def: op_def_pb2.OpDef) -> list[int]:
    """The dtype of every output of ``node``, port by port (see ``arg_types``)."""
    return [dtype for _, types in arg_types(node, op_def) for dtype in types]
