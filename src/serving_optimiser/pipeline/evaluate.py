"""Evaluation of one model against the exported one: sizes, graph counts, accuracy and fidelity.

Everything here is deterministic: the stages that call it run with pinned kernels and threads
(:mod:`serving_optimiser.runtime`), so the figures are the same on any x86-64 machine. Timings
live apart, in :mod:`serving_optimiser.pipeline.latency`.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .params import require, require_positive

log = logging.getLogger(__name__)

REFERENCE = "exported"
# What a model's outputs are compared on; the reference outputs file holds these per data set.
COMPARED_OUTPUTS = ("class_ids", "probabilities")


@dataclass(frozen=True)
class EvaluateParams:
    signature: str
    batch_rows: int
    seed: int
    sample_rows: int
    min_class_agreement: float
    max_eval_rows_lost: int

    @classmethod
    def from_section(cls, section: dict) -> EvaluateParams:
        agreement = float(require(section, "min_class_agreement", float, "evaluate"))
        if not 0 <= agreement <= 1:
            raise UserError(f"params.yaml: 'evaluate.min_class_agreement' must be in [0, 1], got {agreement}")
        rows_lost = require(section, "max_eval_rows_lost", int, "evaluate")
        if rows_lost < 0:
            raise UserError(f"params.yaml: 'evaluate.max_eval_rows_lost' must be >= 0, got {rows_lost}")
        return cls(
            signature=require(section, "signature", str, "evaluate"),
            batch_rows=require_positive(section, "batch_rows", int, "evaluate"),
            seed=require(section, "seed", int, "evaluate"),
            sample_rows=require_positive(section, "sample_rows", int, "evaluate"),
            min_class_agreement=agreement,
            max_eval_rows_lost=rows_lost,
        )


@dataclass(frozen=True)
class ModelEntry:
    """Where a model's name comes from in params.yaml, and how it must run."""

    name: str
    kind: str  # "exported", "variant" (an optimise list) or "peer" (a LiteRT / ONNX artefact)
    needs_onednn: bool  # its ops run only on oneDNN's kernels (quantize_matmuls)
    threads: int  # the peer runtimes' threads (TensorFlow's are process-wide)

    @property
    def is_reference(self) -> bool:
        return self.kind == REFERENCE

    @classmethod
    def find(cls, params: dict, name: str, path: str | Path = "params.yaml") -> ModelEntry:
        """Read without importing TensorFlow, so a stage can pin its kernels before it loads."""
        from ..graph_transforms.catalogue import needs_onednn

        peers = peers_section(params, path)
        threads = peers.threads if peers else 2
        if name == REFERENCE:
            return cls(name, REFERENCE, False, threads)
        variants = params.get("optimise") or {}
        if name in variants:
            return cls(name, "variant", needs_onednn(variants[name]), threads)
        if peers and name in peers.variants:
            return cls(name, "peer", False, threads)
        known = sorted([*variants, *(peers.variants if peers else ())])
        raise UserError(f"{path}: no model '{name}' in 'optimise' or 'peers.variants' (has {', '.join(known)})")


def peers_section(params: dict, path: str | Path = "params.yaml"):
    """The ``peers`` section, checked, or None when params.yaml has none."""
    if "peers" not in params:
        return None
    from ..peers.params import PeersParams

    return PeersParams.from_section(params["peers"], path)


# ---------------------------------------------------------------------------------------------
# Sizes and graph counts (no TensorFlow runtime needed)
# ---------------------------------------------------------------------------------------------


def gzip_size(path: Path) -> int:
    """Bytes of a file or directory as a gzip-compressed tar with fixed metadata (reproducible)."""
    buffer = io.BytesIO()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as compressed:
        with tarfile.open(fileobj=compressed, mode="w") as archive:
            for file in files:
                info = tarfile.TarInfo(file.name if file == path else str(file.relative_to(path)))
                info.size = file.stat().st_size
                with file.open("rb") as stream:
                    archive.addfile(info, stream)
    return len(buffer.getvalue())


