"""The transform-string parser, case by case: what each string parses to, and where each
malformed one fails."""

import pytest

from serving_optimiser.graph_transforms import TransformError
from serving_optimiser.graph_transforms.parser import parse_transforms


def parsed(text: str) -> list[tuple[str, dict[str, list[str]]]]:
    return [(t.name, t.params) for t in parse_transforms(text)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("   \n\t ", []),
        ("fold_constants", [("fold_constants", {})]),
        ("fold_constants()", [("fold_constants", {})]),
        ("fold_constants( )", [("fold_constants", {})]),
        ("a b  c", [("a", {}), ("b", {}), ("c", {})]),
        ("round_weights(num_steps=256)", [("round_weights", {"num_steps": ["256"]})]),
        ("f(a=1, b=x.y/z-2)", [("f", {"a": ["1"], "b": ["x.y/z-2"]})]),
        ("remove_nodes(op=Identity, op=CheckNumerics)", [("remove_nodes", {"op": ["Identity", "CheckNumerics"]})]),
        ('strip_unused_nodes(shape="1,299,299,3")', [("strip_unused_nodes", {"shape": ["1,299,299,3"]})]),
        ('f(old="a:0", new="b c")', [("f", {"old": ["a:0"], "new": ["b c"]})]),
        ('f(a="")', [("f", {"a": [""]})]),
        ("f(a=1,\n   b=2)\ng", [("f", {"a": ["1"], "b": ["2"]}), ("g", {})]),
        ("fold_constants \\\n quantize_weights", [("fold_constants", {}), ("quantize_weights", {})]),
        ("f(a=1, \\\n b=2) \\\r\n g \\\n", [("f", {"a": ["1"], "b": ["2"]}), ("g", {})]),
        ('f(a="x\\\\\ny")', [("f", {"a": ["x\\\\\ny"]})]),
    ],
    ids=[
        "empty", "only-spaces", "bare-name", "empty-parens", "spaced-empty-parens", "several-names",
        "one-param", "bare-value-characters", "repeated-key", "quoted-commas", "quoted-colon-and-space",
        "empty-quoted-value", "newlines", "backslash-newline-between-names", "backslash-newline-in-params",
        "backslash-newline-inside-quotes-kept",
    ],
)
def test_parses(text, expected):
    assert parsed(text) == expected


def test_positions_point_at_names():
    assert [t.position for t in parse_transforms("ab  cd(x=1) \\\n ef")] == [0, 4, 15]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("(a=1)", "at position 0: looking for a transform name, but found '(a=1)'"),
        ("f g!", "at position 3: looking for '(' or a space after transform name 'g', but found '!'"),
        ("f(=1)", "at position 2: looking for a parameter name for 'f', but found '=1)'"),
        ("f(a 1)", "at position 3: looking for '=' after parameter 'a' of 'f', but found ' 1)'"),
        ("f(a=)", "at position 4: looking for a value for parameter 'a' (quote it if it has spaces, commas or colons)"),
        ("f(a=1:2)", "at position 5: looking for ',' or ')', but found ':2)'"),
        ("f(a=1 , b=2)", "at position 5: looking for ',' or ')', but found ' , b=2)'"),
        ("f(a=1", "'(' at position 1 is never closed"),
        ("f(a=1,", "'(' at position 1 is never closed"),
        ('f(a="1)', "quote at position 4 is never closed"),
        ("f \\ g", "at position 2: looking for a transform name, but found '\\ g'"),
    ],
    ids=[
        "no-name", "bad-character-after-name", "missing-param-name", "missing-equals", "missing-value",
        "unquoted-colon", "space-before-comma", "unclosed-paren", "unclosed-after-comma", "unclosed-quote",
        "backslash-without-newline",
    ],
)
def test_malformed_strings_name_the_position_and_quote_the_text(text, message):
    with pytest.raises(TransformError) as error:
        parse_transforms(text)
    assert message in str(error.value)
    assert f"'{text}'" in str(error.value)
