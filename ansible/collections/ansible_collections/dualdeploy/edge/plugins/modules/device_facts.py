#!/usr/bin/python
# ruff: noqa: E402  (Ansible modules put DOCUMENTATION before their imports by convention)
"""Ansible module: detect a device's class from the shared device-class table."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: device_facts
short_description: Detect the device class of a host from serving/device_classes.yaml
description:
  - Gathers exactly the facts that the device-class table's C(detect) entries name (architecture, files that
    must exist, commands that must be on PATH, whether an NVIDIA driver is present) plus the CPU flags that
    matter for INT8, and returns the first class whose every fact holds.
  - Never changes anything on the host.
options:
  classes:
    description: The C(classes) map of the device-class table, in table order.
    type: dict
    required: true
  path:
    description: A path whose file system's free space is reported (its nearest existing ancestor is used).
    type: path
author:
  - dualdeploy
"""

EXAMPLES = r"""
- name: Detect the device class from the shared table.
  dualdeploy.edge.device_facts:
    classes: "{{ table.classes }}"
  register: device
"""

RETURN = r"""
device_class:
  description: The first class whose detection facts all hold, or null.
  returned: always
  type: str
free_mb:
  description: Free MiB on the file system of C(path) (null without C(path)).
  returned: always
  type: int
found:
  description: >-
    The facts found: arch, files and commands that exist, nvidia_gpu, cpu_flags, gpu_arch.
  returned: always
  type: dict
"""

import os
import platform
import shutil

from ansible.module_utils.basic import AnsibleModule

# CPU flags worth reporting: they decide whether INT8 pays off on x86 (VNNI) and Arm (dot product).
_INTERESTING_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")

# Jetson module → CUDA compute capability, read from the device tree.
_TEGRA_GPU_ARCH = {"tegra234": "sm_87", "tegra194": "sm_72", "tegra186": "sm_62", "tegra210": "sm_53"}


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return sorted(f for f in _INTERESTING_FLAGS if f in flags)


def _jetson_gpu_arch() -> str | None:
    try:
        with open("/proc/device-tree/compatible", "rb") as handle:
            compatible = handle.read().decode(errors="replace")
    except OSError:
        return None
    for soc, arch in _TEGRA_GPU_ARCH.items():
        if soc in compatible:
            return arch
    return None


def gather(classes: dict) -> dict:
    """Collect every fact the table's detect entries refer to."""
    files = sorted({f for c in classes.values() for f in (c.get("detect") or {}).get("files", [])})
    commands = sorted({x for c in classes.values() for x in (c.get("detect") or {}).get("commands", [])})
    return {
        "arch": platform.machine(),
        "files": [f for f in files if os.path.exists(f)],
        "commands": [x for x in commands if shutil.which(x)],
        "nvidia_gpu": bool(shutil.which("nvidia-smi") or os.path.exists("/proc/driver/nvidia")),
        "cpu_flags": _cpu_flags(),
        "gpu_arch": _jetson_gpu_arch(),
    }


def match(classes: dict, found: dict) -> str | None:
    """Return the first class (table order) whose every detect fact holds."""
    for name, entry in classes.items():
        detect = entry.get("detect") or {}
        if "arch" in detect and detect["arch"] != found["arch"]:
            continue
        if any(f not in found["files"] for f in detect.get("files", [])):
            continue
        if any(c not in found["commands"] for c in detect.get("commands", [])):
            continue
        if "nvidia_gpu" in detect and bool(detect["nvidia_gpu"]) != found["nvidia_gpu"]:
            continue
        return name
    return None


def free_mb(path: str) -> int:
    """Free MiB for unprivileged users on the file system that holds ``path`` (or its nearest ancestor)."""
    while not os.path.exists(path):
        path = os.path.dirname(path) or "/"
    stat = os.statvfs(path)
    return int(stat.f_bavail * stat.f_frsize // (1 << 20))


def main() -> None:
    module = AnsibleModule(
        argument_spec={"classes": {"type": "dict", "required": True}, "path": {"type": "path"}},
        supports_check_mode=True,
    )
    classes = module.params["classes"]
    found = gather(classes)
    space = free_mb(module.params["path"]) if module.params["path"] else None
    module.exit_json(changed=False, found=found, device_class=match(classes, found), free_mb=space)


if __name__ == "__main__":
    main()
