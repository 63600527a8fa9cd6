"""The Graph Transform Tool on TensorFlow 2: ``TransformGraph`` and the old tool's transforms,
in Python on TensorFlow's GraphDef protos.

    from serving_optimiser.graph_transforms import TransformGraph
"""

import importlib

# Imported on first use (PEP 562): the engine imports TensorFlow (~5 s), and the command-line tools
# check their arguments with the parser and the catalogue before that.
_EXPORTS = {
    "TransformContext": ".context",
    "TransformError": ".errors",
    "TransformGraph": ".engine",
    "parse_and_check": ".engine",
    "parse_transforms": ".parser",
    "register": ".registry",
    "registered_names": ".registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
