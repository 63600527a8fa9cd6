"""What ``summarize_graph`` prints about a GraphDef: likely inputs and outputs, variables,
parameter counts, control edges, devices, op types and a benchmark_model command line.

The text follows the old C++ tool line by line, with a few additions for TensorFlow 2 graphs
(see ``summarize_graph`` and docs/differences/cli.md).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from tensorflow.core.framework import graph_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow.python.framework import tensor_util

from .errors import TransformError
from .graph_utils import find_invalid_inputs, node_map, node_name_from_input, sort_by_execution_order
from .op_sets import REF_VARIABLE_OPS, SUMMARIZED_VARIABLE_OPS

log = logging.getLogger(__name__)

PLACEHOLDER_OPS = ("Placeholder",)
UNLIKELY_OUTPUT_OPS = frozenset({"Const", "Assign", "NoOp", "Placeholder"})


def dtype_string(dtype: int) -> str:
    """TF's DataTypeString: ``float``, ``int32``, ``float_ref``; ``INVALID`` for 0."""
    if dtype == types_pb2.DT_INVALID:
        return "INVALID"
    try:
        return types_pb2.DataType.Name(dtype)[len("DT_"):].lower()
    except ValueError:
        return f"unknown dtype {dtype}"


def shape_string(shape: tensor_shape_pb2.TensorShapeProto) -> str:
    """PartialTensorShape's DebugString: ``[?,224,224,3]``, ``[]`` for a scalar, ``<unknown>``."""
    if shape.unknown_rank:
        return "<unknown>"
    return "[" + ",".join("?" if dim.size == -1 else str(dim.size) for dim in shape.dim) + "]"


def human_readable_num(value: int) -> str:
    """TF's HumanReadableNum: plain below 1000, else two decimals and k, M, B or T."""
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value < 1000:
        return f"{sign}{value}"
    if value >= 10**15:
        return f"{sign}{value:0.3G}"
    units = "kMBT"
    unit = 0
    while value >= 1_000_000:
        value //= 1000
        unit += 1
    return f"{sign}{value / 1000.0:.2f}{units[unit]}"


def _format_element(value) -> str:
    """One element as TF's StrCat prints it (%.6g, or %.9g / %.17g when that does not round-trip)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace").encode("unicode_escape").decode("ascii")
    if isinstance(value, (bool, np.bool_)):
        return "1" if value else "0"
    if isinstance(value, (np.floating, float)):
        if math.isnan(value):
            return "-nan" if math.copysign(1.0, float(value)) < 0 else "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if isinstance(value, np.float64):
            text = f"{float(value):.15g}"
            return text if float(text) == value else f"{float(value):.17g}"
        as_float32 = np.float32(value)
        text = f"{float(as_float32):.6g}"
        return text if np.float32(text) == as_float32 else f"{float(as_float32):.9g}"
    if isinstance(value, (np.complexfloating, complex)):
        return f"({_format_element(np.float32(value.real))},{_format_element(np.float32(value.imag))})"
    return str(int(value))


def tensor_debug_string(tensor: tensor_pb2.TensorProto, max_entries: int = 3) -> str:
    """Tensor::DebugString: ``Tensor<type: float shape: [2,3] values: [1 2 3]...>``."""
    shape = [dim.size for dim in tensor.tensor_shape.dim]
    header = f"Tensor<type: {dtype_string(tensor.dtype)} shape: [{','.join(map(str, shape))}] values: "
    try:
        flat = list(tensor_util.MakeNdarray(tensor).reshape(-1))
    except (TypeError, ValueError) as error:
        return f"{header}<cannot decode: {error}>>"
    limit = min(max_entries, len(flat))
    parts: list[str] = []
    index = 0

    # Tensor::SummarizeValue: nested brackets over all but the last dimension, stopping after
    # `limit` elements ("..." marks the cut inside a row and after the whole thing).
    def print_dim(dim: int) -> None:
        nonlocal index
        if index >= limit:
            return
        if dim == len(shape) - 1:
            for i in range(shape[dim]):
                if index >= limit:
                    if dim != 0:
                        parts.append("...")
                    return
                if i > 0:
                    parts.append(" ")
                parts.append(_format_element(flat[index]))
                index += 1
            return
        for _ in range(shape[dim]):
            opened = False
            if index < limit:
                parts.append("[")
                opened = True
            print_dim(dim + 1)
            if index < limit or opened:
                parts.append("]")

    if not shape:
        parts.append(" ".join(_format_element(v) for v in flat[:limit]))
    else:
        print_dim(0)
    if len(flat) > limit:
        parts.append("...")
    return header + "".join(parts) + ">"


def _node_info(node) -> str:
    shape = shape_string(node.attr["shape"].shape) if "shape" in node.attr else "None"
    dtype = node.attr["dtype"].type if "dtype" in node.attr else types_pb2.DT_INVALID
    return f"(name={node.name}, type={dtype_string(dtype)}({dtype}), shape={shape}) "


def _element_count(shape: tensor_shape_pb2.TensorShapeProto) -> int | None:
    if shape.unknown_rank or any(dim.size < 0 for dim in shape.dim):
        return None
    return math.prod(dim.size for dim in shape.dim)


def _identity_source(node, nodes: dict) -> str:
    """For a TF 2 Identity output, the tensor it forwards and that tensor's op."""
    data = [i for i in node.input if not i.startswith("^")]
    if not data:
        return ""
    source = nodes.get(node_name_from_input(data[0]))
    op = f" ({source.op})" if source is not None else ""
    return f", forwards={data[0]}{op}"


