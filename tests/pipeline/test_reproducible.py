"""Training is bit-reproducible across x86-64 machines of one kind: the train stage pins oneDNN's
kernels and TensorFlow's threads, so the weights are the same whatever the CPU's ISA cap, oneDNN
setting or core count.

Another machine is emulated on this one by capping oneDNN's ISA from outside (AVX2, or AVX-512
where the CPU has it), by forcing oneDNN's rewrites on and by running on one core; the pins must
win over all of these. The md5s of KNOWN_MD5 were measured: one on AMD EPYCs (AVX2-only, and
AVX-512 with VNNI/BF16: the same bits), another on an Intel Xeon (KVM guest, family 6 model 167,
AVX-512/AMX, 4 MiB L2 per core). The pins do not make those two agree: what still differs between
them is not an ISA or a thread count (every setting above gives the same bits on each), but, most
likely, the cache sizes Eigen's and oneDNN's matrix-multiply blocking read from the CPU. On a CPU
of another kind every setting must give the default setting's bits.
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
KNOWN_MD5 = {
    ("AuthenticAMD",): "bf38eb0c760301a9f348ca904ef7fe72",
    ("GenuineIntel", "6", "167"): "6010db0b170a75133d34d6e8de3b8e4c",
}


def cpu_kind() -> tuple[str, ...]:
    fields = {}
    with open("/proc/cpuinfo") as stream:
        for line in stream:
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    return fields.get("vendor_id", ""), fields.get("cpu family", ""), fields.get("model", "")


def known_md5() -> str | None:
    kind = cpu_kind()
    return KNOWN_MD5.get(kind) or KNOWN_MD5.get(kind[:1])


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


def _train(workspace, setting: str) -> str:
    prefix, environment = SETTINGS[setting]
    out = workspace / f"{setting}.npz"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **environment}
    command = [
        sys.executable, str(ROOT / "scripts" / "train.py"), "--train", str(workspace / "prepared" / "train.csv"),
        "--out", str(out), "--out-live", str(workspace / f"live-{setting}"), "--params", str(workspace / "params.yaml"),
    ]
    result = subprocess.run([*prefix, *command], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return hashlib.md5(out.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def expected_md5(workspace) -> str:
    """The known md5 for this kind of CPU, else what the default setting trains here."""
    return known_md5() or _train(workspace, "default")


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_trained_weights_are_the_known_bits_under_every_setting(workspace, expected_md5, setting):
    if setting == "avx512-cap" and not has_avx512():
        pytest.skip("this CPU has no AVX-512 to cap oneDNN at")
    assert _train(workspace, setting) == expected_md5, f"CPU {cpu_kind()}"
