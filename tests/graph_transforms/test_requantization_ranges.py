"""freeze_requantization_ranges and its log parser: the old tool's scenario, percentiles, errors
and the C++ engine as oracle."""

import numpy as np
import pytest
import tensorflow as tf
from graph_helpers import (
    eight_bit_bias_add,
    have_oracle,
    max_error,
    nodes_by_name,
    op_counts,
    oracle_transform,
    requires_oracle,
)
from tensorflow.python.framework import tensor_util

from serving_optimiser.graph_transforms import TransformError, TransformGraph
from serving_optimiser.graph_transforms.transforms.requantization_ranges import parse_min_max_log

REQUANT_LOG = """Something unrelated
[SomePrefix] ;requantization_range_op__print__;__requant_min_max:[-2.4313571][10.584145]
"""


def write_log(tmp_path, text: str) -> str:
    path = tmp_path / "min_max.log"
    path.write_text(text)
    return str(path)


def test_freeze_requantization_ranges_replaces_the_range_op(tmp_path):
    graph = eight_bit_bias_add(lambda dequantize: None)
    log_file = write_log(tmp_path, REQUANT_LOG)
    transform = f'freeze_requantization_ranges(min_max_log_file="{log_file}")'
    frozen = TransformGraph(graph, [], ["dequantize_op"], [transform])
    nodes = nodes_by_name(frozen)
    assert "RequantizationRange" not in op_counts(frozen)
    requantize_inputs = list(nodes["requantize_op"].input)
    assert requantize_inputs[3:] == ["requantization_range_op/frozen_min:0", "requantization_range_op/frozen_max:0"]
    assert tensor_util.MakeNdarray(nodes["requantization_range_op/frozen_min"].attr["value"].tensor) == np.float32(
        -2.4313571)
    assert max_error(graph, frozen, ["dequantize_op"]) <= 0.5


@requires_oracle
def test_freeze_requantization_ranges_matches_the_oracle(tmp_path):
    graph = eight_bit_bias_add(lambda dequantize: None)
    transform = f'freeze_requantization_ranges(min_max_log_file="{write_log(tmp_path, REQUANT_LOG)}")'
    ours = TransformGraph(graph, [], ["dequantize_op"], [transform])
    oracle = oracle_transform(graph, [], ["dequantize_op"], [transform])
    assert sorted(ours.node, key=lambda n: n.name) == sorted(oracle.node, key=lambda n: n.name)


@pytest.mark.parametrize(
    ("line", "record"),
    [
        (";requantization_range_op__print__;__requant_min_max:[-2.4313571][10.584145]",
         ("requantization_range_op", np.float32(-2.4313571), np.float32(10.584145))),
        ("prefix;other_op__print__;__requant_min_max:[-1.0][2.0] trailing",
         ("other_op", -1.0, 2.0)),
        (";a__print__;__requant_min_max:[-1.bad][2.0]", None),
        (";a__print__;__requant_min_max:[1_0][2.0]", None),
        (";a__print__;__requant_min_max:[1][2][3]", None),
        (";a__print__;__requant_min_max:[1]]2]", None),
        (";a_print;__requant_min_max:[1][2]", None),
        ("a__print__;__requant_min_max:[1][2]", ("a", 1.0, 2.0)),
        ("__requant_min_max:[1][2]", None),
    ],
    ids=["reference", "second_node", "bad_number", "underscore_number", "three_values", "extra_bracket",
         "no_print_suffix", "name_first", "no_name_field"],
)
def test_min_max_log_parser(line, record):
    records = parse_min_max_log(f"junk line\n{line}\nmore junk")
    assert records == ([] if record is None else [(record[0], float(record[1]), float(record[2]))])


def twenty_records_log(tmp_path) -> str:
    return write_log(tmp_path, "\n".join(
        f";requantization_range_op__print__;__requant_min_max:[{-i}][{i}]" for i in range(1, 21)))


