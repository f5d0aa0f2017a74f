"""Device classes: detect this machine's class and choose a bundle variant for it.

The table lives in ``contract/device_classes.yaml`` and is shared with the edge
playbooks, so the rules here are deliberately the same simple ones the playbooks
apply: a class matches when every fact listed under ``detect`` holds, classes are
tried in file order, and the first match wins.

Everything except :func:`gather_facts` and :func:`load_table` is pure, so the
choice can be tested from facts alone.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from contract import detect
from contract.detect import gpu_arch_from_compute_cap
from contract.manifest import Variant

__all__ = ["gpu_arch_from_compute_cap"]  # re-exported: one implementation, in contract/detect.py

DEFAULT_TABLE = detect.DEVICE_TABLE
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
        tensorrt_version: the TensorRT library this machine would load (``10.3.0``), when known.
        cpu_class: the CPU class (``cpu_classes`` of the table) of this processor, None if none fits.
        cpu_flags: the CPU features that some CPU class names, found here.
    """

    arch: str
    files: frozenset[str] = field(default_factory=frozenset)
    commands: frozenset[str] = field(default_factory=frozenset)
    nvidia_gpu: bool = False
    gpu_arch: str | None = None
    tensorrt_version: str | None = None
    cpu_class: str | None = None
    cpu_flags: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class VariantChoice:
    """The variant to serve and the execution providers to ask ONNX Runtime for."""

    variant: Variant
    providers: tuple[str, ...]
    reason: str
    refused: tuple[str, ...] = ()
    """TensorRT variants built for the class that this machine cannot run, each with the reason."""
    cpu_refused: tuple[str, ...] = ()
    """INT8 variants set aside because the build did not validate them for this machine's CPU class."""


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


def _read(path: Path) -> Any:
    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DeviceError(f"device table {path}: cannot read ({exc})") from exc


def load_table(path: Path = DEFAULT_TABLE) -> dict[str, DeviceClass]:
    """Read and validate the device-class table.

    Raises:
        DeviceError: the file is missing, not YAML, or malformed.
    """
    return parse_table(_read(path))


def load_tables(path: Path = DEFAULT_TABLE) -> tuple[dict[str, DeviceClass], dict[str, dict[str, Any]]]:
    """The device classes and the CPU classes of one read of the table (what the server needs)."""
    data = _read(path)
    return parse_table(data), cpu_classes(data)


def cpu_classes(data: Any) -> dict[str, dict[str, Any]]:
    """The table's ``cpu_classes`` rows, in file order (empty for a table without them).

    Raises:
        DeviceError: a row lacks ``arch``.
    """
    rows = (data if isinstance(data, dict) else {}).get("cpu_classes") or {}
    for name, row in rows.items():
        if not isinstance(row, dict) or "arch" not in row:
            raise DeviceError(f"device table: cpu class {name!r} must be a mapping with an 'arch'")
    return dict(rows)


def load_cpu_classes(path: Path = DEFAULT_TABLE) -> dict[str, dict[str, Any]]:
    """The table's ``cpu_classes`` rows, in file order (empty for a table without them).

    Raises:
        DeviceError: the file cannot be read, or a row lacks ``arch``.
    """
    return cpu_classes(_read(path))


def memory_limit_bytes() -> int:
    """The memory this process may use: its cgroup's limit (v2 ``memory.max``, v1 ``limit_in_bytes``)
    when it has one, else the machine's ``MemTotal``."""
    limits = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, group = line.split(":", 2)
        if controllers == "":
            candidates = [Path("/sys/fs/cgroup") / group.lstrip("/") / "memory.max"]
        elif "memory" in controllers.split(","):
            candidates = [Path("/sys/fs/cgroup/memory") / group.lstrip("/") / "memory.limit_in_bytes"]
        else:
            continue
        for candidate in candidates:
            try:
                text = candidate.read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 1 << 60:
                limits.append(int(text))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    return min(limits) if limits else 1 << 30


