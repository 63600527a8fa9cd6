"""Parser for the old Graph Transform Tool's transform strings, such as
``fold_constants(ignore_errors=true) strip_unused_nodes(type=float, shape="1,299,299,3")``.

It follows the C++ scanner token for token (see docs/differences.md for the two places where
it is stricter: unterminated strings and unbalanced parentheses are errors here, and the one
where it is more lenient: a backslash-newline counts as a space, because strings pasted from
old multi-line shell examples keep the shell's line continuations inside their quotes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import TransformError

_SPACES = " \t\n\v\f\r"
_LINE_CONTINUATIONS = ("\\\r\n", "\\\n")


def _space_length(text: str, position: int) -> int:
    """Length of the whitespace token at ``position``: a space character, a backslash-newline, or 0."""
    if position >= len(text):
        return 0
    if text[position] in _SPACES:
        return 1
    for continuation in _LINE_CONTINUATIONS:
        if text.startswith(continuation, position):
            return len(continuation)
    return 0


def _is_ident_char(char: str) -> bool:
    return char.isascii() and (char.isalnum() or char == "_")


def _is_bare_value_char(char: str) -> bool:
    return _is_ident_char(char) or char in "./-"


@dataclass
class ParsedTransform:
    name: str
    params: dict[str, list[str]] = field(default_factory=dict)
    position: int = 0  # offset of the name in the transform string, for error messages

    def __str__(self) -> str:
        if not self.params:
            return self.name
        args = ", ".join(f'{key}="{value}"' for key, values in self.params.items() for value in values)
        return f"{self.name}({args})"


def _error(text: str, position: int, expected: str) -> TransformError:
    found = text[position:position + 20] if position < len(text) else "end of string"
    return TransformError(
        f"malformed transform string at position {position}: looking for {expected}, "
        f"but found '{found}' in '{text}'"
    )


def parse_transforms(text: str) -> list[ParsedTransform]:
    """Parse a whole transform string into (name, params) entries, in order.

    Repeated parameter names accumulate: ``f(a=1, a=2)`` gives ``{"a": ["1", "2"]}``.
    """
    result: list[ParsedTransform] = []
    pos = 0
    length = len(text)

    def skip_spaces(p: int) -> int:
        while step := _space_length(text, p):
            p += step
        return p

    while True:
        pos = skip_spaces(pos)
        if pos >= length:
            return result
        start = pos
        while pos < length and _is_ident_char(text[pos]):
            pos += 1
        if pos == start:
            raise _error(text, pos, "a transform name")
        transform = ParsedTransform(text[start:pos], position=start)
        result.append(transform)
        if pos >= length or _space_length(text, pos):
            continue
        if text[pos] != "(":
            raise _error(text, pos, f"'(' or a space after transform name '{transform.name}'")
        open_paren = pos
        pos = skip_spaces(pos + 1)
        if pos < length and text[pos] == ")":
            pos += 1
            continue
        while True:
            name_start = pos
            while pos < length and _is_ident_char(text[pos]):
                pos += 1
            if pos == name_start:
                if pos >= length:
                    raise TransformError(
                        f"malformed transform string: '(' at position {open_paren} is never closed in '{text}'"
                    )
                raise _error(text, pos, f"a parameter name for '{transform.name}'")
            param_name = text[name_start:pos]
            if pos >= length or text[pos] != "=":
                raise _error(text, pos, f"'=' after parameter '{param_name}' of '{transform.name}'")
            pos += 1
            if pos < length and text[pos] == '"':
                value_start = pos + 1
                pos = value_start
                while pos < length and not (text[pos] == '"' and text[pos - 1] != "\\"):
                    pos += 1
                if pos >= length:
                    raise TransformError(
                        f"malformed transform string: quote at position {value_start - 1} is never closed in '{text}'"
                    )
                value = text[value_start:pos]
                pos += 1
            else:
                value_start = pos
                while pos < length and _is_bare_value_char(text[pos]):
                    pos += 1
                if pos == value_start:
                    raise _error(text, pos, f"a value for parameter '{param_name}' (quote it if it has "
                                 "spaces, commas or colons)")
                value = text[value_start:pos]
            transform.params.setdefault(param_name, []).append(value)
            if pos >= length:
                raise TransformError(
                    f"malformed transform string: '(' at position {open_paren} is never closed in '{text}'"
                )
            if text[pos] == ")":
                pos += 1
                break
            if text[pos] != ",":
                raise _error(text, pos, "',' or ')'")
            pos = skip_spaces(pos + 1)
