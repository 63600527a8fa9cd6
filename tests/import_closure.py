"""The package files a stage script imports, directly or through other package modules, found by
reading the source with ``ast`` (nothing is imported). Imports inside functions count: the
scripts import lazily, after parsing their arguments.

A package that imports its names on first use (PEP 562) lists them in an ``_EXPORTS`` table
(name -> relative module). Only the entries a module really imports are followed
(``from serving_optimiser.saved_model import FrozenModel`` reaches ``saved_model/model.py``, not
every module of the table); a module that takes the package object itself (``import
serving_optimiser.saved_model``, ``from serving_optimiser import saved_model``) may reach any
name, so every entry of the table is followed then.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = "serving_optimiser"


def _module_file(src: Path, module: str) -> Path | None:
    base = src / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def _exports(init: Path) -> dict[str, str]:
    """A package ``__init__.py``'s ``_EXPORTS`` table, name -> relative module ({} without one)."""
    tree = ast.parse(init.read_text(), str(init))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            if isinstance(node.value, ast.Dict):
                return {k.value: v.value for k, v in zip(node.value.keys, node.value.values)
                        if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)}
    return {}


def _package_exports(src: Path, package: str, names: list[str] | None) -> set[str]:
    """The modules ``package``'s export table maps ``names`` to (every entry for None)."""
    init = src / Path(*package.split(".")) / "__init__.py"
    if not init.is_file():
        return set()
    table = _exports(init)
    wanted = table if names is None else {name: table[name] for name in names if name in table}
    return {f"{package}.{module.lstrip('.')}" for module in wanted.values()}


@cache
def _imported_modules(path: Path, src: Path) -> frozenset[str]:
    tree = ast.parse(path.read_text(), str(path))
    # A script outside the package has no package for relative imports to start from.
    package_parts = path.relative_to(src).parts[:-1] if path.is_relative_to(src) else ()
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                modules.add(alias.name)
                # The package object itself: any of its lazy names may be used.
                modules |= _package_exports(src, alias.name, None)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package_parts[: len(package_parts) - node.level + 1] if node.level > 1 else package_parts
                base = ".".join((*parts, node.module) if node.module else parts)
            else:
                base = node.module or ""
            modules.add(base)
            names = [alias.name for alias in node.names]
            modules.update(f"{base}.{name}" for name in names)
            modules |= _package_exports(src, base, names)
            for name in names:  # `from pkg import subpackage`: the subpackage object itself
                if (src / Path(*f"{base}.{name}".split(".")) / "__init__.py").is_file():
                    modules |= _package_exports(src, f"{base}.{name}", None)
    return frozenset(m for m in modules if m == PACKAGE or m.startswith(PACKAGE + "."))


def import_closure(script: Path, src: Path) -> set[Path]:
    """Every package file ``script`` needs, including the ``__init__.py`` of each package on the way."""
    seen: set[Path] = set()
    pending = [script]
    while pending:
        path = pending.pop()
        for module in _imported_modules(path, src):
            parts = module.split(".")
            for depth in range(1, len(parts) + 1):
                found = _module_file(src, ".".join(parts[:depth]))
                if found is not None and found not in seen:
                    seen.add(found)
                    pending.append(found)
    return seen