def _found(facts: DeviceFacts) -> dict[str, Any]:
    return {
        "arch": facts.arch,
        "files": facts.files,
        "commands": facts.commands,
        "nvidia_gpu": facts.nvidia_gpu,
    }


def detect_class(table: Mapping[str, DeviceClass], facts: DeviceFacts) -> DeviceClass:
    """The first class of the table whose detection facts all hold (``contract/detect.py`` decides).

    Raises:
        DeviceError: no class matches (the message lists the facts).
    """
    name = detect.match_device_class({n: {"detect": c.detect} for n, c in table.items()}, _found(facts))
    if name is not None:
        return table[name]
    raise DeviceError(
        f"no device class matches this machine (arch={facts.arch}, files={sorted(facts.files)}, "
        f"commands={sorted(facts.commands)}, nvidia_gpu={facts.nvidia_gpu}); "
        f"pass --device-class with one of {', '.join(table)}"
    )


def tensorrt_version_from_int(value: int) -> str:
    """TensorRT's ``getInferLibVersion()`` integer -> ``major.minor.patch``.

    TensorRT 10 and later encode ``major*10000 + minor*100 + patch`` (100300 for 10.3.0);
    TensorRT 8 and earlier ``major*1000 + minor*100 + patch`` (8601 for 8.6.1).
    """
    if value >= 100000:
        return f"{value // 10000}.{value // 100 % 100}.{value % 100}"
    return f"{value // 1000}.{value // 100 % 10}.{value % 100}"


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.strip().split(".")[:2])


