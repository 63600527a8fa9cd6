"""Which fused quantized kernels this TensorFlow wheel runs, and with which post-op lists
(``fused_ops``): each candidate is built as a one-node graph, run, and compared with float.

Run with oneDNN on (TF_ENABLE_ONEDNN_OPTS=1, the default on x86); set ONEDNN_MAX_CPU_ISA=AVX2
before it starts to see the AVX2 kernels. Prints one line per candidate: ok with the largest
error against float relative to the output's range, or the kernel's error message.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf
from tensorflow.core.framework import types_pb2

from serving_optimiser.graph_transforms.graph_utils import make_node
from serving_optimiser.graph_transforms.transforms.weights import content_const

F, QI8, QU8 = types_pb2.DT_FLOAT, types_pb2.DT_QINT8, types_pb2.DT_QUINT8
ALPHA = 0.25


def _gelu_tanh(y: np.ndarray) -> np.ndarray:
    return 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))


ACTIVATIONS = {
    "Relu": lambda y: np.maximum(y, 0),
    "Relu6": lambda y: np.clip(y, 0, 6),
    "LeakyRelu": lambda y: np.where(y > 0, y, ALPHA * y),
    "Elu": lambda y: np.where(y > 0, y, np.expm1(y)),
    "Sigmoid": lambda y: 1 / (1 + np.exp(-y)),
    "Tanh": np.tanh,
    "GeluApproximate": _gelu_tanh,
    "GeluExact": lambda y: 0.5 * y * (1 + np.vectorize(__import__("math").erf)(y / np.sqrt(2))),
    "_FusedSwish": lambda y: y / (1 + np.exp(-y)),
    "_FusedHardSwish": lambda y: y * np.clip(y + 3, 0, 6) / 6,
    "Swish": lambda y: y / (1 + np.exp(-y)),
    "Add": None,
    "Sum": None,
}


def _run(nodes: list, fetch: str) -> np.ndarray:
    graph_def = tf.compat.v1.GraphDef()
    graph_def.node.extend(nodes)
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        return session.run(fetch)


def _float_out(out_type: int, name: str, top: float, low: float = 0.0) -> list:
    """Nodes turning the op's output into floats: none for float, a Dequantize for 8-bit codes."""
    if out_type == F:
        return []
    return [make_node("Dequantize", "dq", [f"{name}:0", f"{name}:1", f"{name}:2"],
                      {"T": out_type, "mode": "SCALED" if out_type == QI8 else "MIN_FIRST"})]


def probe_matmul(fused_ops: list[str], out_type: int, rng: np.random.Generator) -> str:
    x = rng.uniform(0, 2, (64, 64)).astype(np.float32)
    w = rng.normal(0, 0.2, (64, 48)).astype(np.float32)
    b = rng.normal(0, 0.5, 48).astype(np.float32)
    addend = rng.normal(0, 1, (64, 48)).astype(np.float32)
    y = x.astype(np.float64) @ w + b
    act = [op for op in fused_ops if op in ACTIVATIONS and op not in ("Add",)]
    if "Add" in fused_ops:
        y = y + addend
    if act:
        y = ACTIVATIONS[act[0]](y)
    if out_type == QU8:
        y = np.maximum(y, 0.0)  # quint8 codes hold no negatives: the reference clips too
    bound = float(np.abs(w).max())
    codes = np.clip(np.rint(w / bound * 127), -127, 127).astype(np.int8)
    xq = np.clip(np.rint(x / 2.0 * 255), 0, 255).astype(np.uint8)
    out_max = float(np.abs(y).max())
    nodes = [content_const("x", xq, QU8), content_const("w", codes, QI8), content_const("b", b, F),
             content_const("a", addend, F)]
    for n, v in (("xmin", 0.0), ("xmax", 2.0), ("wmin", -bound), ("wmax", bound),
                 ("omin", -out_max if out_type == QI8 else 0.0), ("omax", out_max)):
        nodes.append(content_const(n, np.float32(v), F))
    device = ["x", "w", "b"] + (["a"] if "Add" in fused_ops else [])
    host = ["xmin", "xmax", "wmin", "wmax"] + (["omin", "omax"] if "Requantize" in fused_ops else [])
    op = make_node("_QuantizedMatMul", "mm", device + host, {"T1": QU8, "T2": QI8})
    op.attr["Tdevice_inputs"].list.type.extend([QU8, QI8, F] + ([F] if "Add" in fused_ops else []))
    op.attr["Thost_inputs"].list.type.extend([F] * len(host))
    op.attr["Tdevice_outputs"].list.type.extend([out_type])
    op.attr["Thost_outputs"].list.type.extend([] if out_type == F else [F, F])
    op.attr["Tbias"].type = F
    op.attr["Tout"].type = out_type
    op.attr["U"].type = F
    op.attr["fused_ops"].list.s.extend(s.encode() for s in fused_ops)
    op.attr["input_quant_mode"].s = b"SCALED"
    op.attr["output_quant_mode"].s = b"SCALED"
    op.attr["leakyrelu_alpha"].f = ALPHA
    nodes.append(op)
    if out_type == F:
        fetch = "mm:0"
    else:
        nodes += [make_node("Dequantize", "dq", ["mm:0", "mm:1", "mm:2"],
                            {"T": out_type, "mode": "SCALED"})]
        fetch = "dq:0"
    got = _run(nodes, fetch)
    return f"ok, max |error| / max |y| = {np.abs(got - y).max() / max(out_max, 1e-9):.4f}"


