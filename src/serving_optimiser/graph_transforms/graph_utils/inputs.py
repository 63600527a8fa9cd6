"""Input strings, ``[^]node[:port]``: splitting one into control marker, node name and port, and
writing the canonical ``name:0`` form, so that no transform parses names itself.
"""

from __future__ import annotations

from tensorflow.core.framework import node_def_pb2


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