def model_size(path: Path) -> dict[str, int]:
    """Bytes on disk of a model (a SavedModel directory or a single-file artefact) and gzipped."""
    if path.is_dir():
        total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    elif path.is_file():
        total = path.stat().st_size
    else:
        raise UserError(f"{path}: model not found (run the stage that builds it first)")
    return {"size_bytes": total, "size_gzip_bytes": gzip_size(path)}


def saved_model_counts(directory: Path) -> dict[str, int]:
    """Node counts of the serving graph a SavedModel holds (its ``serve`` MetaGraph)."""
    from .describe import describe_graph, saved_model_graph_def

    graph_def = saved_model_graph_def(str(directory))
    described = describe_graph(graph_def)
    return {
        "graph_nodes": described["total_nodes"],
        "graph_const_nodes": described["const_count"],
        "graph_identity_nodes": described["identity_count"],
        "graph_variable_nodes": described["variable_count"],
        "graph_dequantize_nodes": described["dequantize_count"],
        "graph_function_nodes": sum(len(f.node_def) for f in graph_def.library.function),
    }


def signature_dump(directory: Path) -> str:
    """What ``saved_model_cli show --all --dir DIR`` prints: every signature's inputs and outputs."""
    from tensorflow.python.tools import saved_model_cli

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        saved_model_cli._show_all(str(directory))
    # Drop the trailing spaces some lines carry, and print the op set sorted (Python prints a set
    # in hash order, which changes from process to process), so the committed text is stable.
    lines = []
    for line in buffer.getvalue().splitlines():
        head, brace, ops = line.partition("contains the following ops: {")
        if brace and ops.endswith("}"):
            line = head + brace + ", ".join(sorted(op.strip() for op in ops[:-1].split(","))) + "}"
        lines.append(line.rstrip())
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Running a model (a SavedModel, or a LiteRT / ONNX peer) through one predictor interface
# ---------------------------------------------------------------------------------------------


def load_model(name: str, path: Path, vocabulary: list[str], signature: str, threads: int):
    """A predictor for ``path`` (see :mod:`serving_optimiser.peers.predictor`), named ``name`` in
    its errors."""
    from ..peers import load_predictor

    if not path.exists():
        raise UserError(f"{name}: {path} not found (run the stage that builds it first)")
    return load_predictor(path, threads=threads, label_vocabulary=vocabulary, signature=signature, name=name)


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def class_ids(outputs: dict[str, np.ndarray]) -> np.ndarray:
    return outputs["class_ids"].reshape(-1).astype(np.int64)


