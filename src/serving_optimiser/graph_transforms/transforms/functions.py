"""Function-call transforms: inline_partitionedcall replaces PartitionedCall nodes by the body
of the function they call."""

from __future__ import annotations

from tensorflow.core.framework import attr_value_pb2, graph_pb2, node_def_pb2

from ..context import TransformContext
from ..errors import TransformError
from ..function_library import UnconvertibleFunctionError, nested_to_flat_names
from ..graph_utils import (
    canonical_input_name,
    control_inputs,
    data_inputs,
    library_signatures,
    new_graph_like,
    node_name_from_input,
    parse_input,
)
from ..registry import register

# Nested calls are inlined round by round; this many rounds means the functions recurse.
MAX_ROUNDS = 64


@register("inline_partitionedcall", on_functions=True)
def inline_partitionedcall(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Replace every ``PartitionedCall`` by the nodes of the function it calls.

    Matches: ``PartitionedCall`` nodes (not ``StatefulPartitionedCall``) whose ``f`` names a
    function of the library; a missing ``f``, an ``f`` that is not a function, a function
    missing from the library, or a data-input count different from the function's input args
    is an error naming the node.
    Produces: each body node copied as ``<call>/<node>``; a body input naming an input arg
    becomes the call's matching input, any other becomes ``<call>/<node>:<port>``. Every
    ``<call>:k`` elsewhere in the graph becomes the tensor the function returns as output k.
    The call node vanishes; the library is kept as it was.
    Params: none.
    Differs from the C++ tool:
    - ports come from the producing op's OpDef (``Unique:idx:0`` is ``Unique:1``); the C++
      tool kept the index within the output arg (``Unique:0``, the wrong tensor);
    - control inputs inside the body (``^node``) become ``^<call>/node``, the call's own
      control inputs are added to the inlined nodes that read nothing inlined, and a graph
      reading ``^<call>`` or naming the call as an output gets a node under the call's name
      (``NoOp``, or ``IdentityN`` of the outputs for an output), where the C++ tool left
      dangling inputs or counted control inputs as arguments;
    - a function returning one of its args directly returns the call's input;
    - calls nested inside the inlined bodies are inlined as well, and, with the engine's
      ``on_functions``, calls inside library function bodies too;
    - an inlined name that clashes with an existing node is an error (C++ made duplicates).
    """
    current = graph_def
    for _ in range(MAX_ROUNDS):
        if not any(node.op == "PartitionedCall" for node in current.node):
            return current
        current = _inline_once(current, context)
    raise TransformError(
        f"inline_partitionedcall: PartitionedCall nodes remain after {MAX_ROUNDS} rounds of inlining "
        "(do the functions call themselves?)"
    )


def _function_name(node: node_def_pb2.NodeDef) -> str:
    if "f" not in node.attr:
        raise TransformError(f"inline_partitionedcall: node '{node.name}' has no attribute 'f'")
    if node.attr["f"].WhichOneof("value") != "func":
        raise TransformError(f"inline_partitionedcall: attribute 'f' of node '{node.name}' is not a function")
    return node.attr["f"].func.name


class _Inlined:
    """The nodes replacing one call and how the call's outputs are now spelled."""

    def __init__(self, nodes: list[node_def_pb2.NodeDef], outputs: list[str], out_types: list[int]):
        self.nodes = nodes
        self.outputs = outputs
        self.out_types = out_types


def _inline_call(
    call: node_def_pb2.NodeDef, graph_def: graph_pb2.GraphDef, signatures, protected: set[str]
) -> _Inlined:
    function_name = _function_name(call)
    functions = {function.signature.name: function for function in graph_def.library.function}
    if function_name not in functions:
        raise TransformError(
            f"inline_partitionedcall: node '{call.name}' calls function '{function_name}', "
            "which is not in the library"
        )
    fdef = functions[function_name]
    signature = fdef.signature
    if signature.attr:
        raise TransformError(
            f"inline_partitionedcall: function '{function_name}' called by '{call.name}' is polymorphic"
        )
    call_inputs = data_inputs(call)
    if len(call_inputs) != len(signature.input_arg):
        raise TransformError(
            f"inline_partitionedcall: node '{call.name}' passes {len(call_inputs)} inputs to "
            f"'{function_name}', which takes {len(signature.input_arg)}"
        )
    prefix = call.name
    args = {arg.name: source for arg, source in zip(signature.input_arg, call_inputs, strict=True)}
    try:
        flat = nested_to_flat_names(list(fdef.node_def), signatures)
    except UnconvertibleFunctionError as error:
        raise TransformError(f"inline_partitionedcall: function '{function_name}': {error}") from None
    body_names = {node.name for node in fdef.node_def}

    def outer(input_string: str, reader: str) -> str:
        is_control, name, _ = parse_input(input_string)
        if is_control:
            if name in args:
                return f"^{node_name_from_input(args[name])}"
            if name in body_names:
                return f"^{prefix}/{name}"
        elif input_string in args:
            return args[input_string]
        elif input_string in flat:
            node_name, port = flat[input_string].rsplit(":", 1)
            return f"{prefix}/{node_name}:{port}"
        raise TransformError(
            f"inline_partitionedcall: node '{reader}' of function '{function_name}' reads "
            f"unknown tensor '{input_string}'"
        )

    call_controls = control_inputs(call)
    nodes = []
    for body_node in fdef.node_def:
        node = node_def_pb2.NodeDef()
        node.CopyFrom(body_node)
        node.name = f"{prefix}/{body_node.name}"
        del node.input[:]
        node.input.extend(outer(i, body_node.name) for i in body_node.input)
        # Function-style inputs are "node:out_arg:i": the node name is what precedes the first colon.
        if not any(i.lstrip("^").split(":")[0] in body_names for i in body_node.input):
            # Whatever the call waited for, the body's first nodes must wait for too.
            node.input.extend(c for c in call_controls if c not in node.input)
        nodes.append(node)
    outputs = [outer(fdef.ret[arg.name], f"return value {arg.name}") for arg in signature.output_arg]
    out_types = [arg.type for arg in signature.output_arg]
    needs_stand_in = call.name in protected
    if needs_stand_in or any(f"^{call.name}" in n.input for n in graph_def.node):
        done = [f"^{node_name_from_input(o)}" for o in outputs]
        done += [f"^{prefix}/{name}" for name in sorted(fdef.control_ret.values())]
        if not outputs and not done:
            done = list(call_controls)
        nodes.append(_stand_in(call.name, outputs if needs_stand_in else [], out_types, done))
    return _Inlined(nodes, outputs, out_types)


def _stand_in(
    name: str, outputs: list[str], out_types: list[int], controls: list[str]
) -> node_def_pb2.NodeDef:
    """A node under the call's name: IdentityN of its outputs, or a NoOp that waits for them."""
    unique_controls = list(dict.fromkeys(controls))
    if outputs:
        node = node_def_pb2.NodeDef(
            name=name, op="IdentityN", input=_without_duplicate_controls(outputs + unique_controls)
        )
        node.attr["T"].CopyFrom(attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(type=out_types)))
        return node
    return node_def_pb2.NodeDef(name=name, op="NoOp", input=unique_controls)


