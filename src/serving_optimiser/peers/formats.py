"""The format table: for each artefact format, its files, its quantisations, which of them are
calibrated, the extra params a peer entry takes, and the runtime module that loads (and converts
to) it. Everything else that differs by format reads this table, so a new runtime is one module
plus one row here.

The runtime module is named, not imported: it is imported on first use (:func:`runtime`), so
reading params or this table loads no runtime. It is named after the format (``onnx.py`` for
``onnx``): dvc.yaml's peer stages depend on ``peers/${item.format}.py``, the one runtime each peer
loads, so editing one runtime reruns only its peers (tests/dvc_deps.py writes those deps). A
runtime module defines ``PREDICTOR`` (its :class:`~serving_optimiser.peers.base.Predictor`) and,
for a format peers convert to, ``convert(exported, quantization, calibration, signature, **options)
-> {file name: bytes}`` (``calibration``: the rows of a calibrated quantisation, else None;
``options``: the row's :class:`Option` values of the peer entry). This module imports nothing but
the standard library.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType


@dataclass(frozen=True)
class Option:
    """An integer key a peer entry takes beside ``format`` and ``quantization``: required for the
    ``quantizations`` it names (None: every quantisation of the format), at least ``minimum``
    and, with a ``maximum``, at most that."""

    key: str
    quantizations: tuple[str, ...] | None = None
    minimum: int = 1
    maximum: int | None = None


@dataclass(frozen=True)
class Format:
    """One row of the table.

    ``files``: what an artefact directory holds, the first being the one a predictor opens (a
    SavedModel is opened as its directory, ``opens_directory``); ``described``: how an error names
    a path of this format; ``quantizations``: what a peer entry may ask for (none: the format is a
    source, not a peer); ``calibrated``: the quantisations that take ``calibration_rows``.
    """

    name: str
    module: str
    files: tuple[str, ...]
    described: str
    quantizations: tuple[str, ...] = ()
    calibrated: tuple[str, ...] = ()
    options: tuple[Option, ...] = ()
    opens_directory: bool = False

    @property
    def filename(self) -> str:
        """The file a predictor opens (for a SavedModel, the file that marks its directory)."""
        return self.files[0]

    @property
    def suffix(self) -> str:
        return Path(self.filename).suffix

    def options_for(self, quantization: str) -> tuple[Option, ...]:
        return tuple(o for o in self.options if o.quantizations is None or quantization in o.quantizations)

    def runtime(self) -> ModuleType:
        """The runtime module, imported now (the first call pays for the runtime's import)."""
        return importlib.import_module(f"{__package__}.{self.module}")


FORMATS: dict[str, Format] = {
    row.name: row
    for row in (
        # Listed in the order a directory is searched for an artefact.
        Format("tf", "tf", ("saved_model.pb",), "SavedModel directory", opens_directory=True),
        Format("litert", "litert", ("model.tflite",), ".tflite",
               quantizations=("none", "float16", "int8_dynamic", "int8_full"), calibrated=("int8_full",)),
        # opset: the range tf2onnx 1.17 supports and tests; it refuses 19 and above outright.
        Format("onnx", "onnx", ("model.onnx",), ".onnx", quantizations=("none", "int8_dynamic"),
               options=(Option("opset", minimum=13, maximum=18),)),
        # minimum_dim: MatMuls with a narrower weight stay float (as quantize_matmuls' minimum_dim).
        Format("openvino", "openvino", ("model.xml", "model.bin"), "OpenVINO .xml",
               quantizations=("none", "int8"), calibrated=("int8",), options=(Option("minimum_dim", ("int8",)),)),
    )
}
# The formats a peer entry may name: the ones converted to.
PEER_FORMATS: dict[str, Format] = {name: row for name, row in FORMATS.items() if row.quantizations}
