"""Hardware detection shared by the server and the edge preflight: one implementation, two callers.

What a device is, is decided from facts gathered here and the rows of ``contract/device_classes.yaml``:

- the **device class** (``x86_cpu``, ``jetson``, ...): the first row of ``classes`` whose ``detect``
  facts all hold (architecture, files that exist, commands on PATH, an NVIDIA driver);
- the **CPU class** (``x86_64_avx2``, ``x86_64_avx512_vnni``, ...): the first row of ``cpu_classes``
  whose architecture matches and whose CPU features the processor has. ONNX Runtime picks its integer
  kernels by these features, and they round differently (on x86 without VNNI the u8s8 kernels saturate
  16-bit sums), so an INT8 artefact is validated per CPU class, not per device class;
- the **GPU architecture** (``sm_86``): from ``nvidia-smi``, or on Jetson from the device tree.

This file runs in two places: imported by ``serving.device`` on a server, and shipped to a device by
Ansible as ``module_utils`` of the ``dualdeploy.edge`` collection (``device_facts``), before the server
exists there. So it uses the standard library only, and the collection's copy is byte-for-byte this
file (a test compares them; ``make sync-detect`` copies it).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

DEVICE_TABLE = Path(__file__).with_name("device_classes.yaml")
"""The device-class table (device and CPU classes) beside this file: the one hardware table."""

# Jetson module (device-tree ``compatible``) -> CUDA compute capability. Jetson has no nvidia-smi.
TEGRA_GPU_ARCH = {"tegra234": "sm_87", "tegra194": "sm_72", "tegra186": "sm_62", "tegra210": "sm_53"}


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The CPU feature flags in a ``/proc/cpuinfo`` text (``flags`` on x86, ``Features`` on Arm)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def read_cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """This machine's CPU feature flags (empty when ``/proc/cpuinfo`` cannot be read)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return parse_cpu_flags(handle.read())
    except OSError:
        return frozenset()


def cpu_class(cpu_classes: Mapping[str, Mapping[str, Any]], arch: str, flags: Iterable[str]) -> str | None:
    """The first CPU class (table order) whose ``arch`` matches and whose ``requires`` flags are all present.

    Returns None when no class fits (for example an x86-64 CPU without AVX2).
    """
    have = set(flags)
    for name, row in cpu_classes.items():
        if row.get("arch") == arch and all(flag in have for flag in row.get("requires") or []):
            return str(name)
    return None


def missing_cpu_features(row: Mapping[str, Any], arch: str, flags: Iterable[str]) -> list[str]:
    """What a CPU lacks to belong to a CPU class: its architecture first, then each missing flag."""
    if row.get("arch") != arch:
        return [f"arch {row.get('arch')} (this is {arch})"]
    have = set(flags)
    return [flag for flag in row.get("requires") or [] if flag not in have]


def match_device_class(classes: Mapping[str, Mapping[str, Any]], found: Mapping[str, Any]) -> str | None:
    """The first device class (table order) whose every ``detect`` fact holds in ``found``.

    ``found`` holds ``arch``, ``files`` and ``commands`` (those that exist here) and ``nvidia_gpu``.
    """
    for name, row in classes.items():
        detect = row.get("detect") or {}
        if "arch" in detect and detect["arch"] != found.get("arch"):
            continue
        if any(path not in found.get("files", ()) for path in detect.get("files", [])):
            continue
        if any(cmd not in found.get("commands", ()) for cmd in detect.get("commands", [])):
            continue
        if "nvidia_gpu" in detect and bool(detect["nvidia_gpu"]) != bool(found.get("nvidia_gpu")):
            continue
        return str(name)
    return None


def gpu_arch_from_compute_cap(output: str) -> str | None:
    """``nvidia-smi --query-gpu=compute_cap --format=csv,noheader`` output -> ``sm_86`` (first GPU).

    Returns None when the output holds no ``major.minor`` figure (no GPU, ``[N/A]``, an error).
    """
    lines = output.strip().splitlines()
    first = lines[0].strip() if lines else ""
    major, dot, minor = first.partition(".")
    if not (dot and major.isdigit() and minor.isdigit()):
        return None
    return f"sm_{int(major)}{minor}"


