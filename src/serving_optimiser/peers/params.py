"""The ``peers`` section of the params file: runtime threads and one entry per peer artefact, checked
key by key so a bad entry fails with one line naming it.

    peers:
      threads: 2                      # LiteRT interpreter / ORT session intra-op threads
      variants:
        litert_int8_full: {format: litert, quantization: int8_full, calibration_rows: 120}
        onnx_fp32: {format: onnx, quantization: none, opset: 17}
        openvino_int8: {format: openvino, quantization: int8, calibration_rows: 120, minimum_dim: 32}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..params_file import DEFAULT_PARAMS_FILE, require, require_positive

# Each format's quantisations (its module documents them): listed here, not imported from the
# runtime modules, so reading params needs none of them.
LITERT_QUANTIZATIONS = ("none", "float16", "int8_dynamic", "int8_full")
ONNX_QUANTIZATIONS = ("none", "int8_dynamic")
OPENVINO_QUANTIZATIONS = ("none", "int8")
QUANTIZATIONS = {"litert": LITERT_QUANTIZATIONS, "onnx": ONNX_QUANTIZATIONS, "openvino": OPENVINO_QUANTIZATIONS}
# The file load_predictor opens (an OpenVINO IR also has model.bin beside its model.xml).
EXTENSIONS = {"litert": "tflite", "onnx": "onnx", "openvino": "xml"}
CALIBRATED = {("litert", "int8_full"), ("openvino", "int8")}


@dataclass(frozen=True)
class PeerSpec:
    name: str
    format: str
    quantization: str
    calibration_rows: int | None = None  # litert int8_full, openvino int8
    opset: int | None = None  # onnx only
    minimum_dim: int | None = None  # openvino int8: narrower MatMuls stay float

    @property
    def filename(self) -> str:
        return f"model.{EXTENSIONS[self.format]}"

    @classmethod
    def from_entry(cls, name: str, entry: Any, path: str | Path = DEFAULT_PARAMS_FILE) -> PeerSpec:
        where = f"peers.variants.{name}"
        if not isinstance(entry, dict):
            raise UserError(f"{path}: '{where}' must be a mapping, got {entry!r}")
        format_name = require(entry, "format", str, where, path)
        if format_name not in QUANTIZATIONS:
            raise UserError(f"{path}: '{where}.format' must be one of {', '.join(QUANTIZATIONS)}, got {format_name!r}")
        quantization = require(entry, "quantization", str, where, path)
        if quantization not in QUANTIZATIONS[format_name]:
            choices = ", ".join(QUANTIZATIONS[format_name])
            raise UserError(
                f"{path}: '{where}.quantization' for {format_name} must be one of {choices}, got {quantization!r}"
            )
        allowed = {"format", "quantization"}
        calibration_rows = opset = minimum_dim = None
        if (format_name, quantization) in CALIBRATED:
            allowed.add("calibration_rows")
            calibration_rows = require_positive(entry, "calibration_rows", int, where, path)
        if format_name == "openvino" and quantization == "int8":
            allowed.add("minimum_dim")
            minimum_dim = require_positive(entry, "minimum_dim", int, where, path)
        if format_name == "onnx":
            allowed.add("opset")
            opset = require(entry, "opset", int, where, path)
            if not 13 <= opset <= 18:
                # The range tf2onnx 1.17 supports and tests; it refuses 19 and above outright.
                raise UserError(f"{path}: '{where}.opset' must be between 13 and 18, got {opset}")
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise UserError(
                f"{path}: unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)} "
                f"({format_name} {quantization} peers take {', '.join(sorted(allowed))})"
            )
        return cls(name, format_name, quantization, calibration_rows, opset, minimum_dim)


@dataclass(frozen=True)
class PeersParams:
    threads: int
    variants: dict[str, PeerSpec]

    @classmethod
    def from_section(cls, section: dict[str, Any], path: str | Path = DEFAULT_PARAMS_FILE) -> PeersParams:
        threads = require_positive(section, "threads", int, "peers", path)
        variants = require(section, "variants", dict, "peers", path)
        if not variants:
            raise UserError(f"{path}: 'peers.variants' must not be empty")
        unknown = sorted(set(section) - {"threads", "variants"})
        if unknown:
            keys = ", ".join(f"peers.{key}" for key in unknown)
            raise UserError(f"{path}: unknown key(s) {keys} (expected threads, variants)")
        specs = {str(name): PeerSpec.from_entry(str(name), entry, path) for name, entry in variants.items()}
        return cls(threads, specs)

    def variant(self, name: str, path: str | Path = DEFAULT_PARAMS_FILE) -> PeerSpec:
        if name not in self.variants:
            raise UserError(f"{path}: no peer '{name}' in 'peers.variants' (has {', '.join(sorted(self.variants))})")
        return self.variants[name]
