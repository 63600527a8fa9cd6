"""The frozen model: one GraphDef holding every selected signature, plus what a SavedModel needs
around it (signature keys, tensor names, dtypes, shapes, method names, initialiser nodes).

On disk it is a directory with ``frozen_graph.pb`` (the GraphDef, serialised deterministically)
and ``signatures.json`` (everything else), written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from tensorflow.core.framework import graph_pb2

from ..atomic import atomic_directory
from .errors import SavedModelError

GRAPH_FILENAME = "frozen_graph.pb"
SIGNATURES_FILENAME = "signatures.json"
FORMAT_NAME = "serving_optimiser.frozen_model"
FORMAT_VERSION = 1


def _node_name(tensor_name: str) -> str:
    name = tensor_name[1:] if tensor_name.startswith("^") else tensor_name
    head, sep, tail = name.rpartition(":")
    return head if sep and tail.isdigit() else name


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One signature input or output: graph tensor name (``x:0``), dtype name, shape.

    ``shape`` is None for an unknown rank; unknown dimensions are None.
    """

    name: str
    dtype: str
    shape: list[int | None] | None

    @property
    def node_name(self) -> str:
        return _node_name(self.name)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": self.shape}

    @classmethod
    def from_json(cls, data: dict, where: str) -> TensorInfo:
        try:
            name, dtype, shape = data["name"], data["dtype"], data["shape"]
        except (KeyError, TypeError) as error:
            raise SavedModelError(f"{where}: expected name, dtype and shape, missing {error}") from None
        if not isinstance(name, str) or not isinstance(dtype, str):
            raise SavedModelError(f"{where}: name and dtype must be strings")
        if shape is not None and (
            not isinstance(shape, list) or any(d is not None and not isinstance(d, int) for d in shape)
        ):
            raise SavedModelError(f"{where}: shape must be null or a list of integers and nulls, found {shape!r}")
        return cls(name, dtype, shape)


@dataclasses.dataclass(frozen=True)
class SignatureInfo:
    """One SignatureDef: its key, method name and tensors by input/output key."""

    key: str
    method_name: str
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]

    def to_json(self) -> dict:
        return {
            "method_name": self.method_name,
            "inputs": {k: v.to_json() for k, v in sorted(self.inputs.items())},
            "outputs": {k: v.to_json() for k, v in sorted(self.outputs.items())},
        }

    @classmethod
    def from_json(cls, key: str, data: dict, where: str) -> SignatureInfo:
        if not isinstance(data, dict) or not isinstance(data.get("method_name"), str):
            raise SavedModelError(f"{where}: signature '{key}' needs a method_name string")
        tensors = {}
        for side in ("inputs", "outputs"):
            entries = data.get(side)
            if not isinstance(entries, dict):
                raise SavedModelError(f"{where}: signature '{key}' needs an '{side}' object")
            tensors[side] = {
                name: TensorInfo.from_json(value, f"{where}: signature '{key}' {side[:-1]} '{name}'")
                for name, value in entries.items()
            }
        return cls(key, data["method_name"], tensors["inputs"], tensors["outputs"])