def fidelity(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> tuple[float, float]:
    """(class agreement, max |probability difference|) of ``candidate`` against ``reference``."""
    agreement = float(np.mean(class_ids(reference) == class_ids(candidate)))
    max_diff = float(np.max(np.abs(reference["probabilities"] - candidate["probabilities"])))
    return agreement, max_diff


def accuracy_figures(outputs: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float | int]:
    correct = class_ids(outputs) == labels
    return {"eval_accuracy": round(float(np.mean(correct)), 6), "eval_rows_correct": int(np.sum(correct))}


def sample_rows(rows: int, count: int) -> np.ndarray:
    """Evenly spaced eval rows: the split is ordered by class, so these show every class."""
    return np.unique(np.linspace(0, rows - 1, num=min(count, rows)).round().astype(int))


def sample_predictions(outputs: dict[str, np.ndarray], vocabulary: list[str], rows: int) -> list[dict]:
    """The notebook's printed prediction, for a few eval rows: row, class and probabilities."""
    ids = class_ids(outputs)
    return [
        {"row": int(row), "class": vocabulary[int(ids[row])],
         "probabilities": [round(float(p), 4) for p in outputs["probabilities"][row]]}
        for row in sample_rows(len(ids), rows)
    ]


def gate_failures(figures: dict, params: EvaluateParams) -> list[str]:
    """Why a model fails the gate, if it does (an empty list when it passes)."""
    failures = []
    if figures["agreement"] < params.min_class_agreement:
        failures.append(
            f"class agreement {figures['agreement']:.4%} on the {params.batch_rows}-row batch "
            f"is under evaluate.min_class_agreement={params.min_class_agreement}"
        )
    if figures["eval_rows_lost"] > params.max_eval_rows_lost:
        failures.append(
            f"{figures['eval_rows_lost']} eval rows lost against the exported model "
            f"(evaluate.max_eval_rows_lost={params.max_eval_rows_lost})"
        )
    return failures


def rounded(metrics: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}


def save_outputs(path: Path, outputs: dict[str, dict[str, np.ndarray]]) -> None:
    """The reference model's outputs per data set, for every variant's evaluation to compare to."""
    from ..atomic import atomic_file

    arrays = {f"{data}/{key}": values[key] for data, values in outputs.items() for key in COMPARED_OUTPUTS}
    with atomic_file(path, "wb") as stream:
        np.savez(stream, **arrays)


def load_outputs(path: Path) -> dict[str, dict[str, np.ndarray]]:
    if not path.is_file():
        raise UserError(f"{path}: reference outputs not found (run the reference stage first)")
    result: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as data:
        for name in data.files:
            data_set, key = name.split("/")
            result.setdefault(data_set, {})[key] = data[name]
    return result


# ---------------------------------------------------------------------------------------------
# One model, end to end
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    figures: dict  # every figure, at full precision, and the sample predictions
    outputs: dict[str, dict[str, np.ndarray]]  # per data set ("eval", "batch")


def evaluate_model(
    name: str,
    path: Path,
    data: dict[str, dict[str, np.ndarray]],
    labels: np.ndarray,
    vocabulary: list[str],
    params: EvaluateParams,
    threads: int,
    optimised_graph: Path | None = None,
) -> Evaluation:
    """Run ``name`` on every data set and describe it; fidelity is added by :func:`compare`.

    A broken conversion fails here, naming the model: NaN or Inf in an output, a wrong shape or
    dtype, class ids that are not the argmax of the logits.
    """
    predictor = load_model(name, path, vocabulary, params.signature, threads)
    outputs = {data_set: predictor.checked(features, vocabulary) for data_set, features in data.items()}
    size = model_size(path)
    figures = {"size_bytes": size["size_bytes"], "gzip_bytes": size["size_gzip_bytes"]}
    figures.update(accuracy_figures(outputs["eval"], labels))
    if (path / "saved_model.pb").is_file():
        figures.update(saved_model_counts(path))
    figures["sample_predictions"] = sample_predictions(outputs["eval"], vocabulary, params.sample_rows)
    if optimised_graph is not None:
        from ..saved_model import FrozenModel
        from .describe import describe_graph

        described = describe_graph(FrozenModel.load(optimised_graph).graph_def)
        figures.update({
            "optimised_graph_nodes": described["total_nodes"],
            "optimised_graph_const_nodes": described["const_count"],
            "optimised_graph_identity_nodes": described["identity_count"],
            "optimised_graph_dequantize_nodes": described["dequantize_count"],
        })
    return Evaluation(figures, outputs)


def compare(evaluation: Evaluation, reference_outputs: dict[str, dict[str, np.ndarray]], reference: dict) -> None:
    """Add fidelity against the exported model (its outputs and figures): on the 100,000-row
    batch, which the gate and the headline use, and on the eval split."""
    figures = evaluation.figures
    figures["agreement"], figures["max_dp"] = fidelity(reference_outputs["batch"], evaluation.outputs["batch"])
    figures["eval_agreement"], figures["eval_max_dp"] = fidelity(reference_outputs["eval"], evaluation.outputs["eval"])
    figures["size_ratio"] = figures["size_bytes"] / reference["size_bytes"]
    figures["eval_rows_lost"] = reference["eval_rows_correct"] - figures["eval_rows_correct"]


def headline(figures: dict) -> dict:
    """The few figures ``dvc metrics show`` lists per model, with short names and rounded so the
    table fits a 120-column terminal (README, "Comparing runs", has the legend); full precision
    stays in the details file."""
    result = {
        "size_kb": round(figures["size_bytes"] / 1024, 1),
        "gzip_kb": round(figures["gzip_bytes"] / 1024, 1),
        "acc": round(figures["eval_accuracy"], 4),
    }
    if "agreement" in figures:
        result["size_x"] = round(figures["size_ratio"], 3)
        result["agree"] = round(figures["agreement"], 5)
        result["max_dp"] = round(figures["max_dp"], 4)
    return result
