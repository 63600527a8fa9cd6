"""Freezing: any SavedModel (TF 2 ``tf.saved_model.save`` / Keras export, or TF 1 SavedModelBuilder)
to one GraphDef in which every variable is a constant and every selected signature is served.

TF 1 exports load into a v1 Session (restore, then main_op / legacy_init_op) and freeze with
``convert_variables_to_constants`` from the signatures' inputs and outputs. TF 2 exports load
with ``tf.saved_model.load``; each signature function freezes with
``convert_variables_to_constants_v2``. Signatures whose frozen graphs are identical (Keras'
``serve`` and ``serving_default``) share one copy; when several distinct graphs remain, each
goes under a scope named after its first signature key (``predict/...``) and identical
constants are stored once.

Lookup tables keep working: each table an output reads is exported from the loaded model and
re-filled at load time by a ``LookupTableImportV2`` init node (``<table>/frozen_init``), which
the converted SavedModel's main_op runs, so text-file and constant initialisers alike become
constants in the graph. Resources that are not tables, variables left unfrozen and outputs that
need a placeholder their signature does not feed are refused, naming the node.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence

import numpy as np
from tensorflow.core.framework import graph_pb2
from tensorflow.core.framework.attr_value_pb2 import AttrValue

from ..graph_transforms.graph_utils import (
    make_const_node,
    make_node,
    node_map,
    reachable_names,
)
from ..graph_transforms.op_sets import PLACEHOLDER_OPS, VARIABLE_OPS
from ._surgery import (
    canonical_function_names,
    drop_pure_control_edges,
    merge_graphs,
    prefix_nodes,
    scope_name,
    strip_load_suffixes,
    unique_name,
)
from .errors import SavedModelError, tensorflow_errors
from .model import FrozenModel, SignatureInfo, TensorInfo
from .reader import (
    as_tags,
    is_tf2_export,
    read_meta_graph,
    select_signature_keys,
    signature_info_from_proto,
)
from .safety import refuse_unsafe_ops, scan_for_unsafe_ops

log = logging.getLogger(__name__)

# Table-creating ops: (resource handle?, op that re-fills it).
TABLE_OPS = {
    "HashTableV2": "LookupTableImportV2",
    "MutableHashTableV2": "LookupTableImportV2",
    "MutableHashTableOfTensorsV2": "LookupTableImportV2",
    "MutableDenseHashTableV2": "LookupTableImportV2",
    "HashTable": "LookupTableImport",
    "MutableHashTable": "LookupTableImport",
    "MutableHashTableOfTensors": "LookupTableImport",
    "MutableDenseHashTable": "LookupTableImport",
}
# Ops that may read a captured TF 2 table handle, with the attrs holding key and value dtypes.
TABLE_READERS = {
    "LookupTableFindV2": ("Tin", "Tout"),
    "LookupTableSizeV2": (None, None),
    "LookupTableExportV2": ("Tkeys", "Tvalues"),
    "LookupTableImportV2": ("Tin", "Tout"),
    "LookupTableInsertV2": ("Tin", "Tout"),
    "LookupTableRemoveV2": ("Tin", None),
}
TABLE_WRITERS = frozenset({"LookupTableImportV2", "LookupTableInsertV2", "LookupTableRemoveV2"})


def freeze_saved_model(
    saved_model_dir: str | os.PathLike,
    signature_keys: Sequence[str] | None = None,
    tags: str | Iterable[str] = ("serve",),
    allow_ops: Iterable[str] = (),
) -> FrozenModel:
    """Freeze the selected signatures (default: all) of the MetaGraphDef tagged ``tags``.

    The safety scan runs on the whole MetaGraphDef before TensorFlow loads anything; ops on
    the denylist are refused unless ``allow_ops`` names them.
    """
    where = str(saved_model_dir)
    tags = as_tags(tags)
    meta_graph = read_meta_graph(saved_model_dir, tags)
    keys = select_signature_keys(meta_graph, signature_keys, where)
    refuse_unsafe_ops(scan_for_unsafe_ops(meta_graph, allow_ops), where)
    declared = {key: signature_info_from_proto(key, meta_graph.signature_def[key]) for key in keys}
    source_format = "tf2" if is_tf2_export(meta_graph) else "tf1"
    log.info("freezing %s (%s export, signatures: %s)", where, source_format, ", ".join(keys))
    with tensorflow_errors(where, "freezing"):
        if source_format == "tf2":
            graph_def, signatures, init_nodes = _freeze_tf2(where, tags, declared)
        else:
            graph_def, signatures, init_nodes = _freeze_tf1(where, tags, declared)
    model = FrozenModel(graph_def, signatures, tuple(init_nodes), tags, source_format)
    keep = model.input_node_names() + model.output_node_names()
    graph_def = canonical_function_names(strip_load_suffixes(drop_pure_control_edges(graph_def, keep)))
    model = model.with_graph_def(graph_def)
    _check_frozen(model, where)
    log.info("frozen: %d nodes, %d bytes", len(graph_def.node), graph_def.ByteSize())
    return model


# ---------------------------------------------------------------------------------------------
# TF 1
# ---------------------------------------------------------------------------------------------


def _freeze_tf1(where: str, tags: tuple[str, ...], declared: dict[str, SignatureInfo]):
    import tensorflow as tf
    from tensorflow.python.util import deprecation

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default(), v1.Session(graph=graph) as session, deprecation.silence():
        v1.saved_model.loader.load(session, list(tags), where)
        graph_def = graph.as_graph_def()
        nodes = node_map(graph_def)
        for key, signature in declared.items():
            for name, info in signature.inputs.items():
                node = nodes.get(info.node_name)
                if node is None or node.op not in PLACEHOLDER_OPS or not info.name.endswith(":0"):
                    found = "missing" if node is None else f"a {node.op} node"
                    raise SavedModelError(
                        f"{where}: signature '{key}' input '{name}' is tensor {info.name} ({found}); "
                        f"only Placeholder inputs can be frozen"
                    )
        outputs = sorted({t.node_name for s in declared.values() for t in s.outputs.values()})
        inputs = sorted({t.node_name for s in declared.values() for t in s.inputs.values()})
        taken = set(nodes)
        init_nodes: list[str] = []
        for table in _tables_read_by(nodes, outputs):
            keys, values = _export_tf1_table(where, session, graph, nodes[table])
            new_nodes = _table_refill_nodes(nodes[table], keys, values, taken)
            graph_def.node.extend(new_nodes)
            init_nodes.append(new_nodes[-1].name)
        frozen = v1.graph_util.convert_variables_to_constants(session, graph_def, outputs + inputs + init_nodes)
    return frozen, dict(declared), init_nodes


def _tables_read_by(nodes: dict, outputs: list[str]) -> list[str]:
    return sorted(name for name in reachable_names(nodes, outputs) if nodes[name].op in TABLE_OPS)


def _dtype_attr(node, key: str):
    import tensorflow as tf

    return tf.dtypes.as_dtype(node.attr[key].type)


def _export_tf1_table(where: str, session, graph, table_node) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow as tf
    from tensorflow.python.ops import gen_lookup_ops

    handle = graph.get_tensor_by_name(f"{table_node.name}:0")
    key_dtype, value_dtype = _dtype_attr(table_node, "key_dtype"), _dtype_attr(table_node, "value_dtype")
    with graph.as_default():
        if table_node.op.endswith("V2"):
            exported = gen_lookup_ops.lookup_table_export_v2(handle, key_dtype, value_dtype)
        else:
            exported = gen_lookup_ops.lookup_table_export(handle, key_dtype, value_dtype)
    try:
        keys, values = session.run(exported)
    except tf.errors.OpError:
        raise SavedModelError(
            f"{where}: lookup table '{table_node.name}' is not initialised by the SavedModel's main_op "
            f"or legacy_init_op, so its contents cannot be frozen"
        ) from None
    return _sorted_table(keys, values)


def _sorted_table(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Key order of an exported hash table is arbitrary; sort it so freezing is deterministic."""
    keys, values = np.asarray(keys), np.asarray(values)
    if keys.ndim == 1 and len(keys):
        order = np.argsort(keys, kind="stable")
        keys, values = keys[order], values[order]
    return keys, values


