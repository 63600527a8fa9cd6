"""Debug logging: insert ``Print`` ops after chosen nodes so running the graph prints their values.

(The module is not called ``logging`` so that it cannot shadow the standard library.)
"""

from __future__ import annotations

from tensorflow.core.framework import graph_pb2

from ..context import TransformContext
from ..errors import TransformError
from ..graph_utils import lookup_op_def, make_node, new_graph_like, output_types, parse_input, rename_node_inputs
from ..registry import register

_SUFFIX = "__print__"
_REF_OFFSET = 100  # DT_X_REF == DT_X + 100


@register(
    "insert_logging",
    params={
        "op": "(repeatable; default: every op)", "prefix": "(repeatable; default: every name)", "show_op": "false",
        "show_name": "false", "message": '""', "first_n": "-1", "summarize": "1024",
    },
)
def insert_logging(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Log the consumed outputs of chosen nodes with a ``Print`` op.

    Matches: nodes with at least one output port that something reads (a ``^control``
    input counts as port 0), whose op is one of ``op`` (if given) and whose name starts
    with one of ``prefix`` (if given). Unread nodes (graph outputs) are never logged.
    Produces: right after each such node ``N``, ``Print`` ``N__print__`` with inputs
    [``N:0``, then ``N:p`` for each read port p ascending], T = type of output 0, U = the
    types of those read ports, message = (``;<Op>;`` if show_op) + (``;N__print__;`` if
    show_name) + ``message``, first_n, summarize. Every data reader of ``N``/``N:0`` reads
    ``N__print__:0`` instead; control inputs are untouched.
    Params: ``op`` (repeatable; all ops), ``prefix`` (repeatable; all names), ``show_op``
    (false), ``show_name`` (false), ``message`` (""), ``first_n`` (-1), ``summarize`` (1024).
    Errors: a node to log whose op TF does not know and the library does not define.
    Deliberate differences: U lists only the read ports' types (the C++ tool listed every
    output's type, which does not match Print's inputs for a multi-output node read on some
    ports, so the graph failed to load); nodes without outputs (NoOp read as ``^n``) and
    nodes whose logged outputs are ref-typed (v1 Variables) are skipped rather than given
    a broken Print.
    """
    ops = set(context.get_list("op"))
    prefixes = context.get_list("prefix")
    message = context.get_string("message", "")
    show_name = context.get_bool("show_name", False)
    show_op = context.get_bool("show_op", False)
    first_n = context.get_int("first_n", -1)
    summarize = context.get_int("summarize", 1024)

    read_ports: dict[str, set[int]] = {}
    for node in graph_def.node:
        for input_string in node.input:
            _, name, port = parse_input(input_string)
            read_ports.setdefault(name, set()).add(port)

    nodes = []
    renames: dict[str, str] = {}
    print_names: set[str] = set()
    for node in graph_def.node:
        nodes.append(node)
        ports = sorted(read_ports.get(node.name, ()))
        if not ports:
            continue
        if context.has("op") and node.op not in ops:
            continue
        if context.has("prefix") and not any(node.name.startswith(p) for p in prefixes):
            continue
        op_def = lookup_op_def(node.op, graph_def.library)
        if op_def is None:
            raise TransformError(
                f"insert_logging: node '{node.name}' has op '{node.op}', which is not registered in "
                "TensorFlow nor defined in the graph's function library, so its output types are unknown"
            )
        types = output_types(node, op_def)
        if not types or ports[-1] >= len(types):
            continue
        logged_types = [types[0]] + [types[p] for p in ports]
        if any(t > _REF_OFFSET for t in logged_types):
            continue
        print_name = node.name + _SUFFIX
        node_message = (f";{node.op};" if show_op else "") + (f";{print_name};" if show_name else "") + message
        print_node = make_node(
            "Print",
            print_name,
            [f"{node.name}:0"] + [f"{node.name}:{p}" for p in ports],
            {"message": node_message, "first_n": first_n, "summarize": summarize},
        )
        print_node.attr["T"].type = types[0]
        print_node.attr["U"].list.type.extend(logged_types[1:])
        nodes.append(print_node)
        print_names.add(print_name)
        renames[f"{node.name}:0"] = f"{print_name}:0"
    return rename_node_inputs(new_graph_like(graph_def, nodes), renames, nodes_to_ignore=print_names)
