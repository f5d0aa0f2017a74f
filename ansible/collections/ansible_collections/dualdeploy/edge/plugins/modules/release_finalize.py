#!/usr/bin/python
# ruff: noqa: E402  (Ansible modules put DOCUMENTATION before their imports by convention)
"""Ansible module: turn a verified staging folder into a release folder."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: release_finalize
short_description: Rename releases/.staging-<version>/ to releases/<version>/
description:
  - One C(rename) on the same file system, so a release folder is either complete or absent.
  - Call it only after the staging folder passed verification.
options:
  releases_dir:
    description: The folder that holds one sub-folder per release.
    type: path
    required: true
  version:
    description: The bundle version.
    type: str
    required: true
author:
  - dualdeploy
"""

EXAMPLES = r"""
- name: Turn the verified staging folder into the release folder.
  dualdeploy.edge.release_finalize:
    releases_dir: /opt/dualdeploy/releases
    version: 3f2a9c1d0b7e
"""

RETURN = r"""
release_dir:
  description: The release folder.
  returned: always
  type: str
"""

import os

from ansible.module_utils.basic import AnsibleModule


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "releases_dir": {"type": "path", "required": True},
            "version": {"type": "str", "required": True},
        },
        supports_check_mode=False,
    )
    releases, version = module.params["releases_dir"], module.params["version"]
    final = os.path.join(releases, version)
    staging = os.path.join(releases, f".staging-{version}")
    if os.path.isdir(final):
        module.exit_json(changed=False, release_dir=final)
    if not os.path.isdir(staging):
        module.fail_json(msg=f"staging folder {staging} does not exist; nothing to finalize")
    os.rename(staging, final)
    module.exit_json(changed=True, release_dir=final)


if __name__ == "__main__":
    main()
