"""Comparing two SavedModels on the same inputs: each signature of the converted model is called
next to the original's (``loaded.signatures[key](**inputs)``), and every output gets its kind,
the kind's metric and verdict (:mod:`.output_kinds`), its max |difference|, exact equality, and
equality within float rounding.

Within float rounding means ``|Δ| <= 1e-5 + 1e-4·max|output|`` elementwise (non-float outputs
must be equal): the same function computed by other kernels. oneDNN's AVX-512 kernels sum in
another order than its AVX2 ones, so a frozen or losslessly optimised model can differ from its
original in the last bits on one CPU and not on another: logits up to ~11 by up to 9e-5 were seen,
the error of sums of 512 products, so it scales with the output's magnitude, not each value's.
8-bit weights move the same logits by ~1e-2, a hundred times more.

Class agreement is the kind's agreement for ``class`` and ``label`` outputs (argmax over the last
axis; equal elements) and None for the others: an argmax over regression coordinates or
multi-label probabilities means nothing. The kind comes from the original's graph (or the
caller's override). Without a kind, :func:`compare_outputs` guesses from the arrays as it always
has: argmax for float outputs with at least two columns, the whole row for integer, bool and
string outputs.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..chunks import DEFAULT_CHUNK_BYTES, call_in_chunks, check_memory, output_bytes, rows_per_call
from . import output_kinds
from .errors import SavedModelError, tensorflow_errors
from .model import SignatureInfo
from .output_kinds import DEFAULT_TOLERANCES, GROSS_TOLERANCES, Tolerances
from .reader import as_tags, read_meta_graph, select_signature_keys, signature_info_from_proto
from .safety import refuse_unsafe_ops, scan_for_unsafe_ops

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64
# A call that takes longer is a model that does not return (a loop that never ends): minutes
# beyond any signature of a model this tool can freeze, called on a few dozen rows.
DEFAULT_TIMEOUT_S = 300.0
ROUNDING_ATOL = 1e-5
ROUNDING_RTOL = 1e-4  # of the output's largest magnitude


def within_rounding(original: np.ndarray, converted: np.ndarray) -> bool:
    """Equal up to float re-association (see the module docstring); exact for other dtypes."""
    a, b = np.asarray(original), np.asarray(converted)
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        a, b = a.astype(np.float64), b.astype(np.float64)
        if not np.array_equal(np.isnan(a), np.isnan(b)):
            return False
        finite = np.isfinite(a)
        if not np.array_equal(a[~finite & ~np.isnan(a)], b[~finite & ~np.isnan(b)]):
            return False
        scale = float(np.max(np.abs(a[finite]))) if finite.any() else 0.0
        return bool(np.all(np.abs(a[finite] - b[finite]) <= ROUNDING_ATOL + ROUNDING_RTOL * scale))
    return bool(np.array_equal(a, b))


def compare_outputs(
    original: np.ndarray, converted: np.ndarray, kind: str | None = None, tolerances: Tolerances = DEFAULT_TOLERANCES
) -> dict:
    """``{"class_agreement", "max_abs_diff", "equal", "within_rounding"}`` for one output (see the
    module docstring); with a ``kind``, also its verdict under ``tolerances``
    (:meth:`.output_kinds.Judgement.to_json`: ``kind``, ``metric``, ``value``, ``tolerance``,
    ``verdict``, ``checks``)."""
    a, b = np.asarray(original), np.asarray(converted)
    if a.shape != b.shape:
        raise SavedModelError(f"shape {list(b.shape)} differs from the original's {list(a.shape)}")
    numeric = a.dtype.kind in "biufc" and b.dtype.kind in "biufc"
    if numeric:
        equal = bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc" and b.dtype.kind in "fc"))
    else:
        equal = bool(np.array_equal(a, b))
    max_abs_diff = None
    if numeric:
        if a.size == 0:
            max_abs_diff = 0.0
        else:
            # In the outputs' own float precision (float32 outputs differ by what float32 holds),
            # float64 for integer outputs.
            common = np.result_type(a.dtype, b.dtype, np.float32) if a.dtype.kind in "fc" else np.float64
            diff = np.abs(a.astype(common) - b.astype(common))
            both_nan = np.isnan(a.astype(common)) & np.isnan(b.astype(common))
            diff = np.where(both_nan, 0.0, np.nan_to_num(diff, nan=np.inf))
            max_abs_diff = float(diff.max())
    judgement = None
    agreement = None
    if kind is not None:
        judgement = output_kinds.judge(kind, a, b, tolerances)
        if kind in ("class", "label"):
            agreement = judgement.checks[0].value
    elif a.dtype.kind == "f" and a.ndim >= 2 and a.shape[-1] >= 2:
        agreement = float(np.mean(np.argmax(a, axis=-1) == np.argmax(b, axis=-1))) if a.size else 1.0
    elif a.dtype.kind in "biuOSU" and a.ndim >= 1:
        rows = a.reshape(a.shape[0], -1) == b.reshape(b.shape[0], -1)
        agreement = float(np.mean(np.all(rows, axis=1))) if a.shape[0] else 1.0
    result = {
        "class_agreement": agreement,
        "max_abs_diff": max_abs_diff,
        "equal": equal,
        "within_rounding": equal or within_rounding(a, b),
    }
    if judgement is not None:
        result.update(judgement.to_json())
    return result


def generate_inputs(signature: SignatureInfo, batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0) -> dict:
    """Seeded inputs from the signature's dtypes and shapes (unknown dims: ``batch_size`` first,
    then 1): floats ~ N(0, 1), integers in [0, 10), bools, strings ``b"0"``..``b"9"``."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, info in sorted(signature.inputs.items()):
        if info.shape is None:
            shape = [batch_size]
        else:
            shape = [(batch_size if i == 0 else 1) if d is None else d for i, d in enumerate(info.shape)]
        dtype = info.dtype
        if dtype in ("float16", "bfloat16", "float32", "float64"):
            value = rng.standard_normal(shape).astype(np.float32 if dtype == "bfloat16" else dtype)
        elif dtype.startswith(("int", "uint")):
            value = rng.integers(0, 10, size=shape).astype(dtype)
        elif dtype == "bool":
            value = rng.integers(0, 2, size=shape).astype(bool)
        elif dtype == "string":
            value = np.array([str(v).encode() for v in rng.integers(0, 10, size=int(np.prod(shape)))], dtype=object)
            value = value.reshape(shape)
        else:
            raise SavedModelError(
                f"signature '{signature.key}' input '{name}': cannot generate {dtype} values; pass sample inputs"
            )
        inputs[name] = value
    return inputs


