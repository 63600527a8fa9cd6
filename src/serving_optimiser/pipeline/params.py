"""The pipeline's params file, resolved in one place: each stage's section as a checked dataclass,
the label vocabulary, and the ``model`` section (which model the pipeline optimises and the
samples it runs on). Every error names the file it read (``--params`` may point anywhere) and the
key. TensorFlow-free and light, so a stage checks its params before TensorFlow loads; which model
name is a variant or a peer is :mod:`serving_optimiser.pipeline.entries` (it needs the transform
catalogue, which the data stages should not depend on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..params_file import (
    DEFAULT_PARAMS_FILE,
    check_stage_keys,
    load_params,
    require,
    require_list,
    require_positive,
    section,
)

__all__ = [
    "DEFAULT_PARAMS_FILE", "EvaluateParams", "LatencyParams", "ModelSection", "PipelineParams", "TrainParams",
    "check_stage_keys", "load_params", "require", "require_list", "require_positive", "section",
]

SOURCES = ("iris", "saved_model")
# With source: iris the model is the export stage's and the samples the prepare stage's split.
IRIS_PATH = "models/exported"
IRIS_SAMPLES = "data/prepared"
IRIS_SIGNATURE = "predict"
DEFAULT_SIGNATURE = "serving_default"
MODEL_KEYS = ("source", "path", "signature", "samples", "labels", "class_output", "outputs", "eval_fraction", "seed")
OUTPUT_KINDS = ("class", "label", "multi_label", "regression")  # saved_model.output_kinds.KINDS, TF-free here
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")  # saved_model.keras_file's, TF-free here


@dataclass(frozen=True)
class TrainParams:
    hidden_units: list[int]
    learning_rate: float
    batch_size: int
    epochs: int
    seed: int

    @classmethod
    def from_section(cls, section: dict, path: str | Path = DEFAULT_PARAMS_FILE) -> TrainParams:
        hidden_units = require_list(section, "hidden_units", int, "train", path)
        if any(units <= 0 for units in hidden_units):
            raise UserError(f"{path}: 'train.hidden_units' must be positive integers, got {hidden_units}")
        return cls(
            hidden_units=hidden_units,
            learning_rate=float(require_positive(section, "learning_rate", float, "train", path)),
            batch_size=require_positive(section, "batch_size", int, "train", path),
            epochs=require_positive(section, "epochs", int, "train", path),
            seed=require(section, "seed", int, "train", path),
        )


TOLERANCE_KEYS = ("agreement", "flips_of_positives", "flips_of_all", "rms_diff_of_range", "max_diff_of_range")
STOP_ON_FAILURE = ("auto", "true", "false")
AUTO_OBJECTIVES = ("size",)  # the pipeline's auto variant: deterministic bytes, so no timing


@dataclass(frozen=True)
class EvaluateParams:
    batch_rows: int
    seed: int
    sample_rows: int
    max_eval_rows_lost: int
    chunk_bytes: int = 16 * 2**20  # input bytes per model call (serving_optimiser.chunks)
    max_batch_bytes: int = 64 * 2**20  # the batch holds at most batch_rows rows and this many input bytes
    # Overrides of saved_model.output_kinds.DEFAULT_TOLERANCES (the one set the CLI uses too).
    tolerances: dict[str, float] = field(default_factory=dict)
    stop_on_gate_failure: str = "auto"  # auto: stop dvc repro for Iris, record the failure for a user's model
    # The optimise stage sends a lossy variant's most harmful weights and layers back to per-channel
    # ranges, then float, until it meets the tolerances (pipeline.fallback); False: lists as written.
    fallback: bool = True
    # The fallback's judged runs use the first rows of the batch, at most this many input bytes
    # (Iris's whole 1.6 MB batch; 95 of basic-pitch's 2 s windows): each is a full model run, up to
    # ~20 per variant. The evaluate stage then judges the result on the whole batch.
    fallback_batch_bytes: int = 16 * 2**20

    @classmethod
    def from_section(cls, section: dict, path: str | Path = DEFAULT_PARAMS_FILE) -> EvaluateParams:
        rows_lost = require(section, "max_eval_rows_lost", int, "evaluate", path)
        if rows_lost < 0:
            raise UserError(f"{path}: 'evaluate.max_eval_rows_lost' must be >= 0, got {rows_lost}")
        known = {"batch_rows", "seed", "sample_rows", "max_eval_rows_lost", "chunk_bytes", "max_batch_bytes",
                 "tolerances", "stop_on_gate_failure", "fallback", "fallback_batch_bytes"}
        unknown = sorted(set(section) - known)
        if unknown:
            keys = ", ".join(f"evaluate.{key}" for key in unknown)
            raise UserError(f"{path}: unknown key(s) {keys} (expected {', '.join(sorted(known))})")
        tolerances = section.get("tolerances") or {}
        if not isinstance(tolerances, dict):
            raise UserError(f"{path}: 'evaluate.tolerances' = {tolerances!r} must map tolerance names to fractions")
        for name, value in tolerances.items():
            if name not in TOLERANCE_KEYS:
                raise UserError(
                    f"{path}: 'evaluate.tolerances.{name}' is unknown (expected {', '.join(TOLERANCE_KEYS)})"
                )
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise UserError(f"{path}: 'evaluate.tolerances.{name}' = {value!r} must be a fraction in [0, 1]")
        stop = str(section.get("stop_on_gate_failure", "auto")).lower()
        if stop not in STOP_ON_FAILURE:
            raise UserError(f"{path}: 'evaluate.stop_on_gate_failure' = {section.get('stop_on_gate_failure')!r} "
                            f"must be one of {', '.join(STOP_ON_FAILURE)}")
        fallback = section.get("fallback", True)
        if not isinstance(fallback, bool):
            raise UserError(f"{path}: 'evaluate.fallback' = {fallback!r} must be true or false")
        return cls(
            batch_rows=require_positive(section, "batch_rows", int, "evaluate", path),
            seed=require(section, "seed", int, "evaluate", path),
            sample_rows=require_positive(section, "sample_rows", int, "evaluate", path),
            max_eval_rows_lost=rows_lost,
            chunk_bytes=require_positive(section, "chunk_bytes", int, "evaluate", path),
            max_batch_bytes=require_positive(section, "max_batch_bytes", int, "evaluate", path),
            tolerances={name: float(value) for name, value in tolerances.items()},
            stop_on_gate_failure=stop,
            fallback=fallback,
            fallback_batch_bytes=(require_positive(section, "fallback_batch_bytes", int, "evaluate", path)
                                  if "fallback_batch_bytes" in section else cls.fallback_batch_bytes),
        )

    def stops_on_gate_failure(self, source: str) -> bool:
        """Whether a model that fails the gate stops ``dvc repro``: ``auto`` stops for Iris (the
        committed behaviour) and records the failure as a result for a user's model."""
        return self.stop_on_gate_failure == "true" or (self.stop_on_gate_failure == "auto" and source == "iris")

    def batch_rows_for(self, bytes_per_row: int) -> int:
        """The rows of the batch drawn around the eval data for inputs of ``bytes_per_row``:
        ``batch_rows``, fewer where they would hold more than ``max_batch_bytes``."""
        from ..chunks import capped_rows

        return capped_rows(self.batch_rows, bytes_per_row, self.max_batch_bytes)


