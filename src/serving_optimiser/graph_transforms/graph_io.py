"""Reading and writing GraphDef files the way the old tools did: binary protobuf, or text format
(``.pbtxt``), with clear one-line errors and atomic writes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf import message, text_format, unknown_fields

from ..atomic import atomic_file
from ..errors import first_line
from .errors import GraphFileError

if TYPE_CHECKING:
    from tensorflow.core.framework import graph_pb2

__all__ = ["GraphFileError", "load_graph_def", "save_graph_def"]

TEXT_SUFFIXES = (".pbtxt",)


def is_text_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(TEXT_SUFFIXES)


def _check_plausible(graph_def: graph_pb2.GraphDef, path: str) -> None:
    """Reject bytes that parsed as a GraphDef only by accident.

    Protobuf's binary parser accepts many foreign messages (a SavedModel's saved_model.pb, a
    checkpoint index): their fields land in the unknown-field set, or decode as nameless
    nodes. A real GraphDef has neither.
    """
    if len(unknown_fields.UnknownFieldSet(graph_def)):
        raise GraphFileError(f"'{path}' is not a GraphDef (it holds fields a GraphDef does not have)")
    for index, node in enumerate(graph_def.node):
        if not node.name or not node.op or len(unknown_fields.UnknownFieldSet(node)):
            raise GraphFileError(f"'{path}' is not a GraphDef (node #{index} has no name or no op)")
    if not graph_def.node and not graph_def.library.function:
        raise GraphFileError(f"'{path}' holds an empty GraphDef (no nodes)")


def load_graph_def(path: str | os.PathLike) -> graph_pb2.GraphDef:
    """Read a GraphDef file: text format when the name ends in ``.pbtxt``, otherwise binary
    with a text-format fallback (as the old tools' LoadTextOrBinaryGraphFile did).

    ``~`` is expanded. Raises GraphFileError with a one-line message.
    """
    display = str(path)
    file_path = Path(os.path.expanduser(display))
    try:
        data = file_path.read_bytes()
    except FileNotFoundError:
        raise GraphFileError(f"graph file '{display}' does not exist") from None
    except IsADirectoryError:
        raise GraphFileError(f"graph file '{display}' is a directory, not a GraphDef file") from None
    except OSError as error:
        raise GraphFileError(f"cannot read graph file '{display}': {error.strerror}") from None
    from tensorflow.core.framework import graph_pb2

    graph_def = graph_pb2.GraphDef()
    if is_text_path(file_path):
        try:
            text_format.Parse(data.decode("utf-8"), graph_def)
        except (text_format.ParseError, UnicodeDecodeError) as error:
            raise GraphFileError(f"'{display}' is not a text-format GraphDef: {first_line(error)}") from None
    else:
        try:
            graph_def.ParseFromString(data)
        except message.DecodeError as binary_error:
            graph_def = graph_pb2.GraphDef()
            try:
                text_format.Parse(data.decode("utf-8"), graph_def)
            except (text_format.ParseError, UnicodeDecodeError):
                raise GraphFileError(
                    f"'{display}' is not a GraphDef (neither binary protobuf: {first_line(binary_error)}, "
                    "nor text format)"
                ) from None
    _check_plausible(graph_def, display)
    return graph_def


def save_graph_def(
    graph_def: graph_pb2.GraphDef, path: str | os.PathLike, as_text: bool | None = None
) -> None:
    """Write ``graph_def`` to ``path`` atomically (a temporary file beside it, renamed at the end).

    Text format when ``as_text`` is true, or when it is None and the name ends in ``.pbtxt``.
    """
    file_path = Path(os.path.expanduser(str(path)))
    if as_text is None:
        as_text = is_text_path(file_path)
    data = text_format.MessageToString(graph_def).encode() if as_text else graph_def.SerializeToString(
        deterministic=True
    )
    try:
        with atomic_file(file_path, "wb") as stream:
            stream.write(data)
    except OSError as error:
        raise GraphFileError(f"cannot write graph file '{path}': {error.strerror or error}") from None
