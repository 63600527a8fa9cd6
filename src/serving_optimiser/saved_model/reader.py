"""Reading a SavedModel directory's protobuf without running anything: the MetaGraphDef for a
tag set, the signature keys and their tensors, with one-line errors for missing, oversized or
malformed files."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

    from .model import SignatureInfo, TensorInfo

from ..errors import first_line
from .errors import SavedModelError

# Protobuf cannot parse a message of 2 GiB or more; refuse before reading such a file.
MAX_PROTO_BYTES = 2**31 - 1
# Signature keys TensorFlow adds for itself (TF 2's init op), not served to clients.
INTERNAL_SIGNATURE_PREFIX = "__"


def saved_model_file(directory: str | os.PathLike) -> Path:
    """The SavedModel protobuf file of ``directory`` (``saved_model.pb`` or ``.pbtxt``), checked
    without importing TensorFlow, so a tool can reject a wrong path at once."""
    directory = Path(directory)
    if not directory.exists():
        raise SavedModelError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise SavedModelError(f"{directory}: not a directory (expected a SavedModel directory)")
    binary, text = directory / "saved_model.pb", directory / "saved_model.pbtxt"
    path = binary if binary.exists() else text
    if not path.exists():
        raise SavedModelError(f"{directory}: no saved_model.pb, not a SavedModel directory")
    size = path.stat().st_size
    if size > MAX_PROTO_BYTES:
        raise SavedModelError(f"{path}: {size} bytes, over protobuf's 2 GiB limit")
    return path


def read_saved_model(directory: str | os.PathLike) -> saved_model_pb2.SavedModel:
    """Parse ``<directory>/saved_model.pb`` (or ``.pbtxt``)."""
    from tensorflow.core.protobuf import saved_model_pb2

    path = saved_model_file(directory)
    saved_model = saved_model_pb2.SavedModel()
    try:
        if path.suffix == ".pb":
            saved_model.ParseFromString(path.read_bytes())
        else:
            from google.protobuf import text_format

            text_format.Parse(path.read_text(encoding="utf-8"), saved_model)
    except Exception as error:  # noqa: BLE001 - DecodeError, ParseError, RuntimeError, UnicodeError
        raise SavedModelError(f"{path}: malformed or truncated SavedModel protobuf ({first_line(error)})") from None
    if not saved_model.meta_graphs:
        raise SavedModelError(f"{path}: holds no MetaGraphDef (truncated or not a SavedModel)")
    return saved_model


def as_tags(tags: str | Iterable[str]) -> tuple[str, ...]:
    """A tag set as sorted unique names; ``"serve,gpu"`` and ``["gpu", "serve"]`` are the same."""
    if isinstance(tags, str):
        tags = tags.split(",")
    result = tuple(sorted({t.strip() for t in tags}))
    if not result or any(not t for t in result):
        raise SavedModelError(f"tags must be non-empty names, found {list(tags)!r}")
    return result


def read_meta_graph(
    saved_model_dir: str | os.PathLike, tags: str | Iterable[str] = ("serve",)
) -> meta_graph_pb2.MetaGraphDef:
    """The MetaGraphDef of ``saved_model_dir`` whose tag set is ``tags`` (default: ``serve``).

    Reads the protobuf only; nothing runs. Raises SavedModelError naming the directory when it
    is no SavedModel or has no MetaGraphDef with exactly that tag set.
    """
    return select_meta_graph(read_saved_model(saved_model_dir), as_tags(tags), str(saved_model_dir))


def select_meta_graph(
    saved_model: saved_model_pb2.SavedModel, tags: Iterable[str], where: str | os.PathLike
) -> meta_graph_pb2.MetaGraphDef:
    """The MetaGraphDef whose tag set equals ``tags``."""
    wanted = set(tags)
    for meta_graph in saved_model.meta_graphs:
        if set(meta_graph.meta_info_def.tags) == wanted:
            if not meta_graph.graph_def.node and not meta_graph.graph_def.library.function:
                raise SavedModelError(f"{where}: the MetaGraphDef tagged {sorted(wanted)} has an empty graph")
            return meta_graph
    available = "; ".join(",".join(sorted(m.meta_info_def.tags)) or "(none)" for m in saved_model.meta_graphs)
    raise SavedModelError(
        f"{where}: no MetaGraphDef tagged {','.join(sorted(wanted))} (available tag sets: {available})"
    )


def is_tf2_export(meta_graph: meta_graph_pb2.MetaGraphDef) -> bool:
    """Whether the MetaGraphDef was written by ``tf.saved_model.save`` (it has an object graph)."""
    return meta_graph.HasField("object_graph_def") and len(meta_graph.object_graph_def.nodes) > 0


def serving_signature_keys(meta_graph: meta_graph_pb2.MetaGraphDef) -> list[str]:
    return sorted(k for k in meta_graph.signature_def if not k.startswith(INTERNAL_SIGNATURE_PREFIX))


def select_signature_keys(
    meta_graph: meta_graph_pb2.MetaGraphDef, signature_keys: Sequence[str] | None, where: str | os.PathLike
) -> list[str]:
    """``signature_keys`` checked against the MetaGraphDef (default: all), sorted and unique."""
    available = serving_signature_keys(meta_graph)
    if not available:
        raise SavedModelError(f"{where}: the SavedModel has no signatures to serve")
    if signature_keys is None:
        return available
    if isinstance(signature_keys, str):
        signature_keys = [signature_keys]
    keys = sorted(set(signature_keys))
    if not keys:
        raise SavedModelError(f"{where}: no signature selected")
    missing = [k for k in keys if k not in available]
    if missing:
        names = ", ".join(f"'{k}'" for k in missing)
        raise SavedModelError(f"{where}: unknown signature key {names} (available: {', '.join(available)})")
    return keys


def tensor_info_from_proto(proto, where: str) -> TensorInfo:
    """A dense TensorInfo proto as our TensorInfo (sparse and composite inputs are refused)."""
    from tensorflow.python.framework import dtypes

    from .model import TensorInfo

    encoding = proto.WhichOneof("encoding")
    if encoding != "name":
        raise SavedModelError(f"{where} is a {encoding} tensor; only dense tensors can be frozen")
    try:
        dtype = dtypes.as_dtype(proto.dtype).name
    except TypeError:
        raise SavedModelError(f"{where} has an unknown dtype enum {proto.dtype}") from None
    if proto.tensor_shape.unknown_rank:
        shape = None
    else:
        shape = [None if d.size < 0 else int(d.size) for d in proto.tensor_shape.dim]
    return TensorInfo(proto.name, dtype, shape)


def signature_info_from_proto(key: str, signature_def) -> SignatureInfo:
    """Keys, dtypes, shapes and method name of a SignatureDef, with its own tensor names."""
    from .model import SignatureInfo

    inputs = {
        name: tensor_info_from_proto(proto, f"signature '{key}' input '{name}'")
        for name, proto in sorted(signature_def.inputs.items())
    }
    outputs = {
        name: tensor_info_from_proto(proto, f"signature '{key}' output '{name}'")
        for name, proto in sorted(signature_def.outputs.items())
    }
    if not outputs:
        raise SavedModelError(f"signature '{key}' has no outputs")
    return SignatureInfo(key, signature_def.method_name, inputs, outputs)
