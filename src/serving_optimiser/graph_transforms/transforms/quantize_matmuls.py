"""quantize_matmuls (beyond the old tool): float MatMul (+ bias) layers, and the rank-3 forms Keras 3
gives them (tf.tensordot's MatMul between Reshapes, EinsumDense's Einsum or BatchMatMulV2 with Const
weights), run in int8 through the fused oneDNN kernel QuantizedMatMulWithBiasAndDequantize, float in
and float out; with calibrated ranges, consecutive ReLU layers chain through
QuantizedMatMulWithBiasAndReluAndRequantize.

Why this op (measured on TF 2.21, docs/differences/quantize_matmuls.md): it takes quint8
activations and qint8 weights and returns float, so no qint32 tensor ever needs a Dequantize
(which has no kernel for qint32 under oneDNN) and no Cast + Mul pass is paid; the Relu that
follows stays a float op. The MatMul kernels accept only scalar weight ranges, so weights are
quantised per tensor.
"""

from __future__ import annotations

import logging

import numpy as np
from tensorflow.core.framework import graph_pb2

from ..calibration import DEFAULT_MAX_LAYER_ERROR, LayerProbe, calibrate_ranges, fake_quantize
from ..context import TransformContext
from ..errors import TransformError
from ..graph_utils import canonical_input_name
from ..registry import register
from ._int8 import int8_kernels_available, quantize_weights_symmetric
from ._int8_driver import Int8Transform, run_int8_transform
from ._matmul_layers import SUFFIX, _candidates
from ._matmul_nodes import ACTIVATION_OP, CHAINED_OP, QUANTIZED_OP, MatmulOptions, _weight_levels, emit_matmuls

log = logging.getLogger(__name__)

# Above this many weights (K x N) a calibrated ReLU layer ends in ...AndDequantize + Relu instead
# of chaining in quint8: TF 2.21's ...AndRequantize kernel costs an extra per call that grows
# faster than K x N past a few hundred KB of weights (one layer alone, 16 rows,
# AVX-512: +0.3 ms at 512 x 512, +0.8 ms at 784 x 1024, +12.8 ms at 2048 x 2048). Whole models
# put the break-even between 512 x 512 (the Iris DNN chained: 1.29 x / 0.30 x float at 1 / 100,000
# rows, unchained 1.68 x / 0.35 x) and 784 x 1024 (a Keras MLP chained: 1.84 x / 1.23 x / 0.73 x
# at 1 / 16 / 64 rows, unchained 0.79 x / 0.65 x / 0.51 x).
DEFAULT_CHAIN_MAX_WEIGHTS = 512 * 512
# Which kernel quantizes a float activation (``quantize_kernel``). oneDNN's QuantizeV2 (MIN_FIRST,
# which TensorFlow hands to oneDNN) builds a new oneDNN primitive at every call: 0.1-0.16 ms at
# 64 x 128 floats. SCALED with round_mode HALF_AWAY_FROM_ZERO is left to TensorFlow's own kernel
# (oneDNN's rewrite takes only HALF_TO_EVEN): 8 us there, no slower up to ~512 K floats per call,
# slower beyond (AVX-512, 2 threads: 0.68 against 0.52 ms at 16384 x 128).
QUANTIZE_KERNELS = ("onednn", "tensorflow")
# For the callers that import them from here (the calibrate stage, the benchmark, the tests).
__all__ = ["ACTIVATION_OP", "CHAINED_OP", "QUANTIZED_OP", "SUFFIX", "calibrate_ranges", "int8_kernels_available",
           "layer_probes", "quantize_matmuls"]

TRANSFORM = Int8Transform(
    "quantize_matmuls",
    log,
    match=lambda graph_def, ranges, options: _candidates(graph_def, options.minimum_dim, ranges),
    emit=emit_matmuls,
    kernel_warning=f"{QUANTIZED_OP} does not run in this process (oneDNN off: set TF_ENABLE_ONEDNN_OPTS=1; or not "
                   "an x86 oneDNN build); the rewritten graph only runs where oneDNN is on",
)


def layer_probes(graph_def: graph_pb2.GraphDef, ranges: dict, minimum_dim: int = 32) -> list[LayerProbe]:
    """What calibration measures for each layer this transform would take: its float input, its
    float output (the bias add, else the product) and the int8 layer's answer to that input
    (the input through 8 bits over its calibrated range, or the batch's own range without one;
    the weights as :func:`quantize_weights_symmetric` codes them). A bias added after a Reshape
    of the product is left out of both sides (the product is measured before it)."""
    probes = []
    for layer in _candidates(graph_def, minimum_dim, ranges):
        codes, bound = quantize_weights_symmetric(layer.weights, levels=_weight_levels(layer))
        decoded = (codes.astype(np.float64) * (bound / 127.0)).astype(np.float32)
        bias = np.zeros_like(layer.bias) if layer.bias_after_reshape else layer.bias

        def int8_output(x: np.ndarray, layer=layer, decoded=decoded, bias=bias) -> np.ndarray:
            low, high = layer.input_range if layer.input_range is not None else (float(x.min()), float(x.max()))
            low = 0.0 if layer.non_negative else min(low, 0.0)
            rows = fake_quantize(x, low, max(high, low)).reshape(-1, decoded.shape[0])
            return (rows @ decoded + bias).reshape(x.shape[:x.ndim - layer.contracted] + layer.out_dims)

        output = layer.matmul.name if layer.bias_after_reshape else layer.last.name
        probes.append(LayerProbe(layer.matmul.name, canonical_input_name(layer.activations), f"{output}:0",
                                 int8_output))
    return probes



