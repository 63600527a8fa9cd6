"""The notebook's transforms, one at a time and all together, on SavedModels with control flow
(issue 16): a tf.Module whose tf.function runs a tf.while_loop then a tf.cond, and a small Keras
LSTM (a tf.while_loop over time steps). Freezing lowers their While/If to v1 Switch/Merge loops,
where a transform that changes which nodes run can leave a loop that never ends; so each
converted model is called in a subprocess with a time limit, and such a loop fails the test
instead of hanging it. Everything is built, optimised and called once, by the module fixture.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest
import tensorflow as tf

from model_builders.sample_graphs import NOTEBOOK_TRANSFORMS
from serving_optimiser.graph_transforms.graph_io import load_graph_def
from serving_optimiser.saved_model import optimise_saved_model
from serving_optimiser.saved_model.compare import within_rounding

pytestmark = pytest.mark.xdist_group("control_flow_models")

NOTEBOOK = list(NOTEBOOK_TRANSFORMS)
ALL = "all"
VARIANTS = [*NOTEBOOK, ALL]
LOSSY = {"round_weights(num_steps=256)", "quantize_weights", ALL}
MODELS = ["while_cond", "lstm"]

# Both models' weight matrices are over quantize_weights' default minimum_size (1024 elements),
# so the notebook's plain `quantize_weights` really quantizes them: 40 x 40 in the loop body,
# the LSTM's 24 x 96 recurrent kernel.
WIDTH = 40
LSTM_UNITS, LSTM_STEPS, LSTM_FEATURES, LSTM_CLASSES = 24, 8, 5, 4

# Lossy bounds (|Δ| / max|output|, per call), measured on these seeded models over round_weights,
# quantize_weights and the whole list: the loop's output moved by up to 2.9e-2 (8-bit weights are
# ~1 % off per step of a 40-wide matrix, seven steps), the LSTM's probabilities by up to 2.6e-3
# (8.4e-4 absolute) with all 64 classes kept. The bounds leave about 2x room for other CPUs.
LOSSY_RELATIVE_ERROR = {"while_cond": 5e-2, "lstm": 5e-3}
LOSSY_CLASS_AGREEMENT = 1.0

# Loading and calling one of these models takes well under a second; a model that is still
# running after this long has a loop that no longer ends.
CALL_TIMEOUT_S = 60.0

# Runs in a fresh Python: loads each SavedModel, calls serving_default on every saved call's
# inputs, writes the outputs; a call still running after the limit is reported and ends the
# process (a loop that never ends cannot be stopped any other way).
CHILD = r"""
import json, os, sys, threading
import numpy as np
import tensorflow as tf

jobs, limit = json.loads(sys.argv[1]), float(sys.argv[2])


def call(model_dir, inputs_path, outputs_path):
    function = tf.saved_model.load(model_dir).signatures["serving_default"]
    calls = {}
    with np.load(inputs_path) as saved:
        for key in saved.files:
            index, name = key.split(":", 1)
            calls.setdefault(index, {})[name] = tf.constant(saved[key])
    results = {}
    for index, inputs in sorted(calls.items()):
        for name, value in function(**inputs).items():
            results[f"{index}:{name}"] = value.numpy()
    np.savez(outputs_path, **results)


for name, model_dir, inputs_path, outputs_path in jobs:
    errors = []

    def run():
        try:
            call(model_dir, inputs_path, outputs_path)
        except Exception as error:
            errors.append(f"{type(error).__name__}: {error}".splitlines()[0])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        print(json.dumps([name, f"did not return within {limit:.0f} s"]), flush=True)
        os._exit(3)
    print(json.dumps([name, errors[0] if errors else "ok"]), flush=True)
