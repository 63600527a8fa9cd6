"""freeze_requantization_ranges: the RequantizationRange ops quantize_nodes leaves are replaced by
Consts holding the ranges logged for them (by a graph run after insert_logging).
"""

from __future__ import annotations

import re

import numpy as np
from tensorflow.core.framework import graph_pb2

from ..context import TransformContext
from ..errors import TransformError
from ..graph_utils import new_graph_like, rename_node_inputs
from ..registry import register
from ._const_builders import float_scalar

_PRINT_SUFFIX = "__print__"
_REQUANT_PREFIX = "__requant_min_max:"
# What strtof accepts as a whole field (Python's float() also takes "1_0", which it must not).
_FLOAT_TEXT = re.compile(
    r"\s*[+-]?(\d+\.?\d*(e[+-]?\d+)?|\.\d+(e[+-]?\d+)?|inf(inity)?|nan)\s*", re.IGNORECASE
)


def parse_min_max_log(text: str) -> list[tuple[str, float, float]]:
    """(node name, min, max) records from ``insert_logging`` output; other lines are skipped.

    A record line holds ``...;<name>__print__;__requant_min_max:[<min>][<max>]...``: the last
    ``;``-field starting with the prefix must split on ``[`` into exactly the prefix and two
    ``<number>]<rest>`` parts, and the field before it must end in ``__print__``.
    """
    records = []
    for line in text.split("\n"):
        if f"{_PRINT_SUFFIX};{_REQUANT_PREFIX}" not in line:
            continue
        fields = line.split(";")
        found = [i for i in range(1, len(fields)) if fields[i].startswith(_REQUANT_PREFIX)]
        if not found:
            continue
        index = found[-1]
        parts = fields[index].split("[")
        if len(parts) != 3 or parts[0] != _REQUANT_PREFIX:
            continue
        numbers = [part.split("]") for part in parts[1:]]
        if any(len(pieces) != 2 or not _FLOAT_TEXT.fullmatch(pieces[0]) for pieces in numbers):
            continue
        name_field = fields[index - 1]
        if not name_field.endswith(_PRINT_SUFFIX):
            continue
        low, high = (float(np.float32(float(pieces[0]))) for pieces in numbers)
        records.append((name_field[: -len(_PRINT_SUFFIX)], low, high))
    return records


def _percentile_range(mins: list[float], maxes: list[float], min_percentile: float, max_percentile: float):
    """mins[round(n * min%/100)] and maxes[round(n * (1 - max%/100))], in float32 like upstream."""
    count, hundred = np.float32(len(mins)), np.float32(100.0)
    min_index = np.float32(count * np.float32(np.float32(min_percentile) / hundred))
    max_index = np.float32(count * np.float32(np.float32(1.0) - np.float32(max_percentile) / hundred))
    # Clamped at both ends (upstream clamped the min index only below, the max only above).
    low = int(np.clip(np.sign(min_index) * np.floor(abs(min_index) + 0.5), 0, len(mins) - 1))
    high = int(np.clip(np.sign(max_index) * np.floor(abs(max_index) + 0.5), 0, len(maxes) - 1))
    return sorted(mins)[low], sorted(maxes)[high]


@register(
    "freeze_requantization_ranges",
    params={"min_max_log_file": "(required)", "min_percentile": "5", "max_percentile": "5"},
)
def freeze_requantization_ranges(
    graph_def: graph_pb2.GraphDef, context: TransformContext
) -> graph_pb2.GraphDef:
    """Replace RequantizationRange ops by Consts holding the ranges logged for them.

    Matches: ``RequantizationRange`` nodes named in the log (a graph run after
    ``insert_logging(op=RequantizationRange, show_name=true, message="__requant_min_max:")``).
    Produces: float scalar Consts ``<name>/frozen_min`` and ``<name>/frozen_max``; readers of
    ``<name>:0`` / ``<name>:1`` read them instead. Per node, with n records, the min is the
    sorted mins' element round(n * min_percentile / 100) and the max the sorted maxes'
    element round(n * (1 - max_percentile / 100)), both clamped to the list.
    Params: ``min_max_log_file`` (required), ``min_percentile`` (5), ``max_percentile`` (5).
    Errors: no file name, an unreadable file, a log without records, a logged name missing
    from the graph, a logged node that is not a RequantizationRange.
    Differs from the C++ tool: indexes are clamped at both ends (an out-of-range percentile
    read past the list upstream); a control input ``^<name>`` moves to ``^<name>/frozen_min``
    instead of dangling.
    """
    log_file = context.get_string("min_max_log_file", "")
    if not log_file:
        raise TransformError("freeze_requantization_ranges: you must pass a file name to min_max_log_file")
    min_percentile = context.get_float("min_percentile", 5.0)
    max_percentile = context.get_float("max_percentile", 5.0)
    try:
        with open(log_file, encoding="utf-8", errors="replace") as handle:
            records = parse_min_max_log(handle.read())
    except OSError as error:
        raise TransformError(f"freeze_requantization_ranges: cannot read min_max_log_file '{log_file}': "
                             f"{error.strerror}") from None
    if not records:
        raise TransformError(
            f"freeze_requantization_ranges: no min/max range logs were found in '{log_file}'"
        )
    by_node: dict[str, tuple[list[float], list[float]]] = {}
    for name, low, high in records:
        mins, maxes = by_node.setdefault(name, ([], []))
        mins.append(low)
        maxes.append(high)
    present = {node.name: node for node in graph_def.node}
    missing = sorted(name for name in by_node if name not in present)
    if missing:
        raise TransformError(
            f"freeze_requantization_ranges: nodes in the log are not in the graph: {', '.join(missing)}"
        )
    nodes, renames = [], {}
    for node in graph_def.node:
        if node.name not in by_node:
            nodes.append(node)
            continue
        if node.op != "RequantizationRange":
            raise TransformError(
                f"freeze_requantization_ranges: node '{node.name}' is a {node.op}, "
                "expected a RequantizationRange"
            )
        low, high = _percentile_range(*by_node[node.name], min_percentile, max_percentile)
        nodes += [float_scalar(f"{node.name}/frozen_min", low),
                  float_scalar(f"{node.name}/frozen_max", high)]
        renames[f"{node.name}:0"] = f"{node.name}/frozen_min:0"
        renames[f"{node.name}:1"] = f"{node.name}/frozen_max:0"
        renames[f"^{node.name}"] = f"^{node.name}/frozen_min"
    return rename_node_inputs(new_graph_like(graph_def, nodes), renames)
