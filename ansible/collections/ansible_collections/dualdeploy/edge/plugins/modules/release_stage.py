#!/usr/bin/python
# ruff: noqa: E402  (Ansible modules put DOCUMENTATION before their imports by convention)
"""Ansible module: stage a bundle release, reusing files that earlier releases already hold."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: release_stage
short_description: Prepare releases/.staging-<version>/ and list the bundle files that must still be sent
description:
  - When C(releases/<version>/) already exists, reports C(present=true) and changes nothing.
  - Otherwise creates (or resumes) C(releases/.staging-<version>/). A file that the staging folder already
    holds with the right sha256 is kept (an interrupted rollout resumes) and any file it holds that the
    manifest does not list is deleted (an interrupted copy's temporary file); a file whose sha256 an earlier
    release holds is hard-linked from it; every other file is reported in C(missing) for the controller
    to send.
  - The manifest and its signature are always reported missing: they are small and name the version.
  - Files in earlier releases are trusted only as a source of bytes; the staging folder is verified in full
    (signature and every checksum) before it becomes a release.
options:
  releases_dir:
    description: The folder that holds one sub-folder per release.
    type: path
    required: true
  version:
    description: The bundle version (manifest C(version)).
    type: str
    required: true
  files:
    description: The manifest's C(files) map, relpath → {sha256, size}.
    type: dict
    required: true
author:
  - dualdeploy
"""

EXAMPLES = r"""
- name: Stage the release and reuse files that earlier releases already hold.
  dualdeploy.edge.release_stage:
    releases_dir: /opt/dualdeploy/releases
    version: 3f2a9c1d0b7e
    files: "{{ manifest.files }}"
  register: stage
"""

RETURN = r"""
present:
  description: The release folder already exists; nothing was staged.
  returned: always
  type: bool
staging_dir:
  description: The staging folder to send the missing files into.
  returned: always
  type: str
missing:
  description: Relative paths that the controller must send (always includes manifest.json and its signature).
  returned: always
  type: list
  elements: str
linked:
  description: Relative paths hard-linked from earlier releases.
  returned: always
  type: list
  elements: str
missing_bytes:
  description: Total size of the missing files listed in the manifest.
  returned: always
  type: int
removed:
  description: Files of a resumed staging folder that the manifest does not list (an interrupted copy's
    temporary files), deleted.
  returned: always
  type: list
  elements: str
"""

import hashlib
import json
import os
import re
import shutil

from ansible.module_utils.basic import AnsibleModule

_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_META = ("manifest.json", "manifest.json.sig")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _known_files(releases_dir: str, skip: str) -> dict[str, str]:
    """sha256 → absolute path, from the manifests of earlier releases."""
    known: dict[str, str] = {}
    for name in sorted(os.listdir(releases_dir)):
        release = os.path.join(releases_dir, name)
        if name.startswith(".") or name == skip or not os.path.isdir(release):
            continue
        try:
            with open(os.path.join(release, "manifest.json"), encoding="utf-8") as handle:
                files = json.load(handle).get("files", {})
        except (OSError, ValueError):
            continue
        for rel, entry in files.items():
            path = os.path.join(release, rel)
            if isinstance(entry, dict) and os.path.isfile(path):
                known.setdefault(str(entry.get("sha256")), path)
    return known


def _remove_strays(staging: str, listed: set) -> list:
    """Delete what a resumed staging folder holds beyond the bundle's files; return their paths.

    An interrupted transfer (a power cut, a dropped link) can leave a copy's temporary file behind,
    which the verifier would rightly refuse as a file the manifest does not list.
    """
    removed = []
    for folder, _dirs, names in os.walk(staging):
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, staging)
            if rel not in listed:
                os.unlink(path)
                removed.append(rel)
    return sorted(removed)


def stage(releases_dir: str, version: str, files: dict) -> dict:
    """Create or resume the staging folder; return what is present, linked and missing."""
    final = os.path.join(releases_dir, version)
    staging = os.path.join(releases_dir, f".staging-{version}")
    if os.path.isdir(final):
        return {
            "changed": False,
            "present": True,
            "staging_dir": staging,
            "missing": [],
            "linked": [],
            "missing_bytes": 0,
            "removed": [],
        }
    os.makedirs(staging, mode=0o755, exist_ok=True)
    strays = _remove_strays(staging, set(files) | set(_META))
    known = _known_files(releases_dir, skip=version)
    missing: list[str] = []
    linked: list[str] = []
    missing_bytes = 0
    for rel, entry in sorted(files.items()):
        target = os.path.join(staging, rel)
        if not os.path.realpath(target).startswith(os.path.realpath(staging) + os.sep):
            raise ValueError(f"{rel}: path escapes the release folder")
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        if os.path.isfile(target) and _sha256(target) == entry["sha256"]:
            continue
        if os.path.lexists(target):
            os.unlink(target)
        source = known.get(entry["sha256"])
        if source is not None:
            try:
                os.link(source, target)
                linked.append(rel)
                continue
            except OSError:
                # Another file system or no hard links: copy locally, still nothing sent.
                shutil.copy2(source, target)
                linked.append(rel)
                continue
        missing.append(rel)
        missing_bytes += int(entry["size"])
    return {
        "changed": True,
        "present": False,
        "staging_dir": staging,
        "missing": list(_META) + missing,
        "linked": linked,
        "missing_bytes": missing_bytes,
        "removed": strays,
    }


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "releases_dir": {"type": "path", "required": True},
            "version": {"type": "str", "required": True},
            "files": {"type": "dict", "required": True},
        },
        supports_check_mode=False,
    )
    version = module.params["version"]
    if not _VERSION_RE.match(version):
        module.fail_json(msg=f"version {version!r} is not a safe folder name")
    for rel, entry in module.params["files"].items():
        if not isinstance(entry, dict) or "sha256" not in entry or "size" not in entry:
            module.fail_json(msg=f"manifest files[{rel!r}] lacks sha256 or size")
    os.makedirs(module.params["releases_dir"], mode=0o755, exist_ok=True)
    try:
        result = stage(module.params["releases_dir"], version, module.params["files"])
    except (OSError, ValueError) as exc:
        module.fail_json(msg=f"cannot stage release {version}: {exc}")
    module.exit_json(**result)


if __name__ == "__main__":
    main()
