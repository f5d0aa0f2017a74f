#!/usr/bin/python
# ruff: noqa: E402  (Ansible modules put DOCUMENTATION before their imports by convention)
"""Ansible module: remove server code versions and unpacked wheelhouses that no release needs anymore."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: code_prune
short_description: Keep the newest N server code versions and drop installed wheelhouses
description:
  - Server code lives in C(<prefix>/app/<hash>) with C(<prefix>/app/current) pointing at the one in use.
    Versions are ordered by the modification time of their folder; the newest C(keep) stay (the current
    one always), so the code a rollback restarts with is still there.
  - The wheelhouse (C(<prefix>/runtime/wheelhouse.tar) and its unpacked C(wheels/)) is only the source of
    the venv; once the venv records that it was installed from it, it is removed.
options:
  prefix:
    description: The installation prefix.
    type: path
    required: true
  keep:
    description: How many server code versions to keep (at least 2).
    type: int
    default: 2
  runtime_hash:
    description: Hash of the wheelhouse the venv must have been installed from before it is removed.
    type: str
    required: true
author:
  - dualdeploy
"""

EXAMPLES = r"""
- name: Remove old server code and the installed wheelhouse.
  dualdeploy.edge.code_prune:
    prefix: /opt/dualdeploy
    keep: 2
    runtime_hash: 3f2a9c1d0b7e
"""

RETURN = r"""
removed:
  description: Paths removed, relative to the prefix.
  returned: always
  type: list
  elements: str
"""

import os
import shutil

from ansible.module_utils.basic import AnsibleModule


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "prefix": {"type": "path", "required": True},
            "keep": {"type": "int", "default": 2},
            "runtime_hash": {"type": "str", "required": True},
        },
        supports_check_mode=True,
    )
    prefix, keep = module.params["prefix"], module.params["keep"]
    if keep < 2:
        module.fail_json(msg=f"keep={keep}: must be at least 2 so that a rollback restarts with its code")
    doomed: list[str] = []
    app = os.path.join(prefix, "app")
    if os.path.isdir(app):
        current = os.path.basename(os.path.realpath(os.path.join(app, "current")))
        versions = sorted(
            (n for n in os.listdir(app) if n != "current" and os.path.isdir(os.path.join(app, n))),
            key=lambda n: os.stat(os.path.join(app, n)).st_mtime,
            reverse=True,
        )
        survivors = set(versions[:keep]) | {current}
        doomed += [f"app/{n}" for n in versions if n not in survivors]
    stamp = os.path.join(prefix, "venv", f".dualdeploy-runtime-{module.params['runtime_hash']}")
    if os.path.exists(stamp):
        runtime = os.path.join(prefix, "runtime")
        doomed += [
            f"runtime/{n}" for n in ("wheelhouse.tar", "wheels") if os.path.lexists(os.path.join(runtime, n))
        ]
    if not module.check_mode:
        for rel in doomed:
            path = os.path.join(prefix, rel)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
    module.exit_json(changed=bool(doomed), removed=doomed)


if __name__ == "__main__":
    main()
