"""Evaluation: sizes, graph counts, load time, latency, accuracy and fidelity of the exported
model and of every optimised variant, measured side by side in one process.

Timed repeats interleave the models (in a rotating order) so that machine drift hits all of
them alike; ratios are taken against the exported model measured in the same run.
"""

from __future__ import annotations

import gzip
import io
import logging
import statistics
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .describe import describe_graph
from .params import require, require_positive

log = logging.getLogger(__name__)

REFERENCE = "exported"


@dataclass(frozen=True)
class EvaluateParams:
    batch_rows: int
    repeats: int
    single_row_calls: int
    load_repeats: int
    seed: int
    min_class_agreement: float
    signature: str

    @classmethod
    def from_section(cls, section: dict) -> EvaluateParams:
        repeats = require_positive(section, "repeats", int, "evaluate")
        if repeats < 5:
            raise UserError(f"params.yaml: 'evaluate.repeats' must be at least 5 (median of >= 5), got {repeats}")
        agreement = float(require(section, "min_class_agreement", float, "evaluate"))
        if not 0 <= agreement <= 1:
            raise UserError(f"params.yaml: 'evaluate.min_class_agreement' must be in [0, 1], got {agreement}")
        return cls(
            batch_rows=require_positive(section, "batch_rows", int, "evaluate"),
            repeats=repeats,
            single_row_calls=require_positive(section, "single_row_calls", int, "evaluate"),
            load_repeats=require_positive(section, "load_repeats", int, "evaluate"),
            seed=require(section, "seed", int, "evaluate"),
            min_class_agreement=agreement,
            signature=require(section, "signature", str, "evaluate"),
        )


# ---------------------------------------------------------------------------------------------
# Sizes and graph counts (no TensorFlow runtime needed)
# ---------------------------------------------------------------------------------------------