"""


def call_in_subprocess(jobs: list[list[str]], limit: float) -> dict[str, str]:
    """Job name -> "ok" or what went wrong; a job that hangs costs ``limit`` and the rest go on
    in a new process."""
    status: dict[str, str] = {}
    remaining = list(jobs)
    while remaining:
        command = [sys.executable, "-c", CHILD, json.dumps(remaining), str(limit)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=limit * len(remaining) + 120)
            stdout, stderr = done.stdout, done.stderr
        except subprocess.TimeoutExpired as error:  # only if the child's own limit failed
            stdout, stderr = error.stdout or "", f"the calling process timed out after {error.timeout:.0f} s"
        if isinstance(stdout, bytes):
            stdout = stdout.decode(errors="replace")
        reported = dict(json.loads(line) for line in stdout.splitlines() if line.startswith("["))
        if not reported:
            message = (stderr or "").strip().splitlines()[-1:] or ["no output"]
            status.update({job[0]: f"the calling process failed: {message[0]}" for job in remaining})
            break
        status.update(reported)
        remaining = [job for job in remaining if job[0] not in status]
    return status


# ---------------------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------------------


class LoopThenCond(tf.Module):
    """``h = tanh(h @ w + b)`` for ``steps`` steps of a tf.while_loop, then a tf.cond on sum(h)."""

    def __init__(self):
        super().__init__()
        generator = tf.random.Generator.from_seed(16)
        self.w = tf.Variable(generator.normal([WIDTH, WIDTH]) * (0.9 / WIDTH**0.5))
        self.b = tf.Variable(generator.normal([WIDTH]) * 0.1)

    @tf.function(input_signature=[tf.TensorSpec([None, WIDTH], tf.float32), tf.TensorSpec([], tf.int32)])
    def __call__(self, x, steps):
        def body(i, h):
            return i + 1, tf.tanh(h @ self.w + self.b)

        _, h = tf.while_loop(lambda i, h: i < steps, body, [0, x])
        return tf.cond(tf.reduce_sum(h) > 0.0, lambda: h * 2.0, lambda: h - 1.0)


def build_while_cond(directory: str) -> list[dict[str, np.ndarray]]:
    module = LoopThenCond()
    tf.saved_model.save(module, directory, signatures=module.__call__)
    rng = np.random.default_rng(16)
    positive = np.abs(rng.normal(size=(8, WIDTH))).astype(np.float32)
    loop_x = rng.normal(size=(2, 8, WIDTH)).astype(np.float32)[1]
    # No steps: the cond alone, down each branch. Then 7 steps from loop_x (sum(h) = 5.6, the
    # then branch) and from -loop_x (-7.5, the else branch), and 3 steps (13.1): far enough from
    # 0 that 8-bit weights (up to ~0.2 on the sum) take the same branch.
    return [
        {"x": positive, "steps": np.int32(0)},
        {"x": -positive, "steps": np.int32(0)},
        {"x": loop_x, "steps": np.int32(7)},
        {"x": -loop_x, "steps": np.int32(7)},
        {"x": loop_x, "steps": np.int32(3)},
    ]


def build_lstm(directory: str) -> list[dict[str, np.ndarray]]:
    """LSTM(24) over 8 steps of 5 features, softmax over 4 classes; Keras' seeded initial weights
    (glorot/orthogonal), no training. Exported with ``model.export``."""
    import keras

    keras.utils.set_random_seed(16)
    inputs = keras.Input((LSTM_STEPS, LSTM_FEATURES), name="sequence")
    state = keras.layers.LSTM(LSTM_UNITS, name="lstm")(inputs)
    outputs = keras.layers.Dense(LSTM_CLASSES, activation="softmax", name="classes")(state)
    keras.Model(inputs, outputs).export(directory, verbose=False)
    rng = np.random.default_rng(16)
    return [{"sequence": rng.normal(size=(64, LSTM_STEPS, LSTM_FEATURES)).astype(np.float32)}]


BUILDERS = {"while_cond": build_while_cond, "lstm": build_lstm}


# ---------------------------------------------------------------------------------------------
# Build, optimise and call everything once
# ---------------------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@dataclass
class ModelRun:
    frozen_ops: set[str] = field(default_factory=set)
    status: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    # The graph_transforms log lines of each variant's optimisation.
    logs: dict[str, list[str]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, ModelRun]:
    root = tmp_path_factory.mktemp("control_flow_models")
    records = _Records()
    logger = logging.getLogger("serving_optimiser.graph_transforms")
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    result, jobs = {}, []
    try:
        for model, builder in BUILDERS.items():
            run = result[model] = ModelRun()
            original = root / model
            calls = builder(str(original))
            inputs_path = root / f"{model}_inputs.npz"
            np.savez(inputs_path, **{f"{i:02d}:{k}": v for i, c in enumerate(calls) for k, v in c.items()})
            jobs.append([f"{model}/original", str(original), str(inputs_path), str(root / f"{model}_original.npz")])
            for index, variant in enumerate(VARIANTS):
                out_dir = root / f"{model}_{index}"
                records.messages.clear()
                # compare=False: the subprocess below calls both models, with a time limit.
                optimise_saved_model(
                    original, out_dir, " ".join(NOTEBOOK) if variant == ALL else variant, compare=False,
                    frozen_dir=root / f"{model}_frozen" if index == 0 else None,
                )
                run.logs[variant] = list(records.messages)
                jobs.append([f"{model}/{variant}", str(out_dir), str(inputs_path), str(root / f"{model}_{index}.npz")])
            frozen = load_graph_def(str(root / f"{model}_frozen" / "frozen_graph.pb"))
            run.frozen_ops = {node.op for node in frozen.node}
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    status = call_in_subprocess(jobs, CALL_TIMEOUT_S)
    for name, _, _, outputs_path in jobs:
        model, variant = name.split("/", 1)
        result[model].status[variant] = status.get(name, "not called")
        if status.get(name) == "ok":
            with np.load(outputs_path) as saved:
                result[model].outputs[variant] = {key: saved[key] for key in saved.files}
    return result


def outputs_of(run: ModelRun, variant: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    for name in ("original", variant):
        assert run.status[name] == "ok", f"{name}: {run.status[name]}"
    return run.outputs["original"], run.outputs[variant]


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_freezing_lowers_the_loop_to_v1_control_flow(runs, model):
    """What the transforms see: Switch/Merge loops, not While/If with function bodies."""
    assert {"Switch", "Merge", "Enter", "Exit", "NextIteration", "LoopCond"} <= runs[model].frozen_ops
    assert not runs[model].frozen_ops & {"While", "StatelessWhile", "If", "StatelessIf"}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model", MODELS)
def test_converted_model_returns(runs, model, variant):
    assert runs[model].status["original"] == "ok"
    assert runs[model].status[variant] == "ok", f"{model} after {variant}: {runs[model].status[variant]}"


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v not in LOSSY])
@pytest.mark.parametrize("model", MODELS)
def test_lossless_transform_keeps_outputs_within_rounding(runs, model, variant):
    original, converted = outputs_of(runs[model], variant)
    assert sorted(converted) == sorted(original)
    for key, expected in original.items():
        difference = float(np.max(np.abs(converted[key] - expected)))
        assert within_rounding(expected, converted[key]), f"{key}: max |difference| {difference}"


@pytest.mark.parametrize("variant", sorted(LOSSY))
@pytest.mark.parametrize("model", MODELS)
def test_weight_transform_stays_within_measured_bound(runs, model, variant):
    original, converted = outputs_of(runs[model], variant)
    assert sorted(converted) == sorted(original)
    for key, expected in original.items():
        relative = float(np.max(np.abs(converted[key] - expected)) / np.max(np.abs(expected)))
        assert relative <= LOSSY_RELATIVE_ERROR[model], f"{key}: relative error {relative:.2e}"
        if model == "lstm":
            agreement = float(np.mean(np.argmax(converted[key], -1) == np.argmax(expected, -1)))
            assert agreement >= LOSSY_CLASS_AGREEMENT, f"{key}: class agreement {agreement}"


@pytest.mark.parametrize("model", MODELS)
def test_weight_transforms_change_the_weights(runs, model):
    """The lossy bound means something only if the weights really moved."""
    for variant in LOSSY:
        original, converted = outputs_of(runs[model], variant)
        assert any(not np.array_equal(converted[key], original[key]) for key in original), variant


@pytest.mark.parametrize("variant", NOTEBOOK)
@pytest.mark.parametrize("model", MODELS)
def test_each_transform_logs_one_summary_line(runs, model, variant):
    name = variant.split("(")[0]
    lines = [line for line in runs[model].logs[variant] if line.startswith(f"{name}: ") and "(" in line]
    summaries = [line for line in lines if " nodes, " in line or ": no change (" in line]
    assert len(summaries) == 1, runs[model].logs[variant]
    if name in ("fold_batch_norms", "fold_old_batch_norms"):  # neither model has a batch norm
        assert ": no change (" in summaries[0]
