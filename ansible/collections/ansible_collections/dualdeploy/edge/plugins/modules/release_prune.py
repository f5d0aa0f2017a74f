#!/usr/bin/python
# ruff: noqa: E402  (Ansible modules put DOCUMENTATION before their imports by convention)
"""Ansible module: remove old releases, keeping the newest N and every linked one."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: release_prune
short_description: Keep the newest N releases and every release a link points at
description:
  - Releases are ordered by the modification time of their folder (the rename that finalized them).
  - A release that any of C(protect) links resolves to is never removed, nor is its sibling
    C(<version>.trt-cache) folder.
  - A release that failed its health gate (a C(<failed_dir>/<version>.json) record, written by
    dualdeploy-ctl) does not count against the releases to keep, and is removed with its record.
  - Leftover staging folders of other versions (an interrupted rollout) are removed too.
options:
  releases_dir:
    description: The folder that holds one sub-folder per release.
    type: path
    required: true
  keep:
    description: How many releases to keep (at least 2, so that a rollback target exists).
    type: int
    default: 3
  protect:
    description: Links (e.g. C(current)) whose targets must survive.
    type: list
    elements: path
    default: []
  protect_versions:
    description: Versions that must survive whatever their age (e.g. the one being rolled out).
    type: list
    elements: str
    default: []
  failed_dir:
    description: Folder of the failed-release records (one C(<version>.json) each).
    type: path
author:
  - dualdeploy
"""

EXAMPLES = r"""
- name: Remove releases beyond the newest three.
  dualdeploy.edge.release_prune:
    releases_dir: /opt/dualdeploy/releases
    keep: 3
    protect: [/opt/dualdeploy/current, /opt/dualdeploy/previous]
    failed_dir: /opt/dualdeploy/var/failed
"""

RETURN = r"""
removed:
  description: Names of the folders removed.
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
            "releases_dir": {"type": "path", "required": True},
            "keep": {"type": "int", "default": 3},
            "protect": {"type": "list", "elements": "path", "default": []},
            "protect_versions": {"type": "list", "elements": "str", "default": []},
            "failed_dir": {"type": "path"},
        },
        supports_check_mode=True,
    )
    releases, keep = module.params["releases_dir"], module.params["keep"]
    if keep < 2:
        module.fail_json(msg=f"keep={keep}: must be at least 2 so that a rollback target remains")
    if not os.path.isdir(releases):
        module.exit_json(changed=False, removed=[])
    protected = set(module.params["protect_versions"])
    for link in module.params["protect"]:
        if os.path.islink(link):
            protected.add(os.path.basename(os.path.realpath(link)))
    failed_dir = module.params["failed_dir"]
    failed = set()
    if failed_dir and os.path.isdir(failed_dir):
        failed = {n[: -len(".json")] for n in os.listdir(failed_dir) if n.endswith(".json")}
    names = [n for n in os.listdir(releases) if os.path.isdir(os.path.join(releases, n))]
    versions = sorted(
        (n for n in names if not n.startswith(".") and not n.endswith(".trt-cache")),
        key=lambda n: os.stat(os.path.join(releases, n)).st_mtime,
        reverse=True,
    )
    good = [v for v in versions if v not in failed]
    survivors = set(good[:keep]) | protected
    doomed = [v for v in versions if v not in survivors]
    doomed += [n for n in names if n.endswith(".trt-cache") and n[: -len(".trt-cache")] not in survivors]
    doomed += [n for n in names if n.startswith(".staging-") and n[len(".staging-") :] not in protected]
    if not module.check_mode:
        for name in doomed:
            shutil.rmtree(os.path.join(releases, name))
            if name in failed:
                os.unlink(os.path.join(failed_dir, f"{name}.json"))
    module.exit_json(changed=bool(doomed), removed=sorted(doomed))


if __name__ == "__main__":
    main()
