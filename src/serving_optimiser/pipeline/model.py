"""The model stage: which SavedModel the pipeline optimises and the rows it runs on, written once
for every later stage as ``data/samples`` (``model.json``, ``calibration.npz``, ``evaluation.npz``
and, with labels, ``labels.npy``).

``model.json`` is the :class:`ModelSpec`: the signature the pipeline calls, its inputs and outputs
(keys, dtypes, shapes: from the SavedModel, never from Iris code), and how two models' outputs
are compared (the class output, the output whose max |Δ| is reported, or none: then the gate is
max |Δ| relative to each output's range). With ``source: iris`` the rows are the prepare stage's
split; with ``source: saved_model`` they are the user's ``.npz``, split by a seeded permutation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .params import ModelSection

SPEC_FILE = "model.json"
CALIBRATION_FILE = "calibration.npz"
EVALUATION_FILE = "evaluation.npz"
LABELS_FILE = "labels.npy"
# What the Iris export's predict signature is compared on (its figures since the first run).
IRIS_CLASS_OUTPUT = "class_ids"
IRIS_DIFF_OUTPUT = "probabilities"


@dataclass(frozen=True)
class ModelSpec:
    """What the later stages need to know about the model (``data/samples/model.json``)."""

    source: str
    signature: str
    input_order: list[str]  # the samples' order (the batch drawn around them consumes the seed in it)
    inputs: dict[str, dict]  # key -> {"dtype": name, "shape": [int | None] | None}
    outputs: dict[str, dict]
    class_output: str | None  # whose class agreement gates (argmax of a float output, or the ids)
    diff_output: str | None  # whose max |Δ| is the headline max_dp
    compared: list[str]  # the outputs the reference keeps and every model is compared on
    label_vocabulary: list[str] | None
    has_labels: bool
    # compared output -> kind (saved_model.output_kinds): inferred from the op that produces it,
    # or as model.outputs / model.class_output say. None for Iris, whose kinds are fixed below
    # (and whose model.json predates kinds: its bytes stay the same).
    output_kinds: dict[str, str] | None = None

    @property
    def gate(self) -> str:
        """``class_agreement`` or, without a class output, ``relative_diff``."""
        return "class_agreement" if self.class_output else "relative_diff"

    def kinds(self) -> dict[str, str]:
        """Each compared output's kind: how the evaluation judges it."""
        if self.output_kinds is not None:
            return {key: self.output_kinds[key] for key in self.compared}
        # Iris: class ids are labels; the probabilities come out of a Softmax.
        fixed = {IRIS_CLASS_OUTPUT: "label", IRIS_DIFF_OUTPUT: "class"}
        return {key: fixed.get(key, "regression") for key in self.compared}

    def expected(self, keys=None) -> dict[str, tuple[str, list[int | None] | None]]:
        """Output key -> (dtype, shape) for :func:`~serving_optimiser.peers.predictor.validate_outputs`:
        the numeric outputs (a peer drops strings), and ``classes`` where a vocabulary maps ids to it."""
        keys = keys or [k for k, v in self.outputs.items() if v["dtype"] != "string" or self.label_vocabulary]
        return {key: (self.outputs[key]["dtype"], self.outputs[key]["shape"]) for key in keys}

    def save(self, path: Path) -> None:
        data = asdict(self)
        if data["output_kinds"] is None:
            del data["output_kinds"]
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, samples_dir: str | Path) -> ModelSpec:
        path = Path(samples_dir) / SPEC_FILE
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as error:
            raise UserError(f"{path}: not the model stage's description (run it first: {error})") from None


@dataclass(frozen=True)
class Samples:
    spec: ModelSpec
    calibration: dict[str, np.ndarray]
    evaluation: dict[str, np.ndarray]
    labels: np.ndarray | None

    @classmethod
    def load(cls, samples_dir: str | Path) -> Samples:
        samples_dir = Path(samples_dir)
        spec = ModelSpec.load(samples_dir)
        labels = np.load(samples_dir / LABELS_FILE) if spec.has_labels else None
        calibration = read_rows(samples_dir / CALIBRATION_FILE, spec)
        return cls(spec, calibration, read_rows(samples_dir / EVALUATION_FILE, spec), labels)


def read_rows(path: Path, spec: ModelSpec) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise UserError(f"{path}: not found (run the model stage first)")
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in spec.input_order}