def _table_refill_nodes(table_node, keys: np.ndarray, values: np.ndarray, taken: set[str]) -> list:
    """``<table>/frozen_keys``, ``<table>/frozen_values`` and the init node that imports them."""
    key_type, value_type = table_node.attr["key_dtype"].type, table_node.attr["value_dtype"].type
    keys_node = make_const_node(unique_name(f"{table_node.name}/frozen_keys", taken), keys, dtype=key_type)
    values_node = make_const_node(unique_name(f"{table_node.name}/frozen_values", taken), values, dtype=value_type)
    init = make_node(
        TABLE_OPS[table_node.op],
        unique_name(f"{table_node.name}/frozen_init", taken),
        [table_node.name, keys_node.name, values_node.name],
        {"Tin": key_type, "Tout": value_type},
    )
    return [keys_node, values_node, init]


# ---------------------------------------------------------------------------------------------
# TF 2
# ---------------------------------------------------------------------------------------------


def _freeze_tf2(where: str, tags: tuple[str, ...], declared: dict[str, SignatureInfo]):
    import tensorflow as tf

    loaded = tf.saved_model.load(where, tags=list(tags))
    parts: dict[bytes, list] = {}
    for key, signature in declared.items():
        graph_def, inputs, outputs, init_nodes = _freeze_tf2_signature(where, loaded.signatures[key], signature)
        graph_def = canonical_function_names(graph_def)
        data = graph_def.SerializeToString(deterministic=True) + repr(init_nodes).encode()
        parts.setdefault(data, [graph_def, init_nodes, []])[2].append((key, inputs, outputs))
    groups = list(parts.values())
    taken: set[str] = set()
    merged_parts, signatures, all_init_nodes = [], {}, []
    for graph_def, init_nodes, members in groups:
        prefix = unique_name(scope_name(members[0][0]), taken) if len(groups) > 1 else ""
        rename = (lambda name, p=prefix: f"{p}/{name}") if prefix else (lambda name: name)
        merged_parts.append(prefix_nodes(graph_def, prefix) if prefix else graph_def)
        all_init_nodes.extend(rename(n) for n in init_nodes)
        for key, inputs, outputs in members:
            original = declared[key]
            signatures[key] = SignatureInfo(
                key,
                original.method_name,
                {k: TensorInfo(rename(inputs[k]), v.dtype, v.shape) for k, v in original.inputs.items()},
                {k: TensorInfo(rename(outputs[k]), v.dtype, v.shape) for k, v in original.outputs.items()},
            )
    merged = merged_parts[0] if len(merged_parts) == 1 else merge_graphs(merged_parts)
    return merged, dict(sorted(signatures.items())), all_init_nodes