def load_sample_inputs(
    path: str | os.PathLike, signatures: Iterable[SignatureInfo]
) -> dict[str, dict[str, np.ndarray]]:
    """Inputs from an ``.npz``: array ``<input>`` feeds that input of every signature having it,
    ``<signature>/<input>`` one signature only."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError) as error:
        raise SavedModelError(f"{path}: cannot read sample inputs ({error})") from None
    result: dict[str, dict[str, np.ndarray]] = {}
    used = set()
    for signature in signatures:
        feeds = {}
        for name in signature.inputs:
            for array_name in (f"{signature.key}/{name}", name):
                if array_name in arrays:
                    feeds[name] = arrays[array_name]
                    used.add(array_name)
                    break
        missing = sorted(set(signature.inputs) - set(feeds))
        if missing:
            raise SavedModelError(f"{path}: no array for signature '{signature.key}' input '{missing[0]}'")
        result[signature.key] = feeds
    unused = sorted(set(arrays) - used)
    if unused:
        raise SavedModelError(f"{path}: array '{unused[0]}' matches no signature input")
    return result


def _as_tensor(signature: SignatureInfo, name: str, value):
    import tensorflow as tf

    info = signature.inputs[name]
    array = np.asarray(value)
    if info.dtype == "string":
        if array.dtype.kind == "U":
            array = np.char.encode(array, "utf-8")
        if array.dtype.kind not in "OS":
            raise SavedModelError(f"signature '{signature.key}' input '{name}': expected strings, got {array.dtype}")
    elif info.dtype == "bool" and array.dtype.kind != "b":
        raise SavedModelError(f"signature '{signature.key}' input '{name}': expected bool, got {array.dtype}")
    elif array.dtype.kind not in "biuf":
        raise SavedModelError(f"signature '{signature.key}' input '{name}': expected {info.dtype}, got {array.dtype}")
    if info.shape is not None:
        if array.ndim != len(info.shape) or any(d is not None and d != s for d, s in zip(info.shape, array.shape)):
            raise SavedModelError(
                f"signature '{signature.key}' input '{name}': shape {list(array.shape)} does not fit "
                f"{['?' if d is None else d for d in info.shape]}"
            )
    return tf.constant(array, dtype=tf.dtypes.as_dtype(info.dtype))


def _signatures(directory: str, tags: tuple[str, ...], keys, allow_ops):
    """The MetaGraphDef (scanned for unsafe ops) and the selected signatures."""
    meta_graph = read_meta_graph(directory, tags)
    refuse_unsafe_ops(scan_for_unsafe_ops(meta_graph, allow_ops), directory)
    selected = select_signature_keys(meta_graph, keys, directory)
    return meta_graph, {k: signature_info_from_proto(k, meta_graph.signature_def[k]) for k in selected}


def check_output_kinds(overrides: Mapping[str, str] | None, signatures: Iterable[SignatureInfo]) -> None:
    """Raise SavedModelError naming the first override whose kind is unknown or whose name
    (``output`` or ``signature/output``) is no output of ``signatures``."""
    signatures = list(signatures)
    names = {name for s in signatures for name in s.outputs} | {f"{s.key}/{n}" for s in signatures for n in s.outputs}
    for name, kind in sorted((overrides or {}).items()):
        if kind not in output_kinds.KINDS:
            raise SavedModelError(f"output kind '{kind}' for '{name}' is unknown (expected "
                                  f"{', '.join(output_kinds.KINDS)})")
        if name not in names:
            raise SavedModelError(f"output kind for '{name}': no compared signature has that output "
                                  f"(outputs: {', '.join(sorted(names))})")


def signature_output_kinds(
    meta_graph, signature: SignatureInfo, overrides: Mapping[str, str] | None = None
) -> dict[str, tuple[str, str]]:
    """``{output: (kind, why)}`` of one signature: the override (``signature/output`` before
    ``output``) where given, else inferred from ``meta_graph``'s graph."""
    inferred = output_kinds.infer_output_kinds(
        meta_graph.graph_def, {name: (info.name, info.dtype) for name, info in signature.outputs.items()}
    )
    overrides = overrides or {}
    for name in inferred:
        for given in (f"{signature.key}/{name}", name):
            if given in overrides:
                inferred[name] = (overrides[given], "given")
                break
    return inferred