@register(
    "quantize_matmuls",
    params={
        "minimum_dim": "32",
        "chain_max_weights": f"{DEFAULT_CHAIN_MAX_WEIGHTS} (calibrated ReLU layers with more weights do not chain)",
        "ranges_file": "(none: ranges measured per batch at run time)",
        "max_layer_error": f"{DEFAULT_MAX_LAYER_ERROR:g} (with calibration: a layer over it stays float)",
        "keep_float": "(none; repeatable: MatMul, BatchMatMul or Einsum names that stay float)",
        "quantize_kernel": "onednn (or tensorflow: TensorFlow's QuantizeV2, far faster on small tensors)",
    },
    lossy=True,
)
def quantize_matmuls(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Run float MatMul, BatchMatMul and Einsum (+ constant bias) layers as int8 MatMuls, float in and out.

    Matches: MatMul (T float, transpose_a false, no control inputs) of (any, Const [K, N],
    possibly behind Identity), optionally read only by BiasAdd (NHWC) | Add | AddV2 of a float
    Const of shape [], [1], [N] or [1, N]; or read only by a Reshape whose shape ends in known
    dims holding N values (tf.tensordot: Reshape of (MatMul, ConcatV2 of (leading dims, [N])))
    read only by such a bias add, whose Const broadcasts over those dims. BatchMatMul(V2)
    (adj_x false) of (any, Const [K, N], possibly behind a Reshape of a constant shape: Keras'
    EinsumDense on a fixed sequence length), and Einsum of (any, Const) or (Const, any) whose
    equation contracts the activation's trailing axes with weight axes (in any order) and keeps
    the free axes in order, activation's then weight's (``abc,cde->abde``, ``abcd,cde->abe``):
    the same, the activations reshaped to [-1, K], with the bias added after the product or
    after a Reshape of it. A Relu/Relu6 after it stays a float op (the float-output kernel has
    no Relu variant; the qint32 ...AndRelu path measured slower because its output needs a Cast
    and a Mul), except in a calibrated chain (below).
    Produces, for a layer whose last node (the bias add, else the MatMul) is ``<n>``:
    ``<n>`` itself as a QuantizedMatMulWithBiasAndDequantize (quint8 x qint8, float bias and
    output, input_quant_mode SCALED: the kernel always sees [0, max]), so every reader is
    unchanged; ``<n>/quantize_matmuls/``
    ``weights`` (qint8 codes, symmetric range ``weights_min``/``weights_max`` = -a/a, a the
    largest |weight|, transpose_b applied), ``bias`` (zeros without a bias add), ``quantize``
    (QuantizeV2 quint8 MIN_FIRST of the activations), ``input_min``/``input_max``: per batch
    at run time (Max, and Min over ``reduction_dims``) by default, Consts with ``ranges_file``.
    An activation read from a Relu/Relu6 gets min 0 as a Const. Otherwise a negative minimum
    is folded into ``bias_compensated`` (``bias`` + min * ``column_sums``: a Const when the
    range is calibrated, else computed per call via ``bias_shift``) and the kernel sees the range
    [``zero``, ``input_span``] (a Const too when calibrated). Float weight and bias Consts that
    nothing else reads are removed.
    Where the output is not the 2-D product (a bias after a Reshape, a BatchMatMul, an Einsum),
    the fused op is ``<n>/quantize_matmuls/matmul`` and ``<n>`` is a Reshape of it: to the
    absorbed Reshape's own shape tensor, or to ``output_shape`` (ConcatV2 of ``leading_shape``,
    a StridedSlice of ``input_shape`` = Shape of the activations, and ``output_dims``), so any
    batch and sequence length works; ``flat`` (Reshape to ``flat_shape`` [-1, K]) feeds it.
    Layers that multiply the same activations over the same range (attention's query, key and
    value) share the first one's ``flat``, ``quantize`` and range nodes.
    Calibrated chains: when a layer with a calibrated range is read only by a Relu ``<r>``
    (not a graph output) that only the next layer with a calibrated range reads, ``<r>``
    becomes a QuantizedMatMulWithBiasAndReluAndRequantize emitting quint8 in [0, the next
    layer's calibrated max] (``output_min``/``output_max``), and the next layer takes those
    codes as they are: no float tensor, Relu or QuantizeV2 between them (0.31 x float against
    0.38 x per batch on the Iris DNN, 100,000 rows), unless the first layer has more than
    ``chain_max_weights`` weights (K x N, default 262144 = 512 x 512): TF 2.21's ...AndRequantize
    kernel costs an extra per call that outgrows the chain's gain beyond that, so such a layer
    ends in ...AndDequantize and a float Relu (a 784 -> 1024 -> 1024 MLP: 0.65 x float at 16 rows
    unchained, 1.23 x chained).
    The next layer may read the Relu through a
    tensordot's identity Transpose and flattening Reshape (removed) or flatten it itself; Shape
    ops of the Relu then read the codes (quint8, same shape: ``<r>`` is then a Reshape of
    ``<r>/quantize_matmuls/matmul``).
    Params: ``ranges_file`` (none: dynamic ranges): JSON ``{"<MatMul name>": [min, max]}``;
    MatMuls missing from it get dynamic ranges; entries of other nodes (quantize_convs' ranges)
    and of MatMuls that stay float are unused; a name the graph lacks is an error (unless the
    graph holds this transform's ops already).
    Refused (left float, one log line each): MatMuls inside a lowered while loop (between Enter
    and Exit: their weights come through the Enter and calibration cannot fetch per-iteration
    tensors), non-float T, transpose_a/adj_x, control inputs, weights that are not a finite
    float Const, Einsums of two activations (attention scores) or with other equations, and
    weights with fewer than ``minimum_dim`` (32) rows or columns (K and N of the 2-D matrix):
    below that int8 is no faster (measured break-even at 32 for K and for N on 100,000 rows),
    and a narrow input layer reads raw features whose scales differ, which one 8-bit range
    resolves badly (on the Iris DNN its 4x512 layer caused nearly all the flips).
    MatMuls, BatchMatMuls and Einsums inside library functions (kept While/If bodies) get one
    line each too: this transform does not run on function bodies.
    ``quantize_kernel``: which kernel turns a float activation into codes. ``onednn`` (the
    default) as above. ``tensorflow``: ``quantize`` is QuantizeV2 SCALED, round_mode
    HALF_AWAY_FROM_ZERO, which oneDNN's rewrite leaves to TensorFlow's own kernel; a shifted
    input with a calibrated range is first moved to [0, span] by ``shifted`` (Sub of
    ``input_shift``, the calibrated minimum), and the fused op reads QuantizeV2's own output range.
    The same codes up to ties (+-1); oneDNN's MIN_FIRST QuantizeV2 builds a primitive at every call
    (0.1-0.16 ms at 64 x 128 floats) and is faster only past ~512 K floats per call, so
    ``tensorflow`` suits serving batches (an encoder at batch 1: 2.44 -> 1.90 ms, float 1.75 ms).
    Per-batch shifted inputs keep MIN_FIRST (their shift is QuantizeV2's own).
    Activations (_activations.py, one table; docs/differences/int8_fusions.md): when the layer's
    2-D output (not chained) is read only by an activation the kernel applies on this TensorFlow
    (Relu6, LeakyRelu or a PReLU with one alpha, Elu, Sigmoid, Tanh, exact or tanh GELU, in any
    spelling: the matcher runs the elementwise nodes on a grid), the fused op is a
    _QuantizedMatMul with fused_ops [BiasAdd, <post-op>, Dequantize] (``leakyrelu_alpha``) named
    like the activation's last node, whose nodes go. A per-channel PReLU, swish or hard-swish
    stays float after the float output; a per-channel PReLU becomes ``<p>`` = Maximum of (y,
    ``<p>/scaled`` = Mul of (y, ``<p>/alpha``)) (Minimum when every alpha >= 1). A Relu keeps the
    paths above. One log line per int8 layer says what it became and why.
    Running it again changes nothing more.
    """
    minimum_dim = context.get_int("minimum_dim", 32)
    if minimum_dim < 1:
        raise TransformError(f"quantize_matmuls: minimum_dim must be >= 1, got {minimum_dim}")
    chain_max_weights = context.get_int("chain_max_weights", DEFAULT_CHAIN_MAX_WEIGHTS)
    if chain_max_weights < 0:
        raise TransformError(f"quantize_matmuls: chain_max_weights must be >= 0, got {chain_max_weights}")
    quantize_kernel = context.get_string("quantize_kernel", "onednn")
    if quantize_kernel not in QUANTIZE_KERNELS:
        raise TransformError(f"quantize_matmuls: quantize_kernel must be one of {', '.join(QUANTIZE_KERNELS)}, "
                             f"got '{quantize_kernel}'")
    return run_int8_transform(TRANSFORM, graph_def, context,
                              MatmulOptions(minimum_dim, chain_max_weights, quantize_kernel))
