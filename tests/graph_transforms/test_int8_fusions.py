"""int8 layers through the activations real models use (issue 29): which activation the matcher
names, what quantize_matmuls and quantize_convs make of a layer followed by each (a post-op of the
int8 kernel, or a float output and the activation left float), numerics against float on the
default ISA and on AVX2 (a subprocess with ONEDNN_MAX_CPU_ISA=AVX2), mutations of the emitter that
the checks must catch, and mtcnn's RNet (published weights).

Run directly (``python tests/graph_transforms/test_int8_fusions.py``), this file prints the
numeric errors of every case as JSON: the AVX2 test runs it so in a subprocess, since the ISA cap
must be set before TensorFlow loads.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import graph_pb2

from serving_optimiser.graph_transforms import TransformGraph
from serving_optimiser.graph_transforms.calibration import calibrate_ranges
from serving_optimiser.graph_transforms.graph_utils import consumers_map, node_map
from serving_optimiser.graph_transforms.transforms import _int8_driver, _matmul_nodes
from serving_optimiser.graph_transforms.transforms import quantize_matmuls as qm
from serving_optimiser.graph_transforms.transforms._activations import find_activation

K, N, ROWS = 64, 48, 512
ALPHA = 0.1
# The bound on max |int8 - float| / (range of the float output before the activation) over ROWS
# rows (relative_error), measured on this file's MatMul layers (K = 64, weights per tensor,
# calibrated signed input) on the Xeon with AVX-512 VNNI and AMX, and again with the AVX2 cap: the
# same figures, 0.15 % (sigmoid) to 0.75 % (hard-swish, left float). 2 % leaves room for other
# builds; a dropped post-op or an alpha of 0.3 for 0.1 misses it by far (test_checks_catch...).
MAX_ERROR = 0.02


def _prelu(y: tf.Tensor, alpha: np.ndarray) -> tf.Tensor:
    """Keras 3's frozen PReLU: Relu(y) + (-alpha) * Relu(-y)."""
    return tf.nn.relu(y) + tf.negative(tf.constant(alpha)) * tf.nn.relu(tf.negative(y))


# id -> (builder of the activation, the post-op the MatMul kernel applies, or None: stays float)
ACTIVATIONS = {
    "relu6": (tf.nn.relu6, "Relu6"),
    "leaky_relu": (lambda y: tf.nn.leaky_relu(y, ALPHA), "LeakyRelu"),
    "prelu_shared_alpha": (lambda y: _prelu(y, np.full(N, ALPHA, np.float32)), "LeakyRelu"),
    "prelu_per_channel": (lambda y: _prelu(y, np.linspace(0.05, 0.5, N).astype(np.float32)), None),
    "elu": (tf.nn.elu, "Elu"),
    "sigmoid": (tf.sigmoid, "Sigmoid"),
    "tanh": (tf.tanh, "Tanh"),
    "gelu_exact": (lambda y: tf.nn.gelu(y, approximate=False), "GeluExact"),
    "gelu_tanh": (lambda y: tf.nn.gelu(y, approximate=True), "GeluApproximate"),
    "swish": (tf.nn.silu, None),
    "hard_swish": (lambda y: y * tf.nn.relu6(y + 3.0) / 6.0, None),
}


def layer_graph(activation: str, conv: bool = False) -> graph_pb2.GraphDef:
    """x -> MatMul (or a 3x3 Conv2D) + BiasAdd -> the activation -> Identity 'output'."""
    rng = np.random.default_rng(7)
    graph = tf.Graph()
    with graph.as_default():
        if conv:
            x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 32], name="x")
            weights = rng.normal(0.0, np.sqrt(2.0 / (9 * 32)), (3, 3, 32, N)).astype(np.float32)
            y = tf.nn.conv2d(x, tf.constant(weights), 1, "SAME", name="layer")
        else:
            x = tf.compat.v1.placeholder(tf.float32, [None, K], name="x")
            weights = rng.normal(0.0, np.sqrt(2.0 / K), (K, N)).astype(np.float32)
            y = tf.matmul(x, tf.constant(weights), name="layer")
        y = tf.nn.bias_add(y, tf.constant(rng.normal(0.0, 0.3, N).astype(np.float32)), name="bias")
        tf.identity(ACTIVATIONS[activation][0](y), name="output")
    # As freezing leaves it: without the dead Identity tf.nn.silu's custom gradient adds.
    return tf.compat.v1.graph_util.extract_sub_graph(graph.as_graph_def(), ["output"])