def _inline_once(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    signatures = library_signatures(graph_def.library)
    protected = {node_name_from_input(name) for name in context.output_names}
    new_nodes: list[node_def_pb2.NodeDef] = []
    remap: dict[str, str] = {}
    output_counts: dict[str, int] = {}
    for node in graph_def.node:
        if node.op != "PartitionedCall":
            new_nodes.append(node)
            continue
        inlined = _inline_call(node, graph_def, signatures, protected)
        new_nodes.extend(inlined.nodes)
        output_counts[node.name] = len(inlined.outputs)
        for port, tensor in enumerate(inlined.outputs):
            remap[f"{node.name}:{port}"] = tensor
    seen: set[str] = set()
    for node in new_nodes:
        if node.name in seen:
            raise TransformError(
                f"inline_partitionedcall: inlining would create a second node named '{node.name}'"
            )
        seen.add(node.name)
    result = new_graph_like(graph_def, new_nodes)
    for node in result.node:
        new_inputs = [_resolve(i, node.name, remap, output_counts) for i in node.input]
        if new_inputs != list(node.input):
            del node.input[:]
            node.input.extend(_without_duplicate_controls(new_inputs))
    return result


def _resolve(input_string: str, reader: str, remap: dict[str, str], output_counts: dict[str, int]) -> str:
    """Follow ``<call>:k`` to the tensor now computing it (a call may return another call's output)."""
    while True:
        is_control, name, port = parse_input(input_string)
        if is_control or name not in output_counts:
            return input_string
        if port >= output_counts[name]:
            raise TransformError(
                f"inline_partitionedcall: node '{reader}' reads '{input_string}', but the call has "
                f"{output_counts[name]} outputs"
            )
        input_string = remap[canonical_input_name(input_string)]


def _without_duplicate_controls(inputs: list[str]) -> list[str]:
    """Drop a ``^x`` that repeats another control input or names a data input's node."""
    data_nodes = {node_name_from_input(i) for i in inputs if not i.startswith("^")}
    result, seen = [], set()
    for input_string in inputs:
        if input_string.startswith("^"):
            if input_string[1:] in data_nodes or input_string in seen:
                continue
            seen.add(input_string)
        result.append(input_string)
    return result
