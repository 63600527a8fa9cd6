"""Judging each signature output by what it means: its kind (class, label, multi-label or
regression) inferred from the op that produces it, the metric that kind is used by, and one set of
default tolerances that gives each output a pass or fail verdict.

Kinds, from the output's dtype first, then from its producer found through shape-only ops
(:data:`SHAPE_ONLY_OPS`, float-to-float Cast, function calls and their arguments):

* ``label``: integer, bool or string outputs (class ids, class names). Metric: the share of
  elements equal (``label_agreement``).
* ``class``: Softmax (or LogSoftmax, the same classes), or a float output that an ArgMax of the
  same signature reads (logits beside their class ids). Metric: the share of positions whose argmax
  over the last axis is the same (``class_agreement``).
* ``multi_label``: Sigmoid. Metric: each element is a label at 0.5 (``> 0.5`` is positive, as
  Keras' binary accuracy has it); the flips as a share of the original's positive elements
  (``flips_of_positives``, the figure that fails a model whose rare positives move) and as a share
  of all elements (``flips_of_all``, which binds where positives are common). With no positive in
  the original's batch, the first is None and the second alone judges.
* ``regression``: anything else. Metric: the RMS and the max of |Δ| over the output's range, the
  original's max - min on the batch (``rms_diff_of_range``, ``max_diff_of_range``). A constant
  output has no range: its largest magnitude is the scale, or 1 when it is all zeros.

Tolerances (:data:`DEFAULT_TOLERANCES`, the only place they are set) apply to inputs that stand
for real traffic (``--sample-inputs``). Measured on the tests' models (an Intel Xeon with
AVX-512 VNNI and AMX, TensorFlow 2.21): calibrated int8 of the mixed-scale wide & deep, whose
per-layer guard keeps the layer that mixes scales float, moves its scores by RMS 0.13 % and max
0.61 % of their range (class agreement 99.9 %); without the guard, by RMS 2.1 % and max 9.4 %
(93.9 %): the bounds of 1 % and 5 % fail what breaks the classes and pass what does not. On a
published face network (mtcnn's ONet, docs/saved_model.md) 8-bit weights keep every face class
but move the box by RMS 7.9 % and max 26 % of its range: the figure the old class agreement hid.

Generated inputs (N(0, 1) floats, small integers) are off the model's data: far outside the ranges
the weights were fitted on, or all on one side of the classes' borders, so their figures say little
either way. Two weight levels per tensor keep 92 % of the Iris model's classes on generated rows
(all far from every flower, nearly all one class in both models) and 38 % on Iris-like rows; on
the tf.Module test model, 37.5 % on generated rows. 8-bit weights keep 100 % of both models'
classes there, and the tf.Module's regression outputs within RMS 1.3 % and max 3.2 % of their
range. So on generated inputs only :data:`GROSS_TOLERANCES` applies, for a model that is broken
whatever the data: agreement at least 0.5 (two models that disagree on most answers do not compute
the same function), flips at most half the positives (and an eighth of all elements, the default's
ratio), RMS of |Δ| at most 0.1 and max at most 0.5 of the range (two levels per weight moved the
tf.Module's embedding by RMS 0.20 and max 1.18 of its range; 8-bit weights by 0.002 and 0.012).

This module imports no TensorFlow: the inference reads GraphDef and FunctionDef protos as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

KINDS = ("class", "label", "multi_label", "regression")

# Ops whose output holds the same values as their first input, only laid out or selected
# differently: the kind is the kind of what they read.
SHAPE_ONLY_OPS = frozenset({
    "Identity", "IdentityN", "Snapshot", "StopGradient", "PreventGradient", "EnsureShape", "CheckNumerics",
    "Reshape", "Squeeze", "ExpandDims", "StridedSlice", "Slice", "Transpose", "Cast",
})
CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})
CLASS_OPS = frozenset({"Softmax", "LogSoftmax"})
MULTI_LABEL_OPS = frozenset({"Sigmoid"})
# DataType enum values of half, float, double and bfloat16 (types.proto), so a Cast between two of
# them is seen as shape-only without importing TensorFlow.
FLOAT_TYPES = frozenset({1, 2, 14, 19})
MULTI_LABEL_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """The bounds of a verdict, all fractions: agreements at least, flips and errors at most."""

    agreement: float  # class and label: share of predictions the same
    flips_of_positives: float  # multi_label: flipped elements over the original's positive ones
    flips_of_all: float  # multi_label: flipped elements over all elements
    rms_diff_of_range: float  # regression: RMS of |Δ| over the original's range on the batch
    max_diff_of_range: float  # regression: max of |Δ| over that range


DEFAULT_TOLERANCES = Tolerances(
    agreement=0.99, flips_of_positives=0.02, flips_of_all=0.005, rms_diff_of_range=0.01, max_diff_of_range=0.05
)
# Generated inputs: only gross breakage (see the module docstring for why these figures).
GROSS_TOLERANCES = Tolerances(
    agreement=0.5, flips_of_positives=0.5, flips_of_all=0.125, rms_diff_of_range=0.1, max_diff_of_range=0.5
)


@dataclasses.dataclass(frozen=True)
class Check:
    """One figure against its bound: ``value >= tolerance`` when ``at_least``, else ``<=``."""

    metric: str
    value: float | None
    tolerance: float
    at_least: bool

    @property
    def passed(self) -> bool:
        if self.value is None:  # not measurable on this batch (no positives): another check judges
            return True
        return self.value >= self.tolerance if self.at_least else self.value <= self.tolerance

    def describe(self) -> str:
        """``class agreement 0.9844 is under the minimum 0.9900``: how a failure is named."""
        where = "under the minimum" if self.at_least else "over the maximum"
        return f"{self.metric.replace('_', ' ')} {_figure(self.value)} is {where} {self.tolerance:.4f}"


@dataclasses.dataclass(frozen=True)
class Judgement:
    """An output's kind, its checks (the first is the headline figure) and the verdict."""

    kind: str
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail"

    def failures(self) -> list[str]:
        return [check.describe() for check in self.checks if not check.passed]

    def to_json(self) -> dict:
        """``kind``, the headline ``metric``, ``value`` and ``tolerance``, ``verdict``, and every
        check as ``{metric, value, op, tolerance, passed}``."""
        head = self.checks[0]
        return {
            "kind": self.kind,
            "metric": head.metric,
            "value": head.value,
            "tolerance": head.tolerance,
            "verdict": self.verdict,
            "checks": [
                {"metric": c.metric, "value": c.value, "op": ">=" if c.at_least else "<=", "tolerance": c.tolerance,
                 "passed": c.passed}
                for c in self.checks
            ],
        }


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def class_agreement(original: np.ndarray, converted: np.ndarray) -> float:
    """The share of positions whose argmax over the last axis is the same (1.0 when empty)."""
    a, b = np.asarray(original), np.asarray(converted)
    if a.size == 0:
        return 1.0
    if a.ndim == 0:
        return float(a == b)
    return float(np.mean(np.argmax(a, axis=-1) == np.argmax(b, axis=-1)))


