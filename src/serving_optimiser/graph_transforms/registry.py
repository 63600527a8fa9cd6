"""The registry mapping the old tool's transform names to Python functions.

A transform joins with ``@register("name", params=(...))``; nothing else holds the list.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from tensorflow.core.framework import graph_pb2

from .context import TransformContext
from .errors import TransformError

TransformFunction = Callable[[graph_pb2.GraphDef, TransformContext], graph_pb2.GraphDef]

# Every transform takes ignore_errors; the engine handles it.
COMMON_PARAMS = ("ignore_errors",)


@dataclass(frozen=True)
class RegisteredTransform:
    name: str
    function: TransformFunction
    params: tuple[str, ...]
    # Whether the engine also runs the transform on each function body in the library.
    on_functions: bool


_REGISTRY: dict[str, RegisteredTransform] = {}
_loaded = False


def register(
    name: str, *aliases: str, params: tuple[str, ...] = (), on_functions: bool = False
) -> Callable[[TransformFunction], TransformFunction]:
    def decorate(function: TransformFunction) -> TransformFunction:
        for key in (name, *aliases):
            if key in _REGISTRY:
                raise RuntimeError(f"transform '{key}' registered twice")
            _REGISTRY[key] = RegisteredTransform(key, function, tuple(params), on_functions)
        return function

    return decorate


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    from . import transforms

    for module in pkgutil.iter_modules(transforms.__path__):
        importlib.import_module(f"{transforms.__name__}.{module.name}")
    _loaded = True


def registered_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_transform(name: str) -> RegisteredTransform:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise TransformError(unknown_transforms_message([name])) from None


def unknown_transforms_message(names: list[str]) -> str:
    parts = []
    for name in names:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        parts.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return f"unknown transform {', '.join(parts)}; known transforms: {', '.join(sorted(_REGISTRY))}"
