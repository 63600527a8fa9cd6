"""`pip install .` without extras gives working transform_graph, summarize_graph and
optimise_saved_model: a fresh venv (no system site-packages) gets the repo with --no-deps plus
only pyproject's core dependencies, held to requirements.txt's versions, and runs the three
console scripts on a frozen Iris DNN and a small SavedModel built here with the main venv's
TensorFlow. Their results must be what the fully installed venv gives for the same command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

# ~2 minutes on the Intel Xeon (family 6 model 167, 2 cores) with the pip cache warm: pip's install
# ~35-45 s, the tests ~25 s, deleting the venv (~1.5 GB of small files) ~55 s; so make test-full only.
pytestmark = [pytest.mark.slow, pytest.mark.full, pytest.mark.xdist_group("install_core")]

REPO = Path(__file__).resolve().parents[1]
CORE_DEPENDENCIES = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
# Import names of what the extras bring (peers, pipeline, s3, dev, published-models).
EXTRA_MODULES = ("openvino", "nncf", "ai_edge_litert", "onnxruntime", "onnx", "tf2onnx", "dvc", "dvclive",
                 "vl_convert", "dvc_s3", "pytest", "sklearn", "networkx", "joblib", "lz4", "tf_keras")
PIP_TIMEOUT_S = 900  # a cold pip cache downloads TensorFlow (~250 MB)
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
TRANSFORMS = "remove_nodes(op=Identity) fold_constants(ignore_errors=true) quantize_weights(minimum_size=16) " \
             "strip_unused_nodes sort_by_execution_order"
HIDDEN_UNITS = (32, 32)


def run(argv: list[str | Path], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run outside the work tree: from the repo, ``python -c`` would see its folders (dvclive/, src/)."""
    completed = subprocess.run([str(arg) for arg in argv], capture_output=True, text=True, timeout=timeout,
                               env=ENV, check=False, cwd=Path(tempfile.gettempdir()))
    assert completed.returncode == 0, (
        f"{' '.join(map(str, argv[:4]))} ... exited {completed.returncode}:\n{completed.stderr[-3000:]}"
    )
    return completed


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory) -> Iterator[Path]:
    """The bin/ directory of a venv holding the package and its core dependencies only. The package
    is built from a copy of pyproject.toml and src/, so no build files land in the work tree."""
    scratch = tmp_path_factory.mktemp("install_core")
    source = scratch / "source"
    source.mkdir()
    shutil.copy2(REPO / "pyproject.toml", source)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = scratch / "venv"
    started = time.perf_counter()
    run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "--quiet", "-c", REPO / "requirements.txt", *CORE_DEPENDENCIES],
        timeout=PIP_TIMEOUT_S)
    run([python, "-m", "pip", "install", "--quiet", "--no-deps", source], timeout=PIP_TIMEOUT_S)
    print(f"core venv installed in {time.perf_counter() - started:.0f} s")
    yield venv / "bin"
    shutil.rmtree(scratch)  # TensorFlow's ~1.5 GB: not left for pytest's basetemp rotation


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A frozen Iris DNN (TF 1 style, fitted weights), a tf.Module SavedModel and its sample rows."""
    import tensorflow as tf

    from model_builders.sample_graphs import frozen_iris_dnn

    scratch = tmp_path_factory.mktemp("install_core_models")
    frozen = scratch / "iris_frozen.pb"
    frozen.write_bytes(frozen_iris_dnn(seed=0, hidden_units=HIDDEN_UNITS).SerializeToString())

    class Classifier(tf.Module):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.hidden = tf.Variable(rng.normal(0, 0.5, (8, 64)).astype(np.float32))
            self.logits = tf.Variable(rng.normal(0, 0.5, (64, 5)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32, name="features")])
        def serve(self, features):
            hidden = tf.nn.relu(tf.matmul(features, self.hidden))
            return {"scores": tf.nn.softmax(tf.matmul(hidden, self.logits))}

    classifier = Classifier()
    saved_model = scratch / "saved_model"
    tf.saved_model.save(classifier, str(saved_model), signatures={"serving_default": classifier.serve})
    samples = scratch / "samples.npz"
    np.savez(samples, features=np.random.default_rng(1).normal(size=(128, 8)).astype(np.float32))
    return {"frozen": frozen, "saved_model": saved_model, "samples": samples, "scratch": scratch}


def test_the_venv_holds_the_core_and_no_extra(core_venv):
    code = ("import importlib.util, serving_optimiser\n"
            f"print([name for name in {EXTRA_MODULES!r} if importlib.util.find_spec(name)])")
    assert run([core_venv / "python", "-c", code]).stdout.strip() == "[]"
    for tool in ("transform_graph", "summarize_graph", "optimise_saved_model"):
        assert (core_venv / tool).is_file(), f"{tool}: no console script in the core venv"


def test_summarize_graph_prints_what_the_full_install_prints(core_venv, models):
    core = run([core_venv / "summarize_graph", "--in_graph", models["frozen"], "--print_structure"]).stdout
    full = run([sys.executable, "-m", "serving_optimiser.cli.summarize_graph", "--in_graph", models["frozen"],
                "--print_structure"]).stdout
    assert "Found 4 possible inputs" in core
    assert "dnn/head/predictions/probabilities" in core
    assert core == full


def test_transform_graph_writes_the_full_installs_bytes(core_venv, models):
    from graph_helpers import run_graph
    from tensorflow.core.framework import graph_pb2

    from model_builders.sample_graphs import IRIS_FEATURES, IRIS_OUTPUT, iris_samples

    outputs = {}
    for name, command in (("core", [core_venv / "transform_graph"]),
                          ("full", [sys.executable, "-m", "serving_optimiser.cli.transform_graph"])):
        outputs[name] = models["scratch"] / f"iris_{name}.pb"
        completed = run([*command, "--in_graph", models["frozen"], "--out_graph", outputs[name],
                         "--inputs", ",".join(IRIS_FEATURES), "--outputs", IRIS_OUTPUT, "--transforms", TRANSFORMS])
        assert "quantize_weights:" in completed.stderr
    assert outputs["core"].read_bytes() == outputs["full"].read_bytes()

    transformed = graph_pb2.GraphDef.FromString(outputs["core"].read_bytes())
    ops = [node.op for node in transformed.node]
    assert "Identity" not in ops
    # Every kernel and the hidden layers' biases (32 values); the logits' 3 are under minimum_size.
    assert ops.count("Dequantize") == 2 * len(HIDDEN_UNITS) + 1
    original = graph_pb2.GraphDef.FromString(models["frozen"].read_bytes())
    features, _ = iris_samples(512, seed=3)
    (expected,) = run_graph(original, [IRIS_OUTPUT], features)
    (actual,) = run_graph(transformed, [IRIS_OUTPUT], features)
    # 8-bit weights over three layers: probabilities within 0.05, classes mostly the same.
    assert np.max(np.abs(actual - expected)) < 0.05
    assert np.mean(actual.argmax(1) == expected.argmax(1)) >= 0.98


def test_optimise_saved_model_converts_and_passes_its_comparison(core_venv, models):
    import tensorflow as tf

    out_dir, report = models["scratch"] / "optimised", models["scratch"] / "report.json"
    completed = run([core_venv / "optimise_saved_model", "--transforms", TRANSFORMS, "--sample-inputs",
                     models["samples"], "--report", report, models["saved_model"], out_dir])
    assert "verdict: pass" in completed.stdout
    assert json.loads(report.read_text())["verdict"] == "pass"

    features = np.load(models["samples"])["features"]
    expected = tf.saved_model.load(str(models["saved_model"])).signatures["serving_default"](
        features=tf.constant(features))["scores"].numpy()
    actual = tf.saved_model.load(str(out_dir)).signatures["serving_default"](
        features=tf.constant(features))["scores"].numpy()
    # 8-bit weights on two layers of a random softmax classifier: within 0.02 of the original.
    assert np.max(np.abs(actual - expected)) < 0.02
    assert np.mean(actual.argmax(1) == expected.argmax(1)) >= 0.95
