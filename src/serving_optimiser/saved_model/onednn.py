"""Models holding ops that only oneDNN implements: finding them, and making such a model fail at
load, with the fix in the error, wherever it would otherwise fail at its first request.

TensorFlow registers the fused int8 ops that ``quantize_matmuls`` and ``quantize_convs`` emit
(``QuantizedMatMulWithBias*``, ``QuantizedConv2DWith*``, ``QuantizedDepthwiseConv2D*``) with
placeholder CPU kernels that oneDNN's graph rewrite replaces. Where the rewrite is off, a model
holding them loads, then every call fails with ``Missing 0-th output from {{node ...}}``.
TensorFlow turns the rewrite on by default (Linux x86-64) only on CPUs with AVX512_VNNI,
AVX512_BF16, AVX_VNNI or AMX (``DefaultOneDnnPolicy``, tensorflow/core/util/port.cc), so on an
AMD Zen 2/3 or an Intel Skylake-SP a model server would accept the model and fail every request.

The self-check is one such op on constants, read by the SavedModel's init op (the one op every
loader runs, TF Serving's C++ ``LoadSavedModel`` and ``tf.saved_model.load`` alike). Without the
rewrite the load itself fails, and TensorFlow's message names the check's node, whose name
carries the fix: ``Missing 0-th output from {{node
int8_ops_need_oneDNN-set_TF_ENABLE_ONEDNN_OPTS_to_1/probe}}`` (a node name cannot hold ``=``).
"""

from __future__ import annotations

import os
import re
from collections import Counter

import numpy as np
from tensorflow.core.framework import graph_pb2, types_pb2
from tensorflow.core.framework.attr_value_pb2 import AttrValue

from ..graph_transforms.graph_utils import copy_graph, make_const_node, make_node
from ._surgery import unique_name

FIX = "TF_ENABLE_ONEDNN_OPTS=1"
SELF_CHECK_SCOPE = "int8_ops_need_oneDNN-set_TF_ENABLE_ONEDNN_OPTS_to_1"
# oneDNN's fused quantized ops (mkl_qmatmul_op.cc, mkl_conv_ops.cc); the plain QuantizedMatMul,
# QuantizedConv2D, QuantizedRelu, ... of quantize_nodes have reference kernels and run anywhere.
# The underscore ops (_QuantizedMatMul with fused activations, _FusedQuantizedConv2D, ...) exist
# only as oneDNN kernels.
_ONEDNN_ONLY_OP = re.compile(
    r"^_?Quantized(MatMulWithBias|Conv2D(With|And|PerChannel)|DepthwiseConv2D)|^_QuantizedMatMul$|^_FusedQuantized"
)
# CPUs with any of these get oneDNN's rewrites by default (DefaultOneDnnPolicy).
ONEDNN_DEFAULT_ON_FLAGS = ("avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def is_onednn_only(op: str) -> bool:
    return bool(_ONEDNN_ONLY_OP.match(op))


def onednn_only_ops(graph_def: graph_pb2.GraphDef) -> Counter:
    """How many nodes of each oneDNN-only op type the graph and its function library hold."""
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    return Counter(node.op for node in nodes if is_onednn_only(node.op))


def describe_ops(counts: Counter) -> str:
    return ", ".join(f"{op} x{count}" for op, count in sorted(counts.items()))


def missing_kernels_message(counts: Counter) -> str:
    """Why this process cannot run ``counts``' ops, and what to set (one line)."""
    return (
        f"the model holds int8 ops that only oneDNN implements ({describe_ops(counts)}), and oneDNN's "
        f"rewrites are off in this process (TF_ENABLE_ONEDNN_OPTS={_setting()}; TensorFlow turns them on "
        "by default only on CPUs with AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX): set "
        f"{FIX} here and in the serving environment (e.g. docker run -e {FIX}), or use a float variant"
    )


def _setting() -> str:
    return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset")


def add_self_check(graph_def: graph_pb2.GraphDef) -> tuple[graph_pb2.GraphDef, str]:
    """A copy of ``graph_def`` with the self-check (see the module docstring); returns the graph and
    the node the init op must depend on."""
    result = copy_graph(graph_def)
    scope = unique_name(SELF_CHECK_SCOPE, {node.name for node in result.node})
    values = {
        "a": (np.ones((1, 1), np.uint8), types_pb2.DT_QUINT8),
        "b": (np.ones((1, 1), np.int8), types_pb2.DT_QINT8),
        "bias": (np.zeros([1], np.float32), None),
        **{key: (np.float32(value), None) for key, value in _RANGES.items()},
    }
    constants = [make_const_node(f"{scope}/{key}", value, dtype) for key, (value, dtype) in values.items()]
    attrs = {"transpose_a": False, "transpose_b": False, "input_quant_mode": b"MIN_FIRST"}
    attrs.update({key: AttrValue(type=dtype) for key, dtype in _PROBE_TYPES.items()})
    probe = make_node("QuantizedMatMulWithBiasAndDequantize", f"{scope}/probe", [c.name for c in constants], attrs)
    # The placeholder kernel's missing output is reported at its reader, so the probe needs one.
    check = make_node("CheckNumerics", f"{scope}/check", [probe.name], {"T": types_pb2.DT_FLOAT, "message": "int8"})
    result.node.extend([*constants, probe, check])
    return result, check.name


_RANGES = {"min_a": 0.0, "max_a": 1.0, "min_b": -1.0, "max_b": 1.0, "min_out": 0.0, "max_out": 1.0}
_PROBE_TYPES = {
    "T1": types_pb2.DT_QUINT8,
    "T2": types_pb2.DT_QINT8,
    "Tbias": types_pb2.DT_FLOAT,
    "Toutput": types_pb2.DT_FLOAT,
}