@dataclasses.dataclass(frozen=True)
class FrozenModel:
    """A frozen GraphDef with the signatures it serves.

    ``init_node_names`` are nodes that must run once when the model loads, before any call
    (table initialisers built at freeze time); the converted SavedModel's main_op runs them.
    ``tags`` are the tags of the MetaGraphDef it came from; ``source_format`` is ``"tf1"``
    or ``"tf2"`` (how it was frozen).
    """

    graph_def: graph_pb2.GraphDef
    signatures: dict[str, SignatureInfo]
    init_node_names: tuple[str, ...] = ()
    tags: tuple[str, ...] = ("serve",)
    source_format: str = ""

    def input_node_names(self) -> list[str]:
        """Node names of every signature input (for TransformGraph's ``inputs``), sorted, unique."""
        return sorted({t.node_name for s in self.signatures.values() for t in s.inputs.values()})

    def output_node_names(self) -> list[str]:
        """Node names of every signature output and init node (TransformGraph's ``outputs``)."""
        names = {t.node_name for s in self.signatures.values() for t in s.outputs.values()}
        return sorted(names | set(self.init_node_names))

    def with_graph_def(self, graph_def: graph_pb2.GraphDef) -> FrozenModel:
        """The same model around another (for example optimised) GraphDef."""
        return dataclasses.replace(self, graph_def=graph_def)

    def check_graph(self) -> None:
        """Fail naming the signature and tensor when the graph lacks a node the model needs."""
        present = {node.name for node in self.graph_def.node}
        for key, signature in sorted(self.signatures.items()):
            for side, tensors in (("input", signature.inputs), ("output", signature.outputs)):
                for name, info in sorted(tensors.items()):
                    if info.node_name not in present:
                        raise SavedModelError(
                            f"signature '{key}' {side} '{name}': node '{info.node_name}' "
                            f"(tensor {info.name}) is not in the graph"
                        )
        for name in self.init_node_names:
            if name not in present:
                raise SavedModelError(f"init node '{name}' is not in the graph")

    def metadata_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "source_format": self.source_format,
            "tags": list(self.tags),
            "init_nodes": list(self.init_node_names),
            "signatures": {key: s.to_json() for key, s in sorted(self.signatures.items())},
        }

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``frozen_graph.pb`` and ``signatures.json`` into ``directory``, atomically.

        An existing ``directory`` is replaced as a whole. The GraphDef is serialised
        deterministically, so the same model gives the same bytes.
        """
        with atomic_directory(directory) as temporary:
            (temporary / GRAPH_FILENAME).write_bytes(self.graph_def.SerializeToString(deterministic=True))
            text = json.dumps(self.metadata_json(), indent=2, sort_keys=True) + "\n"
            (temporary / SIGNATURES_FILENAME).write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> FrozenModel:
        """Read a directory written by :meth:`save`; errors name the file and the problem."""
        directory = Path(directory)
        if not directory.is_dir():
            raise SavedModelError(f"{directory}: no such directory")
        graph_path, meta_path = directory / GRAPH_FILENAME, directory / SIGNATURES_FILENAME
        for path in (graph_path, meta_path):
            if not path.is_file():
                raise SavedModelError(f"{path}: missing (not a frozen model directory)")
        graph_def = graph_pb2.GraphDef()
        try:
            graph_def.ParseFromString(graph_path.read_bytes())
        except Exception as error:  # noqa: BLE001 - protobuf raises DecodeError or RuntimeError
            raise SavedModelError(f"{graph_path}: not a valid GraphDef ({error})") from None
        try:
            data = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise SavedModelError(f"{meta_path}: not valid JSON ({error})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise SavedModelError(f"{meta_path}: not a frozen model description (format '{FORMAT_NAME}')")
        if data.get("version") != FORMAT_VERSION:
            raise SavedModelError(f"{meta_path}: version {data.get('version')!r}, expected {FORMAT_VERSION}")
        signatures = data.get("signatures")
        if not isinstance(signatures, dict) or not signatures:
            raise SavedModelError(f"{meta_path}: 'signatures' must be a non-empty object")
        init_nodes, tags = data.get("init_nodes", []), data.get("tags", ["serve"])
        if not isinstance(init_nodes, list) or not all(isinstance(n, str) for n in init_nodes):
            raise SavedModelError(f"{meta_path}: 'init_nodes' must be a list of node names")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise SavedModelError(f"{meta_path}: 'tags' must be a list of strings")
        model = cls(
            graph_def=graph_def,
            signatures={key: SignatureInfo.from_json(key, value, str(meta_path)) for key, value in signatures.items()},
            init_node_names=tuple(init_nodes),
            tags=tuple(tags),
            source_format=str(data.get("source_format", "")),
        )
        try:
            model.check_graph()
        except SavedModelError as error:
            raise SavedModelError(f"{graph_path}: {error}") from None
        return model