_NVINFER_LIBS = ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so")
_TENSORRT_DISTRIBUTIONS = ("tensorrt", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-cu12-libs")


def _probe_tensorrt_version() -> str | None:
    """The TensorRT version ONNX Runtime's TensorRT EP would load here, or None when unknown.

    First the shared library the dynamic linker finds (what the EP dlopens), then the version of
    an installed ``tensorrt`` Python distribution. ONNX Runtime's Python API does not report the
    TensorRT version it was built against, so nothing else is asked.
    """
    for name in _NVINFER_LIBS:
        try:
            lib = ctypes.CDLL(name)
            lib.getInferLibVersion.restype = ctypes.c_int32
            return tensorrt_version_from_int(int(lib.getInferLibVersion()))
        except (OSError, AttributeError):
            continue
    for dist in _TENSORRT_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def gather_facts(
    table: Mapping[str, DeviceClass], cpu_classes: Mapping[str, Mapping[str, Any]] | None = None
) -> DeviceFacts:
    """Look at this machine for exactly the facts the tables ask about (``contract/detect.py``)."""
    found = detect.gather({n: {"detect": c.detect} for n, c in table.items()}, cpu_classes or {})
    return DeviceFacts(
        arch=found["arch"],
        files=frozenset(found["files"]),
        commands=frozenset(found["commands"]),
        nvidia_gpu=found["nvidia_gpu"],
        gpu_arch=found["gpu_arch"],
        tensorrt_version=_probe_tensorrt_version() if found["nvidia_gpu"] or found["gpu_arch"] else None,
        cpu_class=found["cpu_class"],
        cpu_flags=frozenset(found["cpu_flags"]),
    )


def cpu_problem(variant: Variant, facts: DeviceFacts) -> str | None:
    """Why an INT8 ONNX variant must not run on this CPU (None when the build validated it here).

    The rule is :func:`contract.detect.int8_cpu_refusal`, which the edge preflight applies too.
    """
    # The rule takes plain data: the Ansible module side has no pydantic.
    return detect.int8_cpu_refusal(
        variant.model_dump(exclude_none=True), facts.cpu_class, facts.arch, facts.cpu_flags
    )


def _latency(variant: Variant) -> float:
    value = variant.latency_ms_p50
    return math.inf if value is None else float(value)


def _tensorrt_problems(variant: Variant, available: set[str], facts: DeviceFacts) -> list[str]:
    """Every reason this machine cannot run a TensorRT variant (empty when it can).

    An engine runs only on the GPU architecture and the TensorRT major.minor it was built with,
    so both must be known here and equal to the manifest's; an unknown TensorRT version is a
    refusal, not a guess.
    """
    problems = []
    file = variant.file
    if not file.endswith(".onnx"):
        # Bundles from before the EP context wrapper: ONNX Runtime cannot load a raw engine.
        problems.append(
            f"{file} is a raw TensorRT engine; ONNX Runtime's TensorrtExecutionProvider loads an engine "
            "only through its EP context wrapper (.onnx), which this bundle lacks (rebuild it)"
        )
    arch = variant.gpu_arch
    built_with = variant.tensorrt_version
    if not arch or not built_with:
        problems.append("the manifest does not pin the engine's gpu_arch and tensorrt_version")
    if facts.gpu_arch is None:
        problems.append(f"engine built for {arch}, no NVIDIA GPU compute capability detected here")
    elif arch and facts.gpu_arch != arch:
        problems.append(f"engine built for {arch}, this GPU is {facts.gpu_arch}")
    if facts.tensorrt_version is None:
        problems.append(
            f"engine built with TensorRT {built_with}, the TensorRT version here is unknown "
            "(no libnvinfer and no tensorrt Python package found)"
        )
    elif built_with and _major_minor(str(built_with)) != _major_minor(facts.tensorrt_version):
        problems.append(
            f"engine built with TensorRT {built_with}, this machine has TensorRT {facts.tensorrt_version} "
            "(major.minor must match)"
        )
    if "TensorrtExecutionProvider" not in available:
        problems.append("needs ONNX Runtime's TensorrtExecutionProvider, which this onnxruntime build lacks")
    return problems


def runnable_problem(
    variant: Variant,
    device_class: DeviceClass,
    available_providers: Iterable[str],
    facts: DeviceFacts,
) -> str | None:
    """Why this machine cannot run ``variant`` (None when it can).

    A TensorRT variant runs through ONNX Runtime's TensorRT execution provider, so
    its file must be the EP context wrapper (an ONNX model naming the engine), and
    it needs that provider, a GPU of the architecture the engine was built for and
    the same TensorRT major.minor. Otherwise the onnx variants run, with the
    TensorRT and CUDA providers where they are available.
    """
    available = set(available_providers)
    fmt = variant.format
    if fmt not in device_class.formats:
        return f"format {fmt!r} is not run on device class {device_class.name} ({list(device_class.formats)})"
    if fmt == "tensorrt":
        problems = _tensorrt_problems(variant, available, facts)
        if problems:
            return "; ".join(problems)
    elif fmt != "onnx":
        return f"unknown format {fmt!r}"
    if not any(p in available for p in device_class.providers):
        return f"none of the providers {list(device_class.providers)} is available ({sorted(available)})"
    return None


def choose_variant(
    variants: Sequence[Variant],
    device_class: DeviceClass,
    available_providers: Sequence[str],
    facts: DeviceFacts,
    requested: str = "auto",
    *,
    exclude: Mapping[str, str] | None = None,
) -> VariantChoice:
    """Choose the variant to serve and its execution providers.

    With ``requested="auto"``: among the variants listed for the device class,
    in a format and precision the class runs, that this machine can run, take
    the one the manifest measured fastest (``metrics.latency_ms_p50``); the
    class's precision order breaks ties. Every variant in a manifest already
    passed the prebuild's accuracy gate.

    Args:
        variants: the manifest's variants.
        device_class: the class of this machine.
        available_providers: ``onnxruntime.get_available_providers()``.
        facts: the detection facts (for the GPU architecture).
        requested: ``"auto"`` or a variant name.
        exclude: variants already tried and failed here, by name, with the reason (``"auto"`` only).

    Returns:
        The choice, with providers in the class's order, filtered to those available.

    Raises:
        DeviceError: the requested variant is unknown or cannot run here, or no
            variant suits the class.
    """
    providers = tuple(p for p in device_class.providers if p in set(available_providers))
    exclude = exclude or {}
    by_name = {v.name: v for v in variants}
    if requested != "auto":
        if requested not in by_name:
            raise DeviceError(f"--variant {requested!r} is not in the bundle (it has {', '.join(by_name)})")
        variant = by_name[requested]
        problem = runnable_problem(variant, device_class, available_providers, facts)
        if problem:
            raise DeviceError(f"variant {requested!r} cannot run on this machine: {problem}")
        unvalidated = cpu_problem(variant, facts)
        if unvalidated:
            # The operator's explicit choice stands; the on-device quality gate still has the last word.
            return VariantChoice(
                variant, providers, "requested with --variant", cpu_refused=(f"{requested}: {unvalidated}",)
            )
        return VariantChoice(variant, providers, "requested with --variant")

    candidates = []
    rejected = []
    refused = []
    cpu_refused = []
    for variant in variants:
        name = variant.name
        if name in exclude:
            rejected.append(f"{name}: {exclude[name]}")
            refused.append(f"{name}: {exclude[name]}")
            continue
        if device_class.name not in variant.device_classes:
            rejected.append(f"{name}: not built for {device_class.name}")
            continue
        if variant.precision not in device_class.precisions:
            rejected.append(f"{name}: precision {variant.precision} not used on {device_class.name}")
            continue
        problem = runnable_problem(variant, device_class, available_providers, facts)
        if problem:
            rejected.append(f"{name}: {problem}")
            if variant.format == "tensorrt":
                refused.append(f"{name}: {problem}")
            continue
        problem = cpu_problem(variant, facts)
        if problem:
            rejected.append(f"{name}: {problem}")
            cpu_refused.append(f"{name}: {problem}")
            continue
        candidates.append(variant)
    if not candidates:
        raise DeviceError(
            f"no variant of the bundle suits device class {device_class.name}: {'; '.join(rejected)}"
        )
    order = {p: i for i, p in enumerate(device_class.precisions)}
    best = min(candidates, key=lambda v: (_latency(v), order.get(v.precision, len(order))))
    reason = (
        f"fastest measured for {device_class.name} "
        f"(p50 {_latency(best):.3g} ms among {', '.join(v.name for v in candidates)})"
    )
    return VariantChoice(best, providers, reason, tuple(refused), tuple(cpu_refused))


# --- tuned serving settings (python -m serving.tune) ----------------------------------------------
TUNED_SCHEMA_VERSION = 1
TUNED_ENV = {
    "max_batch_size": "DUALDEPLOY_MAX_BATCH_SIZE",
    "max_queue_delay_ms": "DUALDEPLOY_MAX_QUEUE_DELAY_MS",
    "threads": "DUALDEPLOY_THREADS",
    "instances": "DUALDEPLOY_INSTANCES",
}
"""The settings a tuner may record, and the server's environment variables that carry them.

``instances`` may be left out (sidecars written before it was tunable): one instance.

Nothing else can be tuned: the queue limit, the timeouts, the body, element and memory budgets are safety
bounds, and a tuned file that names one is refused. The batch size is further capped by the bundle's
``serving.max_batch_size`` (the largest batch the build proved), so tuning can only tighten it.
"""
MAX_TUNED_QUEUE_DELAY_MS = 100.0
"""A queue delay above this is a latency bug, not a tuning result."""
MAX_INSTANCES = 64
"""The most concurrent model runs a server takes (``--instances``)."""


@dataclass(frozen=True)
class TunedSettings:
    """The tuned settings of one device class, from a sidecar file written by ``serving.tune``."""

    device_class: str
    max_batch_size: int
    max_queue_delay_ms: float
    threads: int
    instances: int = 1

    def environment(self) -> dict[str, str]:
        """The settings as the server's environment (an ``EnvironmentFile``, a Pod's ``env``)."""
        return {env: str(getattr(self, name)) for name, env in TUNED_ENV.items()}


def parse_tuned(
    data: Any, device_class: str, *, model: str, max_batch_size: int, source: str = "tuned settings"
) -> TunedSettings | None:
    """Validate a parsed sidecar and return the settings for ``device_class`` (None: none tuned for it).

    Args:
        data: the parsed YAML.
        device_class: the class of the device that will serve.
        model: the bundle's model name; the sidecar must have been tuned for it.
        max_batch_size: the bundle's ``serving.max_batch_size``, the cap of a tuned batch size.
        source: the file, for messages.

    Raises:
        DeviceError: naming the file and the key that is missing, unknown, or out of bounds.
    """
    if not isinstance(data, dict) or data.get("schema_version") != TUNED_SCHEMA_VERSION:
        raise DeviceError(f"{source}: key schema_version: must be {TUNED_SCHEMA_VERSION}")
    if data.get("model") != model:
        raise DeviceError(f"{source}: key model: tuned for {data.get('model')!r}, this bundle is {model!r}")
    classes = data.get("classes")
    if not isinstance(classes, dict):
        raise DeviceError(f"{source}: key classes: must be a mapping of device class to settings")
    entry = classes.get(device_class)
    if entry is None:
        return None
    where = f"classes.{device_class}.settings"
    settings = entry.get("settings") if isinstance(entry, dict) else None
    if not isinstance(settings, dict):
        raise DeviceError(f"{source}: key {where}: must be a mapping")
    for key in settings:
        if key not in TUNED_ENV:
            raise DeviceError(
                f"{source}: key {where}.{key}: not a tunable setting ({', '.join(TUNED_ENV)}); "
                "queue limits, timeouts and budgets are safety bounds, never tuned"
            )
    missing = [key for key in TUNED_ENV if key not in settings and key != "instances"]
    if missing:
        raise DeviceError(f"{source}: key {where}.{missing[0]}: missing")
    batch, delay, threads = (settings[k] for k in ("max_batch_size", "max_queue_delay_ms", "threads"))
    instances = settings.get("instances", 1)
    if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= max_batch_size:
        raise DeviceError(
            f"{source}: key {where}.max_batch_size: {batch!r} is not an integer from 1 to the bundle's "
            f"serving.max_batch_size ({max_batch_size})"
        )
    if (
        not isinstance(delay, int | float)
        or isinstance(delay, bool)
        or not 0 <= delay <= MAX_TUNED_QUEUE_DELAY_MS
    ):
        raise DeviceError(
            f"{source}: key {where}.max_queue_delay_ms: {delay!r} is not a number from 0 to "
            f"{MAX_TUNED_QUEUE_DELAY_MS:g}"
        )
    if not isinstance(threads, int) or isinstance(threads, bool) or not 0 <= threads <= 1024:
        raise DeviceError(
            f"{source}: key {where}.threads: {threads!r} is not an integer from 0 (ORT's default)"
        )
    if not isinstance(instances, int) or isinstance(instances, bool) or not 1 <= instances <= MAX_INSTANCES:
        raise DeviceError(
            f"{source}: key {where}.instances: {instances!r} is not an integer from 1 to {MAX_INSTANCES}"
        )
    return TunedSettings(device_class, batch, float(delay), threads, instances)


def load_tuned(path: Path, device_class: str, *, model: str, max_batch_size: int) -> TunedSettings | None:
    """Read a sidecar written by ``python -m serving.tune`` (see :func:`parse_tuned`).

    Raises:
        DeviceError: the file cannot be read, is not YAML, or has a bad key (named).
    """
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DeviceError(f"{path}: cannot read the tuned settings ({exc})") from exc
    return parse_tuned(data, device_class, model=model, max_batch_size=max_batch_size, source=str(path))