@dataclass(frozen=True)
class LatencyParams:
    batch_sizes: tuple[int, ...]  # ascending
    repeats: int
    calls_per_round: int
    rows_per_round: int
    load_repeats: int
    seed: int
    max_call_bytes: int = 256 * 2**20  # batch sizes whose input holds more are not timed
    max_stage_seconds: float = 90.0  # the largest batch sizes are dropped until the rounds fit

    @classmethod
    def from_section(cls, section: dict, path: str | Path = DEFAULT_PARAMS_FILE) -> LatencyParams:
        repeats = require_positive(section, "repeats", int, "latency", path)
        if repeats < 5:
            raise UserError(f"{path}: 'latency.repeats' must be at least 5 (median of >= 5), got {repeats}")
        sizes = require_list(section, "batch_sizes", int, "latency", path)
        bad = [size for size in sizes if size < 1]
        if bad:
            raise UserError(f"{path}: 'latency.batch_sizes' must be positive row counts, got {bad[0]}")
        if len(set(sizes)) != len(sizes):
            raise UserError(f"{path}: 'latency.batch_sizes' lists a size twice: {sizes}")
        known = {
            "batch_sizes", "repeats", "calls_per_round", "rows_per_round", "load_repeats", "seed", "max_call_bytes",
            "max_stage_seconds",
        }
        unknown = sorted(set(section) - known)
        if unknown:
            keys = ", ".join(f"latency.{key}" for key in unknown)
            raise UserError(f"{path}: unknown key(s) {keys} (expected {', '.join(sorted(known))})")
        return cls(
            batch_sizes=tuple(sorted(sizes)),
            repeats=repeats,
            calls_per_round=require_positive(section, "calls_per_round", int, "latency", path),
            rows_per_round=require_positive(section, "rows_per_round", int, "latency", path),
            load_repeats=require_positive(section, "load_repeats", int, "latency", path),
            seed=require(section, "seed", int, "latency", path),
            max_call_bytes=require_positive(section, "max_call_bytes", int, "latency", path),
            max_stage_seconds=float(require_positive(section, "max_stage_seconds", float, "latency", path)),
        )

    def sizes_that_fit(self, bytes_per_row: int) -> tuple[int, ...]:
        """The batch sizes whose input holds at most ``max_call_bytes`` (the smallest at least)."""
        kept = tuple(size for size in self.batch_sizes if size * bytes_per_row <= self.max_call_bytes)
        return kept or self.batch_sizes[:1]

    def calls(self, batch: int) -> int:
        """Calls per model per round at ``batch`` rows: ``calls_per_round``, fewer where that would
        pass ``rows_per_round`` rows, and at least one (a 100,000-row call is timed once a round)."""
        return max(1, min(self.calls_per_round, self.rows_per_round // batch))


@dataclass(frozen=True)
class ModelSection:
    """The ``model`` section: the Iris export (``source: iris``) or the user's SavedModel.

    Checked here without TensorFlow: the keys, that the paths exist and are what they should be,
    that the samples file is an .npz holding the labels array if one is named. What needs the
    SavedModel's signature (its inputs in the samples, their dtypes and shapes, the class output)
    is checked by the model stage (:mod:`serving_optimiser.pipeline.model`).
    """

    source: str
    path: Path
    signature: str
    samples: Path
    labels: str | None  # the name of an array in the samples file (saved_model only)
    class_output: str | None  # saved_model only; Iris compares class_ids and probabilities
    eval_fraction: float
    seed: int
    params_file: Path
    # saved_model only: output -> kind where the graph's own op would judge it wrongly;
    # ``class_output: X`` is shorthand for ``X: class``.
    outputs: dict[str, str] = field(default_factory=dict)

    def output_kinds(self) -> dict[str, str]:
        """The kinds the user gave: ``model.outputs``, and ``model.class_output`` as ``class``."""
        given = dict(self.outputs)
        if self.class_output is not None:
            given.setdefault(self.class_output, "class")
        return given

    def where(self, key: str) -> str:
        """``FILE: 'model.KEY' = VALUE`` for an error's start."""
        return f"{self.params_file}: 'model.{key}' = {getattr(self, key)!s:s}"

    @classmethod
    def from_section(cls, values: dict[str, Any], path: str | Path = DEFAULT_PARAMS_FILE) -> ModelSection:
        path = Path(path)
        unknown = sorted(set(values) - set(MODEL_KEYS))
        if unknown:
            keys = ", ".join(f"model.{key}" for key in unknown)
            raise UserError(f"{path}: unknown key(s) {keys} (expected {', '.join(MODEL_KEYS)})")
        source = require(values, "source", str, "model", path)
        if source not in SOURCES:
            raise UserError(f"{path}: 'model.source' = {source!r} is not one of {', '.join(SOURCES)}")
        for key in ("path", "samples"):
            require(values, key, str, "model", path)
        for key in ("signature", "labels", "class_output"):
            if values.get(key) is not None and not isinstance(values[key], str):
                raise UserError(f"{path}: 'model.{key}' = {values[key]!r} must be a string or null")
        outputs = values.get("outputs") or {}
        if not isinstance(outputs, dict) or not all(isinstance(k, str) for k in outputs):
            raise UserError(f"{path}: 'model.outputs' = {outputs!r} must map output names to kinds")
        for name, kind in outputs.items():
            if kind not in OUTPUT_KINDS:
                raise UserError(f"{path}: 'model.outputs.{name}' = {kind!r} is not one of {', '.join(OUTPUT_KINDS)}")
        fraction = float(require(values, "eval_fraction", float, "model", path))
        if not 0 < fraction < 1:
            raise UserError(f"{path}: 'model.eval_fraction' = {fraction} must be between 0 and 1")
        signature = values.get("signature") or (IRIS_SIGNATURE if source == "iris" else DEFAULT_SIGNATURE)
        model = cls(
            source=source,
            path=Path(values["path"]),
            signature=signature,
            samples=Path(values["samples"]),
            labels=values.get("labels"),
            class_output=values.get("class_output"),
            eval_fraction=fraction,
            seed=require(values, "seed", int, "model", path),
            params_file=path,
            outputs=dict(outputs),
        )
        model._check_paths(values)
        return model

    def _check_paths(self, values: dict[str, Any]) -> None:
        path = self.params_file
        if self.source == "iris":
            # The Iris pipeline's own outputs: anything else means source was left at iris by mistake.
            expected = {"path": IRIS_PATH, "samples": IRIS_SAMPLES, "signature": None, "labels": None,
                        "class_output": None, "outputs": None}
            for key, value in expected.items():
                if (values.get(key) or None) != value:
                    raise UserError(
                        f"{path}: 'model.{key}' = {values.get(key)} needs model.source=saved_model "
                        f"(with source iris it is {value})"
                    )
            return
        if not self.path.exists():
            raise UserError(f"{self.where('path')}: no such directory or Keras file")
        keras_file = self.path.is_file() and self.path.suffix.lower() in KERAS_SUFFIXES
        if not keras_file and (not self.path.is_dir() or not any(
                (self.path / name).is_file() for name in ("saved_model.pb", "saved_model.pbtxt"))):
            raise UserError(f"{self.where('path')}: not a SavedModel directory (no saved_model.pb) "
                            f"nor a Keras file ({', '.join(KERAS_SUFFIXES)})")
        if self.samples.suffix != ".npz":
            raise UserError(f"{self.where('samples')}: must be an .npz file of input arrays by input key")
        if not self.samples.is_file():
            raise UserError(f"{self.where('samples')}: no such file")
        names = npz_names(self.samples, self.where("samples"))
        if self.labels is not None and self.labels not in names:
            raise UserError(f"{self.where('labels')}: no such array in {self.samples} (has {', '.join(names)})")


def npz_names(path: Path, where: str) -> list[str]:
    """The array names of an .npz, in file order, or a one-line error starting with ``where``."""
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return list(data.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise UserError(f"{where}: not a readable .npz ({reason})") from None


class PipelineParams:
    """A params file, read once; each accessor checks its section and names the file in errors."""

    def __init__(self, data: dict[str, Any], path: str | Path = DEFAULT_PARAMS_FILE) -> None:
        self.data = data
        self.path = Path(path)

    @classmethod
    def load(cls, path: str | Path = DEFAULT_PARAMS_FILE) -> PipelineParams:
        return cls(load_params(path), path)

    def section(self, name: str) -> dict[str, Any]:
        return section(self.data, name, self.path)

    def label_vocabulary(self) -> list[str]:
        """``data.label_vocabulary``: the Iris classes, in class-id order."""
        vocabulary = require_list(self.section("data"), "label_vocabulary", str, "data", self.path)
        if len(set(vocabulary)) != len(vocabulary):
            raise UserError(f"{self.path}: 'data.label_vocabulary' lists a label twice: {vocabulary}")
        return vocabulary

    def model(self) -> ModelSection:
        return ModelSection.from_section(self.section("model"), self.path)

    def train(self) -> TrainParams:
        return TrainParams.from_section(self.section("train"), self.path)

    def evaluate(self) -> EvaluateParams:
        return EvaluateParams.from_section(self.section("evaluate"), self.path)

    def latency(self) -> LatencyParams:
        return LatencyParams.from_section(self.section("latency"), self.path)

    def variants(self) -> dict[str, Any]:
        """The ``optimise`` section (its keys name DVC stages and directories)."""
        variants = self.section("optimise")
        check_stage_keys(variants, "optimise", self.path)
        return variants

    def auto_objective(self, variant: str) -> str | None:
        """The objective of an ``auto`` variant (a mapping ``{objective: size}`` in place of a
        transform list), or None for a transform list."""
        value = self.variants().get(variant)
        if not isinstance(value, dict):
            return None
        unknown = sorted(set(value) - {"objective"})
        if unknown:
            raise UserError(f"{self.path}: unknown key(s) {', '.join(f'optimise.{variant}.{k}' for k in unknown)} "
                            "(an auto variant takes objective only)")
        objective = value.get("objective", "size")
        if objective not in AUTO_OBJECTIVES:
            raise UserError(f"{self.path}: 'optimise.{variant}.objective' = {objective!r}: the pipeline's auto "
                            "variant takes size only (latency depends on the machine, and its bytes must not)")
        return objective

    def transforms(self, variant: str) -> list[str]:
        """A variant's transform list; for an ``auto`` variant, the lossless list (what it writes
        when no candidate wins), its candidates being :func:`auto_candidates`."""
        if self.auto_objective(variant) is not None:
            from ..saved_model.candidates import CANDIDATES, LOSSLESS

            return list(CANDIDATES[LOSSLESS][0])
        return require_list(self.variants(), variant, str, "optimise", self.path)

    def auto_candidates(self, variant: str) -> dict[str, list[str]]:
        """An ``auto`` variant's candidate lists: the library's (``optimise_saved_model --auto``)
        that need neither calibration inputs nor oneDNN (see :mod:`.optimise`)."""
        from ..saved_model.candidates import CANDIDATES

        return {name: list(transforms) for name, (transforms, calibrated, _) in CANDIDATES.items() if not calibrated}
