"""The safety scan: before anything from a SavedModel runs, look through its graph and function
library for ops that reach the file system, the network or Python, and refuse them unless the
user allows them by name.

The denylist starts from ``saved_model_cli scan``'s (ReadFile, WriteFile, PrintV2) and adds the
Python-calling ops, file readers and writers, file-listing, summary, debug and RPC ops.
Checkpoint ops (SaveV2, RestoreV2, ...) are allowed only inside the SaveableObject machinery
the SaverDef points at: a save op where only the save tensor reaches it, a restore op where
only the save or restore op reaches it. A text-file table initialiser in a TF 1 graph must read
one of the SavedModel's declared assets.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path

from tensorflow.core.framework import graph_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from ..graph_transforms.graph_utils import lookup_op_def, node_name_from_input, reachable_names
from .errors import SavedModelError

_READS = "reads files"
_WRITES = "writes files"
_PYTHON = "runs Python code"
_NETWORK = "talks to the network"

DENYLIST: dict[str, str] = {
    # saved_model_cli scan's own denylist.
    "ReadFile": _READS,
    "WriteFile": _WRITES,
    "PrintV2": "prints to the process's output",
    "Print": "prints to the process's output",
    "PyFunc": _PYTHON,
    "PyFuncStateless": _PYTHON,
    "EagerPyFunc": _PYTHON,
    "MatchingFiles": "lists files",
    "MatchingFilesDataset": "lists files",
    "ImmutableConst": "maps a file into memory",
    "FileSystemSetConfiguration": "configures file systems",
    "LoadAndRemapMatrix": _READS,
    **{
        op: _READS
        for op in (
            "WholeFileReader",
            "WholeFileReaderV2",
            "TextLineReader",
            "TextLineReaderV2",
            "FixedLengthRecordReader",
            "FixedLengthRecordReaderV2",
            "TFRecordReader",
            "TFRecordReaderV2",
            "LMDBReader",
            "TFRecordDataset",
            "TFRecordDatasetV2",
            "TextLineDataset",
            "FixedLengthRecordDataset",
            "FixedLengthRecordDatasetV2",
            "CSVDataset",
            "CSVDatasetV2",
            "ExperimentalCSVDataset",
            "LMDBDataset",
            "ExperimentalLMDBDataset",
            "LoadDataset",
        )
    },
    **{
        op: _WRITES
        for op in (
            "SaveDataset",
            "SaveDatasetV2",
            "DatasetToTFRecord",
            "ExperimentalDatasetToTFRecord",
            "SnapshotDataset",
            "SnapshotDatasetV2",
            "DistributedSave",
            "CreateSummaryFileWriter",
            "CreateSummaryDbWriter",
            "WriteSummary",
            "WriteScalarSummary",
            "WriteHistogramSummary",
            "WriteImageSummary",
            "WriteAudioSummary",
            "WriteGraphSummary",
            "WriteRawProtoSummary",
            "ImportEvent",
            "FlushSummaryWriter",
            "CloseSummaryWriter",
            "StatsAggregatorSetSummaryWriter",
            "DebugIdentity",
            "DebugIdentityV2",
            "DebugIdentityV3",
            "DebugNanCount",
            "DebugNumericSummary",
        )
    },
    **{
        op: _NETWORK
        for op in (
            "RpcServer",
            "RpcServerStart",
            "RpcServerRegister",
            "RpcClient",
            "RpcCall",
            "DataServiceDataset",
            "DataServiceDatasetV2",
            "DataServiceDatasetV3",
            "DataServiceDatasetV4",
            "RegisterDataset",
            "RegisterDatasetV2",
        )
    },
}
SAVE_OPS = {"SaveV2": _WRITES, "Save": _WRITES, "SaveSlices": _WRITES, "MergeV2Checkpoints": _WRITES}
RESTORE_OPS = {"RestoreV2": _READS, "Restore": _READS, "RestoreSlice": _READS}
TEXT_FILE_TABLE_OPS = ("InitializeTableFromTextFile", "InitializeTableFromTextFileV2")

_SAVE, _RESTORE, _OTHER = "save", "restore", "other"


@dataclasses.dataclass(frozen=True)
class UnsafeOp:
    """One refused node: its op, name, enclosing library function (None at top level), reason."""

    op: str
    node: str
    function: str | None
    reason: str

    def describe(self) -> str:
        where = f"node '{self.node}'" + (f" in function '{self.function}'" if self.function else "")
        return f"op {self.op} ({where}) {self.reason}"


def _called_functions(node, library_names: set[str]) -> set[str]:
    """Library functions a NodeDef calls: its op itself, or func / list(func) attrs."""
    called = {node.op} & library_names
    for value in node.attr.values():
        if value.HasField("func"):
            called.add(value.func.name)
        called.update(f.name for f in value.list.func)
    return called & library_names


def _sides(graph_def: graph_pb2.GraphDef, saver_def) -> dict[str, set[str]]:
    """For each top-level node: which of save / restore / other reaches it."""
    nodes = {node.name: node for node in graph_def.node}
    save_side = reachable_names(nodes, [node_name_from_input(saver_def.save_tensor_name)]) if saver_def else set()
    restore_side = reachable_names(nodes, [node_name_from_input(saver_def.restore_op_name)]) if saver_def else set()
    result = {}
    for name in nodes:
        sides = set()
        if name in save_side:
            sides.add(_SAVE)
        if name in restore_side:
            sides.add(_RESTORE)
        result[name] = sides or {_OTHER}
    return result


def _function_sides(graph_def: graph_pb2.GraphDef, node_sides: dict[str, set[str]]) -> dict[str, set[str]]:
    """Propagate the sides of calling nodes into the library, through nested calls."""
    functions = {f.signature.name: f for f in graph_def.library.function}
    names = set(functions)
    result: dict[str, set[str]] = {name: set() for name in names}
    pending: list[tuple[str, frozenset[str]]] = []
    for node in graph_def.node:
        for called in _called_functions(node, names):
            pending.append((called, frozenset(node_sides[node.name])))
    while pending:
        name, sides = pending.pop()
        if sides <= result[name]:
            continue
        result[name] |= sides
        for inner in functions[name].node_def:
            for called in _called_functions(inner, names):
                pending.append((called, frozenset(result[name])))
    # A function nothing in the graph calls can still be called by the object graph.
    return {name: sides or {_OTHER} for name, sides in result.items()}


def _verdict(op: str, sides: set[str]) -> str | None:
    if op in DENYLIST:
        return DENYLIST[op]
    if op in SAVE_OPS and sides != {_SAVE}:
        return f"{SAVE_OPS[op]} outside the checkpoint's save path"
    if op in RESTORE_OPS and _OTHER in sides:
        return f"{RESTORE_OPS[op]} outside the checkpoint's restore path"
    return None


def _asset_tensor_names(meta_graph: meta_graph_pb2.MetaGraphDef) -> set[str]:
    names = {node_name_from_input(a.tensor_info.name) for a in meta_graph.asset_file_def}
    collection = meta_graph.collection_def.get("asset_filepaths")
    if collection is not None:
        names.update(node_name_from_input(n) for n in collection.node_list.value)
    return names


def _text_file_tables(graph_def: graph_pb2.GraphDef, assets: set[str]) -> list[UnsafeOp]:
    """TF 1 text-file initialisers whose file name is not one of the declared assets."""
    nodes = {node.name: node for node in graph_def.node}
    found = []
    for node in graph_def.node:
        if node.op not in TEXT_FILE_TABLE_OPS or len(node.input) < 2:
            continue
        source = node_name_from_input(node.input[1])
        while source in nodes and nodes[source].op == "Identity" and nodes[source].input:
            if source in assets:
                break
            source = node_name_from_input(nodes[source].input[0])
        if source not in assets:
            found.append(UnsafeOp(node.op, node.name, None, "reads a file that is not one of the SavedModel's assets"))
    return found


def scan_graph(graph_def: graph_pb2.GraphDef, saver_def=None, allow_ops: Iterable[str] = ()) -> list[UnsafeOp]:
    """Unsafe nodes of a GraphDef and its function library, top level first."""
    allowed = set(allow_ops)
    node_sides = _sides(graph_def, saver_def)
    found = [
        UnsafeOp(node.op, node.name, None, reason)
        for node in graph_def.node
        if (reason := _verdict(node.op, node_sides[node.name])) is not None
    ]
    function_sides = _function_sides(graph_def, node_sides)
    for function in sorted(graph_def.library.function, key=lambda f: f.signature.name):
        name = function.signature.name
        for node in function.node_def:
            reason = _verdict(node.op, function_sides[name])
            if reason is not None:
                found.append(UnsafeOp(node.op, node.name, name, reason))
    return [item for item in found if item.op not in allowed]


def check_allow_ops(allow_ops: Iterable[str]) -> list[str]:
    """The op names, stripped; an empty or unknown op name is an error (typos would allow nothing)."""
    if isinstance(allow_ops, str):
        allow_ops = allow_ops.split(",")
    names = [name.strip() for name in allow_ops]
    for name in names:
        if not name:
            raise SavedModelError(f"empty op name in allowed ops {list(allow_ops)!r}")
        if lookup_op_def(name) is None:
            raise SavedModelError(f"allowed op '{name}' is not an op TensorFlow knows")
    return names


def scan_for_unsafe_ops(
    model: graph_pb2.GraphDef | meta_graph_pb2.MetaGraphDef | saved_model_pb2.SavedModel | str | os.PathLike,
    allow_ops: Iterable[str] = (),
) -> list[UnsafeOp]:
    """Every node (graph and function library) running an op on the denylist, minus ``allow_ops``.

    ``model`` is a GraphDef, a MetaGraphDef (its SaverDef exempts the checkpoint machinery and
    its assets the text-file table initialisers), a SavedModel proto or a SavedModel
    directory (every MetaGraphDef is scanned). Nothing is loaded or run.
    """
    allow = check_allow_ops(allow_ops)
    if isinstance(model, (str, os.PathLike)):
        from .reader import read_saved_model

        model = read_saved_model(Path(model))
    if isinstance(model, saved_model_pb2.SavedModel):
        found = []
        for meta_graph in model.meta_graphs:
            found.extend(item for item in scan_for_unsafe_ops(meta_graph, allow) if item not in found)
        return found
    if isinstance(model, meta_graph_pb2.MetaGraphDef):
        saver_def = model.saver_def if model.HasField("saver_def") else None
        found = scan_graph(model.graph_def, saver_def, allow)
        tables = _text_file_tables(model.graph_def, _asset_tensor_names(model))
        return found + [item for item in tables if item.op not in allow]
    if isinstance(model, graph_pb2.GraphDef):
        return scan_graph(model, None, allow)
    raise TypeError(f"scan_for_unsafe_ops: cannot scan a {type(model).__name__}")


def refuse_unsafe_ops(findings: list[UnsafeOp], where: str) -> None:
    """Raise one line naming the first unsafe op (and how many more) and how to allow it."""
    if not findings:
        return
    first = findings[0]
    more = f" (and {len(findings) - 1} more unsafe node(s))" if len(findings) > 1 else ""
    ops = ",".join(sorted({item.op for item in findings}))
    raise SavedModelError(f"{where}: refusing unsafe {first.describe()}{more}; allow it with --allow-ops {ops}")
