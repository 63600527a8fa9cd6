"""The transforms' names and arguments, read from their ``@register`` decorators with ``ast``
instead of importing the transform modules (which import TensorFlow, ~5 s), so a command-line tool
rejects an unknown transform or argument at once. The decorators stay the one place the list is
kept; the engine checks against the live registry with the same function, and a test proves the
two agree.
"""

from __future__ import annotations

import ast
import difflib
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

from .. import booleans
from .errors import TransformError
from .parser import ParsedTransform

# Every transform takes ignore_errors; the engine handles it.
COMMON_PARAMS = ("ignore_errors",)
# Transforms whose output runs only on oneDNN's kernels (x86 builds, oneDNN's rewrites on).
NEEDS_ONEDNN = frozenset({"quantize_matmuls", "quantize_convs"})
_TRANSFORMS_DIR = Path(__file__).parent / "transforms"


@cache
def declared_transforms() -> dict[str, tuple[str, ...]]:
    """Transform name (and each alias) -> the arguments its ``@register`` declares."""
    declared: dict[str, tuple[str, ...]] = {}
    for path in sorted(_TRANSFORMS_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef):
                continue
            for decorator in node.decorator_list:
                if not (isinstance(decorator, ast.Call) and getattr(decorator.func, "id", None) == "register"):
                    continue
                names = [arg.value for arg in decorator.args if isinstance(arg, ast.Constant)]
                params: tuple[str, ...] = ()
                for keyword in decorator.keywords:
                    if keyword.arg == "params" and isinstance(keyword.value, ast.Dict):
                        params = tuple(key.value for key in keyword.value.keys if isinstance(key, ast.Constant))
                for name in names:
                    declared[name] = params
    return declared


@cache
def lossy_transforms() -> frozenset[str]:
    """The transforms whose ``@register`` says ``lossy=True`` (they change the values a model
    computes), read with ``ast`` like :func:`declared_transforms`."""
    lossy: set[str] = set()
    for path in sorted(_TRANSFORMS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.FunctionDef):
                continue
            for decorator in node.decorator_list:
                if not (isinstance(decorator, ast.Call) and getattr(decorator.func, "id", None) == "register"):
                    continue
                if any(k.arg == "lossy" and getattr(k.value, "value", False) is True for k in decorator.keywords):
                    lossy.update(arg.value for arg in decorator.args if isinstance(arg, ast.Constant))
    return frozenset(lossy)


def unknown_transforms_message(names: Sequence[str], known: Sequence[str]) -> str:
    parts = []
    for name in names:
        close = difflib.get_close_matches(name, known, n=1)
        parts.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return f"unknown transform {', '.join(parts)}; known transforms: {', '.join(sorted(known))}"


def check_transforms(parsed: Sequence[ParsedTransform], accepted: Mapping[str, Sequence[str]] | None = None) -> None:
    """Fail before anything runs if a name is unknown, a transform gets an argument it lacks, or
    ``ignore_errors`` is not a boolean. ``accepted`` maps each name to its arguments (default:
    what the decorators declare)."""
    accepted = declared_transforms() if accepted is None else accepted
    unknown = [t.name for t in parsed if t.name not in accepted]
    if unknown:
        raise TransformError(unknown_transforms_message(unknown, list(accepted)))
    for transform in parsed:
        takes = (*accepted[transform.name], *COMMON_PARAMS)
        extra = [key for key in transform.params if key not in takes]
        if extra:
            raise TransformError(f"{transform.name}: unknown argument '{extra[0]}' (it takes: {', '.join(takes)})")
        values = transform.params.get("ignore_errors", [])
        if len(values) > 1 or any(booleans.parse_bool(v) is None for v in values):
            raise TransformError(
                f"{transform.name}: ignore_errors should be {booleans.EXPECTED}, found {','.join(values)}"
            )


def needs_onednn(transforms: Sequence[str]) -> bool:
    """Whether a transform list's result runs only with oneDNN's rewrites on; read without
    importing TensorFlow, so a stage can pin its kernels before TensorFlow loads."""
    from .parser import parse_transforms

    return any(t.name in NEEDS_ONEDNN for t in parse_transforms(" ".join(transforms)))