def _benchmark_lines(inputs: list, outputs: list, graph_path: str) -> list[str]:
    layers, types, shapes = [], [], []
    for node in inputs:
        layers.append(node.name)
        types.append(dtype_string(node.attr["dtype"].type if "dtype" in node.attr else 0))
        shape = node.attr["shape"].shape if "shape" in node.attr else None
        if shape is None or shape.unknown_rank:
            shapes.append("")
        else:
            shapes.append(",".join(str(dim.size) for dim in shape.dim))
    return [
        "To use with tensorflow/tools/benchmark:benchmark_model try these arguments:",
        "bazel run tensorflow/tools/benchmark:benchmark_model --"
        f" --graph={graph_path} --show_flops --input_layer={','.join(layers)}"
        f" --input_layer_type={','.join(types)} --input_layer_shape={':'.join(shapes)}"
        f" --output_layer={','.join(node.name for node in outputs)}",
    ]


def summarize_graph(
    graph_def: graph_pb2.GraphDef, graph_path: str = "", print_structure: bool = False
) -> str:
    """The text the old ``summarize_graph`` printed for ``graph_def``, ending in a newline.

    Lines, in order: possible inputs (Placeholders with dtype and shape); variables; possible
    outputs (nodes nothing reads, other than Const/Assign/NoOp/Placeholder); const and
    variable parameter counts with human-readable numbers, and control edges; library
    functions (if any); nodes per device; op-type counts (graph plus library function
    bodies, by count then name); a benchmark_model command line; with ``print_structure``,
    every node in execution order with its inputs (and value, for a Const).

    Additions for TF 2 graphs (the old tool predates them): resource variables
    (``VarHandleOp``) are listed and counted as variables (but left out of the benchmark
    line, which cannot feed a resource); variable parameters are counted from the ``shape``
    attr (the old tool looked for a ``value`` attr variables never have, so it printed 0); an
    ``Identity`` output also shows the tensor it forwards (``forwards=dense/Softmax:0
    (Softmax)``), since TF 2 functions name every output ``Identity_<k>``; the library's
    functions are listed; each device count gets its own line (the old tool ran them together).

    Raises TransformError if an input names a node that does not exist (the old tool printed
    the first part of the summary, then those inputs, then failed).
    """
    nodes = node_map(graph_def)
    placeholders = [node for node in graph_def.node if node.op in PLACEHOLDER_OPS]
    variables = [node for node in graph_def.node if node.op in SUMMARIZED_VARIABLE_OPS]
    lines: list[str] = []

    if placeholders:
        lines.append(f"Found {len(placeholders)} possible inputs: " + "".join(map(_node_info, placeholders)))
    else:
        lines.append("No inputs spotted.")
    if variables:
        lines.append(f"Found {len(variables)} variables: " + "".join(map(_node_info, variables)))
    else:
        lines.append("No variables spotted.")

    consumed = {node_name_from_input(i) for node in graph_def.node for i in node.input}
    outputs = [
        node for node in graph_def.node if node.name not in consumed and node.op not in UNLIKELY_OUTPUT_OPS
    ]
    if outputs:
        described = []
        for node in outputs:
            extra = _identity_source(node, nodes) if node.op == "Identity" else ""
            described.append(f"(name={node.name}, op={node.op}{extra}) ")
        lines.append(f"Found {len(outputs)} possible outputs: " + "".join(described))
    else:
        lines.append("No outputs spotted.")

    const_count = variable_count = control_edges = 0
    devices: dict[str, int] = {}
    for node in graph_def.node:
        control_edges += sum(1 for i in node.input if i.startswith("^"))
        if node.device:
            devices[node.device] = devices.get(node.device, 0) + 1
        if node.op == "Const":
            if "value" in node.attr and node.attr["value"].HasField("tensor"):
                count = _element_count(node.attr["value"].tensor.tensor_shape)
                const_count += count or 0
            else:
                log.warning("Decoding Tensor failed for node %s", node.name)
        elif node.op in SUMMARIZED_VARIABLE_OPS:
            count = _element_count(node.attr["shape"].shape) if "shape" in node.attr else None
            if count is None:
                log.warning("Variable %s has no fully defined shape; not counted", node.name)
            variable_count += count or 0
    lines.append(
        f"Found {const_count} ({human_readable_num(const_count)}) const parameters, {variable_count} "
        f"({human_readable_num(variable_count)}) variable parameters, and {control_edges} control_edges"
    )
    functions = [function.signature.name for function in graph_def.library.function]
    if functions:
        lines.append(f"Found {len(functions)} functions in the library: {', '.join(functions)}")
    for device in sorted(devices):
        lines.append(f"{devices[device]} nodes assigned to device '{device}'")

    invalid = find_invalid_inputs(graph_def)
    if invalid:
        details = "; ".join(f"input {input_string} for node {node}" for node, input_string in invalid[:5])
        more = f" (and {len(invalid) - 5} more)" if len(invalid) > 5 else ""
        raise TransformError(f"invalid graph: inputs refer to nonexistent nodes: {details}{more}")

    op_counts: dict[str, int] = {}
    for node in graph_def.node:
        op_counts[node.op] = op_counts.get(node.op, 0) + 1
    for function in graph_def.library.function:
        for node in function.node_def:
            op_counts[node.op] = op_counts.get(node.op, 0) + 1
    ordered = sorted(op_counts.items(), key=lambda item: (-item[1], item[0]))
    lines.append("Op types used: " + ", ".join(f"{count} {op}" for op, count in ordered))

    benchmark_inputs = placeholders + [node for node in variables if node.op in REF_VARIABLE_OPS]
    lines.extend(_benchmark_lines(benchmark_inputs, outputs, graph_path))

    if print_structure:
        for node in sort_by_execution_order(graph_def).node:
            line = f"{node.name} ({node.op}): [{', '.join(node.input)}]"
            if node.op == "Const":
                if "value" in node.attr and node.attr["value"].HasField("tensor"):
                    line += f", value={tensor_debug_string(node.attr['value'].tensor)}"
                else:
                    log.warning("Decoding Tensor failed for node %s", node.name)
            lines.append(line)
    return "\n".join(lines) + "\n"
