"""The one boolean grammar shared by transform params and command-line flags."""

import pytest

from serving_optimiser.booleans import parse_bool


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("TrUe", True), ("1", True), ("false", False), ("FALSE", False), ("0", False),
     ("yes", None), ("no", None), ("", None), ("01", None), (" true", None)],
)
def test_parse_bool(text, expected):
    assert parse_bool(text) is expected
