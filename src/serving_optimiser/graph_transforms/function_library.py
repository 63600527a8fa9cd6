"""Running transforms on the function library: converting FunctionDef bodies to GraphDefs and
back, and the engine hook that applies an ``on_functions`` transform to every function body.

TF 2 graphs frozen with ``lower_control_flow=False`` keep their control flow as ``If`` /
``StatelessIf`` / ``While`` nodes whose branches and bodies live in ``graph_def.library``. The
old tool copied that library back unchanged after every transform, so nothing inside a branch
was ever optimised. Here a transform registered with ``on_functions=True`` is also run on each
function body, and the body is written back with the function's signature untouched.

A FunctionDef names tensors ``node:output_arg:index`` (``add:z:0``, ``split:output:1``) and
arguments by their bare name; a GraphDef names them ``node:port``. The conversion between the
two uses the OpDef of each node (or the signature of a library function called as an op) to
count how many tensors every output argument holds, like TensorFlow's
``function_def_to_graph_def``, but without needing the functions to be registered in a live
graph or eager context, and in both directions.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping

from tensorflow.core.framework import function_pb2, graph_pb2, node_def_pb2, op_def_pb2, types_pb2

from ..errors import UserError
from .context import TransformContext
from .errors import TransformError
from .graph_utils import (
    arg_types,
    find_invalid_inputs,
    library_signatures,
    lookup_op_def,
    node_name_from_input,
    parse_input,
)

log = logging.getLogger(__name__)


class UnconvertibleFunctionError(Exception):
    """A FunctionDef (or a transformed body) cannot be converted; the message says why."""


# ---------------------------------------------------------------------------------------------
# Output arguments -> flat ports
# ---------------------------------------------------------------------------------------------


def output_arg_sizes(node: node_def_pb2.NodeDef, signatures: Mapping[str, op_def_pb2.OpDef]) -> list[tuple[str, int]]:
    """(output arg name, number of tensors it holds) for each output arg of ``node``, in order."""
    op_def = lookup_op_def(node.op, signatures)
    if op_def is None:
        raise UnconvertibleFunctionError(f"op '{node.op}' is neither registered nor a library function")
    try:
        return [(name, len(types)) for name, types in arg_types(node, op_def, unresolved_type=types_pb2.DT_INVALID)]
    except TransformError as error:
        raise UnconvertibleFunctionError(str(error)) from None


def nested_to_flat_names(
    nodes: list[node_def_pb2.NodeDef], signatures: Mapping[str, op_def_pb2.OpDef]
) -> dict[str, str]:
    """``node:out_arg:i`` -> ``node:port`` for every output tensor of ``nodes``."""
    mapping = {}
    for node in nodes:
        port = 0
        for arg_name, count in output_arg_sizes(node, signatures):
            for index in range(count):
                mapping[f"{node.name}:{arg_name}:{index}"] = f"{node.name}:{port}"
                port += 1
    return mapping


# ---------------------------------------------------------------------------------------------
# FunctionDef <-> GraphDef
# ---------------------------------------------------------------------------------------------


def _check_monomorphic(fdef: function_pb2.FunctionDef) -> None:
    signature = fdef.signature
    if signature.attr:
        raise UnconvertibleFunctionError("it is polymorphic (its signature has attrs)")
    for arg in list(signature.input_arg) + list(signature.output_arg):
        if arg.type == types_pb2.DT_INVALID or arg.number_attr or arg.type_list_attr:
            raise UnconvertibleFunctionError(f"argument '{arg.name}' has no fixed single type")


def _arg_shape(fdef: function_pb2.FunctionDef, index: int):
    """The shape TensorFlow records for input arg ``index``, or None."""
    if index in fdef.arg_attr:
        attrs = fdef.arg_attr[index].attr
        if "_output_shapes" in attrs:
            value = attrs["_output_shapes"]
            if value.WhichOneof("value") == "list" and value.list.shape:
                return value.list.shape[0]
            if value.WhichOneof("value") == "shape":
                return value.shape
    if "_input_shapes" in fdef.attr:
        shapes = fdef.attr["_input_shapes"].list.shape
        if index < len(shapes):
            return shapes[index]
    return None


def function_to_graph_def(
    fdef: function_pb2.FunctionDef, library_graph: graph_pb2.GraphDef | None = None
) -> tuple[graph_pb2.GraphDef, dict[str, str]]:
    """A GraphDef of ``fdef``'s body, plus the map from its nested names to flat tensor names.

    Each input arg becomes a Placeholder named after it (dtype from the signature, shape from
    the recorded ``_output_shapes``/``_input_shapes`` if any, internal ``_`` arg attrs); body
    nodes keep their names and attrs; inputs are rewritten to ``node:port``. This is what
    TensorFlow's ``function_def_to_graph_def`` builds, without its need for the functions to
    be registered in the current graph or eager context. The result carries the library and versions of
    ``library_graph`` so transforms that run the graph can resolve nested function calls.
    The map also holds ``ret`` values of the function under their own (nested) strings.
    """
    _check_monomorphic(fdef)
    signatures = library_signatures(library_graph.library) if library_graph is not None else {}
    graph_def = graph_pb2.GraphDef()
    if library_graph is not None:
        graph_def.library.CopyFrom(library_graph.library)
        if library_graph.HasField("versions"):
            graph_def.versions.CopyFrom(library_graph.versions)
    arg_names = [arg.name for arg in fdef.signature.input_arg]
    body_names = {node.name for node in fdef.node_def}
    clashes = sorted(set(arg_names) & body_names)
    if clashes:
        raise UnconvertibleFunctionError(f"argument '{clashes[0]}' has the name of a body node")
    mapping: dict[str, str] = {}
    for index, arg in enumerate(fdef.signature.input_arg):
        placeholder = graph_def.node.add(name=arg.name, op="Placeholder")
        placeholder.attr["dtype"].type = arg.type
        shape = _arg_shape(fdef, index)
        if shape is not None:
            placeholder.attr["shape"].shape.CopyFrom(shape)
        if index in fdef.arg_attr:
            # Internal attrs (``_user_specified_name``...) go along, as TensorFlow does.
            for key, value in sorted(fdef.arg_attr[index].attr.items()):
                if key.startswith("_") and key != "_output_shapes":
                    placeholder.attr[key].CopyFrom(value)
        mapping[arg.name] = f"{arg.name}:0"
        mapping[f"^{arg.name}"] = f"^{arg.name}"
    mapping.update(nested_to_flat_names(list(fdef.node_def), signatures))
    for node in fdef.node_def:
        mapping[f"^{node.name}"] = f"^{node.name}"
    for node in fdef.node_def:
        new_node = graph_def.node.add()
        new_node.CopyFrom(node)
        del new_node.input[:]
        for input_string in node.input:
            if input_string not in mapping:
                raise UnconvertibleFunctionError(f"node '{node.name}' reads unknown tensor '{input_string}'")
            new_node.input.append(mapping[input_string])
    for ret_name, nested in fdef.ret.items():
        if nested not in mapping:
            raise UnconvertibleFunctionError(f"return value '{ret_name}' names unknown tensor '{nested}'")
    for ret_name, node_name in fdef.control_ret.items():
        if node_name not in body_names:
            raise UnconvertibleFunctionError(f"control return '{ret_name}' names unknown node '{node_name}'")
    return graph_def, mapping


def graph_def_to_function(
    fdef: function_pb2.FunctionDef,
    body: graph_pb2.GraphDef,
    ret_tensors: Mapping[str, str],
    library: function_pb2.FunctionDefLibrary,
) -> function_pb2.FunctionDef:
    """``fdef`` with its body replaced by ``body`` (a GraphDef as ``function_to_graph_def`` makes).

    ``ret_tensors`` maps each output arg name to the flat tensor (``node:port``) it returns.
    Nodes named after input args must be the arg Placeholders and are dropped; every other
    input string is rewritten to the nested form. Signature, attrs, arg attrs and control
    returns are kept; a control return or a returned tensor missing from ``body`` is an error.
    """
    arg_names = {arg.name for arg in fdef.signature.input_arg}
    signatures = library_signatures(library)
    body_nodes = []
    for node in body.node:
        if node.name in arg_names:
            if node.op != "Placeholder":
                raise UnconvertibleFunctionError(f"argument node '{node.name}' became a {node.op}")
            continue
        if node.op == "Placeholder":
            raise UnconvertibleFunctionError(f"body has a Placeholder '{node.name}' that is no argument")
        body_nodes.append(node)
    flat_to_nested = {flat: nested for nested, flat in nested_to_flat_names(body_nodes, signatures).items()}
    body_names = {node.name for node in body_nodes}

    def nested_name(flat: str, reader: str) -> str:
        is_control, name, port = parse_input(flat)
        if is_control:
            if name not in arg_names and name not in body_names:
                raise UnconvertibleFunctionError(f"'{reader}' has a control input on missing node '{name}'")
            return f"^{name}"
        if name in arg_names:
            if port != 0:
                raise UnconvertibleFunctionError(f"'{reader}' reads port {port} of argument '{name}'")
            return name
        key = f"{name}:{port}"
        if key not in flat_to_nested:
            raise UnconvertibleFunctionError(f"'{reader}' reads '{flat}', which does not exist")
        return flat_to_nested[key]

    result = function_pb2.FunctionDef()
    result.CopyFrom(fdef)
    del result.node_def[:]
    for node in body_nodes:
        new_node = result.node_def.add()
        new_node.CopyFrom(node)
        del new_node.input[:]
        new_node.input.extend(nested_name(i, node.name) for i in node.input)
    result.ret.clear()
    for arg in fdef.signature.output_arg:
        result.ret[arg.name] = nested_name(ret_tensors[arg.name], f"return value {arg.name}")
    missing = sorted(name for name in fdef.control_ret.values() if name not in body_names)
    if missing:
        raise UnconvertibleFunctionError(f"control return node '{missing[0]}' was removed")
    return result


# ---------------------------------------------------------------------------------------------
# The engine hook
# ---------------------------------------------------------------------------------------------


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def transform_function(
    fdef: function_pb2.FunctionDef, graph_def: graph_pb2.GraphDef, registered, context: TransformContext
) -> function_pb2.FunctionDef:
    """``fdef`` with ``registered.function`` applied to its body.

    Raises UnconvertibleFunctionError if the body cannot be converted either way.
    """
    body, mapping = function_to_graph_def(fdef, graph_def)
    ret_tensors = {arg.name: mapping[fdef.ret[arg.name]] for arg in fdef.signature.output_arg}
    input_names = [arg.name for arg in fdef.signature.input_arg]
    # The returned tensors' nodes and the control returns must survive, like graph outputs.
    output_names = _unique(
        [node_name_from_input(ret_tensors[arg.name]) for arg in fdef.signature.output_arg]
        + sorted(fdef.control_ret.values())
    )
    params = copy.deepcopy(context.params)
    body_context = TransformContext(context.transform, input_names, output_names, params)
    try:
        transformed = registered.function(body, body_context)
    except TransformError as error:
        raise UnconvertibleFunctionError(f"the transform failed on its body: {error}") from error
    invalid = find_invalid_inputs(transformed)
    if invalid:
        node, input_string = invalid[0]
        raise UnconvertibleFunctionError(
            f"the transformed body has a dangling input '{input_string}' on '{node}'"
        )
    result = graph_def_to_function(fdef, transformed, ret_tensors, graph_def.library)
    # The result must convert again exactly as a FunctionDef read from disk would.
    function_to_graph_def(result, graph_def)
    return result


def transform_library_functions(
    graph_def: graph_pb2.GraphDef, registered, context: TransformContext
) -> graph_pb2.GraphDef:
    """A copy of ``graph_def`` with ``registered.function`` applied to every function body.

    Functions are processed in name order, each against the library as it was on entry. Each
    gets a context whose ``input_names`` are its input args and whose ``output_names`` are
    the nodes its return values come from plus its control-return nodes; the transform's
    params are those of the main graph. The new body replaces the old one in place; the
    signature, ``ret`` keys, attrs, arg attrs and control returns are unchanged. A function
    that cannot be converted, or whose transformed body cannot be converted back, is left as
    it was and logged by name; the library is never left half-written.
    """
    result = graph_pb2.GraphDef()
    result.CopyFrom(graph_def)
    index_of = {function.signature.name: i for i, function in enumerate(graph_def.library.function)}
    for name in sorted(index_of):
        original = graph_def.library.function[index_of[name]]
        try:
            transformed = transform_function(original, graph_def, registered, context)
        except (UnconvertibleFunctionError, UserError) as error:
            # A body the transform cannot handle stays as it was; a bug still propagates.
            log.warning("%s: function '%s' left unchanged: %s", context.transform, name, error)
            continue
        if transformed != original:
            log.info(
                "%s: function '%s': %d -> %d nodes",
                context.transform, name, len(original.node_def), len(transformed.node_def),
            )
            result.library.function[index_of[name]].CopyFrom(transformed)
    return result
