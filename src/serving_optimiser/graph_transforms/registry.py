"""The registry mapping the old tool's transform names to Python functions.

A transform joins with ``@register("name", params={"param": "default", ...})``; nothing else
holds the list. ``lossy=True`` marks a transform that changes the values a model computes
(weight rounding and quantisation, int8 ops): :mod:`serving_optimiser.saved_model.guard` gates
those, while ``TransformGraph`` runs every transform as the old tool did. The defaults are text
for people (``transform_graph --list``); the transform itself applies them through its context's
typed getters.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tensorflow.core.framework import graph_pb2

from . import catalogue
from .context import TransformContext
from .errors import TransformError

TransformFunction = Callable[[graph_pb2.GraphDef, TransformContext], graph_pb2.GraphDef]



@dataclass(frozen=True)
class RegisteredTransform:
    name: str
    function: TransformFunction
    params: tuple[str, ...]
    # Whether the engine also runs the transform on each function body in the library.
    on_functions: bool
    # (param, its default as the user would write it, or how it behaves when absent).
    defaults: tuple[tuple[str, str], ...] = ()
    # Whether the transform changes the model's answers (the guard's business, not the engine's).
    lossy: bool = False

    def usage(self) -> str:
        """``name(param=default, ...)``, or the bare name for a transform without params."""
        if not self.defaults:
            return self.name
        return f"{self.name}({', '.join(f'{param}={default}' for param, default in self.defaults)})"


_REGISTRY: dict[str, RegisteredTransform] = {}
_loaded = False


def register(
    name: str, *aliases: str, params: Mapping[str, str] | None = None, on_functions: bool = False,
    lossy: bool = False,
) -> Callable[[TransformFunction], TransformFunction]:
    """Register ``function`` under ``name`` (and ``aliases``), taking ``params``: param -> default;
    ``lossy`` when it changes the values the model computes."""
    defaults = tuple((params or {}).items())

    def decorate(function: TransformFunction) -> TransformFunction:
        for key in (name, *aliases):
            if key in _REGISTRY:
                raise RuntimeError(f"transform '{key}' registered twice")
            _REGISTRY[key] = RegisteredTransform(
                key, function, tuple(param for param, _ in defaults), on_functions, defaults, lossy
            )
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


def lossy_names() -> list[str]:
    """The transforms registered with ``lossy=True``."""
    _load_all()
    return sorted(name for name, registered in _REGISTRY.items() if registered.lossy)


def get_transform(name: str) -> RegisteredTransform:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise TransformError(unknown_transforms_message([name])) from None


def transform_listing() -> str:
    """Every transform with its arguments and defaults, and the first line of its docstring:
    what ``transform_graph --list`` prints."""
    _load_all()
    lines = ["Every transform also takes ignore_errors (default false: an error stops the run).", ""]
    for name in sorted(_REGISTRY):
        registered = _REGISTRY[name]
        summary = (registered.function.__doc__ or "").strip().splitlines()
        lines.append(registered.usage())
        if summary:
            lines.append(f"    {summary[0]}")
    return "\n".join(lines) + "\n"


def unknown_transforms_message(names: list[str]) -> str:
    return catalogue.unknown_transforms_message(names, list(_REGISTRY))
