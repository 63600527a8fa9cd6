"""Converting: a (transformed) frozen model back to a TF 1-format SavedModel, written with
``tf.compat.v1.saved_model.Builder``, with the original signature keys, input and output keys,
dtypes, shapes and method names, so a TF Serving client of the original works unchanged.

Dequantize once: ``quantize_weights`` leaves ``Dequantize(Const quint8, Const min, Const max)``
for every large weight, which would run on every call. With ``dequantize_once`` each such
Dequantize (``<w>``) feeds a float resource variable ``<w>/dequantized_once`` in the
LOCAL_VARIABLES collection instead of its consumers: the 8-bit constants stay in
saved_model.pb (small on disk), the variable is not in the checkpoint, the SavedModel's main_op
assigns it once at load time, and calls read the float variable (``<w>/dequantized_once/Read``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np
from tensorflow.core.framework import graph_pb2, tensor_shape_pb2, types_pb2, variable_pb2
from tensorflow.core.framework.attr_value_pb2 import AttrValue
from tensorflow.core.protobuf import meta_graph_pb2

from ..atomic import atomic_directory
from ..errors import first_line
from ..graph_transforms.graph_utils import (
    copy_graph,
    make_node,
    node_map,
    parse_input,
    reachable_names,
    rename_node_inputs,
)
from ._files import check_output_directory
from ._surgery import unique_name
from .errors import SavedModelError, tensorflow_errors
from .model import FrozenModel, SignatureInfo, TensorInfo
from .onednn import add_self_check, describe_ops, onednn_only_ops
from .warmup import DEFAULT_BATCH_SIZES, write_warmup_requests

log = logging.getLogger(__name__)

MAIN_OP_NAME = "frozen_model_init"


def convert_to_saved_model(
    frozen: FrozenModel,
    out_dir: str | os.PathLike,
    dequantize_once: bool = True,
    overwrite: bool = False,
    warmup_batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    warmup_samples: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> dict:
    """Write ``frozen`` as a SavedModel at ``out_dir``, atomically (temporary directory + rename);
    return what was done (see :func:`write_saved_model`).

    An existing non-empty ``out_dir`` is an error unless ``overwrite``.
    """
    with atomic_directory(check_output_directory(out_dir, overwrite)) as temporary:
        return write_saved_model(
            frozen, temporary, dequantize_once, label=str(out_dir),
            warmup_batch_sizes=warmup_batch_sizes, warmup_samples=warmup_samples,
        )


def write_saved_model(
    frozen: FrozenModel,
    directory: str | os.PathLike,
    dequantize_once: bool = True,
    label: str | None = None,
    warmup_batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    warmup_samples: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> dict:
    """Write the SavedModel into the (empty or missing) ``directory``; return what was done.

    ``label`` names the output in error messages (default: ``directory``). A model holding
    oneDNN-only int8 ops gets the load-time self-check of :mod:`.onednn` in its init op.
    ``warmup_batch_sizes`` (empty: none) are the batch sizes of the TF Serving warm-up records
    written for every signature (:mod:`.warmup`), from ``warmup_samples`` (signature -> input ->
    rows) where given, else generated from the signature.
    """
    import tensorflow as tf
    from tensorflow.python.ops.resource_variable_ops import ResourceVariable
    from tensorflow.python.util import deprecation

    frozen.check_graph()
    graph_def, renames, variable_defs = frozen.graph_def, {}, []
    if dequantize_once:
        graph_def, renames, variable_defs = cache_dequantized_weights(graph_def, frozen.init_node_names)
    init_names = list(frozen.init_node_names) + [v.initializer_name for v in variable_defs]
    int8_ops = onednn_only_ops(graph_def)
    if int8_ops:
        graph_def, self_check = add_self_check(graph_def)
        init_names.append(self_check)
        log.info("oneDNN-only ops (%s): the init op checks their kernels at load", describe_ops(int8_ops))
    graph_def, main_op = _add_main_op(graph_def, init_names)
    where = label or str(directory)
    v1 = tf.compat.v1
    graph = tf.Graph()
    with tensorflow_errors(where, "writing the SavedModel"), graph.as_default(), deprecation.silence():
        try:
            tf.import_graph_def(graph_def, name="")
        except (ValueError, tf.errors.OpError) as error:
            raise SavedModelError(f"{where}: the graph does not import into TensorFlow: {_tf_detail(error)}") from None
        for variable_def in variable_defs:
            graph.add_to_collection(v1.GraphKeys.LOCAL_VARIABLES, ResourceVariable(variable_def=variable_def))
        signature_defs = {key: _signature_def(graph, s, renames) for key, s in sorted(frozen.signatures.items())}
        with v1.Session(graph=graph) as session:
            builder = v1.saved_model.Builder(str(directory))
            builder.add_meta_graph_and_variables(
                session,
                list(frozen.tags),
                signature_def_map=signature_defs,
                main_op=graph.get_operation_by_name(main_op) if main_op else None,
                strip_default_attrs=True,
            )
            builder.save()
    if warmup_batch_sizes:
        write_warmup_requests(directory, frozen.signatures.values(), warmup_batch_sizes, warmup_samples)
    log.info("converted to a SavedModel (%d weight(s) dequantized once at load)", len(variable_defs))
    return {
        "dequantized_once": len(variable_defs),
        "main_op": main_op,
        "onednn_only_ops": dict(sorted(int8_ops.items())),
        "warmup_batch_sizes": list(warmup_batch_sizes or ()),
    }


def _tf_detail(error: Exception) -> str:
    """The first line of a TensorFlow error, with the node it names if that is further down."""
    text = str(error).strip()
    first = first_line(error)
    node = re.search(r"\{\{node ([^}]+)\}\}", text)
    return f"{first} (node '{node.group(1)}')" if node and node.group(1) not in first else first


def _add_main_op(graph_def: graph_pb2.GraphDef, init_names: list[str]) -> tuple[graph_pb2.GraphDef, str | None]:
    if not init_names:
        return graph_def, None
    result = copy_graph(graph_def)
    name = unique_name(MAIN_OP_NAME, {node.name for node in result.node})
    result.node.append(make_node("NoOp", name, [f"^{n}" for n in init_names]))
    return result, name


def _signature_def(graph, signature: SignatureInfo, renames: dict[str, str]) -> meta_graph_pb2.SignatureDef:
    """A SignatureDef with the declared dtypes and shapes, checked against the graph."""
    from tensorflow.python.framework import dtypes

    key = signature.key
    proto = meta_graph_pb2.SignatureDef(method_name=signature.method_name)
    sides = (("input", signature.inputs, proto.inputs), ("output", signature.outputs, proto.outputs))
    for side, tensors, target in sides:
        for name, info in sorted(tensors.items()):
            tensor_name = renames.get(info.name, info.name)
            try:
                tensor = graph.get_tensor_by_name(tensor_name)
            except (KeyError, ValueError):
                raise SavedModelError(
                    f"signature '{key}' {side} '{name}': tensor {info.name} is not in the graph"
                ) from None
            if tensor.dtype.base_dtype.name != info.dtype:
                raise SavedModelError(
                    f"signature '{key}' {side} '{name}': tensor {info.name} is {tensor.dtype.name}, "
                    f"the signature declares {info.dtype}"
                )
            target[name].CopyFrom(_tensor_info_proto(tensor_name, dtypes.as_dtype(info.dtype).as_datatype_enum, info))
    return proto


def _tensor_info_proto(tensor_name: str, dtype_enum: int, info: TensorInfo) -> meta_graph_pb2.TensorInfo:
    shape = tensor_shape_pb2.TensorShapeProto()
    if info.shape is None:
        shape.unknown_rank = True
    else:
        shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=-1 if d is None else d) for d in info.shape)
    return meta_graph_pb2.TensorInfo(name=tensor_name, dtype=dtype_enum, tensor_shape=shape)


# ---------------------------------------------------------------------------------------------
# Dequantize once
# ---------------------------------------------------------------------------------------------


def _const_source(nodes: dict, input_string: str):
    """The Const an input reads, looking through Identity nodes (None if it is not one)."""
    seen = set()
    while True:
        is_control, name, port = parse_input(input_string)
        node = nodes.get(name)
        if is_control or port != 0 or node is None or name in seen:
            return None
        seen.add(name)
        if node.op == "Const":
            return node
        if node.op != "Identity" or len(node.input) != 1:
            return None
        input_string = node.input[0]


def cache_dequantized_weights(graph_def: graph_pb2.GraphDef, init_node_names=()):
    """Route each constant Dequantize through a float variable assigned once at load time.

    Matches: Dequantize of (Const, Const, Const), each possibly behind Identity nodes, not
    feeding an init node. Produces ``<w>/dequantized_once`` (VarHandleOp), ``.../Assign``
    (AssignVariableOp from ``<w>``) and ``.../Read/ReadVariableOp``, which every reader of
    ``<w>`` reads instead. Returns (graph, tensor renames, VariableDefs).
    """
    nodes = node_map(graph_def)
    feeds_init = reachable_names(nodes, init_node_names)
    candidates = [
        node
        for node in graph_def.node
        if node.op == "Dequantize"
        and node.name not in feeds_init
        and len(node.input) == 3
        and all(_const_source(nodes, i) is not None for i in node.input)
    ]
    if not candidates:
        return graph_def, {}, []
    taken = set(nodes)
    reads: dict[str, str] = {}
    new_nodes, variable_defs = [], []
    for node in candidates:
        quantized = _const_source(nodes, node.input[0])
        dtype = node.attr["dtype"].type if "dtype" in node.attr else types_pb2.DT_FLOAT
        shape = AttrValue(shape=quantized.attr["value"].tensor.tensor_shape)
        variable = unique_name(f"{node.name}/dequantized_once", taken)
        assign, read = f"{variable}/Assign", f"{variable}/Read/ReadVariableOp"
        taken.update((assign, read))
        new_nodes += [
            make_node(
                "VarHandleOp", variable, [], {"dtype": dtype, "shape": shape, "shared_name": variable, "container": ""}
            ),
            make_node("AssignVariableOp", assign, [variable, node.name], {"dtype": dtype}),
            make_node("ReadVariableOp", read, [variable], {"dtype": dtype}),
        ]
        reads[node.name] = read
        variable_defs.append(
            variable_pb2.VariableDef(
                variable_name=f"{variable}:0",
                initializer_name=assign,
                snapshot_name=f"{read}:0",
                initial_value_name=f"{node.name}:0",
                is_resource=True,
                trainable=False,
            )
        )
    # A Dequantize has one output, so its readers read port 0 or wait for it (``^``). The new
    # nodes join after the renaming, so each Assign still reads its Dequantize.
    read_renames = {}
    for name, read in reads.items():
        read_renames.update({f"{name}:0": read, f"^{name}": f"^{read}"})
    result = rename_node_inputs(graph_def, read_renames, follow_chains=False)
    result.node.extend(new_nodes)
    renames = {f"{name}:0": f"{read}:0" for name, read in reads.items()}
    return result, renames, variable_defs
