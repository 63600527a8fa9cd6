"""The package files a stage script imports, directly or through other package modules, found by
reading the source with ``ast`` (nothing is imported). Imports inside functions count: the
scripts import lazily, after parsing their arguments; so do the modules a package's ``_EXPORTS``
table imports on first use."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "serving_optimiser"


def _module_file(src: Path, module: str) -> Path | None:
    base = src / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path, src: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    # A script outside the package has no package for relative imports to start from.
    package_parts = path.relative_to(src).parts[:-1] if path.is_relative_to(src) else ()
    modules: set[str] = set()
    for node in ast.walk(tree):
        # A package that imports on first use (PEP 562) names its modules in _EXPORTS.
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            if isinstance(node.value, ast.Dict):
                for value in node.value.values:
                    if isinstance(value, ast.Constant) and value.value.startswith("."):
                        modules.add(".".join((*package_parts, value.value.lstrip("."))))
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package_parts[: len(package_parts) - node.level + 1] if node.level > 1 else package_parts
                base = ".".join((*parts, node.module) if node.module else parts)
            else:
                base = node.module or ""
            modules.add(base)
            modules.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in modules if m == PACKAGE or m.startswith(PACKAGE + ".")}


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