def rows(conv: bool = False, seed: int = 3) -> np.ndarray:
    # A conv reads a non-negative input here (as after a pooled ReLU): a signed one under SAME
    # padding stays float (quantize_convs' padding rule).
    if conv:
        return np.abs(np.random.default_rng(seed).normal(0.0, 1.0, (ROWS // 8, 8, 8, 32))).astype(np.float32)
    return np.random.default_rng(seed).normal(0.0, 1.0, (ROWS, K)).astype(np.float32)


def run(graph_def: graph_pb2.GraphDef, x: np.ndarray, fetch: str = "output:0") -> np.ndarray:
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        return session.run(fetch, {"x:0": x})


def quantized(graph_def: graph_pb2.GraphDef, directory: Path, conv: bool = False) -> graph_pb2.GraphDef:
    """The graph through quantize_matmuls (or quantize_convs), calibrated on other rows."""
    ranges = calibrate_ranges(graph_def, [{"x": rows(conv, seed=11)}])
    path = directory / "ranges.json"
    path.write_text(json.dumps({name: list(r) for name, r in ranges.items()}))
    transform = "quantize_convs" if conv else "quantize_matmuls"
    return TransformGraph(graph_def, ["x"], ["output"], [f"{transform}(ranges_file={path})"])


def relative_error(graph_def: graph_pb2.GraphDef, int8: graph_pb2.GraphDef, conv: bool = False) -> float:
    """max |int8 - float| of the output over the range of the float layer's output before its
    activation: the int8 product's error is a share of that range, and none of these activations
    grows a difference by more than 1.13 (GELU's steepest slope), whatever its own output range."""
    x = rows(conv)
    expected, got, before = run(graph_def, x), run(int8, x), run(graph_def, x, "bias:0")
    return float(np.abs(got - expected).max() / (before.max() - before.min()))


def check_structure(int8: graph_pb2.GraphDef, activation: str) -> None:
    """The layer is one int8 kernel; a fusable activation is its post-op and its float nodes are
    gone; any other stays float after QuantizedMatMulWithBiasAndDequantize."""
    post_op = ACTIVATIONS[activation][1]
    ops = [node.op for node in int8.node]
    needed = {n.op for n in tf.compat.v1.graph_util.extract_sub_graph(int8, ["output"]).node}
    if post_op is None:
        assert qm.QUANTIZED_OP in ops and qm.ACTIVATION_OP not in ops
        if activation == "prelu_per_channel":
            # Left float as Maximum(y, alpha * y): two ops for Keras' five.
            assert {"Maximum", "Mul"} <= needed and not {"Relu", "Neg", "AddV2"} & needed
        return
    fused = [node for node in int8.node if node.op == qm.ACTIVATION_OP]
    assert len(fused) == 1 and qm.QUANTIZED_OP not in ops
    assert list(fused[0].attr["fused_ops"].list.s) == [b"BiasAdd", post_op.encode(), b"Dequantize"]
    if post_op == "LeakyRelu":
        assert fused[0].attr["leakyrelu_alpha"].f == pytest.approx(ALPHA, rel=1e-6)
    # What is left of the activation's float nodes (a Neg of a constant alpha is left for
    # fold_constants) does not run: nothing the output needs reads it.
    assert not {"Relu", "Relu6", "LeakyRelu", "Elu", "Sigmoid", "Tanh", "Erfc", "Neg"} & needed
    # The fused op takes the activation's place: the Identity reads it.
    readers = [node for node in int8.node if node.name == "output"]
    assert readers[0].input[0] == fused[0].name


def check_numerics(error: float) -> None:
    assert error <= MAX_ERROR, f"max |int8 - float| is {error:.2%} of the output's range (bound {MAX_ERROR:.0%})"


def errors(directory: Path) -> dict[str, float]:
    """Every activation's error (for the AVX2 subprocess)."""
    result = {}
    for activation in ACTIVATIONS:
        graph_def = layer_graph(activation)
        result[activation] = relative_error(graph_def, quantized(graph_def, directory))
    return result


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_matcher_names_the_activation(activation):
    graph_def = layer_graph(activation)
    found = find_activation("bias", node_map(graph_def), consumers_map(graph_def), N)
    expected = {"prelu_per_channel": "PReLU", "prelu_shared_alpha": "LeakyRelu", "swish": "Swish",
                "hard_swish": "HardSwish", "gelu_exact": "GeluExact", "gelu_tanh": "GeluApproximate",
                "leaky_relu": "LeakyRelu", "relu6": "Relu6"}.get(activation, activation.capitalize())
    assert found is not None and found.kind == expected
    assert found.end.name == node_map(graph_def)["output"].input[0]


def test_matcher_finds_nothing_when_the_output_is_read_elsewhere():
    graph = tf.Graph()
    with graph.as_default():
        y = tf.nn.bias_add(tf.compat.v1.placeholder(tf.float32, [None, 4], name="x"), tf.zeros([4]), name="bias")
        tf.identity(tf.nn.relu6(y), name="output")
        tf.identity(y, name="bias_read_elsewhere")
    graph_def = graph.as_graph_def()
    assert find_activation("bias", node_map(graph_def), consumers_map(graph_def), 4) is None


@pytest.mark.onednn
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_matmul_activation(activation, tmp_path, caplog):
    graph_def = layer_graph(activation)
    with caplog.at_level(logging.INFO, logger=qm.__name__):
        int8 = quantized(graph_def, tmp_path)
    check_structure(int8, activation)
    check_numerics(relative_error(graph_def, int8))
    lines = [r.getMessage() for r in caplog.records if "int8 layer 'layer' (MatMul) becomes" in r.getMessage()]
    assert len(lines) == 1 and ("fused_ops" in lines[0]) == (ACTIVATIONS[activation][1] is not None)


@pytest.mark.onednn
@pytest.mark.parametrize("activation", ["gelu_exact", "leaky_relu"])
def test_matmul_activation_with_per_batch_ranges(activation):
    """Without a ranges file the bias is computed at every call: the kernel must not cache it."""
    graph_def = layer_graph(activation)
    int8 = TransformGraph(graph_def, ["x"], ["output"], ["quantize_matmuls"])
    check_structure(int8, activation)
    assert not next(n for n in int8.node if n.op == qm.ACTIVATION_OP).attr["is_bias_const"].b
    check_numerics(relative_error(graph_def, int8))


@pytest.mark.onednn
def test_matmul_activations_on_avx2(tmp_path):
    """The same layers on oneDNN's AVX2 kernels (u8 x s8 pairs summed in int16)."""
    paths = [str(Path(__file__).parents[2] / "src"), str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
    environment = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "TF_ENABLE_ONEDNN_OPTS": "1",
                   "PYTHONPATH": os.pathsep.join(paths)}
    child = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True,
                           env=environment, timeout=600)
    assert child.returncode == 0, child.stderr[-2000:]
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    assert set(measured) == set(ACTIVATIONS)
    for activation, error in measured.items():
        assert error <= MAX_ERROR, f"{activation} on AVX2: {error:.2%} of the output's range"


@pytest.mark.onednn
@pytest.mark.parametrize("mutation", ["drop_post_op", "change_alpha"])
def test_checks_catch_a_broken_emitter(mutation, tmp_path, monkeypatch):
    """Mutation test: an emitter that drops the post-op, or writes another alpha, fails the checks."""
    original = _matmul_nodes._activation_op

    def broken(*args, **kwargs):
        node = original(*args, **kwargs)
        if mutation == "drop_post_op":
            del node.attr["fused_ops"].list.s[1]
        else:
            node.attr["leakyrelu_alpha"].f = 0.3
        return node

    monkeypatch.setattr(_matmul_nodes, "_activation_op", broken)
    activation = "leaky_relu" if mutation == "change_alpha" else "sigmoid"
    graph_def = layer_graph(activation)
    int8 = quantized(graph_def, tmp_path)
    with pytest.raises(AssertionError):
        check_structure(int8, activation)
    with pytest.raises(AssertionError):
        check_numerics(relative_error(graph_def, int8))


@pytest.mark.onednn
def test_checks_catch_a_wrong_float_prelu(tmp_path, monkeypatch):
    """Mutation test: the two-op PReLU left after the float output, with its alphas scaled by 1.5."""
    original = _int8_driver.float_prelu

    def broken(activation, producer, device):
        nodes = original(activation, producer, device)
        alpha = nodes[0].attr["value"].tensor
        values = tf.make_ndarray(alpha) * 1.5
        nodes[0].attr["value"].tensor.CopyFrom(tf.make_tensor_proto(values))
        return nodes

    monkeypatch.setattr(_int8_driver, "float_prelu", broken)
    graph_def = layer_graph("prelu_per_channel")
    with pytest.raises(AssertionError):
        check_numerics(relative_error(graph_def, quantized(graph_def, tmp_path)))


@pytest.mark.onednn
@pytest.mark.parametrize("activation", ["prelu_per_channel", "prelu_shared_alpha", "leaky_relu", "swish"])
def test_conv_activation_ends_in_dequantize(activation, tmp_path, caplog):
    """No int8 conv kernel of this TensorFlow fuses anything but Relu: the conv runs in int8, ends
    in one Dequantize, and the activation stays float (one log line says so)."""
    graph_def = layer_graph(activation, conv=True)
    with caplog.at_level(logging.INFO):
        int8 = quantized(graph_def, tmp_path, conv=True)
    ops = [node.op for node in int8.node]
    assert ops.count("QuantizedConv2DWithBiasAndReluAndRequantize") == 1 and ops.count("Dequantize") == 1
    # A PReLU in fewer float ops than Keras' five (a Neg of the constant alpha is left for
    # fold_constants, unread): Maximum(y, alpha * y) per channel, one LeakyRelu for one alpha.
    needed = {n.op for n in tf.compat.v1.graph_util.extract_sub_graph(int8, ["output"]).node}
    if activation.startswith("prelu"):
        assert ("Maximum" if activation == "prelu_per_channel" else "LeakyRelu") in needed
        assert not {"Neg", "Relu", "AddV2"} & needed
    check_numerics(relative_error(graph_def, int8, conv=True))
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "ends in a Dequantize (int8 compute, float output)" in messages
    assert "int8 layer 'layer' (Conv2D) becomes QuantizedConv2DWithBiasAndReluAndRequantize" in messages


@pytest.mark.onednn
@pytest.mark.real
def test_mtcnn_rnet(tmp_path, caplog):
    """mtcnn's RNet (published weights, PReLU after every layer): its convolutions and its 576 ->
    128 layer run in int8, each ending in one dequantize with the PReLU float as Maximum(y,
    alpha * y); the face probability agrees with float."""
    from model_builders.int8_models import INT8_TRANSFORMS
    from published_models import load
    from serving_optimiser.saved_model import optimise_saved_model
    from serving_optimiser.saved_model.onednn import SELF_CHECK_SCOPE
    from serving_optimiser.saved_model.reader import read_meta_graph

    model = load("mtcnn_rnet")
    with caplog.at_level(logging.INFO):
        # The gate off: every eligible layer int8 (with it, the box regression's rms difference,
        # 1.2 % of its range against a 1 % tolerance, sends all three layers back to float).
        optimise_saved_model(model.saved_model, tmp_path / "int8", INT8_TRANSFORMS, signature_keys=["serving_default"],
                             calibration_inputs={"serving_default": model.inputs},
                             sample_inputs={"serving_default": model.inputs}, warmup_batch_sizes=(), gate=False)
    graph = read_meta_graph(tmp_path / "int8").graph_def
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    ops = [node.op for node in nodes if not node.name.startswith(SELF_CHECK_SCOPE)]  # not the load-time probe
    # conv1 (3 input channels) stays float under minimum_dim; conv2 and conv3 and fc4 are int8.
    assert ops.count("QuantizedConv2DWithBiasAndReluAndRequantize") == 2
    assert ops.count(qm.QUANTIZED_OP) == 1
    # The three PReLUs after them; conv1's (a float layer) keeps Keras' form (Neg, Relu, AddV2).
    assert ops.count("Maximum") == 3 and ops.count("AddV2") == 1
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert messages.count("its PReLU") >= 3
    functions = {key: __import__("tensorflow").saved_model.load(str(path)).signatures["serving_default"]
                 for key, path in (("float", model.saved_model), ("int8", tmp_path / "int8"))}
    answers = {key: f(**{k: tf.constant(v) for k, v in model.inputs.items()})["face_prob"].numpy()[:, 1]
               for key, f in functions.items()}
    # Measured (Xeon, AVX-512 VNNI + AMX, and with the AVX2 cap): max |face probability
    # difference| 0.0059 over the 32 rows, every face / not-face call the same.
    assert np.abs(answers["int8"] - answers["float"]).max() < 0.05
    assert ((answers["int8"] > 0.5) == (answers["float"] > 0.5)).all()


if __name__ == "__main__":
    import tempfile

    from serving_optimiser.runtime import quiet_tensorflow

    quiet_tensorflow()
    with tempfile.TemporaryDirectory() as scratch:
        print(json.dumps(errors(Path(sys.argv[1] if len(sys.argv) > 1 else scratch))))