def probe_conv(op_name: str, fused_ops: list[str], out_type: int, rng: np.random.Generator) -> str:
    depthwise = "Depthwise" in op_name
    x = rng.uniform(0, 2, (2, 8, 8, 16)).astype(np.float32)
    w = rng.normal(0, 0.2, (3, 3, 16, 1 if depthwise else 24)).astype(np.float32)
    channels = 16 if depthwise else 24
    b = rng.normal(0, 0.5, channels).astype(np.float32)
    if depthwise:
        y = tf.nn.depthwise_conv2d(x, w, [1, 1, 1, 1], "SAME").numpy().astype(np.float64) + b
    else:
        y = tf.nn.conv2d(x, w, 1, "SAME").numpy().astype(np.float64) + b
    summand = rng.uniform(0, 1, y.shape).astype(np.float32)
    if "Sum" in fused_ops:
        y = y + np.rint(summand * 255) / 255
    act = [op for op in fused_ops if op in ACTIVATIONS and op not in ("Sum", "Add")]
    if act:
        y = ACTIVATIONS[act[0]](y)
    if out_type == QU8:
        y = np.maximum(y, 0.0)  # quint8 codes hold no negatives: the reference clips too
    axis = (0, 1, 3) if depthwise else (0, 1, 2)
    bound = np.abs(w).max(axis=axis)
    codes = np.clip(np.rint(w / bound.reshape((1, 1, -1, 1) if depthwise else (1, 1, 1, -1)) * 127),
                    -127, 127).astype(np.int8)
    xq = np.clip(np.rint(x / 2.0 * 255), 0, 255).astype(np.uint8)
    out_max = float(np.abs(y).max())
    nodes = [content_const("x", xq, QU8), content_const("w", codes, QI8), content_const("b", b, F),
             content_const("s", np.rint(summand * 255).astype(np.uint8), QU8),
             content_const("wmin", (-bound).astype(np.float32), F), content_const("wmax", bound.astype(np.float32), F)]
    for n, v in (("xmin", 0.0), ("xmax", 2.0), ("smin", 0.0), ("smax", 1.0),
                 ("omin", -out_max if out_type == QI8 else 0.0), ("omax", out_max)):
        nodes.append(content_const(n, np.float32(v), F))
    device = ["x", "w", "b"] + (["s"] if "Sum" in fused_ops else [])
    host = ["xmin", "xmax", "wmin", "wmax"] + (["smin", "smax"] if "Sum" in fused_ops else [])
    host += ["omin", "omax"] if "Requantize" in fused_ops else []
    op = make_node(op_name, "conv", device + host, {"Tinput": QU8, "Tfilter": QI8, "out_type": out_type})
    # As TensorFlow's own tests build it (mkl_quantized_conv_ops_test.cc): every input and output
    # on the host side.
    op.attr["Thost_inputs"].list.type.extend([QU8, QI8, F] + ([QU8] if "Sum" in fused_ops else []) + [F] * len(host))
    op.attr["Thost_outputs"].list.type.extend([out_type, F, F])
    op.attr["Tdevice_inputs"].list.SetInParent()
    op.attr["Tdevice_outputs"].list.SetInParent()
    op.attr["Tbias"].type = F
    op.attr["Tsummand"].type = QU8 if "Sum" in fused_ops else out_type
    op.attr["strides"].list.i.extend([1, 1, 1, 1])
    op.attr["padding"].s = b"SAME"
    op.attr["fused_ops"].list.s.extend(s.encode() for s in fused_ops)
    op.attr["alpha"].f = ALPHA
    nodes.append(op)
    if out_type == types_pb2.DT_QINT32:
        return "qint32 out: not compared"
    nodes += _float_out(out_type, "conv", out_max)
    got = _run(nodes, "dq:0")
    return f"ok, max |error| / max |y| = {np.abs(got - y).max() / max(out_max, 1e-9):.4f}"


