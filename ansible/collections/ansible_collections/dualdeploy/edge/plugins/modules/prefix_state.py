#!/usr/bin/python
# ruff: noqa: E402  (Ansible modules put DOCUMENTATION before their imports by convention)
"""Ansible module: create the install prefix's folders and report what the device already has."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: prefix_state
short_description: Create the prefix folders and report the installed runtime, server code and releases
description:
  - One round trip instead of a stat per fact, so that a re-run of a finished rollout stays cheap.
  - Creates missing C(folders) under C(prefix) (mode 0755) and reports them; reports whether the venv was
    installed from the given wheelhouse, whether the given server code version is unpacked, and where
    the C(current) link points.
options:
  prefix:
    description: The install prefix.
    type: path
    required: true
  folders:
    description: Folders (relative to the prefix) that must exist.
    type: list
    elements: str
    default: []
  runtime_hash:
    description: The wheelhouse hash the venv must have been installed from.
    type: str
    required: true
  app_hash:
    description: The server code archive hash that must be unpacked under app/.
    type: str
    required: true
author:
  - dualdeploy
"""

EXAMPLES = r"""
- name: Create the prefix folders and read what the device has.
  dualdeploy.edge.prefix_state:
    prefix: /opt/dualdeploy
    folders: [runtime, bin, etc, var/log]
    runtime_hash: 0123456789abcdef
    app_hash: fedcba9876543210
  register: state
"""

RETURN = r"""
created:
  description: Folders that were created.
  returned: always
  type: list
  elements: str
runtime_installed:
  description: The venv was installed from the wheelhouse with C(runtime_hash).
  returned: always
  type: bool
app_unpacked:
  description: The server code with C(app_hash) is unpacked and complete.
  returned: always
  type: bool
current:
  description: The target of the C(current) link, or null.
  returned: always
  type: str
"""

import os

from ansible.module_utils.basic import AnsibleModule


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "prefix": {"type": "path", "required": True},
            "folders": {"type": "list", "elements": "str", "default": []},
            "runtime_hash": {"type": "str", "required": True},
            "app_hash": {"type": "str", "required": True},
        },
        supports_check_mode=True,
    )
    prefix = module.params["prefix"]
    created = []
    for rel in module.params["folders"]:
        path = os.path.join(prefix, rel)
        if not os.path.isdir(path):
            if not module.check_mode:
                os.makedirs(path, mode=0o755, exist_ok=True)
            created.append(rel)
    current = os.path.join(prefix, "current")
    module.exit_json(
        changed=bool(created),
        created=created,
        runtime_installed=os.path.exists(
            os.path.join(prefix, "venv", f".dualdeploy-runtime-{module.params['runtime_hash']}")
        ),
        app_unpacked=os.path.exists(os.path.join(prefix, "app", module.params["app_hash"], ".complete")),
        current=os.readlink(current) if os.path.islink(current) else None,
    )


if __name__ == "__main__":
    main()
