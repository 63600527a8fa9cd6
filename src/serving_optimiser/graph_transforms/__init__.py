"""The Graph Transform Tool on TensorFlow 2: ``TransformGraph`` and the old tool's transforms,
in Python on TensorFlow's GraphDef protos.

    from serving_optimiser.graph_transforms import TransformGraph
"""

from .context import TransformContext
from .engine import TransformGraph, parse_and_check
from .errors import TransformError
from .parser import parse_transforms
from .registry import register, registered_names

__all__ = [
    "TransformContext",
    "TransformError",
    "TransformGraph",
    "parse_and_check",
    "parse_transforms",
    "register",
    "registered_names",
]
