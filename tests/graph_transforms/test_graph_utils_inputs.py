"""graph_utils.inputs: splitting input strings into control marker, node name and port, the
canonical ``name:0`` form, and a node's data and control inputs."""

import pytest

from serving_optimiser.graph_transforms.graph_utils import make_node
from serving_optimiser.graph_transforms.graph_utils.inputs import (
    canonical_input_name,
    control_inputs,
    data_inputs,
    is_control_input,
    node_name_from_input,
    parse_input,
    tensor_name,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x", (False, "x", 0)),
        ("x:2", (False, "x", 2)),
        ("^x", (True, "x", 0)),
        ("^x:1", (True, "x", 1)),
        ("scope/a:b", (False, "scope/a:b", 0)),
        ("scope/a:b:3", (False, "scope/a:b", 3)),
    ],
    ids=["bare", "port", "control", "control-port", "colon-in-name", "colon-in-name-and-port"],
)
def test_parse_input(text, expected):
    assert parse_input(text) == expected
    assert node_name_from_input(text) == expected[1]
    assert is_control_input(text) == expected[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("x", "x:0"), ("x:0", "x:0"), ("^x", "^x:0"), ("x:1", "x:1"), ("scope/a:b", "scope/a:b:0")],
    ids=["bare", "explicit-port-0", "control", "port-1", "colon-in-name"],
)
def test_canonical_input_name(text, expected):
    assert canonical_input_name(text) == expected


def test_tensor_name_omits_port_0():
    assert [tensor_name("split"), tensor_name("split", 0), tensor_name("split", 2)] == ["split", "split", "split:2"]


def test_data_and_control_inputs_keep_their_order():
    node = make_node("AddN", "sum", ["a", "^wait_first", "b:1", "^wait_second"])
    assert data_inputs(node) == ["a", "b:1"]
    assert control_inputs(node) == ["^wait_first", "^wait_second"]
