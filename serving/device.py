"""Device classes: detect this machine's class and choose a bundle variant for it.

The table lives in ``serving/device_classes.yaml`` and is shared with the edge
playbooks, so the rules here are deliberately the same simple ones the playbooks
apply: a class matches when every fact listed under ``detect`` holds, classes are
tried in file order, and the first match wins.

Everything except :func:`gather_facts` and :func:`load_table` is pure, so the
choice can be tested from facts alone.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_TABLE = Path(__file__).with_name("device_classes.yaml")
TABLE_SCHEMA_VERSION = 1


class DeviceError(Exception):
    """The device table is invalid, no class matches, or no variant can run here."""


@dataclass(frozen=True)
class DeviceClass:
    """One row of the device-class table."""

    name: str
    description: str
    detect: Mapping[str, Any]
    formats: tuple[str, ...]
    precisions: tuple[str, ...]
    onnxruntime_package: str
    providers: tuple[str, ...]
    trt_engine_cache: bool
    memory_max: str


@dataclass(frozen=True)
class DeviceFacts:
    """What detection looks at, gathered once from the machine (or given by a test).

    Attributes:
        arch: ``platform.machine()``, e.g. ``x86_64`` or ``aarch64``.
        files: the paths named by the table that exist here.
        commands: the programs named by the table that are on PATH.
        nvidia_gpu: an NVIDIA driver is present.
        gpu_arch: the GPU's compute capability as ``sm_XY``, when known.
    """

    arch: str
    files: frozenset[str] = field(default_factory=frozenset)
    commands: frozenset[str] = field(default_factory=frozenset)
    nvidia_gpu: bool = False
    gpu_arch: str | None = None


@dataclass(frozen=True)
class VariantChoice:
    """The variant to serve and the execution providers to ask ONNX Runtime for."""

    variant: Mapping[str, Any]
    providers: tuple[str, ...]
    reason: str


_REQUIRED_KEYS = ("detect", "formats", "precisions", "onnxruntime_package", "providers", "memory_max")


def parse_table(data: Any) -> dict[str, DeviceClass]:
    """Validate the parsed YAML of the device table and return its classes in file order.

    Raises:
        DeviceError: naming the class and key that is missing or malformed.
    """
    if not isinstance(data, dict) or data.get("schema_version") != TABLE_SCHEMA_VERSION:
        raise DeviceError(f"device table: schema_version must be {TABLE_SCHEMA_VERSION}")
    classes = data.get("classes")
    if not isinstance(classes, dict) or not classes:
        raise DeviceError("device table: 'classes' must be a non-empty mapping")
    table: dict[str, DeviceClass] = {}
    for name, row in classes.items():
        if not isinstance(row, dict):
            raise DeviceError(f"device table: class {name!r} must be a mapping")
        for key in _REQUIRED_KEYS:
            if key not in row:
                raise DeviceError(f"device table: class {name!r} lacks {key!r}")
        if not isinstance(row["detect"], dict):
            raise DeviceError(f"device table: class {name!r}: 'detect' must be a mapping")
        table[name] = DeviceClass(
            name=name,
            description=str(row.get("description", "")),
            detect=row["detect"],
            formats=tuple(row["formats"]),
            precisions=tuple(row["precisions"]),
            onnxruntime_package=str(row["onnxruntime_package"]),
            providers=tuple(row["providers"]),
            trt_engine_cache=bool(row.get("trt_engine_cache", False)),
            memory_max=str(row["memory_max"]),
        )
    return table


def load_table(path: Path = DEFAULT_TABLE) -> dict[str, DeviceClass]:
    """Read and validate the device-class table.

    Raises:
        DeviceError: the file is missing, not YAML, or malformed.
    """
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DeviceError(f"device table {path}: cannot read ({exc})") from exc
    return parse_table(data)


def matches(device_class: DeviceClass, facts: DeviceFacts) -> bool:
    """Whether every fact listed in the class's ``detect`` block holds."""
    detect = device_class.detect
    if "arch" in detect and detect["arch"] != facts.arch:
        return False
    if any(path not in facts.files for path in detect.get("files", [])):
        return False
    if any(cmd not in facts.commands for cmd in detect.get("commands", [])):
        return False
    return not ("nvidia_gpu" in detect and bool(detect["nvidia_gpu"]) != facts.nvidia_gpu)


def detect_class(table: Mapping[str, DeviceClass], facts: DeviceFacts) -> DeviceClass:
    """The first class of the table whose detection facts all hold.

    Raises:
        DeviceError: no class matches (the message lists the facts).
    """
    for device_class in table.values():
        if matches(device_class, facts):
            return device_class
    raise DeviceError(
        f"no device class matches this machine (arch={facts.arch}, files={sorted(facts.files)}, "
        f"commands={sorted(facts.commands)}, nvidia_gpu={facts.nvidia_gpu}); "
        f"pass --device-class with one of {', '.join(table)}"
    )


def _probe_gpu_arch() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.strip().splitlines()[0] if out.strip() else ""
    return "sm_" + first.replace(".", "") if first else None