def gzip_size(directory: Path) -> int:
    """Bytes of the directory as a gzip-compressed tar with fixed metadata (reproducible)."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as compressed:
        with tarfile.open(fileobj=compressed, mode="w") as archive:
            for path in sorted(p for p in directory.rglob("*") if p.is_file()):
                info = tarfile.TarInfo(str(path.relative_to(directory)))
                info.size = path.stat().st_size
                with path.open("rb") as stream:
                    archive.addfile(info, stream)
    return len(buffer.getvalue())


def model_sizes(directory: Path) -> dict[str, int]:
    pb = directory / "saved_model.pb"
    if not pb.is_file():
        raise UserError(f"{directory}: not a SavedModel (no saved_model.pb)")
    variables = directory / "variables"
    variables_bytes = sum(p.stat().st_size for p in variables.rglob("*") if p.is_file()) if variables.is_dir() else 0
    return {
        "size_saved_model_pb_bytes": pb.stat().st_size,
        "size_variables_bytes": variables_bytes,
        "size_total_bytes": sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()),
        "size_gzip_bytes": gzip_size(directory),
    }


def graph_counts(directory: Path) -> dict[str, int]:
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((directory / "saved_model.pb").read_bytes())
    graph_def = saved_model.meta_graphs[0].graph_def
    described = describe_graph(graph_def)
    return {
        "graph_nodes": described["total_nodes"],
        "graph_const_nodes": described["const_count"],
        "graph_identity_nodes": described["identity_count"],
        "graph_variable_nodes": described["variable_count"],
        "graph_dequantize_nodes": described["dequantize_count"],
        "graph_function_nodes": sum(len(f.node_def) for f in graph_def.library.function),
    }


# ---------------------------------------------------------------------------------------------
# Running models
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    name: str
    directory: Path
    signature: object
    load_seconds: float
    first_call_seconds: float = 0.0
    _keep_alive: object = None


def load_model(name: str, directory: Path, signature_key: str, load_repeats: int = 1) -> LoadedModel:
    import tensorflow as tf

    if not (directory / "saved_model.pb").is_file():
        raise UserError(f"{directory}: SavedModel for '{name}' not found (run its convert stage first)")
    timings = []
    loaded = None
    for _ in range(load_repeats):
        start = time.perf_counter()
        loaded = tf.saved_model.load(str(directory), tags=["serve"])
        timings.append(time.perf_counter() - start)
    if signature_key not in loaded.signatures:
        raise UserError(f"{directory}: no signature '{signature_key}' (has {', '.join(sorted(loaded.signatures))})")
    return LoadedModel(name, directory, loaded.signatures[signature_key], statistics.median(timings), 0.0, loaded)


def to_tensors(features: dict[str, np.ndarray]) -> dict:
    import tensorflow as tf

    return {name: tf.constant(values) for name, values in features.items()}


def predict(model: LoadedModel, tensors: dict) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in model.signature(**tensors).items()}


def _timed(model: LoadedModel, tensors: dict) -> float:
    start = time.perf_counter()
    outputs = model.signature(**tensors)
    for value in outputs.values():
        value.numpy()  # results are materialised before the clock stops
    return time.perf_counter() - start


def _rows(tensors: dict) -> int:
    return int(next(iter(tensors.values())).shape[0])


def measure_latency(
    models: list[LoadedModel], batch: dict, single: dict, repeats: int, single_row_calls: int, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Batch latency (median) and batch-1 p50/p99 per model, and their ratios to the first model.

    The batch rounds run first, then the batch-1 rounds (a 100,000-row call leaves caches and
    the allocator in a state that slows the next small calls). Each round times every model, in
    a seeded random order. Ratios are medians of per-round ratios against the first model
    measured in the same round, so drift and one-off stalls (single 100,000-row calls vary by
    +-15 % on this machine) hit both sides of a ratio alike.
    """
    for model in models:
        model.first_call_seconds = _timed(model, single)
        _timed(model, batch)
        for _ in range(5):
            _timed(model, single)
    batch_times: dict[str, list[float]] = {m.name: [] for m in models}
    single_times: dict[str, list[list[float]]] = {m.name: [] for m in models}
    calls_per_round = max(1, single_row_calls // repeats)
    rng = np.random.default_rng(seed)
    for round_index in range(repeats):
        for index in rng.permutation(len(models)):
            batch_times[models[index].name].append(_timed(models[index], batch))
        log.info("latency: %d-row round %d/%d done", _rows(batch), round_index + 1, repeats)
    for _ in range(repeats):
        for index in rng.permutation(len(models)):
            single_times[models[index].name].append([_timed(models[index], single) for _ in range(calls_per_round)])
    log.info("latency: %d batch-1 calls per model done", calls_per_round * repeats)
    reference = models[0].name
    result = {}
    for model in models:
        singles = np.concatenate(single_times[model.name]) * 1000
        round_p50 = [float(np.median(calls)) for calls in single_times[model.name]]
        reference_p50 = [float(np.median(calls)) for calls in single_times[reference]]
        result[model.name] = {
            "latency_batch_ms_median": statistics.median(batch_times[model.name]) * 1000,
            "latency_single_ms_p50": float(np.percentile(singles, 50)),
            "latency_single_ms_p99": float(np.percentile(singles, 99)),
            "latency_batch_ratio": statistics.median(
                a / b for a, b in zip(batch_times[model.name], batch_times[reference])
            ),
            "latency_single_p50_ratio": statistics.median(a / b for a, b in zip(round_p50, reference_p50)),
        }
    return result


def fidelity(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> tuple[float, float]:
    """(class agreement, max |probability difference|) of ``candidate`` against ``reference``."""
    agreement = float(np.mean(reference["class_ids"].reshape(-1) == candidate["class_ids"].reshape(-1)))
    max_diff = float(np.max(np.abs(reference["probabilities"] - candidate["probabilities"])))
    return agreement, max_diff


def evaluate_models(
    model_dirs: dict[str, Path],
    eval_features: dict[str, np.ndarray],
    eval_labels: np.ndarray,
    batch_features: dict[str, np.ndarray],
    params: EvaluateParams,
) -> dict[str, dict[str, float]]:
    """Metrics per model name; ``model_dirs`` must include the reference model ``exported``."""
    if REFERENCE not in model_dirs:
        raise UserError(f"evaluate: the reference model '{REFERENCE}' is missing")
    names = [REFERENCE, *sorted(n for n in model_dirs if n != REFERENCE)]
    metrics: dict[str, dict[str, float]] = {}
    for name in names:
        metrics[name] = {**model_sizes(model_dirs[name]), **graph_counts(model_dirs[name])}
    models = []
    for name in names:
        log.info("loading %s from %s", name, model_dirs[name])
        models.append(load_model(name, model_dirs[name], params.signature, params.load_repeats))
    eval_tensors, batch_tensors = to_tensors(eval_features), to_tensors(batch_features)
    single_tensors = to_tensors({k: v[:1] for k, v in eval_features.items()})
    eval_outputs = {m.name: predict(m, eval_tensors) for m in models}
    batch_outputs = {m.name: predict(m, batch_tensors) for m in models}
    latency = measure_latency(
        models, batch_tensors, single_tensors, params.repeats, params.single_row_calls, params.seed
    )
    reference = metrics[REFERENCE]
    for model in models:
        m = metrics[model.name]
        m["load_seconds"] = model.load_seconds
        m["first_call_ms"] = model.first_call_seconds * 1000
        m.update(latency[model.name])
        m["eval_accuracy"] = float(np.mean(eval_outputs[model.name]["class_ids"].reshape(-1) == eval_labels))
        m["eval_class_agreement"], m["eval_max_abs_prob_diff"] = fidelity(
            eval_outputs[REFERENCE], eval_outputs[model.name]
        )
        m["batch_class_agreement"], m["batch_max_abs_prob_diff"] = fidelity(
            batch_outputs[REFERENCE], batch_outputs[model.name]
        )
    for model in models:
        m = metrics[model.name]
        m["size_total_ratio"] = m["size_total_bytes"] / reference["size_total_bytes"]
    return {name: {k: _rounded(v) for k, v in m.items()} for name, m in metrics.items()}


def _rounded(value):
    return round(value, 6) if isinstance(value, float) else value


def failing_variants(metrics: dict[str, dict[str, float]], min_class_agreement: float) -> list[str]:
    return [
        f"{name} (class agreement {min(m['eval_class_agreement'], m['batch_class_agreement']):.4f})"
        for name, m in metrics.items()
        if min(m["eval_class_agreement"], m["batch_class_agreement"]) < min_class_agreement
    ]
