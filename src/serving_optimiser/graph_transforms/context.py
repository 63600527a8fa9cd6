"""What a transform receives besides the graph: input and output names and its raw string
parameters, with typed getters that apply the old tool's defaults and error rules; and, for the
int8 transforms, the calibration a caller measured on the graph as it is at that step."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import booleans
from .calibration import Calibration
from .errors import TransformError


@dataclass
class TransformContext:
    transform: str
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    params: dict[str, list[str]] = field(default_factory=dict)
    calibration: Calibration | None = None

    def _fail(self, message: str) -> TransformError:
        return TransformError(f"{self.transform}: {message}")

    def count(self, name: str) -> int:
        return len(self.params.get(name, []))

    def get_list(self, name: str) -> list[str]:
        return list(self.params.get(name, []))

    def get_string(self, name: str, default: str | None = None, required: bool = False) -> str | None:
        values = self.params.get(name, [])
        if len(values) > 1:
            raise self._fail(f"expected a single '{name}' parameter, but found {len(values)} occurrences")
        if not values:
            if required:
                raise self._fail(f"missing required parameter '{name}'")
            return default
        return values[0]

    def get_int(self, name: str, default: int) -> int:
        value = self.get_string(name)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise self._fail(f"{name}='{value}' is not an integer") from None

    def get_float(self, name: str, default: float) -> float:
        value = self.get_string(name)
        if value is None:
            return default
        try:
            return float(value)
        except ValueError:
            raise self._fail(f"{name}='{value}' is not a number") from None

    def get_bool(self, name: str, default: bool) -> bool:
        value = self.get_string(name)
        if value is None:
            return default
        parsed = booleans.parse_bool(value)
        if parsed is None:
            raise self._fail(f"{name}='{value}' is not a boolean (expected {booleans.EXPECTED})")
        return parsed

    def has(self, name: str) -> bool:
        return name in self.params
