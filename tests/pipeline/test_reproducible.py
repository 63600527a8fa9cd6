"""Training is bit-reproducible across x86-64 machines: the train stage pins oneDNN's kernels and
TensorFlow's threads, so the weights are the same whatever the CPU's ISA or core count.

Another machine is emulated on this one by capping oneDNN's ISA from outside (AVX2, or AVX-512
where the CPU has it) and by running on one core; the pins must win over all of these. The
expected md5 was computed on an AMD EPYC with AVX-512 (VNNI, BF16) and matches the weights an
AVX2-only machine trains, so a CI machine of either kind checks the claim for real.
"""

import hashlib
import os
import subprocess
import sys

import pytest
import yaml
from pipeline_helpers import IRIS, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("reproducible")]

TINY_TRAIN = {"hidden_units": [64, 64], "epochs": 30}
EXPECTED_MD5 = "bf38eb0c760301a9f348ca904ef7fe72"


def has_avx512() -> bool:
    with open("/proc/cpuinfo") as stream:
        return " avx512f " in stream.read()


SETTINGS = {
    "default": ([], {}),
    "one-core": (["taskset", "-c", "0"], {}),
    "avx2-cap": ([], {"ONEDNN_MAX_CPU_ISA": "AVX2"}),
    "avx512-cap": ([], {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}),
    "onednn-on": ([], {"TF_ENABLE_ONEDNN_OPTS": "1"}),
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("reproducible")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(TINY_TRAIN)
    (base / "params.yaml").write_text(yaml.safe_dump(params))
    script = ROOT / "scripts" / "prepare.py"
    subprocess.run(
        [sys.executable, str(script), "--data", str(IRIS), "--out-dir", str(base / "prepared"),
         "--params", str(base / "params.yaml")],
        check=True, capture_output=True,
    )
    return base


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_trained_weights_are_the_same_on_every_kind_of_machine(workspace, setting):
    prefix, environment = SETTINGS[setting]
    if setting == "avx512-cap" and not has_avx512():
        pytest.skip("this CPU has no AVX-512 to cap oneDNN at")
    out = workspace / f"{setting}.npz"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **environment}
    command = [
        sys.executable, str(ROOT / "scripts" / "train.py"), "--train", str(workspace / "prepared" / "train.csv"),
        "--out", str(out), "--out-live", str(workspace / f"live-{setting}"), "--params", str(workspace / "params.yaml"),
    ]
    result = subprocess.run([*prefix, *command], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert hashlib.md5(out.read_bytes()).hexdigest() == EXPECTED_MD5
