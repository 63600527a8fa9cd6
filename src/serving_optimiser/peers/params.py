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
from .formats import FORMATS, PEER_FORMATS

# Each peer format's quantisations (its runtime module documents them), from the format table, which
# names the runtime modules without importing them: reading params loads none of them.
QUANTIZATIONS = {name: row.quantizations for name, row in PEER_FORMATS.items()}


@dataclass(frozen=True)
class PeerSpec:
    name: str
    format: str
    quantization: str
    # The calibrated quantisations' rows, then one field per Option of the format table.
    calibration_rows: int | None = None  # litert int8_full, openvino int8
    opset: int | None = None  # onnx only
    minimum_dim: int | None = None  # openvino int8: narrower MatMuls stay float

    @property
    def filename(self) -> str:
        """The file a predictor opens (an OpenVINO IR also has model.bin beside its model.xml)."""
        return FORMATS[self.format].filename

    @property
    def calibrated(self) -> bool:
        return self.quantization in FORMATS[self.format].calibrated

    def options(self) -> dict[str, int | None]:
        """The values of the format's options that apply to this quantisation, by key."""
        return {option.key: getattr(self, option.key) for option in FORMATS[self.format].options_for(self.quantization)}

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
        values: dict[str, int] = {}
        row = PEER_FORMATS[format_name]
        if quantization in row.calibrated:
            allowed.add("calibration_rows")
            values["calibration_rows"] = require_positive(entry, "calibration_rows", int, where, path)
        for option in row.options_for(quantization):
            allowed.add(option.key)
            if option.maximum is None and option.minimum == 1:
                values[option.key] = require_positive(entry, option.key, int, where, path)
                continue
            value = require(entry, option.key, int, where, path)
            if value < option.minimum or (option.maximum is not None and value > option.maximum):
                bounds = f"between {option.minimum} and {option.maximum}" if option.maximum is not None else (
                    f"at least {option.minimum}")
                raise UserError(f"{path}: '{where}.{option.key}' must be {bounds}, got {value}")
            values[option.key] = value
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise UserError(
                f"{path}: unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)} "
                f"({format_name} {quantization} peers take {', '.join(sorted(allowed))})"
            )
        return cls(name, format_name, quantization, **values)


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
