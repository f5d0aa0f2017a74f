"""Which CPU classes an INT8 artefact claims, and how each can be checked on the build host.

ONNX Runtime chooses its integer kernels by CPU features, and they do not all compute the same
numbers (on x86-64 without VNNI the u8s8 kernels sum in 16 bits). So the INT8 gate runs once per CPU
class of ``contract/device_classes.yaml``:

- **native**: the build host belongs to the class;
- **emulated**: the class names an emulator that is installed here (``qemu-x86_64 -cpu Haswell`` for
  the AVX2 class), and ``python -m model_build.emulate`` runs the model under it;
- **unverified**: neither; recorded as such, never as passed.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from contract import detect
from contract.bundle import load_tensors, save_tensors

from .errors import BuildError
from .spec import Spec

DEVICE_TABLE = detect.DEVICE_TABLE
REPO_ROOT = Path(__file__).resolve().parent.parent
EMULATOR_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class ClassPlan:
    """How one claimed CPU class will be gated here."""

    cpu_class: str
    via: str
    """``native``, ``emulated``, or ``unverified``."""
    emulator: tuple[str, ...] = ()
    reason: str = ""
    """Why the class is unverified (empty otherwise)."""


def load_table(path: Path = DEVICE_TABLE) -> dict[str, Any]:
    """The parsed device-class table (device classes and CPU classes)."""
    return dict(yaml.safe_load(path.read_text()))


def claimed_classes(spec: Spec, table: Mapping[str, Any]) -> list[str]:
    """The CPU classes the INT8 variant must be right on (``quantize.cpu_classes`` or its default).

    The default is every CPU class of an architecture that one of ``quantize.device_classes`` detects.

    Raises:
        BuildError: a named CPU class is not in the table.
    """
    cpu_classes = table.get("cpu_classes") or {}
    if spec.quantize.cpu_classes:
        unknown = [c for c in spec.quantize.cpu_classes if c not in cpu_classes]
        if unknown:
            raise BuildError(
                "quantize",
                f"quantize.cpu_classes: {unknown} not in {DEVICE_TABLE} "
                f"(cpu_classes: {', '.join(cpu_classes)})",
            )
        return list(spec.quantize.cpu_classes)
    devices = table.get("classes") or {}
    arches = {
        (devices.get(name) or {}).get("detect", {}).get("arch") for name in spec.quantize.device_classes
    }
    return [name for name, row in cpu_classes.items() if row.get("arch") in arches]


def host_cpu_class(table: Mapping[str, Any]) -> str | None:
    """This build host's CPU class, detected by the shared module (``contract/detect.py``)."""
    return detect.cpu_class(table.get("cpu_classes") or {}, platform.machine(), detect.read_cpu_flags())


def plan(
    spec: Spec,
    table: Mapping[str, Any],
    *,
    arch: str | None = None,
    flags: frozenset[str] | None = None,
) -> list[ClassPlan]:
    """For each claimed CPU class: native, emulated (emulator installed), or unverified with the reason.

    Args:
        spec: the model spec.
        table: the parsed device table.
        arch: the build host's architecture (default: this machine's).
        flags: the build host's CPU flags (default: this machine's).
    """
    cpu_classes = table.get("cpu_classes") or {}
    arch = arch or platform.machine()
    flags = detect.read_cpu_flags() if flags is None else flags
    host = detect.cpu_class(cpu_classes, arch, flags)
    plans = []
    for name in claimed_classes(spec, table):
        row = cpu_classes[name]
        emulator = tuple(str(a) for a in row.get("emulator") or ())
        if name == host:
            plans.append(ClassPlan(name, "native"))
        elif emulator and arch == "x86_64" and row.get("arch") == "x86_64":
            if shutil.which(emulator[0]):
                plans.append(ClassPlan(name, "emulated", emulator))
            else:
                plans.append(
                    ClassPlan(
                        name,
                        "unverified",
                        reason=f"its emulator {emulator[0]} is not installed here (Debian package qemu-user)",
                    )
                )
        else:
            needs = detect.missing_cpu_features(row, arch, flags)
            # A host that has every feature of a lower class still runs its own, faster kernels:
            # ONNX Runtime dispatches on the best instruction set present, so it can't stand in.
            why = f"lacking {', '.join(needs)}" if needs else f"whose kernels differ from {name}'s"
            plans.append(
                ClassPlan(
                    name,
                    "unverified",
                    reason=(
                        f"this build host is {host or 'of no CPU class'}, {why}, "
                        "and no emulator runs this class"
                    ),
                )
            )
    return plans


def run_emulated(
    emulator: tuple[str, ...], model: Path, inputs: Sequence[Mapping[str, np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    """Run ``model`` on each input set inside one emulated Python process.

    Raises:
        BuildError: the emulator fails or times out, with the last lines it printed.
    """
    with tempfile.TemporaryDirectory(prefix="emulate.") as scratch:
        folder = Path(scratch)
        argv = [*emulator, sys.executable, "-m", "model_build.emulate", str(model)]
        outs = []
        for i, arrays in enumerate(inputs):
            save_tensors(folder / f"in{i}.npz", arrays)
            outs.append(folder / f"out{i}.npz")
            argv += ["--run", str(folder / f"in{i}.npz"), str(outs[-1])]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        try:
            proc = subprocess.run(
                argv,
                cwd=REPO_ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=EMULATOR_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BuildError("quantize", f"{' '.join(emulator)}: {type(exc).__name__}: {exc}") from exc
        if proc.returncode != 0:
            # qemu warns once per CPU feature it cannot emulate ("TCG doesn't support requested feature").
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "TCG doesn't support" not in ln]
            raise BuildError(
                "quantize", f"{' '.join(emulator)} exited {proc.returncode}: {' / '.join(lines[-3:])}"
            )
        return [load_tensors(path) for path in outs]
