#!/usr/bin/python
# ruff: noqa: E402  (Ansible modules put DOCUMENTATION before their imports by convention)
"""Ansible module: detect a device's class from the shared device-class table."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: device_facts
short_description: Detect the device class of a host from contract/device_classes.yaml
description:
  - Gathers exactly the facts that the device-class table's C(detect) entries name (architecture, files that
    must exist, commands that must be on PATH, whether an NVIDIA driver is present) plus the CPU flags that
    the C(cpu_classes) name, and returns the first class whose every fact holds and the CPU class.
  - Never changes anything on the host.
options:
  classes:
    description: The C(classes) map of the device-class table, in table order.
    type: dict
    required: true
  cpu_classes:
    description: The C(cpu_classes) map of the device-class table, in table order.
    type: dict
    default: {}
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
cpu_class:
  description: The first CPU class whose architecture and CPU features this host has, or null.
  returned: always
  type: str
found:
  description: >-
    The facts found: arch, files and commands that exist, nvidia_gpu, cpu_flags (those a CPU class names),
    cpu_class, gpu_arch.
  returned: always
  type: dict
"""

import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.dualdeploy.edge.plugins.module_utils.detect import gather, match_device_class

# Detection is contract/detect.py, shipped here as this collection's module_utils (a byte-for-byte copy
# that a test compares): the device and the server decide the device and CPU class the same way.


def match(classes: dict, found: dict) -> str | None:
    """Return the first class (table order) whose every detect fact holds."""
    return match_device_class(classes, found)


def free_mb(path: str) -> int:
    """Free MiB for unprivileged users on the file system that holds ``path`` (or its nearest ancestor)."""
    while not os.path.exists(path):
        path = os.path.dirname(path) or "/"
    stat = os.statvfs(path)
    return int(stat.f_bavail * stat.f_frsize // (1 << 20))


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "classes": {"type": "dict", "required": True},
            "cpu_classes": {"type": "dict", "default": {}},
            "path": {"type": "path"},
        },
        supports_check_mode=True,
    )
    classes = module.params["classes"]
    found = gather(classes, module.params["cpu_classes"])
    space = free_mb(module.params["path"]) if module.params["path"] else None
    module.exit_json(
        changed=False,
        found=found,
        device_class=match(classes, found),
        cpu_class=found["cpu_class"],
        free_mb=space,
    )


if __name__ == "__main__":
    main()
