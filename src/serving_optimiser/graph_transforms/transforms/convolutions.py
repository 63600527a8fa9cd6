"""Convolution rewrites: flatten_atrous_conv turns SpaceToBatchND -> conv -> BatchToSpaceND into
one conv with an up-sampled filter, and the fuse_* transforms merge MirrorPad and ResizeBilinear
into the Conv2D that reads them.

Every rewrite here is only applied where it computes exactly what it replaces: a match the
fused or flattened op would compute differently is left alone with a log line saying why.
"""

from __future__ import annotations

import logging

import numpy as np
from tensorflow.core.framework import graph_pb2, node_def_pb2, types_pb2

from ..context import TransformContext
from ..graph_utils import (
    NodeMatch,
    const_value,
    consumers_map,
    control_inputs,
    data_inputs,
    make_const_node,
    new_graph_like,
    pattern,
    replace_matching_op_types,
)
from ..registry import register

log = logging.getLogger(__name__)

ANY = pattern("*")

# T values the fused ops accept (their OpDefs in TF 2.21).
_FLOAT_TYPES = frozenset({types_pb2.DT_HALF, types_pb2.DT_BFLOAT16, types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE})
_FUSED_PAD_TYPES = _FLOAT_TYPES
_FUSED_RESIZE_TYPES = frozenset({types_pb2.DT_HALF, types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE})


class _SkipError(Exception):
    """This match would not compute the same thing once rewritten; the message says why."""


def _string_attr(node: node_def_pb2.NodeDef, key: str, default: str) -> str:
    return node.attr[key].s.decode() if key in node.attr else default


def _check_plain_conv(conv: node_def_pb2.NodeDef) -> None:
    """Refuse conv attrs the rewritten op would drop: layout, dilations, explicit paddings."""
    data_format = _string_attr(conv, "data_format", "NHWC")
    if data_format != "NHWC":
        raise _SkipError(f"{conv.op} '{conv.name}' has data_format={data_format}")
    dilations = list(conv.attr["dilations"].list.i) if "dilations" in conv.attr else []
    if any(d != 1 for d in dilations):
        raise _SkipError(f"{conv.op} '{conv.name}' has dilations={dilations}")
    padding = _string_attr(conv, "padding", "")
    if padding not in ("SAME", "VALID"):
        raise _SkipError(f"{conv.op} '{conv.name}' has padding={padding or 'unset'}")
    if "explicit_paddings" in conv.attr and conv.attr["explicit_paddings"].list.i:
        raise _SkipError(f"{conv.op} '{conv.name}' has explicit_paddings")


def _with_controls(node: node_def_pb2.NodeDef, *sources: node_def_pb2.NodeDef) -> node_def_pb2.NodeDef:
    """Add the control inputs of ``sources`` (the nodes ``node`` replaces) to ``node``, once each."""
    for source in sources:
        for control in control_inputs(source):
            if control not in node.input:
                node.input.append(control)
    return node


def _copy_attrs(target: node_def_pb2.NodeDef, source: node_def_pb2.NodeDef, *keys: str) -> None:
    for key in keys:
        if key in source.attr:
            target.attr[key].CopyFrom(source.attr[key])


def _replace(
    graph_def: graph_pb2.GraphDef, transform: str, op_pattern, build
) -> graph_pb2.GraphDef:
    """replace_matching_op_types where ``build`` may raise _SkipError to keep a match as it was."""
    skipped = []

    def generator(match: NodeMatch, input_nodes: set[str], output_nodes: set[str]):
        try:
            new_nodes = build(match)
        except _SkipError as reason:
            log.warning("%s: left '%s' as it was: %s", transform, match.node.name, reason)
            skipped.append(match.node.name)
            return match.all_nodes()
        # A node matched twice (the filter also being the pad input, say) is emitted once.
        return list({node.name: node for node in reversed(new_nodes)}.values())[::-1]

    result, replaced = replace_matching_op_types(graph_def, op_pattern, generator)
    # With every match kept (skipped here, or cancelled by the helper because a replaced node
    # is read outside the match), the graph comes back as it was, node order included.
    return result if replaced > len(skipped) else new_graph_like(graph_def, graph_def.node)


# ---------------------------------------------------------------------------------------------
# flatten_atrous_conv
# ---------------------------------------------------------------------------------------------

_ATROUS = pattern(
    "BatchToSpaceND",
    pattern("Conv2D|DepthwiseConv2dNative", pattern("SpaceToBatchND", ANY, ANY, ANY), ANY),
    ANY,
    ANY,
)


def _const(node: node_def_pb2.NodeDef, role: str) -> np.ndarray:
    if node.op != "Const":
        raise _SkipError(f"{role} '{node.name}' is a {node.op}, not a Const")
    return const_value(node)