def label_agreement(original: np.ndarray, converted: np.ndarray) -> float:
    """The share of elements equal (1.0 when empty)."""
    a, b = np.asarray(original), np.asarray(converted)
    return float(np.mean(a == b)) if a.size else 1.0


def multi_label_flips(original: np.ndarray, converted: np.ndarray) -> tuple[float | None, float]:
    """``(flips over the original's positives or None without positives, flips over all)``, each
    element a label at :data:`MULTI_LABEL_THRESHOLD`."""
    a = np.asarray(original, np.float64) > MULTI_LABEL_THRESHOLD
    b = np.asarray(converted, np.float64) > MULTI_LABEL_THRESHOLD
    if a.size == 0:
        return None, 0.0
    flips, positives = int(np.count_nonzero(a != b)), int(np.count_nonzero(a))
    return (flips / positives if positives else None), flips / a.size


def regression_errors(original: np.ndarray, converted: np.ndarray) -> tuple[float, float]:
    """``(RMS of |Δ|, max of |Δ|)`` over the original's range on the batch (see the module
    docstring for constant outputs). A NaN in one output only is an infinite error."""
    a, b = np.asarray(original, np.float64), np.asarray(converted, np.float64)
    if a.size == 0:
        return 0.0, 0.0
    finite = a[np.isfinite(a)]
    scale = float(finite.max() - finite.min()) if finite.size else 0.0
    if scale == 0.0:
        scale = float(np.abs(finite).max()) if finite.size else 0.0
        scale = scale or 1.0
    both_nan = np.isnan(a) & np.isnan(b)
    with np.errstate(invalid="ignore"):
        diff = np.where(both_nan | (a == b), 0.0, np.abs(a - b))  # equal infinities differ by nothing
    diff = np.nan_to_num(diff, nan=np.inf)
    return float(np.sqrt(np.mean(diff**2))) / scale, float(diff.max()) / scale


