#!/usr/bin/python
# ruff: noqa: E402  (Ansible modules put DOCUMENTATION before their imports by convention)
"""Ansible module: switch a symlink to a new target atomically."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: atomic_link
short_description: Point a symlink at a new target by renaming a temporary link over it
description:
  - Creates C(<path>.tmp-<pid>) pointing at C(target) and renames it over C(path), so readers always see
    either the old or the new target and never a missing link (never delete-then-create).
  - Reports the previous target so that a failed health gate can switch back.
options:
  path:
    description: The symlink to switch, e.g. C(/opt/dualdeploy/current).
    type: path
    required: true
  target:
    description: The new target. Relative targets are kept relative (resolved from the link's folder).
    type: str
    required: true
author:
  - dualdeploy
"""

EXAMPLES = r"""
- name: Switch the current link to the new release.
  dualdeploy.edge.atomic_link:
    path: /opt/dualdeploy/current
    target: releases/3f2a9c1d0b7e
  register: switch
"""

RETURN = r"""
previous:
  description: The link's target before the switch, or null when the link did not exist.
  returned: always
  type: str
"""

import os

from ansible.module_utils.basic import AnsibleModule


def switch(path: str, target: str) -> tuple[bool, str | None]:
    """Point ``path`` at ``target``; return (changed, previous target)."""
    previous = os.readlink(path) if os.path.islink(path) else None
    if os.path.lexists(path) and previous is None:
        raise ValueError(f"{path} exists and is not a symlink; refusing to replace it")
    if previous == target:
        return False, previous
    base = os.path.dirname(path) or "."
    if not os.path.exists(os.path.join(base, target)):
        raise ValueError(f"target {target} does not exist (from {base})")
    temp = f"{path}.tmp-{os.getpid()}"
    if os.path.lexists(temp):
        os.unlink(temp)
    os.symlink(target, temp)
    os.replace(temp, path)
    return True, previous


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "target": {"type": "str", "required": True},
        },
        supports_check_mode=False,
    )
    try:
        changed, previous = switch(module.params["path"], module.params["target"])
    except (OSError, ValueError) as exc:
        module.fail_json(msg=f"cannot switch {module.params['path']}: {exc}")
    module.exit_json(changed=changed, previous=previous, target=module.params["target"])


if __name__ == "__main__":
    main()