def _flat_padding(
    conv_padding: str, filter_size: int, block: int, pad: tuple[int, int], crop: tuple[int, int]
) -> str | None:
    """The padding of a dilated conv that equals this space-to-batch conv along one axis, or None.

    Along one axis, after SpaceToBatchND pads by (p0, p1) and splits into ``block`` phases, a
    stride-1 conv with k taps and BatchToSpaceND cropping (c0, c1) computes
    ``y[i] = sum_t w[t] x[i + offset + block*t]`` with output length ``n + delta``. The dilated
    conv (K = (k-1)*block + 1 taps) computes the same with offset -(K-1)//2, delta 0 when SAME,
    and offset 0, delta -(K-1) when VALID. Zeros outside x agree in both.
    """
    dilated = (filter_size - 1) * block + 1
    (p0, p1), (c0, c1) = pad, crop
    if conv_padding == "VALID":
        offset, delta = c0 - p0, (p0 + p1 - c0 - c1) - (dilated - 1)
    else:
        offset, delta = c0 - p0 - block * ((filter_size - 1) // 2), p0 + p1 - c0 - c1
    if offset == -((dilated - 1) // 2) and delta == 0:
        return "SAME"
    if offset == 0 and delta == -(dilated - 1):
        return "VALID"
    return None


def _flatten_atrous(match: NodeMatch, consumers) -> list[node_def_pb2.NodeDef]:
    batch_to_space = match.node
    conv = match.inputs[0].node
    space_to_batch = match.inputs[0].inputs[0].node
    input_node = match.inputs[0].inputs[0].inputs[0].node
    filter_node = match.inputs[0].inputs[1].node
    _check_plain_conv(conv)
    strides = list(conv.attr["strides"].list.i) if "strides" in conv.attr else []
    if any(s != 1 for s in strides):
        raise _SkipError(f"{conv.op} '{conv.name}' has strides={strides}")
    block = _const(match.inputs[0].inputs[0].inputs[1].node, "block_shape").reshape(-1)
    paddings = _const(match.inputs[0].inputs[0].inputs[2].node, "paddings")
    back_block = _const(match.inputs[1].node, "block_shape").reshape(-1)
    crops = _const(match.inputs[2].node, "crops")
    filter_value = _const(filter_node, "filter")
    if block.shape != (2,) or paddings.shape != (2, 2) or crops.shape != (2, 2):
        raise _SkipError(
            f"block_shape, paddings and crops have shapes {list(block.shape)}, {list(paddings.shape)}, "
            f"{list(crops.shape)}, not those of a 2-D atrous conv ([2], [2, 2], [2, 2])"
        )
    if not np.array_equal(block, back_block) or np.any(block < 1):
        raise _SkipError(
            f"block shapes {block.tolist()} and {back_block.tolist()} differ or are not positive"
        )
    if filter_value.ndim != 4 or filter_node.attr["dtype"].type not in _FLOAT_TYPES:
        raise _SkipError(f"filter '{filter_node.name}' is not a 4-D float tensor")
    other_readers = sorted({c.name for c in consumers[filter_node.name]} - {conv.name})
    if other_readers:
        # The up-sampled filter keeps the filter's name, so every reader would get it.
        raise _SkipError(f"filter '{filter_node.name}' is also read by '{other_readers[0]}'")
    conv_padding = _string_attr(conv, "padding", "VALID")
    paddings_needed = {
        _flat_padding(conv_padding, filter_value.shape[axis], int(block[axis]),
                      tuple(int(v) for v in paddings[axis]), tuple(int(v) for v in crops[axis]))
        for axis in (0, 1)
    }
    if len(paddings_needed) != 1 or None in paddings_needed:
        raise _SkipError(
            f"paddings {paddings.tolist()} and crops {crops.tolist()} match neither a SAME nor a "
            "VALID dilated conv"
        )
    padding = paddings_needed.pop()

    block_h, block_w = int(block[0]), int(block[1])
    height, width, in_channels, out_channels = filter_value.shape
    upsampled = np.zeros(
        ((height - 1) * block_h + 1, (width - 1) * block_w + 1, in_channels, out_channels), filter_value.dtype
    )
    upsampled[::block_h, ::block_w] = filter_value
    new_filter = make_const_node(filter_node.name, upsampled, dtype=filter_node.attr["dtype"].type)
    _with_controls(new_filter, filter_node)

    flattened = node_def_pb2.NodeDef(name=batch_to_space.name, op=conv.op, device=conv.device)
    flattened.input.extend([data_inputs(space_to_batch)[0], new_filter.name])
    _copy_attrs(flattened, conv, "T", "strides")
    flattened.attr["padding"].s = padding.encode()
    _copy_attrs(flattened, conv, "data_format")
    if conv.op == "Conv2D":
        _copy_attrs(flattened, conv, "use_cudnn_on_gpu")
    _with_controls(flattened, space_to_batch, conv, batch_to_space)
    return [input_node, new_filter, flattened]


@register("flatten_atrous_conv", on_functions=True)
def flatten_atrous_conv(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Replace an atrous convolution written as space-to-batch by one dilated-filter conv.

    Matches: BatchToSpaceND of (Conv2D|DepthwiseConv2dNative of (SpaceToBatchND of any,
    block_shape, paddings), filter), block_shape, crops.
    Produces: the filter Const, same name, up-sampled to [(H-1)*bh+1, (W-1)*bw+1, I, O] with
    zeros between the taps; a conv of the same op named as the BatchToSpaceND, reading the
    SpaceToBatchND's input and the filter, with T, strides, data_format (and use_cudnn_on_gpu
    for Conv2D) copied and padding SAME. Emitted in the order input node, filter, conv; the
    block_shape/paddings/crops nodes go.
    Params: none. Run fold_constants first if the shapes are computed, fold_batch_norms after.
    Differs from the C++ tool, which made every match a SAME conv: a match is rewritten only
    where the dilated conv is exact, i.e. stride 1, NHWC, no dilations, Const block shape,
    paddings, crops and float filter read by nothing else, and paddings/crops equal to a SAME
    dilated conv (the usual ``atrous_conv2d(padding="SAME")`` export) or to a VALID one (then
    the new conv is VALID; the C++ tool changed the output size). Anything else is left as it
    was and logged. Control inputs of the replaced nodes move to the new conv, the port of the
    SpaceToBatchND's input is kept, and the filter keeps its dtype.
    """
    consumers = consumers_map(graph_def)
    return _replace(graph_def, context.transform, _ATROUS, lambda match: _flatten_atrous(match, consumers))


# ---------------------------------------------------------------------------------------------
# fuse_pad_and_conv, fuse_resize_and_conv, fuse_resize_pad_and_conv
# ---------------------------------------------------------------------------------------------


def _check_fusable_conv(conv: node_def_pb2.NodeDef, allowed_types: frozenset[int], fused_op: str) -> None:
    _check_plain_conv(conv)
    if conv.attr["T"].type not in allowed_types:
        raise _SkipError(f"{fused_op} does not take T={types_pb2.DataType.Name(conv.attr['T'].type)}")


def _check_resize(resize: node_def_pb2.NodeDef, conv: node_def_pb2.NodeDef) -> None:
    if resize.attr["half_pixel_centers"].b:
        raise _SkipError(
            f"ResizeBilinear '{resize.name}' has half_pixel_centers=true, which the fused op ignores"
        )
    if resize.attr["T"].type != conv.attr["T"].type:
        raise _SkipError(f"ResizeBilinear '{resize.name}' reads a different type than the conv computes")


def _check_mirror_pad(pad: node_def_pb2.NodeDef) -> None:
    if "Tpaddings" in pad.attr and pad.attr["Tpaddings"].type != types_pb2.DT_INT32:
        raise _SkipError(f"MirrorPad '{pad.name}' has non-int32 paddings; the fused op takes int32")


def _fused_conv(op: str, conv: node_def_pb2.NodeDef, inputs: list[str]) -> node_def_pb2.NodeDef:
    return node_def_pb2.NodeDef(name=conv.name, op=op, input=inputs)


@register("fuse_resize_pad_and_conv", on_functions=True)
def fuse_resize_pad_and_conv(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Fuse ResizeBilinear -> MirrorPad -> Conv2D into one FusedResizeAndPadConv2D.

    Matches: Conv2D of (MirrorPad of ResizeBilinear, paddings), filter.
    Produces: FusedResizeAndPadConv2D named as the conv, inputs [resize input, resize size,
    paddings, filter], attrs resize_align_corners (from align_corners), mode (from MirrorPad),
    T, padding, strides (from the conv); filter and paddings nodes re-emitted before it; the
    ResizeBilinear and MirrorPad go.
    Params: none.
    Differs from the C++ tool: matches the fused op would compute differently are left as they
    were and logged: ResizeBilinear with half_pixel_centers=true (what TF 2's tf.image.resize
    emits), a conv with non-NHWC data_format, dilations, explicit paddings, or a T the fused
    op lacks, a ResizeBilinear whose input type differs, int64 paddings. Control inputs of the
    replaced nodes move to the fused node.
    """

    def build(match: NodeMatch) -> list[node_def_pb2.NodeDef]:
        conv, pad, weights = match.node, match.inputs[0].node, match.inputs[1].node
        resize, pad_dims = match.inputs[0].inputs[0].node, match.inputs[0].inputs[1].node
        _check_fusable_conv(conv, _FUSED_RESIZE_TYPES, "FusedResizeAndPadConv2D")
        _check_resize(resize, conv)
        _check_mirror_pad(pad)
        inputs = [*data_inputs(resize)[:2], data_inputs(pad)[1], data_inputs(conv)[1]]
        fused = _fused_conv("FusedResizeAndPadConv2D", conv, inputs)
        if "align_corners" in resize.attr:
            fused.attr["resize_align_corners"].CopyFrom(resize.attr["align_corners"])
        _copy_attrs(fused, pad, "mode")
        _copy_attrs(fused, conv, "T", "padding", "strides")
        return [weights, pad_dims, _with_controls(fused, conv, pad, resize)]

    conv_pattern = pattern("Conv2D", pattern("MirrorPad", pattern("ResizeBilinear"), ANY), ANY)
    return _replace(graph_def, context.transform, conv_pattern, build)


@register("fuse_resize_and_conv", on_functions=True)
def fuse_resize_and_conv(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Fuse ResizeBilinear -> Conv2D into one FusedResizeAndPadConv2D with zero padding.

    Matches: Conv2D of ResizeBilinear, filter.
    Produces: a Const ``<conv>_dummy_paddings`` (int32 [4, 2] zeros) and a
    FusedResizeAndPadConv2D named as the conv, inputs [resize input, resize size,
    ``<conv>_dummy_paddings``, filter], mode REFLECT, resize_align_corners, T, padding, strides
    as in fuse_resize_pad_and_conv; the filter node is re-emitted first; the ResizeBilinear goes.
    Params: none.
    Differs from the C++ tool: the same skipped matches as fuse_resize_pad_and_conv (apart from
    the MirrorPad checks), logged; control inputs of the replaced nodes move to the fused node.
    """

    def build(match: NodeMatch) -> list[node_def_pb2.NodeDef]:
        conv, resize, weights = match.node, match.inputs[0].node, match.inputs[1].node
        _check_fusable_conv(conv, _FUSED_RESIZE_TYPES, "FusedResizeAndPadConv2D")
        _check_resize(resize, conv)
        dummy_paddings = make_const_node(f"{conv.name}_dummy_paddings", np.zeros((4, 2), np.int32))
        inputs = [*data_inputs(resize)[:2], dummy_paddings.name, data_inputs(conv)[1]]
        fused = _fused_conv("FusedResizeAndPadConv2D", conv, inputs)
        if "align_corners" in resize.attr:
            fused.attr["resize_align_corners"].CopyFrom(resize.attr["align_corners"])
        fused.attr["mode"].s = b"REFLECT"
        _copy_attrs(fused, conv, "T", "padding", "strides")
        return [weights, dummy_paddings, _with_controls(fused, conv, resize)]

    return _replace(graph_def, context.transform, pattern("Conv2D", pattern("ResizeBilinear"), ANY), build)


@register("fuse_pad_and_conv", on_functions=True)
def fuse_pad_and_conv(graph_def: graph_pb2.GraphDef, context: TransformContext) -> graph_pb2.GraphDef:
    """Fuse MirrorPad -> Conv2D into one FusedPadConv2D.

    Matches: Conv2D of (MirrorPad of any, paddings), filter.
    Produces: FusedPadConv2D named as the conv, inputs [pad input, paddings, filter], attrs
    mode (from MirrorPad), T, padding, strides (from the conv); filter, pad input and paddings
    nodes re-emitted before it; the MirrorPad goes.
    Params: none.
    Differs from the C++ tool: a conv with non-NHWC data_format, dilations, explicit paddings or
    a T FusedPadConv2D lacks, or int64 paddings, is left as it was and logged; control inputs
    of the replaced nodes move to the fused node.
    """

    def build(match: NodeMatch) -> list[node_def_pb2.NodeDef]:
        conv, pad, weights = match.node, match.inputs[0].node, match.inputs[1].node
        input_node, pad_dims = match.inputs[0].inputs[0].node, match.inputs[0].inputs[1].node
        _check_fusable_conv(conv, _FUSED_PAD_TYPES, "FusedPadConv2D")
        _check_mirror_pad(pad)
        fused = _fused_conv("FusedPadConv2D", conv, [*data_inputs(pad)[:2], data_inputs(conv)[1]])
        _copy_attrs(fused, pad, "mode")
        _copy_attrs(fused, conv, "T", "padding", "strides")
        return [weights, input_node, pad_dims, _with_controls(fused, conv, pad)]

    conv_pattern = pattern("Conv2D", pattern("MirrorPad", ANY, ANY), ANY)
    return _replace(graph_def, context.transform, conv_pattern, build)
