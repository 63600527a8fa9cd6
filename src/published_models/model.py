"""What a published model hands to tests and benchmarks, and the once-per-cache SavedModel export.

A ``PublishedModel`` is a SavedModel directory (exported into the cache the first time it is asked
for, then reused), realistic sample inputs by signature input name, the expected kind of each
output (``class``, ``label``, ``multi_label``, ``regression``: the kinds of issue 27), the
authors' own converted files where they ship them, and what the inputs are known to contain
(``truth``) so a test can check that the predictions make sense.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from published_models.sources import WHEELS, Wheel, cache_dir

Kind = Literal["class", "label", "multi_label", "regression"]
KINDS: tuple[str, ...] = ("class", "label", "multi_label", "regression")

# Bump when an export function changes what it writes: the cached SavedModels are keyed by it.
EXPORT_FORMAT = 1


@dataclass(frozen=True)
class Output:
    """One signature output: its kind, its shape without the batch dimension, and what it means."""

    kind: Kind
    shape: tuple[int, ...]
    description: str
    labels: tuple[str, ...] | None = None  # names of the last axis' entries, where they have names


@dataclass(frozen=True)
class PublishedModel:
    """A published model, exported as a SavedModel, with inputs to run it on and what to expect."""

    name: str
    wheel: Wheel
    source_files: tuple[str, ...]  # the files of the wheel the SavedModel is made from
    saved_model: Path
    signature: str
    inputs: dict[str, np.ndarray]  # signature input name -> sample batch (read-only)
    input_description: str
    outputs: dict[str, Output]  # signature output name -> expected kind, shape, meaning
    parameters: int
    peers: dict[str, Path] = field(default_factory=dict)  # "tflite" / "onnx" -> the authors' own file
    peer_inputs: dict[str, str] = field(default_factory=dict)  # peer tensor name -> signature input name
    peer_outputs: dict[str, str] = field(default_factory=dict)  # peer tensor name -> signature output name
    truth: dict[str, np.ndarray] = field(default_factory=dict)  # what each sample row is known to hold

    @property
    def rows(self) -> int:
        return len(next(iter(self.inputs.values())))


def frozen(array: np.ndarray) -> np.ndarray:
    """``array`` made read-only, so a cached model's inputs cannot be changed by one caller for the next."""
    array = np.ascontiguousarray(array)
    array.setflags(write=False)
    return array


def cached_saved_model(name: str, package: str, export: Callable[[Path], None]) -> Path:
    """The SavedModel ``<cache>/saved_models/<name>-<package version>-f<EXPORT_FORMAT>``, exported once.

    ``export`` writes a SavedModel into the directory it is given. It writes into a private
    directory that is then renamed into place, so concurrent test workers never see half a model.
    """
    target = cache_dir() / "saved_models" / f"{name}-{WHEELS[package].version}-f{EXPORT_FORMAT}"
    if (target / "saved_model.pb").is_file():
        return target
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        export(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        os.rename(partial, target)
    except OSError:
        # Another process renamed its export into place first: keep that one.
        shutil.rmtree(partial, ignore_errors=True)
        if not (target / "saved_model.pb").is_file():
            raise
    return target


def saved_model_parameters(directory: Path) -> int:
    """The number of values in the SavedModel's variables (trainable or not: batch-norm statistics count)."""
    import tensorflow as tf

    prefix = str(Path(directory) / "variables" / "variables")
    variables = tf.train.list_variables(prefix)
    return sum(int(np.prod(shape)) for name, shape in variables if "_CHECKPOINTABLE_OBJECT_GRAPH" not in name)