def judge(kind: str, original: np.ndarray, converted: np.ndarray,
          tolerances: Tolerances = DEFAULT_TOLERANCES) -> Judgement:
    """The kind's metric on the two outputs, checked against ``tolerances``."""
    t = tolerances
    if kind == "class":
        checks = (Check("class_agreement", class_agreement(original, converted), t.agreement, True),)
    elif kind == "label":
        checks = (Check("label_agreement", label_agreement(original, converted), t.agreement, True),)
    elif kind == "multi_label":
        of_positives, of_all = multi_label_flips(original, converted)
        checks = (Check("flips_of_positives", of_positives, t.flips_of_positives, False),
                  Check("flips_of_all", of_all, t.flips_of_all, False))
    elif kind == "regression":
        rms, largest = regression_errors(original, converted)
        checks = (Check("rms_diff_of_range", rms, t.rms_diff_of_range, False),
                  Check("max_diff_of_range", largest, t.max_diff_of_range, False))
    else:
        raise ValueError(f"unknown output kind '{kind}': expected one of {', '.join(KINDS)}")
    return Judgement(kind, checks)


# --------------------------------------------------------------------------------------------
# Inference from the graph
# --------------------------------------------------------------------------------------------


def kind_of_dtype(dtype: str) -> str | None:
    """``label`` for integer, bool and string dtype names, None for the others."""
    return "label" if dtype.startswith(("int", "uint")) or dtype in ("bool", "string") else None


class _Scope:
    """The top-level graph, or one call of a library function (so an argument leads back to the
    caller's input, and two calls of one function are two places)."""

    def __init__(self, nodes, library: Mapping, parent: _Scope | None = None, call=None, function=None) -> None:
        self.nodes = {node.name: node for node in nodes}
        self.library, self.parent, self.call, self.function = library, parent, call, function
        self.path: tuple = (parent.path if parent else ()) + ((call.name,) if call is not None else ())
        self._children: dict[str, _Scope] = {}

    def enter(self, call) -> _Scope | None:
        """The scope of the function ``call`` calls (None when it calls none in the library)."""
        name = call.attr["f"].func.name if call.op in CALL_OPS else call.op
        function = self.library.get(name)
        if function is None:
            return None
        if call.name not in self._children:
            self._children[call.name] = _Scope(function.node_def, self.library, self, call, function)
        return self._children[call.name]

    def split(self, reference: str) -> tuple[str, int | None, str | None]:
        """``(node, output index, output arg name)`` of an input string; ``(arg, None, None)`` for a
        function's own argument. Graph inputs are ``node:i``; function inputs ``node:arg:i``."""
        parts = reference.split(":")
        if len(parts) == 1:
            return (parts[0], None, None) if self.function is not None else (parts[0], 0, None)
        if len(parts) == 2:
            return parts[0], int(parts[1]), None
        return parts[0], int(parts[2]), parts[1]


def _data_inputs(node) -> list[str]:
    return [name for name in node.input if not name.startswith("^")]


def _output_position(scope: _Scope, node, index: int, arg: str | None) -> int:
    """The flat output index of ``node:arg:index`` (a function node names its output arg)."""
    if arg is None or node.op in CALL_OPS or node.op == "IdentityN":
        return index
    function = scope.library.get(node.op)
    if function is not None:
        names = [a.name for a in function.signature.output_arg]
        if arg in names:
            return names.index(arg) + index
    return index


