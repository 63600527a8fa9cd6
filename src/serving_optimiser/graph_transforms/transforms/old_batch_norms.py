"""fold_old_batch_norms: fold the monolithic batch-norm ops (BatchNormWithGlobalNormalization,
FusedBatchNorm*) that follow a convolution into its weights, and keep the shift as a BiasAdd.

It shares the match machinery of fold_batch_norms (batch_norms.py): only a match whose
intermediate results nobody else reads is rewritten, and control edges move to whatever
replaces the node they pointed at.
"""

from __future__ import annotations

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2

from ..context import TransformContext
from ..errors import TransformError
from ..graph_utils import NodeMatch, const_value, control_inputs, make_const_node, make_node, pattern
from ..registry import register
from ._batch_norm_matching import (
    ANY,
    CONST,
    FLOAT_TYPES,
    Readers,
    RefuseError,
    float_values,
    renamed,
    replace_matches,
    scaled_weights,
    set_inputs,
    weight_columns,
    with_value,
)

_BATCH_NORMS = "BatchNormWithGlobalNormalization|FusedBatchNorm|FusedBatchNormV2|FusedBatchNormV3"
_BN_CONV = pattern("Conv2D|DepthwiseConv2dNative", ANY, CONST)
_OLD_BN_FAMILIES = (
    pattern(_BATCH_NORMS, _BN_CONV, CONST, CONST, CONST, CONST),
    pattern(_BATCH_NORMS, pattern("BatchToSpaceND", _BN_CONV, CONST, CONST), CONST, CONST, CONST, CONST),
    pattern(_BATCH_NORMS, pattern("ConcatV2", _BN_CONV, _BN_CONV, CONST), CONST, CONST, CONST, CONST),
    # A TF 1 / tf.layers batch norm on a 2-D tensor: the fused kernel wants 4-D, so the layer
    # wraps it in Reshape[-1,1,1,C] ... Reshape[-1,C], which hides the MatMul from family 1.
    pattern(
        "Reshape",
        pattern(_BATCH_NORMS, pattern("Reshape", pattern("MatMul", ANY, CONST), CONST), CONST, CONST, CONST, CONST),
        CONST,
    ),
)