def gpu_arch_from_tegra(compatible: str) -> str | None:
    """The Jetson GPU architecture from the device tree's ``compatible`` string, or None."""
    for soc, arch in TEGRA_GPU_ARCH.items():
        if soc in compatible:
            return arch
    return None


def probe_gpu_arch() -> str | None:
    """This machine's GPU compute capability: ``nvidia-smi`` first, then the Jetson device tree."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
        arch = gpu_arch_from_compute_cap(out)
        if arch:
            return arch
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/device-tree/compatible", "rb") as handle:
            return gpu_arch_from_tegra(handle.read().decode(errors="replace"))
    except OSError:
        return None


def gather(
    classes: Mapping[str, Mapping[str, Any]], cpu_classes: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """Look at this machine for exactly the facts the tables ask about.

    Returns:
        ``{arch, files, commands, nvidia_gpu, cpu_flags, cpu_class, gpu_arch}``; lists are sorted, and
        ``cpu_flags`` keeps only the flags some CPU class names.
    """
    files = sorted({f for row in classes.values() for f in (row.get("detect") or {}).get("files", [])})
    commands = sorted({c for row in classes.values() for c in (row.get("detect") or {}).get("commands", [])})
    arch = platform.machine()
    named = {flag for row in cpu_classes.values() for flag in row.get("requires") or []}
    flags = read_cpu_flags()
    nvidia = bool(shutil.which("nvidia-smi") or os.path.exists("/proc/driver/nvidia"))
    tegra = os.path.exists("/etc/nv_tegra_release")
    return {
        "arch": arch,
        "files": [f for f in files if os.path.exists(f)],
        "commands": [c for c in commands if shutil.which(c)],
        "nvidia_gpu": nvidia,
        "cpu_flags": sorted(flags & named),
        "cpu_class": cpu_class(cpu_classes, arch, flags),
        "gpu_arch": probe_gpu_arch() if nvidia or tegra else None,
    }


def int8_cpu_refusal(
    variant: Mapping[str, Any], cpu_class: str | None, arch: str, flags: Iterable[str]
) -> str | None:
    """Why an INT8 ONNX variant must not serve on this CPU (None when the build validated its class).

    ONNX Runtime's integer kernels differ by CPU class, so an INT8 variant serves only on the classes
    whose gate it passed at build (natively or under an emulator), as the manifest's ``cpu.validated``
    lists them. FP32 and FP16 variants, and TensorRT engines, carry no CPU condition. The server and the
    edge preflight both apply this one rule.
    """
    if variant.get("precision") != "int8" or variant.get("format") != "onnx":
        return None
    record = variant.get("cpu")
    if not isinstance(record, Mapping):
        return "the manifest records no per-CPU-class validation (a bundle from before schema 2; rebuild it)"
    validated = [str(name) for name in record.get("validated") or []]
    have = sorted(set(flags))
    if cpu_class is None:
        return (
            f"this CPU ({arch}, features {', '.join(have) or 'none known'}) is of no CPU class of the "
            f"table; the build validated it on {', '.join(validated) or 'no class'}"
        )
    if cpu_class in validated:
        return None
    results = record.get("results") or {}
    result = results.get(cpu_class) or {}
    why = f": {result['reason']}" if result.get("reason") else ""
    lacking = []
    for name in validated:
        row = results.get(name) or {}
        missing = missing_cpu_features(
            {"arch": row.get("arch", arch), "requires": row.get("requires", [])}, arch, have
        )
        lacking.append(f"{name} (this CPU lacks {', '.join(missing)})" if missing else name)
    status = result.get("status", "not claimed")
    return (
        f"not validated for this CPU class {cpu_class} at build ({status}{why}); "
        f"validated on {', '.join(lacking) or 'no class'}"
    )