def _source(scope: _Scope, reference: str, depth: int = 0):
    """``(scope, node)`` producing ``reference``, through shape-only ops, calls and arguments."""
    for _ in range(10_000):  # a bound, not a loop: GraphDefs are acyclic apart from frames
        name, index, arg = scope.split(reference)
        if index is None:  # a function argument: the caller's matching input
            position = [a.name for a in scope.function.signature.input_arg].index(name)
            reference, scope = _data_inputs(scope.call)[position], scope.parent
            continue
        node = scope.nodes.get(name)
        if node is None:
            return scope, None
        position = _output_position(scope, node, index, arg)
        if node.op in SHAPE_ONLY_OPS and _data_inputs(node):
            if node.op == "Cast" and not {node.attr["SrcT"].type, node.attr["DstT"].type} <= FLOAT_TYPES:
                return scope, node
            inputs = _data_inputs(node)
            reference = inputs[position] if node.op == "IdentityN" and position < len(inputs) else inputs[0]
            continue
        callee = scope.enter(node)
        if callee is not None:
            output = callee.function.signature.output_arg[position].name
            reference, scope = callee.function.ret[output], callee
            continue
        return scope, node
    return scope, None


def _argmax_sources(graph_def, tensors: Iterable[str], scope: _Scope) -> set[tuple]:
    """Where each ArgMax upstream of ``tensors`` reads from, as ``(scope path, node name)``."""
    found, seen = set(), set()
    stack = [(scope, reference) for reference in tensors]
    while stack:
        current, reference = stack.pop()
        name, index, _ = current.split(reference)
        if index is None:
            position = [a.name for a in current.function.signature.input_arg].index(name)
            stack.append((current.parent, _data_inputs(current.call)[position]))
            continue
        key = (current.path, name)
        node = current.nodes.get(name)
        if key in seen or node is None:
            continue
        seen.add(key)
        if node.op == "ArgMax":
            where, source = _source(current, _data_inputs(node)[0])
            if source is not None:
                found.add((where.path, source.name))
        stack.extend((current, reference) for reference in _data_inputs(node))
        callee = current.enter(node)
        if callee is not None:
            stack.extend((callee, reference) for reference in callee.function.ret.values())
    return found


# A call whose arguments or outputs do not match its function's signature: the kind falls back to
# regression (every output has one) rather than failing the comparison.
_MALFORMED = (ValueError, IndexError, KeyError)


def infer_output_kinds(graph_def, outputs: Mapping[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """``{output: (kind, why)}`` for ``outputs`` (output key -> (tensor name, dtype name)) of one
    signature of ``graph_def``, a GraphDef proto (frozen, or a MetaGraphDef's with its function
    library). ``why`` says what decided: the dtype, the producing op, or an ArgMax reading it."""
    library = {function.signature.name: function for function in graph_def.library.function}
    top = _Scope(graph_def.node, library)
    try:
        argmax_reads = _argmax_sources(graph_def, [tensor for tensor, _ in outputs.values()], top)
    except _MALFORMED:
        argmax_reads = set()
    kinds = {}
    for key, (tensor, dtype) in sorted(outputs.items()):
        by_dtype = kind_of_dtype(dtype)
        if by_dtype is not None:
            kinds[key] = (by_dtype, f"dtype {dtype}")
            continue
        try:
            scope, node = _source(top, tensor)
        except _MALFORMED:
            scope, node = top, None
        if node is None:
            kinds[key] = ("regression", "producer not found")
        elif node.op in CLASS_OPS:
            kinds[key] = ("class", node.op)
        elif node.op in MULTI_LABEL_OPS:
            kinds[key] = ("multi_label", node.op)
        elif (scope.path, node.name) in argmax_reads:
            kinds[key] = ("class", f"{node.op} read by ArgMax")
        else:
            kinds[key] = ("regression", node.op)
    return kinds


def parse_output_kinds(items: Iterable[str]) -> dict[str, str]:
    """``NAME=KIND`` strings as ``{NAME: KIND}``; a malformed item or unknown kind is a ValueError
    naming it."""
    result = {}
    for item in items:
        name, sep, kind = item.partition("=")
        name, kind = name.strip(), kind.strip()
        if not sep or not name:
            raise ValueError(f"'{item}' is not NAME=KIND")
        if kind not in KINDS:
            raise ValueError(f"'{item}': unknown kind '{kind}' (expected {', '.join(KINDS)})")
        result[name] = kind
    return result
