"""Packages whose names are imported on first use (PEP 562), so that importing a light module of
the package (errors, parser, reader) does not load TensorFlow (~5 s)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``exports`` maps each name to the relative module
    that defines it (``{"TransformGraph": ".engine"}``)."""

    def attribute(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name], package), name)

    return attribute