def compare_saved_models(
    original_dir: str | os.PathLike,
    converted_dir: str | os.PathLike,
    inputs: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    signature_keys: Sequence[str] | None = None,
    tags: str | Iterable[str] = ("serve",),
    allow_ops: Iterable[str] = (),
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    output_kind_overrides: Mapping[str, str] | None = None,
    tolerances: Tolerances = DEFAULT_TOLERANCES,
    generated_tolerances: Tolerances = GROSS_TOLERANCES,
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
) -> dict[str, dict[str, dict]]:
    """Call every selected signature (default: all of the converted model's) of both models on
    the same inputs; ``{key: {output: {...}}}`` with :func:`compare_outputs`' figures and verdict,
    ``kind_from`` (what decided the kind) and ``inputs`` (``sample`` or ``generated``).

    ``inputs`` maps signature key -> input key -> array; signatures it omits get seeded inputs
    generated from their dtypes and shapes, and are judged by ``generated_tolerances`` (gross
    breakage only) instead of ``tolerances``. Each output's kind is inferred from the original's
    graph unless ``output_kind_overrides`` (``output`` or ``signature/output`` -> kind) gives it.
    Both models are scanned for unsafe ops first. A call that has not returned after
    ``timeout_s`` seconds is cancelled and reported as an error. Each model is called on at
    most ``chunk_bytes`` of input rows at a time (None: all rows in one call), outputs joined
    along the rows; inputs under the bound are one call.
    """
    import tensorflow as tf

    tags = as_tags(tags)
    original_dir, converted_dir = str(original_dir), str(converted_dir)
    _, converted = _signatures(converted_dir, tags, signature_keys, allow_ops)
    original_graph, original = _signatures(original_dir, tags, sorted(converted), allow_ops)
    check_output_kinds(output_kind_overrides, converted.values())
    for key, signature in converted.items():
        before = original[key]
        if sorted(before.inputs) != sorted(signature.inputs) or sorted(before.outputs) != sorted(signature.outputs):
            raise SavedModelError(
                f"{converted_dir}: signature '{key}' has other input or output keys than the original"
            )
    unknown = sorted(set(inputs or {}) - set(converted))
    if unknown:
        raise SavedModelError(f"sample inputs name signature '{unknown[0]}', which is not compared")
    with tensorflow_errors(original_dir, "loading"):
        loaded_original = tf.saved_model.load(original_dir, tags=list(tags))
    with tensorflow_errors(converted_dir, "loading"):
        loaded_converted = tf.saved_model.load(converted_dir, tags=list(tags))
    report: dict[str, dict[str, dict]] = {}
    for key, signature in sorted(converted.items()):
        sampled = key in (inputs or {})
        feeds = dict((inputs or {}).get(key) or generate_inputs(signature, batch_size, seed))
        kinds = signature_output_kinds(original_graph, original[key], output_kind_overrides)
        missing = sorted(set(signature.inputs) - set(feeds))
        if missing:
            raise SavedModelError(f"signature '{key}': no sample input for '{missing[0]}'")
        feeds = {name: feeds[name] for name in signature.inputs}
        rows = _rows(feeds)
        outputs = {name: (info.dtype, info.shape) for name, info in signature.outputs.items()}
        check_memory(2 * output_bytes(outputs, rows),  # both models' outputs are held to be compared
                     f"the {'sample' if sampled else 'generated'} inputs of signature '{key}' hold {rows} rows: "
                     "the outputs of both models", "use fewer rows (--sample-inputs)")
        expected = _call_in_chunks(loaded_original.signatures[key], signature, feeds, timeout_s, chunk_bytes,
                                   original_dir, key)
        actual = _call_in_chunks(loaded_converted.signatures[key], signature, feeds, timeout_s, chunk_bytes,
                                 converted_dir, key)
        report[key] = {}
        for name in sorted(signature.outputs):
            kind, why = kinds[name]
            try:
                result = compare_outputs(expected[name], actual[name], kind,
                                         tolerances if sampled else generated_tolerances)
            except SavedModelError as error:
                raise SavedModelError(f"signature '{key}' output '{name}': {error}") from None
            report[key][name] = {**result, "kind_from": why, "inputs": "sample" if sampled else "generated"}
        calls = _calls(signature, feeds, chunk_bytes)
        log.info("compared signature '%s' on %d rows in %d call%s per model", key, rows, calls,
                 "" if calls == 1 else "s")
    return report


