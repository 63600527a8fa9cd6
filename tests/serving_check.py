"""Run as a script in a child process (its oneDNN setting is the child's environment): load each
SavedModel through ``tf.saved_model.load`` and through TensorFlow's C++ loader (ServingSession),
call every signature on the given inputs, replay the warm-up records, and save what each loader
answered (or the error) to ``OUT/<model>.npz``.

    python tests/serving_check.py OUT INPUTS.npz MODEL_DIR [MODEL_DIR ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str]) -> None:
    from serving_optimiser.runtime import quiet_tensorflow

    quiet_tensorflow()
    import tensorflow as tf

    from serving_optimiser.saved_model import ServingSession

    out, inputs = Path(argv[0]), dict(np.load(argv[1]))
    out.mkdir(parents=True, exist_ok=True)
    for directory in argv[2:]:
        arrays, errors = {}, {}
        try:
            loaded = tf.saved_model.load(directory)
            for key, function in loaded.signatures.items():
                feeds = {name: tf.constant(inputs[name]) for name in function.structured_input_signature[1]}
                for name, value in function(**feeds).items():
                    arrays[f"tf/{key}/{name}"] = value.numpy()
        except Exception as error:  # noqa: BLE001 - reported to the test, which asserts on it
            errors["tf"] = str(error)
        try:
            with ServingSession(directory) as session:
                for key in session.signature_keys:
                    names = session.meta_graph.signature_def[key].inputs
                    for name, value in session.run(key, {n: inputs[n] for n in names}).items():
                        arrays[f"c_api/{key}/{name}"] = value
                arrays["warmup_replies"] = np.array(len(session.replay_warmup()))
        except Exception as error:  # noqa: BLE001
            errors["c_api"] = str(error)
        arrays["errors"] = np.array(json.dumps(errors))
        np.savez(out / f"{Path(directory).name}.npz", **arrays)


def check_in_child(out: Path, inputs: dict, directories: list[Path], env: dict) -> dict[str, dict]:
    """Run :func:`main` in a child with ``env``; per model: arrays by ``loader/signature/output``,
    ``errors`` (loader -> message) and ``warmup_replies``."""
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "inputs.npz", **inputs)
    command = [sys.executable, __file__, str(out), str(out / "inputs.npz"), *map(str, directories)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    answers = {}
    for directory in directories:
        with np.load(out / f"{directory.name}.npz", allow_pickle=True) as data:
            arrays = {name: data[name] for name in data.files}
        errors = json.loads(str(arrays.pop("errors")))
        answers[directory.name] = {"errors": errors, "warmup_replies": arrays.pop("warmup_replies", None),
                                   "arrays": arrays}
    return answers


if __name__ == "__main__":
    main(sys.argv[1:])