def _why(error: Exception) -> str:
    """The kernel's own sentence out of TensorFlow's long error text: the line before the
    ``[[{{node ...}}]]`` marker, else the first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    marked = [index for index, line in enumerate(lines) if line.startswith("[[")]
    return "refused: " + (lines[marked[0] - 1] if marked and marked[0] > 0 else lines[0])[:160]


CONV_OPS = ("_FusedQuantizedConv2D", "_FusedQuantizedDepthwiseConv2D")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conv-case", type=int, help="(internal) run one conv case in this process")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    activations = ["Relu", "Relu6", "LeakyRelu", "Elu", "Sigmoid", "Tanh", "GeluApproximate", "GeluExact",
                   "_FusedSwish", "_FusedHardSwish", "Swish"]
    if args.conv_case is None:
        print(f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(default)')} "
          f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', '(default)')}")
    cases = [(["BiasAdd", "Dequantize"], F), (["BiasAdd", "Requantize"], QU8), (["BiasAdd", "Requantize"], QI8),
             (["BiasAdd", "Add", "Dequantize"], F)]
    cases += [(["BiasAdd", a, "Dequantize"], F) for a in activations]
    cases += [(["BiasAdd", a, "Requantize"], QU8) for a in activations]
    for fused_ops, out_type in cases if args.conv_case is None else []:
        try:
            result = probe_matmul(fused_ops, out_type, rng)
        except Exception as error:  # noqa: BLE001 - the kernel's message is the finding
            result = _why(error)
        print(f"_QuantizedMatMul {fused_ops} -> {types_pb2.DataType.Name(out_type)}: {result}")
    conv_cases = [(["BiasAdd", "Requantize"], QU8), (["BiasAdd", "Requantize"], QI8),
                  (["BiasAdd", "Relu", "Requantize"], QU8), (["BiasAdd", "Sum", "Relu", "Requantize"], QU8),
                  (["BiasAdd", "Dequantize"], F), (["BiasAdd", "Sum", "Requantize"], QU8)]
    conv_cases += [(["BiasAdd", a, "Requantize"], QU8) for a in activations if a != "Relu"]
    conv_cases += [(["BiasAdd", a, "Dequantize"], F) for a in ("Relu", "LeakyRelu")]
    flat = [(op_name, fused_ops, out_type) for op_name in CONV_OPS for fused_ops, out_type in conv_cases]
    if args.conv_case is not None:
        op_name, fused_ops, out_type = flat[args.conv_case]
        try:
            result = probe_conv(op_name, fused_ops, out_type, rng)
        except Exception as error:  # noqa: BLE001 - the kernel's message is the finding
            result = _why(error)
        print(result, flush=True)
        return
    # Some lists crash the process (segfault): each conv case runs in its own.
    for index, (op_name, fused_ops, out_type) in enumerate(flat):
        child = subprocess.run([sys.executable, __file__, "--conv-case", str(index)], capture_output=True, text=True)
        lines = child.stdout.strip().splitlines()
        result = lines[-1] if child.returncode == 0 and lines else f"crashed (exit {child.returncode})"
        print(f"{op_name} {fused_ops} -> {types_pb2.DataType.Name(out_type)}: {result}", flush=True)

if __name__ == "__main__":
    main()