def call_with_time_limit(function, tensors: dict, timeout_s: float, where: str, key: str) -> dict[str, np.ndarray]:
    """``function(**tensors)`` as numpy arrays, cancelled after ``timeout_s`` seconds.

    The call runs in a worker thread under a TensorFlow cancellation manager, which stops a
    running function between kernels (a While loop included) when the time is up.
    """
    from tensorflow.python.eager import cancellation

    manager = cancellation.CancellationManager()
    outcome: dict = {}

    def call() -> None:
        try:
            with cancellation.CancellationManagerContext(manager):
                outcome["result"] = {k: v.numpy() for k, v in function(**tensors).items()}
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread, re-raised there
            outcome["error"] = error

    worker = threading.Thread(target=call, name=f"call {key}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        manager.start_cancel()
        worker.join(10.0)
        raise SavedModelError(
            f"{where}: signature '{key}' did not return within {timeout_s:g} s (a loop that never ends?)"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _call_in_chunks(function, signature: SignatureInfo, feeds: dict, timeout_s: float, chunk_bytes: int | None,
                    where: str, key: str) -> dict[str, np.ndarray]:
    """``function`` on ``feeds`` in calls of at most ``chunk_bytes`` of input (:mod:`..chunks`)."""

    def call(chunk: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {name: _as_tensor(signature, name, value) for name, value in chunk.items()}
        with tensorflow_errors(where, f"calling signature '{key}'"):
            return call_with_time_limit(function, tensors, timeout_s, where, key)

    if not _rows_split(signature, feeds):
        return call(feeds)
    return call_in_chunks(call, feeds, chunk_bytes, f"{where}: signature '{key}'")


def _rows_split(signature: SignatureInfo, feeds: Mapping[str, np.ndarray]) -> bool:
    """Whether the feeds have rows to split: every input at least 1-D with the same row count,
    and no signature input with a fixed first dimension (a chunk would not fit it)."""
    counts = {int(np.shape(v)[0]) if np.ndim(v) else None for v in feeds.values()}
    fixed = any(info.shape and info.shape[0] is not None for info in signature.inputs.values())
    return len(counts) == 1 and None not in counts and not fixed


def _calls(signature: SignatureInfo, feeds: Mapping[str, np.ndarray], chunk_bytes: int | None) -> int:
    """How many calls per model :func:`_call_in_chunks` makes on ``feeds``."""
    if chunk_bytes is None or not _rows_split(signature, feeds):
        return 1
    rows = _rows(feeds)
    return max(1, -(-rows // rows_per_call(feeds, chunk_bytes)))


def _rows(feeds: Mapping[str, np.ndarray]) -> int:
    shapes = [np.shape(v) for v in feeds.values() if np.ndim(v)]
    return int(shapes[0][0]) if shapes else 1


def min_class_agreement(report: Mapping[str, Mapping[str, Mapping]]) -> float | None:
    """The lowest class agreement over every output that has one (None if none has)."""
    values = [o["class_agreement"] for s in report.values() for o in s.values() if o["class_agreement"] is not None]
    return min(values) if values else None


def failing_outputs(report: Mapping[str, Mapping[str, Mapping]]) -> list[str]:
    """One phrase per output whose verdict fails, naming it and the figures over their bounds:
    ``signature 'a' output 'p' (class): class agreement 0.9500 is under the minimum 0.9900``."""
    result = []
    for key, outputs in sorted(report.items()):
        for name, figures in sorted(outputs.items()):
            if figures.get("verdict") == "fail":
                missed = [
                    output_kinds.Check(c["metric"], c["value"], c["tolerance"], c["op"] == ">=").describe()
                    for c in figures["checks"] if not c["passed"]
                ]
                result.append(f"signature '{key}' output '{name}' ({figures['kind']}): {', '.join(missed)}")
    return result
