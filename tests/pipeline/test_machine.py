"""The machine stage's description: TensorFlow's oneDNN default derived from CPU flags as its
DefaultOneDnnPolicy does (and checked against TensorFlow itself), the TF_ENABLE_ONEDNN_OPTS
setting as TensorFlow reads it, stable content, and no TensorFlow import."""

import json
import os
import subprocess
import sys

import pytest
from pipeline_helpers import ROOT

from serving_optimiser.pipeline.machine import (
    ONEDNN_DEFAULT_FLAGS,
    describe_machine,
    machine_line,
    onednn_default,
    onednn_setting,
)

# An AVX2-only AMD EPYC (Zen 2/3) and a Cascade Lake Xeon, as /proc/cpuinfo lists them.
AVX2_EPYC = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2 sha_ni"
CASCADE_LAKE = AVX2_EPYC + " avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni"


def cpuinfo_file(tmp_path, flags: str, name: str = "AMD EPYC 7B12"):
    text = "".join(
        f"processor\t: {index}\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 49\n"
        f"model name\t: {name}\nstepping\t: 0\ncpu MHz\t\t: {2250 + index}.000\nflags\t\t: {flags}\n\n"
        for index in range(2)
    )
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


def test_onednn_is_off_by_default_on_an_avx2_only_cpu():
    assert onednn_default(set(AVX2_EPYC.split()), "x86_64") == (
        False, "off: the CPU has none of avx512_vnni, avx512_bf16, avx_vnni, amx_tile, amx_int8, amx_bf16"
    )
    # AVX-512 alone (Skylake-SP) is not enough either.
    assert onednn_default(set(AVX2_EPYC.split()) | {"avx512f", "avx512bw"}, "x86_64")[0] is False


@pytest.mark.parametrize("flag", ONEDNN_DEFAULT_FLAGS)
def test_any_neural_network_feature_turns_the_default_on(flag):
    on, why = onednn_default(set(AVX2_EPYC.split()) | {flag}, "x86_64")
    assert on and why == f"on: the CPU has {flag}"


def test_onednn_default_elsewhere_is_off():
    assert onednn_default(set(CASCADE_LAKE.split()), "aarch64")[0] is False


@pytest.mark.parametrize(
    ("value", "default", "expected"),
    [
        (None, False, (False, "off (TensorFlow's default on this CPU)")),
        (None, True, (True, "on (TensorFlow's default on this CPU)")),
        ("1", False, (True, "on (TF_ENABLE_ONEDNN_OPTS=1)")),
        ("TRUE", False, (True, "on (TF_ENABLE_ONEDNN_OPTS=TRUE)")),
        ("0", True, (False, "off (TF_ENABLE_ONEDNN_OPTS=0)")),
        ("false", True, (False, "off (TF_ENABLE_ONEDNN_OPTS=false)")),
        ("yes", False, (False, "off (TensorFlow's default: it ignores TF_ENABLE_ONEDNN_OPTS='yes')")),
    ],
    ids=["unset-off", "unset-on", "1", "TRUE", "0", "false", "ignored"],
)
def test_the_setting_is_read_as_tensorflow_reads_it(value, default, expected):
    assert onednn_setting(value, default) == expected


def test_description_holds_what_decides_a_timing_and_nothing_that_varies(tmp_path):
    path = cpuinfo_file(tmp_path, AVX2_EPYC)
    machine = describe_machine(path, {"TF_ENABLE_ONEDNN_OPTS": "1", "HOME": "/root", "OMP_NUM_THREADS": "2"})
    assert machine["cpu"] == "AMD EPYC 7B12"
    assert machine["cpu_id"] == "AuthenticAMD cpu family 23 model 49 stepping 0"
    assert machine["isa"] == ["avx2", "fma"]
    assert machine["environment"] == {"TF_ENABLE_ONEDNN_OPTS": "1", "OMP_NUM_THREADS": "2"}
    assert (machine["onednn_default"], machine["onednn"]) == (False, True)
    assert machine["runtimes"]["tensorflow"] == "2.21.0" and machine["runtimes"]["openvino"] == "2026.4.1"
    assert machine["cores"] == len(os.sched_getaffinity(0))
    assert "MHz" not in json.dumps(machine) and "2250" not in json.dumps(machine)
    assert describe_machine(path, {"TF_ENABLE_ONEDNN_OPTS": "1"})["environment"] == {"TF_ENABLE_ONEDNN_OPTS": "1"}
    line = machine_line(machine)
    assert line.startswith("AMD EPYC 7B12 (AuthenticAMD cpu family 23 model 49 stepping 0), ")
    assert "oneDNN on (TF_ENABLE_ONEDNN_OPTS=1); its default here is off: the CPU has none of" in line


TENSORFLOW_SAYS = (
    "from tensorflow.python.util import _pywrap_util_port; print(int(_pywrap_util_port.IsMklEnabled()))"
)


@pytest.mark.parametrize("value", [None, "0", "1"], ids=["unset", "0", "1"])
def test_derived_setting_is_what_tensorflow_turns_on(value):
    env = {key: item for key, item in os.environ.items() if key != "TF_ENABLE_ONEDNN_OPTS"}
    if value is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = value
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    result = subprocess.run([sys.executable, "-c", TENSORFLOW_SAYS], env=env, capture_output=True, text=True,
                            check=True)
    machine = describe_machine(environ=env)
    assert bool(int(result.stdout.strip().splitlines()[-1])) == machine["onednn"], machine["onednn_why"]


def test_script_writes_the_same_bytes_quickly_without_tensorflow(tmp_path):
    code = (
        "import runpy, sys; sys.argv = ['machine.py', '--out', sys.argv[1]]; "
        f"runpy.run_path({str(ROOT / 'scripts' / 'machine.py')!r}, run_name='__main__')"
    )
    outputs = []
    for index in range(2):
        out = tmp_path / f"machine{index}.json"
        check = f"{code}; assert 'tensorflow' not in sys.modules, 'imported TensorFlow'"
        result = subprocess.run([sys.executable, "-c", check, str(out)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("machine: ") and result.stderr == ""
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert json.loads(outputs[0])["onednn_why"]
