"""TransformContext's typed getters: the old tool's defaults, one boolean grammar, and errors
that name the transform, the param and the bad value."""

import pytest

from serving_optimiser.graph_transforms import TransformContext, TransformError


def context(**params: list[str]) -> TransformContext:
    return TransformContext("round_weights", ["in"], ["out"], dict(params))


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("TRUE", True), ("True", True), ("1", True), ("false", False), ("False", False), ("0", False)],
)
def test_get_bool_takes_the_cpp_words_in_any_case(value, expected):
    assert context(flag=[value]).get_bool("flag", not expected) is expected


@pytest.mark.parametrize("value", ["yes", "no", "on", "", "2", " true"])
def test_get_bool_refuses_other_words(value):
    with pytest.raises(TransformError, match=f"round_weights: flag='{value}' is not a boolean"):
        context(flag=[value]).get_bool("flag", False)


def test_defaults_apply_when_a_param_is_absent():
    empty = context()
    assert empty.get_bool("flag", True) is True
    assert empty.get_int("num_steps", 256) == 256
    assert empty.get_float("fallback_min", -1.5) == -1.5
    assert empty.get_string("type", "float") == "float"
    assert empty.get_list("op") == []
    assert empty.count("op") == 0 and not empty.has("op")


def test_typed_values():
    values = context(num_steps=["16"], fallback_min=["-0.25"], op=["Identity", "CheckNumerics"])
    assert values.get_int("num_steps", 256) == 16
    assert values.get_float("fallback_min", 0.0) == -0.25
    assert values.get_list("op") == ["Identity", "CheckNumerics"]
    assert values.count("op") == 2 and values.has("op")


@pytest.mark.parametrize(
    ("params", "call", "message"),
    [
        ({"num_steps": ["abc"]}, lambda c: c.get_int("num_steps", 256), "num_steps='abc' is not an integer"),
        ({"num_steps": ["1.5"]}, lambda c: c.get_int("num_steps", 256), "num_steps='1.5' is not an integer"),
        ({"fallback_min": ["low"]}, lambda c: c.get_float("fallback_min", 0.0), "fallback_min='low' is not a number"),
        ({"num_steps": ["1", "2"]}, lambda c: c.get_int("num_steps", 256),
         "expected a single 'num_steps' parameter, but found 2 occurrences"),
        ({}, lambda c: c.get_string("op", required=True), "missing required parameter 'op'"),
    ],
    ids=["not-an-integer", "float-for-an-integer", "not-a-number", "repeated-single-param", "missing-required"],
)
def test_errors_name_the_transform_and_the_param(params, call, message):
    with pytest.raises(TransformError) as error:
        call(context(**params))
    assert str(error.value) == f"round_weights: {message}"