def write_rows(path: Path, rows: dict[str, np.ndarray]) -> None:
    with path.open("wb") as stream:
        np.savez(stream, **rows)


# ---------------------------------------------------------------------------------------------
# Building the spec and the samples (the model stage)
# ---------------------------------------------------------------------------------------------


def _signature(model: ModelSection):
    """The SavedModel's signature ``model.signature`` (its protobuf read, nothing run)."""
    return _meta_graph_and_signature(model)[1]


def _meta_graph_and_signature(model: ModelSection):
    """The SavedModel's MetaGraphDef and its signature ``model.signature``."""
    from ..saved_model.errors import SavedModelError
    from ..saved_model.reader import read_meta_graph, serving_signature_keys, signature_info_from_proto

    try:
        meta_graph = read_meta_graph(str(model.path))
    except SavedModelError as error:
        raise UserError(f"{model.where('path')}: {error}") from None
    if model.signature not in meta_graph.signature_def:
        keys = ", ".join(serving_signature_keys(meta_graph)) or "none"
        raise UserError(f"{model.where('signature')}: no such signature in {model.path} (has {keys})")
    try:
        return meta_graph, signature_info_from_proto(model.signature, meta_graph.signature_def[model.signature])
    except SavedModelError as error:
        raise UserError(f"{model.where('signature')}: {error}") from None


def tensor_dict(info) -> dict:
    return {"dtype": info.dtype, "shape": info.shape}


def check_rows(model: ModelSection, arrays: dict[str, np.ndarray], signature) -> None:
    """Every signature input in the samples, with its dtype and a shape that fits; one row count."""
    where = model.where("samples")
    missing = [key for key in signature.inputs if key not in arrays]
    if missing:
        raise UserError(f"{where}: no array for signature '{signature.key}' input(s) {', '.join(missing)} "
                        f"(has {', '.join(arrays) or 'none'})")
    rows = set()
    for key, info in signature.inputs.items():
        array = arrays[key]
        want = "object" if info.dtype == "string" else info.dtype
        if array.dtype.name != want and not (info.dtype == "string" and array.dtype.kind in "SU"):
            raise UserError(
                f"{where}: array '{key}' is {array.dtype.name}, signature '{signature.key}' takes {info.dtype}"
            )
        shape = info.shape
        fits = shape is None or (
            array.ndim == len(shape) and all(d is None or d == s for d, s in zip(shape, array.shape))
        )
        if not fits or array.ndim == 0:
            expected = ["?" if d is None else d for d in shape] if shape is not None else "rows first"
            raise UserError(f"{where}: array '{key}' has shape {list(array.shape)}, signature '{signature.key}' "
                            f"takes {expected}")
        rows.add(array.shape[0])
    if len(rows) != 1:
        raise UserError(f"{where}: the input arrays have different row counts {sorted(rows)}")
    if rows.pop() < 2:
        raise UserError(f"{where}: needs at least 2 rows (some to calibrate on, some to evaluate on)")


