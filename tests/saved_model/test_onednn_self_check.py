"""A SavedModel holding oneDNN-only int8 ops never fails at a first request: where oneDNN is off
(TensorFlow's default on CPUs without AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX; emulated on any
CPU with TF_ENABLE_ONEDNN_OPTS=0) it fails at load, through ``tf.saved_model.load`` and through
TensorFlow's C++ loader alike, naming the fix; with oneDNN on it answers. Loaded in child
processes, because the setting is read once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from saved_model.models import INT8, LOSSLESS, wide_mlp_inputs

from serving_optimiser.saved_model import onednn_only_ops, optimise_saved_model
from serving_optimiser.saved_model.onednn import SELF_CHECK_SCOPE
from serving_optimiser.saved_model.reader import read_meta_graph

pytestmark = pytest.mark.slow

# Every layer of the seeded 16 -> 64 -> 64 -> 8 MLP in int8 with per-batch ranges, on 512 rows:
# measured max |error| 1.6 % of the largest |score| (AVX-512 VNNI and the AVX2 cap alike).
MAX_ERROR_FRACTION = 0.05

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from serving_optimiser.runtime import quiet_tensorflow
    quiet_tensorflow()
    import tensorflow as tf
    from serving_optimiser.saved_model import ServingSession
    directory, inputs = sys.argv[1], dict(np.load(sys.argv[2]))
    result = {}
    try:
        signature = tf.saved_model.load(directory).signatures["serving_default"]
        scores = signature(**{k: tf.constant(v) for k, v in inputs.items()})["scores"].numpy()
        result["tf"] = {"scores": scores.tolist()}
    except Exception as error:
        result["tf"] = {"error": str(error)}
    try:
        with ServingSession(directory) as session:
            result["c_api"] = {"scores": session.run("serving_default", inputs)["scores"].tolist()}
            result["c_api"]["warmup"] = len(session.replay_warmup())
    except Exception as error:
        result["c_api"] = {"error": str(error)}
    print(json.dumps(result))
""")


@pytest.fixture(scope="module")
def int8_model(wide_mlp, tmp_path_factory):
    # compare=False: the comparison would need the kernels in this process, whatever its setting.
    out = tmp_path_factory.mktemp("int8") / "model"
    report = optimise_saved_model(wide_mlp, out, INT8, compare=False)
    assert report["onednn_only_ops"] == {"QuantizedMatMulWithBiasAndDequantize": 3}
    return out


def _load_in_child(directory, inputs_path, onednn: str) -> dict:
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(directory), str(inputs_path)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_init_op_holds_the_self_check_and_float_models_none(int8_model, wide_mlp, tmp_path):
    meta_graph = read_meta_graph(str(int8_model), ("serve",))
    nodes = {node.name: node for node in meta_graph.graph_def.node}
    main_op = nodes[meta_graph.collection_def["saved_model_main_op"].node_list.value[0]]
    assert f"^{SELF_CHECK_SCOPE}/check" in main_op.input
    assert nodes[f"{SELF_CHECK_SCOPE}/probe"].op == "QuantizedMatMulWithBiasAndDequantize"
    assert onednn_only_ops(meta_graph.graph_def)["QuantizedMatMulWithBiasAndDequantize"] == 4  # 3 layers + probe
    optimise_saved_model(wide_mlp, tmp_path / "float", LOSSLESS, compare=False)
    float_graph = read_meta_graph(str(tmp_path / "float"), ("serve",)).graph_def
    assert not onednn_only_ops(float_graph) and not any(SELF_CHECK_SCOPE in n.name for n in float_graph.node)


@pytest.mark.parametrize("onednn", ["0", "1"], ids=["onednn_off", "onednn_on"])
def test_fails_at_load_naming_the_fix_or_answers(int8_model, wide_mlp, tmp_path, onednn):
    inputs = wide_mlp_inputs(512, seed=8)
    np.savez(tmp_path / "inputs.npz", **inputs)
    result = _load_in_child(int8_model, tmp_path / "inputs.npz", onednn)
    if onednn == "0":
        # tf.saved_model.load runs the init op while loading, so no signature is ever returned.
        assert "scores" not in result["tf"] and "scores" not in result["c_api"]
        assert "Missing 0-th output" in result["tf"]["error"] and SELF_CHECK_SCOPE in result["tf"]["error"]
        c_api_error = result["c_api"]["error"]
        assert "TensorFlow's C++ loader" in c_api_error and "TF_ENABLE_ONEDNN_OPTS=1" in c_api_error
        assert "\n" not in c_api_error
        return
    expected = tf.saved_model.load(str(wide_mlp)).signatures["serving_default"](x=tf.constant(inputs["x"]))
    expected = expected["scores"].numpy()
    through_tf, through_c_api = np.array(result["tf"]["scores"]), np.array(result["c_api"]["scores"])
    assert np.abs(through_tf - expected).max() <= MAX_ERROR_FRACTION * np.abs(expected).max()
    # Per-batch ranges: the same batch through both loaders gives the same codes, so the same scores.
    assert np.allclose(through_c_api, through_tf, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert result["c_api"]["warmup"] == 1


def test_optimise_saved_model_says_in_one_line_what_to_set(wide_mlp, tmp_path):
    code = "import sys; from serving_optimiser.cli.optimise_saved_model import main; sys.exit(main())"
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(wide_mlp), str(tmp_path / "out"), "--transforms", INT8],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("optimise_saved_model: error:")]
    assert len(errors) == 1, result.stderr
    assert "QuantizedMatMulWithBiasAndDequantize x3" in errors[0] and "set TF_ENABLE_ONEDNN_OPTS=1" in errors[0]
    assert "not written" in errors[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("op", "only_onednn"), [
    ("QuantizedMatMulWithBiasAndReluAndRequantize", True), ("QuantizedConv2DWithBiasAndRelu", True),
    ("QuantizedDepthwiseConv2DWithBiasAndRelu", True), ("_QuantizedMatMul", True), ("_FusedQuantizedConv2D", True),
    ("_FusedQuantizedDepthwiseConv2D", True),
    # quantize_nodes' ops have reference kernels and run with oneDNN off.
    ("QuantizedMatMul", False), ("QuantizedConv2D", False), ("QuantizedRelu", False), ("MatMul", False),
])
def test_which_ops_only_onednn_runs(op, only_onednn):
    from serving_optimiser.saved_model.onednn import is_onednn_only

    assert is_onednn_only(op) is only_onednn
