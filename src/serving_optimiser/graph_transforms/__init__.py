"""The Graph Transform Tool on TensorFlow 2: ``TransformGraph`` and the old tool's transforms,
in Python on TensorFlow's GraphDef protos.

    from serving_optimiser.graph_transforms import TransformGraph
"""

from .._lazy import lazy_exports

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

__getattr__ = lazy_exports(__name__, _EXPORTS)