@pytest.mark.parametrize(
    ("percentiles", "expected"),
    [
        ("", (-19.0, 20.0)),
        ("min_percentile=0, max_percentile=0", (-20.0, 20.0)),
        ("min_percentile=50, max_percentile=50", (-10.0, 11.0)),
        ("min_percentile=2.5, max_percentile=7.5", (-19.0, 20.0)),
    ],
    ids=["defaults", "zero", "fifty", "rounding"],
)
def test_percentiles_pick_the_range(tmp_path, percentiles, expected):
    graph = eight_bit_bias_add(lambda dequantize: None)
    arguments = f'min_max_log_file="{twenty_records_log(tmp_path)}"' + (f", {percentiles}" if percentiles else "")
    transform = f"freeze_requantization_ranges({arguments})"
    frozen = nodes_by_name(TransformGraph(graph, [], ["dequantize_op"], [transform]))
    values = tuple(float(tensor_util.MakeNdarray(frozen[f"requantization_range_op/frozen_{k}"].attr["value"].tensor))
                   for k in ("min", "max"))
    assert values == expected
    if have_oracle():
        oracle = nodes_by_name(oracle_transform(graph, [], ["dequantize_op"], [transform]))
        assert oracle["requantization_range_op/frozen_min"] == frozen["requantization_range_op/frozen_min"]
        assert oracle["requantization_range_op/frozen_max"] == frozen["requantization_range_op/frozen_max"]


def test_out_of_range_percentiles_are_clamped(tmp_path):
    graph = eight_bit_bias_add(lambda dequantize: None)
    transform = (f'freeze_requantization_ranges(min_max_log_file="{twenty_records_log(tmp_path)}", '
                 "min_percentile=100, max_percentile=100)")
    frozen = nodes_by_name(TransformGraph(graph, [], ["dequantize_op"], [transform]))
    assert tensor_util.MakeNdarray(frozen["requantization_range_op/frozen_min"].attr["value"].tensor) == -1.0
    assert tensor_util.MakeNdarray(frozen["requantization_range_op/frozen_max"].attr["value"].tensor) == 1.0


def test_control_inputs_on_the_range_op_move_to_frozen_min(tmp_path):
    def tail(dequantize):
        with tf.control_dependencies([dequantize.op.graph.get_operation_by_name("requantization_range_op")]):
            tf.raw_ops.NoOp(name="after_range")

    graph = eight_bit_bias_add(tail)
    transform = f'freeze_requantization_ranges(min_max_log_file="{write_log(tmp_path, REQUANT_LOG)}")'
    frozen = TransformGraph(graph, [], ["dequantize_op", "after_range"], [transform])
    assert list(nodes_by_name(frozen)["after_range"].input) == ["^requantization_range_op/frozen_min"]


@pytest.mark.parametrize(
    ("log_text", "arguments", "message"),
    [
        (None, "", "you must pass a file name to min_max_log_file"),
        (None, 'min_max_log_file="/nonexistent/min_max.log"',
         "cannot read min_max_log_file '/nonexistent/min_max.log'"),
        ("nothing to see\n", "LOG", "no min/max range logs were found"),
        (";missing_op__print__;__requant_min_max:[1][2]\n", "LOG", "not in the graph: missing_op"),
        (";requantize_op__print__;__requant_min_max:[1][2]\n", "LOG",
         "node 'requantize_op' is a Requantize, expected a RequantizationRange"),
        (REQUANT_LOG, "LOG, min_percentile=low", "min_percentile='low' is not a number"),
    ],
    ids=["no_file_name", "missing_file", "no_records", "unknown_node", "wrong_op", "bad_percentile"],
)
def test_freeze_requantization_ranges_errors(tmp_path, log_text, arguments, message):
    graph = eight_bit_bias_add(lambda dequantize: None)
    if log_text is not None:
        arguments = arguments.replace("LOG", f'min_max_log_file="{write_log(tmp_path, log_text)}"')
    with pytest.raises(TransformError, match=f"freeze_requantization_ranges: .*{message}"):
        TransformGraph(graph, [], ["dequantize_op"], [f"freeze_requantization_ranges({arguments})"])
