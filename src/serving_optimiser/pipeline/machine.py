"""What decides a timing on this machine, read without importing TensorFlow: the CPU, the ISA
features that pick kernels, cores, the runtimes' versions, the environment variables that change
their kernels or threads, and whether TensorFlow turns oneDNN on here.

The ``machine`` stage writes this description on every ``dvc repro`` (it is ``always_changed``)
and every latency stage depends on the file, so the timings are re-measured exactly when it
changes: on another CPU, core count, runtime version or oneDNN setting, and never otherwise.
Nothing in it varies from run to run on one machine (no clock speed, load or date).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

# CPU flags (as /proc/cpuinfo spells them) that decide which kernels oneDNN, XNNPACK, MLAS and
# OpenVINO pick, and so float bits and speed.
ISA_FLAGS = (
    "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_int8", "amx_bf16",
)
# TensorFlow's DefaultOneDnnPolicy (tensorflow/core/util/port.cc) on Linux x86-64: oneDNN's graph
# rewrites are on by default only on CPUs with one of these features.
ONEDNN_DEFAULT_FLAGS = ("avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
# Environment variables that change TensorFlow's kernels or threads, recorded when set.
KERNEL_ENVIRONMENT = (
    "TF_ENABLE_ONEDNN_OPTS", "ONEDNN_MAX_CPU_ISA", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS",
    "OMP_NUM_THREADS",
)
# The runtimes the latency stages time, by distribution name (the first one installed wins).
RUNTIMES = {
    "tensorflow": ("tensorflow-cpu", "tensorflow"),
    "ai-edge-litert": ("ai-edge-litert",),
    "onnxruntime": ("onnxruntime",),
    "openvino": ("openvino",),
}
_TRUE, _FALSE = ("1", "true"), ("0", "false")


def cpuinfo(path: str | Path = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's ``name : value`` fields ({} where there is no such file)."""
    fields: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    return fields


def onednn_default(flags: set[str], machine: str | None = None) -> tuple[bool, str]:
    """(on, why) of TensorFlow's oneDNN default on a CPU with ``flags`` (Linux)."""
    machine = machine or platform.machine()
    if machine not in ("x86_64", "AMD64"):
        return False, f"off on {machine} (only x86-64 CPUs are checked here)"
    present = [flag for flag in ONEDNN_DEFAULT_FLAGS if flag in flags]
    if present:
        return True, f"on: the CPU has {', '.join(present)}"
    return False, "off: the CPU has none of " + ", ".join(ONEDNN_DEFAULT_FLAGS)


def onednn_setting(value: str | None, default: bool) -> tuple[bool, str]:
    """(on, why) of oneDNN in a TensorFlow process whose TF_ENABLE_ONEDNN_OPTS is ``value``.

    As TensorFlow reads it (ReadBoolFromEnvVar): 0/1/true/false in any case; anything else is
    ignored with a warning, so the default applies.
    """
    state = "on" if default else "off"
    if value is None:
        return default, f"{state} (TensorFlow's default on this CPU)"
    if value.strip().lower() in _TRUE:
        return True, f"on (TF_ENABLE_ONEDNN_OPTS={value})"
    if value.strip().lower() in _FALSE:
        return False, f"off (TF_ENABLE_ONEDNN_OPTS={value})"
    return default, f"{state} (TensorFlow's default: it ignores TF_ENABLE_ONEDNN_OPTS={value!r})"


def _version(distributions: tuple[str, ...]) -> str | None:
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def describe_machine(
    cpuinfo_path: str | Path = "/proc/cpuinfo", environ: Mapping[str, str] | None = None
) -> dict:
    """This machine as the latency stages' dependency (see the module docstring)."""
    environ = os.environ if environ is None else environ
    info = cpuinfo(cpuinfo_path)
    flags = set(info.get("flags", "").split())
    default, default_why = onednn_default(flags)
    on, why = onednn_setting(environ.get("TF_ENABLE_ONEDNN_OPTS"), default)
    cpu_id = " ".join(f"{key} {info[key]}" for key in ("cpu family", "model", "stepping") if key in info)
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_id": f"{info.get('vendor_id', platform.machine())} {cpu_id}".strip(),
        "isa": [flag for flag in ISA_FLAGS if flag in flags],
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "system": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "runtimes": {name: _version(distributions) for name, distributions in RUNTIMES.items()},
        "environment": {name: environ[name] for name in KERNEL_ENVIRONMENT if name in environ},
        "onednn_default": default,
        "onednn_default_why": default_why,
        "onednn": on,
        "onednn_why": why,
    }


def machine_line(machine: Mapping) -> str:
    """The machine in one line, for a report: CPU, cores, ISA, TensorFlow and its oneDNN default."""
    runtimes = machine.get("runtimes", {})
    return (
        f"{machine['cpu']} ({machine.get('cpu_id', '')}), {machine['cores']} cores, {' '.join(machine['isa'])}; "
        f"TensorFlow {runtimes.get('tensorflow')}, oneDNN {machine['onednn_why']}; "
        f"its default here is {machine['onednn_default_why']}"
    )
