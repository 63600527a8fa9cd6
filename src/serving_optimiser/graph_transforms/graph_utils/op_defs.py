"""Op definitions: a node's OpDef from the graph's function library or TF's op registry, and the
dtypes of its input and output arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tensorflow.core.framework import attr_value_pb2, function_pb2, node_def_pb2, op_def_pb2, types_pb2

from ..errors import TransformError


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