def user_samples(model: ModelSection) -> tuple[ModelSpec, dict, dict, np.ndarray | None]:
    """Spec, calibration rows, evaluation rows and labels of a user's SavedModel."""
    meta_graph, signature = _meta_graph_and_signature(model)
    with np.load(model.samples, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    labels = arrays.pop(model.labels) if model.labels is not None else None
    unused = sorted(set(arrays) - set(signature.inputs))
    if unused:
        raise UserError(f"{model.where('samples')}: array '{unused[0]}' is no input of signature "
                        f"'{signature.key}' (inputs {', '.join(signature.inputs)}; labels go in model.labels)")
    check_rows(model, arrays, signature)
    order = [name for name in arrays]
    rows = len(arrays[order[0]])
    if labels is not None and (labels.ndim == 0 or labels.shape[0] != rows or labels.dtype.kind not in "iub"):
        raise UserError(f"{model.where('labels')}: must be integer class ids, one per row ({rows}), "
                        f"got {labels.dtype.name} {list(labels.shape)}")
    if model.class_output is not None and model.class_output not in signature.outputs:
        raise UserError(f"{model.where('class_output')}: no such output of signature '{signature.key}' "
                        f"(has {', '.join(signature.outputs)})")
    if labels is not None and model.class_output is None:
        raise UserError(f"{model.where('labels')}: labels need a model.class_output to score them against")
    # Seeded, row order kept within each part: the first part evaluates, the rest calibrates.
    order_rows = np.random.default_rng(model.seed).permutation(rows)
    count = min(rows - 1, max(1, round(rows * model.eval_fraction)))
    evaluation_rows, calibration_rows = np.sort(order_rows[:count]), np.sort(order_rows[count:])
    for name in model.outputs:
        if name not in signature.outputs:
            raise UserError(f"{model.params_file}: 'model.outputs.{name}': no such output of signature "
                            f"'{signature.key}' (has {', '.join(signature.outputs)})")
    class_output = model.class_output
    diff_output = None
    if class_output is not None and signature.outputs[class_output].dtype.startswith(("float", "bfloat")):
        diff_output = class_output
    # Every numeric output is judged by its kind (a peer returns no strings); the class output too.
    compared = [k for k, v in signature.outputs.items() if v.dtype != "string" or k == class_output]
    if not compared:
        raise UserError(f"{model.where('signature')}: signature '{signature.key}' has no numeric output to compare")
    from ..saved_model.compare import signature_output_kinds

    kinds = signature_output_kinds(meta_graph, signature, model.output_kinds())
    spec = ModelSpec(
        source=model.source, signature=signature.key, input_order=order,
        inputs={k: tensor_dict(v) for k, v in signature.inputs.items()},
        outputs={k: tensor_dict(v) for k, v in signature.outputs.items()},
        class_output=class_output, diff_output=diff_output, compared=compared, label_vocabulary=None,
        has_labels=labels is not None, output_kinds={key: kinds[key][0] for key in compared},
    )
    calibration = {key: arrays[key][calibration_rows] for key in order}
    evaluation = {key: arrays[key][evaluation_rows] for key in order}
    return spec, calibration, evaluation, None if labels is None else labels[evaluation_rows].astype(np.int64)


def iris_samples(model: ModelSection, vocabulary: list[str]) -> tuple[ModelSpec, dict, dict, np.ndarray]:
    """The Iris export's spec and the prepare stage's split (train rows calibrate, eval rows evaluate)."""
    from .data import FEATURE_NAMES, features_and_labels, read_iris_csv

    signature = _signature(model)
    calibration, _ = features_and_labels(read_iris_csv(model.samples / "train.csv", vocabulary), vocabulary)
    evaluation, labels = features_and_labels(read_iris_csv(model.samples / "eval.csv", vocabulary), vocabulary)
    spec = ModelSpec(
        source=model.source, signature=signature.key, input_order=list(FEATURE_NAMES),
        inputs={k: tensor_dict(v) for k, v in signature.inputs.items()},
        outputs={k: tensor_dict(v) for k, v in signature.outputs.items()},
        class_output=IRIS_CLASS_OUTPUT, diff_output=IRIS_DIFF_OUTPUT, compared=[IRIS_CLASS_OUTPUT, IRIS_DIFF_OUTPUT],
        label_vocabulary=list(vocabulary), has_labels=True,
    )
    return spec, calibration, evaluation, labels


def write_samples(model: ModelSection, vocabulary: list[str], out_dir: str | Path) -> ModelSpec:
    """Check the model section against the SavedModel and write ``out_dir`` atomically."""
    from ..atomic import atomic_directory

    if model.source == "iris":
        spec, calibration, evaluation, labels = iris_samples(model, vocabulary)
    else:
        spec, calibration, evaluation, labels = user_samples(model)
    with atomic_directory(out_dir) as temporary:
        spec.save(temporary / SPEC_FILE)
        write_rows(temporary / CALIBRATION_FILE, calibration)
        write_rows(temporary / EVALUATION_FILE, evaluation)
        if labels is not None:
            np.save(temporary / LABELS_FILE, labels)
    return spec


def rows_around(rows: dict[str, np.ndarray], count: int, seed: int) -> dict[str, np.ndarray]:
    """``count`` rows drawn around ``rows``' distribution: pick a row, add Gaussian noise with a
    tenth of each float input's spread (other dtypes are copied), so the batch covers the classes
    and their borders. For the Iris features this is what the pipeline has always drawn."""
    rng = np.random.default_rng(seed)
    total = len(next(iter(rows.values())))
    picks = rng.integers(0, total, size=count)
    result = {}
    for key, values in rows.items():
        picked = values[picks]
        if values.dtype.kind == "f":
            noise = rng.normal(0.0, 0.1 * float(values.std()), size=picked.shape)
            picked = (picked + noise).astype(values.dtype)
        result[key] = picked
    return result