def _scale_and_offset(bn: node_def_pb2.NodeDef, consts: list[node_def_pb2.NodeDef]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, offset) such that bn(x) == x * scale + offset, in float32 as C++."""
    fused = bn.op != "BatchNormWithGlobalNormalization"
    # Input order: BNGN (t, mean, var, beta, gamma); FusedBatchNorm* (x, gamma, beta, mean, var).
    mean_node, var_node, beta_node, gamma_node = (
        (consts[2], consts[3], consts[1], consts[0]) if fused else tuple(consts)
    )
    if fused and (bn.attr["is_training"].b if "is_training" in bn.attr else True):
        raise RefuseError(f"{bn.op} '{bn.name}' has is_training=true, so it normalises with batch statistics")
    epsilon_attr = "epsilon" if fused else "variance_epsilon"
    epsilon = np.float32(bn.attr[epsilon_attr].f if epsilon_attr in bn.attr else 1e-4)
    scale_after_normalization = fused or bn.attr["scale_after_normalization"].b
    mean = float_values(mean_node).astype(np.float32)
    if mean.ndim != 1:
        raise TransformError(
            f"fold_old_batch_norms: mean Const '{mean_node.name}' of '{bn.name}' has shape {list(mean.shape)}, "
            "expected a vector"
        )
    values = {}
    for role, node in (("variance", var_node), ("beta", beta_node), ("gamma", gamma_node)):
        values[role] = float_values(node).astype(np.float32)
        if values[role].shape != mean.shape:
            raise TransformError(
                f"fold_old_batch_norms: {role} Const '{node.name}' of '{bn.name}' has shape "
                f"{list(values[role].shape)}, expected {list(mean.shape)}"
            )
    scale = np.float32(1.0) / np.sqrt(values["variance"] + epsilon)
    if scale_after_normalization:
        scale = scale * values["gamma"]
    offset = -mean * scale + values["beta"]
    return scale, offset


def _check_batch_norm(bn: node_def_pb2.NodeDef, readers: Readers) -> None:
    extra_outputs = sorted({r for r, port in readers.data.get(bn.name, []) if port != 0})
    if extra_outputs:
        raise RefuseError(f"'{extra_outputs[0]}' reads the batch statistics of '{bn.name}'")
    if "T" in bn.attr and bn.attr["T"].type not in FLOAT_TYPES:
        raise RefuseError(f"'{bn.name}' is not a float batch norm")


def _fuse_into_conv(
    scale: np.ndarray, offset: np.ndarray, conv_match: NodeMatch, output_name: str, readers: Readers,
    *allowed_readers: node_def_pb2.NodeDef,
) -> list[node_def_pb2.NodeDef]:
    """Scaled weights, the input and conv as they were, ``<conv>_bn_offset`` and a BiasAdd
    named ``output_name`` (the C++ FuseScaleOffsetToConvWeights)."""
    conv, source, weights = conv_match.node, conv_match.inputs[0].node, conv_match.inputs[1].node
    readers.require_only(conv, *allowed_readers)
    readers.require_only(weights, conv)
    if source.name == weights.name:
        raise RefuseError(f"'{conv.name}' reads its weights as its input too")
    weight_values = float_values(weights)
    cols = weight_columns(conv, weight_values)
    if cols != scale.shape[0]:
        raise TransformError(
            f"fold_old_batch_norms: '{conv.name}' has {cols} output channels but its batch norm has {scale.shape[0]}"
        )
    conv_type = conv.attr["T"].type if "T" in conv.attr else types_pb2.DT_FLOAT
    offset_node = make_const_node(f"{conv.name}_bn_offset", offset, dtype=conv_type)
    bias_add = make_node("BiasAdd", output_name, [conv.name, offset_node.name])
    if "data_format" in conv.attr:
        bias_add.attr["data_format"].CopyFrom(conv.attr["data_format"])
    bias_add.attr["T"].type = conv_type
    scaled = scaled_weights(conv, weight_values.astype(np.float32), scale).astype(weight_values.dtype)
    return [with_value(weights, scaled), source, conv, offset_node, bias_add]


def _kept_bn_consts(match: NodeMatch, readers: Readers) -> list[node_def_pb2.NodeDef]:
    """Batch-norm Consts something else reads (C++ cancelled the fold and looped forever)."""
    return [m.node for m in match.inputs[1:] if readers.read_elsewhere(m.node, match.node)]


def _fold_plain(match: NodeMatch, readers: Readers, renames: dict[str, str]) -> list[node_def_pb2.NodeDef]:
    bn = match.node
    _check_batch_norm(bn, readers)
    scale, offset = _scale_and_offset(bn, [m.node for m in match.inputs[1:]])
    new_nodes = _fuse_into_conv(scale, offset, match.inputs[0], bn.name, readers, bn)
    bias_add = new_nodes[-1]
    set_inputs(bias_add, list(bias_add.input), [c[1:] for c in control_inputs(bn)])
    return new_nodes + _kept_bn_consts(match, readers)


def _fold_batch_to_space(
    match: NodeMatch, readers: Readers, renames: dict[str, str]
) -> list[node_def_pb2.NodeDef]:
    bn, to_space_match = match.node, match.inputs[0]
    to_space = to_space_match.node
    _check_batch_norm(bn, readers)
    readers.require_only(to_space, bn)
    scale, offset = _scale_and_offset(bn, [m.node for m in match.inputs[1:]])
    conv = to_space_match.inputs[0].node
    bias_add_name = f"{conv.name}/biasadd"
    new_nodes = _fuse_into_conv(scale, offset, to_space_match.inputs[0], bias_add_name, readers, to_space)
    new_to_space = renamed(to_space, bn.name, bn)
    new_to_space.input[0] = bias_add_name
    renames[to_space.name] = bn.name
    new_nodes += [to_space_match.inputs[1].node, to_space_match.inputs[2].node, new_to_space]
    return new_nodes + _kept_bn_consts(match, readers)


def _fold_concat(match: NodeMatch, readers: Readers, renames: dict[str, str]) -> list[node_def_pb2.NodeDef]:
    bn, concat_match = match.node, match.inputs[0]
    concat = concat_match.node
    _check_batch_norm(bn, readers)
    readers.require_only(concat, bn)
    branches = concat_match.inputs[:2]
    if branches[0].inputs[1].node.name == branches[1].inputs[1].node.name:
        raise RefuseError(f"both inputs of '{concat.name}' use the weights '{branches[0].inputs[1].node.name}'")
    scale, offset = _scale_and_offset(bn, [m.node for m in match.inputs[1:]])
    axis = int(const_value(concat_match.inputs[2].node))
    scales, offsets = [scale, scale], [offset, offset]
    if axis in (3, -1):
        # Concatenated along the channels: each branch gets its own part of the vectors.
        split = weight_columns(branches[0].node, const_value(branches[0].inputs[1].node))
        scales, offsets = [scale[:split], scale[split:]], [offset[:split], offset[split:]]
    new_nodes = []
    for index, branch in enumerate(branches):
        name = f"{concat.name}_bn_in{index}"
        new_nodes += _fuse_into_conv(scales[index], offsets[index], branch, name, readers, concat)
    new_concat = renamed(concat, bn.name, bn)
    new_concat.input[0], new_concat.input[1] = f"{concat.name}_bn_in0", f"{concat.name}_bn_in1"
    renames[concat.name] = bn.name
    new_nodes += [concat_match.inputs[2].node, new_concat]
    return new_nodes + _kept_bn_consts(match, readers)


def _fold_reshaped_matmul(
    match: NodeMatch, readers: Readers, renames: dict[str, str]
) -> list[node_def_pb2.NodeDef]:
    outer, bn_match = match.node, match.inputs[0]
    bn, to_4d_match = bn_match.node, bn_match.inputs[0]
    to_4d, matmul_match = to_4d_match.node, to_4d_match.inputs[0]
    _check_batch_norm(bn, readers)
    readers.require_only(to_4d, bn)
    readers.require_only(bn, outer)
    if "data_format" in bn.attr and bn.attr["data_format"].s not in (b"", b"NHWC"):
        raise RefuseError(f"'{bn.name}' is not NHWC, so its channels are not the MatMul's columns")
    cols = weight_columns(matmul_match.node, float_values(matmul_match.inputs[1].node))
    # Only the exact round trip [N, C] -> [N, 1, 1, C] -> [N, C] is a per-column batch norm.
    to_4d_shape = const_value(to_4d_match.inputs[1].node).tolist()
    to_2d_shape = const_value(match.inputs[1].node).tolist()
    if to_4d_shape != [-1, 1, 1, cols] or to_2d_shape != [-1, cols]:
        raise RefuseError(
            f"'{to_4d.name}' and '{outer.name}' reshape to {to_4d_shape} and {to_2d_shape}, "
            f"not [-1, 1, 1, {cols}] and [-1, {cols}]"
        )
    scale, offset = _scale_and_offset(bn, [m.node for m in bn_match.inputs[1:]])
    new_nodes = _fuse_into_conv(scale, offset, matmul_match, outer.name, readers, to_4d)
    bias_add = new_nodes[-1]
    waited_for = [c[1:] for node in (to_4d, bn, outer) for c in control_inputs(node)]
    set_inputs(bias_add, list(bias_add.input), waited_for)
    shapes = [to_4d_match.inputs[1].node, match.inputs[1].node]
    kept_shapes = [
        shape for shape, reader in zip(shapes, (to_4d, outer), strict=True) if readers.read_elsewhere(shape, reader)
    ]
    return new_nodes + kept_shapes + _kept_bn_consts(bn_match, readers)


@register("fold_old_batch_norms", on_functions=True)
def fold_old_batch_norms(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Fold monolithic batch-norm ops into the convolution weights before them, plus a BiasAdd.

    Matches, each family repeated until a pass folds nothing, in this order (BN =
    BatchNormWithGlobalNormalization|FusedBatchNorm|FusedBatchNormV2|FusedBatchNormV3, all four
    Const inputs; CONV = Conv2D|DepthwiseConv2dNative of (any, Const)):
    1. BN of (CONV, ...); 2. BN of (BatchToSpaceND of (CONV, Const, Const), ...);
    3. BN of (ConcatV2 of (CONV, CONV, Const axis), ...);
    4. Reshape of (BN of (Reshape of (MatMul of (any, Const), Const [-1,1,1,C]), ...), Const
    [-1,C]): a TF 1 / tf.layers batch norm on a 2-D tensor (beyond the C++ tool).
    Produces: weights Consts (same names) scaled by gamma / sqrt(variance + epsilon) per channel;
    a Const ``<conv>_bn_offset`` (beta - mean * scale); a BiasAdd of (conv, offset) named
    (1) as the BN, (2) ``<conv>/biasadd``, read by the BatchToSpaceND now named as the BN,
    (3) ``<concat>_bn_in0`` / ``_bn_in1``, read by the ConcatV2 now named as the BN (the
    vectors are split between the branches when the axis is 3, or -1), (4) as the outer
    Reshape, whose input Reshape and BN are gone.
    Params: none.
    Errors: mean/variance/beta/gamma that are not vectors of one length, or a conv whose channel
    count differs from the batch norm's.
    Differs from C++: FusedBatchNormV2/V3 fold too (same maths as V1); a FusedBatchNorm* with
    is_training=true, a BN whose batch statistics are read, and a conv, weights,
    BatchToSpaceND or ConcatV2 read by other nodes are left alone (C++ folded them, giving
    wrong results); a BN Const read elsewhere is kept instead of making the pass spin forever;
    axis -1 splits like axis 3; a depthwise branch splits at its channel count; v1 Concat is
    not matched (it crashed the C++ tool).
    """
    current = graph_def
    builders = (_fold_plain, _fold_batch_to_space, _fold_concat, _fold_reshaped_matmul)
    for family, build in zip(_OLD_BN_FAMILIES, builders):
        # Every fold removes a batch-norm node, so this many passes always reach the end.
        for _ in range(len(graph_def.node) + 1):
            current, folded = replace_matches(current, family, build, context)
            if not folded:
                break
    return current
