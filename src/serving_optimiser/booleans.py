"""The one boolean grammar of params and flags: true/false/1/0 in any case, as the C++ tool's
``GetOneBoolParameter`` and TensorFlow's command-line flags read them."""

from __future__ import annotations

_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})
EXPECTED = "true, false, 1 or 0"


def parse_bool(text: str) -> bool | None:
    """``True`` or ``False`` for a boolean word, ``None`` for anything else.

    None instead of an exception because every caller words the error for its own context
    (a transform's param, a command-line flag, a params.yaml key).
    """
    value = text.lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return None
