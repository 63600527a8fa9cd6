"""Reading a params file (``params.yaml`` or the one ``--params`` names): one section per stage,
checked key by key so a bad file fails with one line naming the file and the key, instead of a
KeyError deep inside a stage. TensorFlow-free, and below every package that reads params (the
pipeline's resolution of them is :mod:`serving_optimiser.pipeline.params`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

DEFAULT_PARAMS_FILE = "params.yaml"


def load_params(path: str | Path = DEFAULT_PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise UserError(f"{path}: cannot read params file ({error.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} is not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of stage sections at the top level")
    return data


def section(params: dict[str, Any], name: str, path: str | Path = DEFAULT_PARAMS_FILE) -> dict[str, Any]:
    value = params.get(name)
    if not isinstance(value, dict):
        raise UserError(f"{path}: missing section '{name}'" if value is None else f"{path}: '{name}' must be a mapping")
    return value


def require(
    values: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, path: str | Path = DEFAULT_PARAMS_FILE
) -> Any:
    """``values[key]`` checked against ``kind`` (bool is never accepted as a number)."""
    if key not in values:
        raise UserError(f"{path}: missing key '{where}.{key}'")
    value = values[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    elif float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    else:
        ok = isinstance(value, kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise UserError(f"{path}: '{where}.{key}' must be {names}, got {value!r}")
    return value


def require_positive(values: dict[str, Any], key: str, kind: type, where: str, path=DEFAULT_PARAMS_FILE) -> Any:
    value = require(values, key, kind, where, path)
    if value <= 0:
        raise UserError(f"{path}: '{where}.{key}' must be positive, got {value!r}")
    return value


def require_list(values: dict[str, Any], key: str, item_kind: type, where: str, path=DEFAULT_PARAMS_FILE) -> list:
    value = require(values, key, list, where, path)
    if not value:
        raise UserError(f"{path}: '{where}.{key}' must not be empty")
    for index, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, item_kind):
            raise UserError(f"{path}: '{where}.{key}[{index}]' must be {item_kind.__name__}, got {item!r}")
    return value


_STAGE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def check_stage_keys(values: dict[str, Any], where: str, path: str | Path = DEFAULT_PARAMS_FILE) -> None:
    """Keys that name DVC stages (``optimise@KEY``) and directories: letters, digits, _ and -."""
    for key in values:
        if not isinstance(key, str) or not _STAGE_KEY.fullmatch(key):
            raise UserError(
                f"{path}: '{where}.{key}' is not a valid variant name (letters, digits, _ and - only: "
                f"it names DVC stages and directories)"
            )