def _freeze_tf2_signature(where: str, function, signature: SignatureInfo):
    """Freeze one signature function: (graph_def, input key -> tensor, output key -> tensor, init nodes)."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    key = signature.key
    frozen = convert_variables_to_constants_v2(function)
    graph_def = frozen.graph.as_graph_def()
    _, kwargs = function.structured_input_signature
    arg_keys = sorted(kwargs)
    if arg_keys != sorted(signature.inputs):
        raise SavedModelError(
            f"{where}: signature '{key}' function takes {arg_keys}, expected {sorted(signature.inputs)}"
        )
    inputs = {k: t.name for k, t in zip(arg_keys, frozen.inputs[: len(arg_keys)], strict=True)}
    output_keys = sorted(function.structured_outputs)
    if output_keys != sorted(signature.outputs) or len(frozen.outputs) != len(output_keys):
        raise SavedModelError(
            f"{where}: signature '{key}' function returns {output_keys}, expected {sorted(signature.outputs)}"
        )
    outputs = {k: t.name for k, t in zip(output_keys, frozen.outputs, strict=True)}
    for side, names, declared in (("input", inputs, signature.inputs), ("output", outputs, signature.outputs)):
        tensors = frozen.inputs if side == "input" else frozen.outputs
        by_name = {t.name: t for t in tensors}
        for name, tensor_name in names.items():
            if by_name[tensor_name].dtype.name != declared[name].dtype:
                raise SavedModelError(
                    f"{where}: signature '{key}' {side} '{name}' is {by_name[tensor_name].dtype.name} in the "
                    f"function but {declared[name].dtype} in the SignatureDef"
                )
    captured = {internal.op.name: external for external, internal in function.graph.captures}
    init_nodes: list[str] = []
    resources = [t.op.name for t in frozen.inputs[len(arg_keys) :]]
    if resources:
        graph_def, init_nodes = _rebuild_tables(where, key, graph_def, resources, captured)
    return graph_def, inputs, outputs, init_nodes


def _table_readers(nodes: dict, consumers: dict, name: str) -> list:
    """Nodes reading the resource ``name``, looking through Identity nodes."""
    found, pending, seen = [], [name], set()
    while pending:
        current = pending.pop()
        for consumer in consumers.get(current, []):
            if consumer.name in seen:
                continue
            seen.add(consumer.name)
            if consumer.op == "Identity":
                pending.append(consumer.name)
            else:
                found.append(consumer)
    return found


def _rebuild_tables(where: str, key: str, graph_def, resources: list[str], captured: dict):
    """Replace each captured table handle (a resource Placeholder) by a table and its refill."""
    import tensorflow as tf

    from ..graph_transforms.graph_utils import consumers_map

    nodes, consumers = node_map(graph_def), consumers_map(graph_def)
    taken = set(nodes)
    replacements, extra, init_nodes = {}, [], []
    for name in resources:
        readers = _table_readers(nodes, consumers, name)
        key_type = value_type = None
        for reader in readers:
            if reader.op not in TABLE_READERS:
                raise SavedModelError(
                    f"{where}: signature '{key}': captured resource '{name}' is read by node '{reader.name}' "
                    f"(op {reader.op}); only variables and lookup tables can be frozen"
                )
            key_attr, value_attr = TABLE_READERS[reader.op]
            key_type = key_type or (reader.attr[key_attr].type if key_attr else None)
            value_type = value_type or (reader.attr[value_attr].type if value_attr else None)
        if key_type is None or value_type is None or name not in captured:
            raise SavedModelError(
                f"{where}: signature '{key}': captured resource '{name}' cannot be frozen "
                f"(no lookup op shows its key and value types)"
            )
        exported = tf.raw_ops.LookupTableExportV2(
            table_handle=captured[name], Tkeys=tf.dtypes.as_dtype(key_type), Tvalues=tf.dtypes.as_dtype(value_type)
        )
        keys, values = _sorted_table(exported[0].numpy(), exported[1].numpy())
        attrs = {
            "key_dtype": AttrValue(type=key_type),
            "value_dtype": AttrValue(type=value_type),
            "shared_name": name,
            "container": "",
            "use_node_name_sharing": False,
        }
        if values.ndim > 1:
            op = "MutableHashTableOfTensorsV2"
            attrs["value_shape"] = AttrValue(shape=tf.TensorShape(values.shape[1:]).as_proto())
        elif any(r.op in TABLE_WRITERS for r in readers):
            op = "MutableHashTableV2"
        else:
            op = "HashTableV2"
        table = make_node(op, name, [], attrs)
        replacements[name] = table
        refill = _table_refill_nodes(table, keys, values, taken)
        extra.extend(refill)
        init_nodes.append(refill[-1].name)
    result = graph_pb2.GraphDef()
    result.CopyFrom(graph_def)
    del result.node[:]
    result.node.extend(replacements.get(node.name, node) for node in graph_def.node)
    result.node.extend(extra)
    return result, init_nodes


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _check_frozen(model: FrozenModel, where: str) -> None:
    """No variable left, no resource placeholder, and each signature feeds what it needs."""
    model.check_graph()
    nodes = node_map(model.graph_def)
    for node in model.graph_def.node:
        if node.op in VARIABLE_OPS:
            raise SavedModelError(f"{where}: variable node '{node.name}' ({node.op}) could not be frozen")
    for key, signature in sorted(model.signatures.items()):
        fed = {t.node_name for t in signature.inputs.values()}
        # A fed PlaceholderWithDefault never evaluates its default; every other fed node is
        # a Placeholder (the freezers refuse anything else), which has no inputs anyway.
        needed = reachable_names(nodes, [t.node_name for t in signature.outputs.values()], stop_at=fed)
        unfed = sorted(name for name in needed if nodes[name].op == "Placeholder" and name not in fed)
        if unfed:
            raise SavedModelError(
                f"{where}: signature '{key}' outputs need placeholder '{unfed[0]}', which is not one of its inputs"
            )