def gather_facts(table: Mapping[str, DeviceClass]) -> DeviceFacts:
    """Look at this machine for exactly the facts the table asks about."""
    files: set[str] = set()
    commands: set[str] = set()
    for device_class in table.values():
        files.update(p for p in device_class.detect.get("files", []) if os.path.exists(p))
        commands.update(c for c in device_class.detect.get("commands", []) if shutil.which(c))
    nvidia = shutil.which("nvidia-smi") is not None or os.path.exists("/proc/driver/nvidia")
    return DeviceFacts(
        arch=platform.machine(),
        files=frozenset(files),
        commands=frozenset(commands),
        nvidia_gpu=nvidia,
        gpu_arch=_probe_gpu_arch() if nvidia else None,
    )


def _latency(variant: Mapping[str, Any]) -> float:
    value = variant.get("metrics", {}).get("latency_ms_p50")
    return float(value) if isinstance(value, int | float) else math.inf


def _tensorrt_problem(variant: Mapping[str, Any], available: set[str], facts: DeviceFacts) -> str | None:
    if not str(variant.get("file", "")).endswith(".onnx"):
        # A raw serialized engine (.engine/.plan) needs the TensorRT runtime itself; ONNX
        # Runtime only loads engines wrapped in an ONNX EPContext model.
        return (
            f"{variant.get('file')} is a raw TensorRT engine; this server runs TensorRT through ONNX "
            "Runtime's TensorrtExecutionProvider, which loads ONNX models (the onnx variants) instead"
        )
    if "TensorrtExecutionProvider" not in available:
        return "needs ONNX Runtime's TensorrtExecutionProvider, which this onnxruntime build lacks"
    arch = variant.get("gpu_arch")
    if arch and facts.gpu_arch != arch:
        return f"engine built for {arch}, this GPU is {facts.gpu_arch or 'unknown'}"
    return None


def runnable_problem(
    variant: Mapping[str, Any],
    device_class: DeviceClass,
    available_providers: Iterable[str],
    facts: DeviceFacts,
) -> str | None:
    """Why this machine cannot run ``variant`` (None when it can).

    A TensorRT variant runs through ONNX Runtime's TensorRT execution provider, so
    its file must be an ONNX model embedding the engine (EPContext), and it needs
    that provider and a GPU of the architecture the engine was built for. A raw
    ``.engine`` file is not runnable here; on a GPU the onnx variants then run with
    the TensorRT and CUDA providers.
    """
    available = set(available_providers)
    fmt = variant.get("format")
    if fmt not in device_class.formats:
        return f"format {fmt!r} is not run on device class {device_class.name} ({list(device_class.formats)})"
    if fmt == "tensorrt":
        problem = _tensorrt_problem(variant, available, facts)
        if problem:
            return problem
    elif fmt != "onnx":
        return f"unknown format {fmt!r}"
    if not any(p in available for p in device_class.providers):
        return f"none of the providers {list(device_class.providers)} is available ({sorted(available)})"
    return None


def choose_variant(
    variants: Sequence[Mapping[str, Any]],
    device_class: DeviceClass,
    available_providers: Sequence[str],
    facts: DeviceFacts,
    requested: str = "auto",
) -> VariantChoice:
    """Choose the variant to serve and its execution providers.

    With ``requested="auto"``: among the variants listed for the device class,
    in a format and precision the class runs, that this machine can run, take
    the one the manifest measured fastest (``metrics.latency_ms_p50``); the
    class's precision order breaks ties. Every variant in a manifest already
    passed the prebuild's accuracy gate.

    Args:
        variants: ``manifest["variants"]``.
        device_class: the class of this machine.
        available_providers: ``onnxruntime.get_available_providers()``.
        facts: the detection facts (for the GPU architecture).
        requested: ``"auto"`` or a variant name.

    Returns:
        The choice, with providers in the class's order, filtered to those available.

    Raises:
        DeviceError: the requested variant is unknown or cannot run here, or no
            variant suits the class.
    """
    providers = tuple(p for p in device_class.providers if p in set(available_providers))
    by_name = {str(v.get("name")): v for v in variants}
    if requested != "auto":
        if requested not in by_name:
            raise DeviceError(f"--variant {requested!r} is not in the bundle (it has {', '.join(by_name)})")
        variant = by_name[requested]
        problem = runnable_problem(variant, device_class, available_providers, facts)
        if problem:
            raise DeviceError(f"variant {requested!r} cannot run on this machine: {problem}")
        return VariantChoice(variant, providers, "requested with --variant")

    candidates = []
    rejected = []
    for variant in variants:
        name = variant.get("name")
        if device_class.name not in variant.get("device_classes", []):
            rejected.append(f"{name}: not built for {device_class.name}")
            continue
        if variant.get("precision") not in device_class.precisions:
            rejected.append(f"{name}: precision {variant.get('precision')} not used on {device_class.name}")
            continue
        problem = runnable_problem(variant, device_class, available_providers, facts)
        if problem:
            rejected.append(f"{name}: {problem}")
            continue
        candidates.append(variant)
    if not candidates:
        raise DeviceError(
            f"no variant of the bundle suits device class {device_class.name}: {'; '.join(rejected)}"
        )
    order = {p: i for i, p in enumerate(device_class.precisions)}
    best = min(candidates, key=lambda v: (_latency(v), order.get(str(v.get("precision")), len(order))))
    reason = (
        f"fastest measured for {device_class.name} "
        f"(p50 {_latency(best):.3g} ms among {', '.join(str(v.get('name')) for v in candidates)})"
    )
    return VariantChoice(best, providers, reason)
