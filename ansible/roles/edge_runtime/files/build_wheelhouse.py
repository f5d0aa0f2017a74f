#!/usr/bin/env python3
"""Prepare an offline wheelhouse for one device platform (runs on the controller).

Renders the device's requirements (the server's pinned list with the device class's ONNX Runtime
package swapped in, plus extras such as the supervisor), then ``pip download``s binary wheels for the
device's CPU architecture and Python version. A marker keyed by the requirements' hash makes a re-run a
no-op. The wheels and the requirements are packed into one uncompressed ``wheelhouse-<hash>.tar`` (wheels
are compressed already), so the device receives one file. Prints one JSON line ``{"tar", "hash", "built"}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

_ORT = re.compile(r"^onnxruntime(-[a-z]+)?\s*==\s*(\S+)\s*$")


def render(requirements: Path, package: str, version: str, extras: list[str]) -> str:
    """The device's requirements: the server's list with the class's ORT package."""
    lines = []
    for raw in requirements.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _ORT.match(line)
        if match:
            line = f"{package}=={version or match.group(2)}"
        lines.append(line)
    return "\n".join([*lines, *extras]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requirements", type=Path, required=True, help="the server's requirements file")
    parser.add_argument("--dest", type=Path, required=True, help="wheelhouse folder for this platform")
    parser.add_argument("--machine", required=True, help="device CPU architecture (x86_64, aarch64)")
    parser.add_argument("--python-version", required=True, help="device Python major.minor")
    parser.add_argument("--onnxruntime-package", required=True, help="ORT package of the device class")
    parser.add_argument("--onnxruntime-version", default="", help="ORT version; empty keeps the pin")
    parser.add_argument("--extra", action="append", default=[], help="extra requirement lines")
    parser.add_argument("--find-links", action="append", default=[], help="folders with vendor wheels")
    args = parser.parse_args()

    text = render(args.requirements, args.onnxruntime_package, args.onnxruntime_version, args.extra)
    digest = hashlib.sha256(f"{text}{args.machine}{args.python_version}".encode()).hexdigest()[:16]
    marker = args.dest / f".complete-{digest}"
    archive = args.dest / f"wheelhouse-{digest}.tar"
    if marker.exists() and archive.exists():
        print(json.dumps({"tar": str(archive), "hash": digest, "built": False}))
        return 0
    args.dest.mkdir(parents=True, exist_ok=True)
    # A fresh folder each build: the tar then holds exactly this list's closure (pip's cache keeps it fast).
    wheels = args.dest / "wheels"
    if wheels.exists():
        shutil.rmtree(wheels)
    native = args.machine == platform.machine() and args.python_version == "{}.{}".format(
        *sys.version_info[:2]
    )
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write(text)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--only-binary=:all:",
        "--dest",
        str(wheels),
        "-r",
        handle.name,
    ]
    if not native:
        tags = [
            f"manylinux2014_{args.machine}",
            f"manylinux_2_28_{args.machine}",
            f"manylinux_2_34_{args.machine}",
            f"linux_{args.machine}",
        ]
        cmd += [a for t in tags for a in ("--platform", t)]
        cmd += ["--python-version", args.python_version, "--implementation", "cp"]
    cmd += [f"--find-links={d}" for d in args.find_links]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    Path(handle.name).unlink()
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        print(f"pip download failed for {args.dest.name}: see stderr", file=sys.stderr)
        return result.returncode
    # Pack exactly the wheels this requirements list resolved to, then write the marker last:
    # a wheelhouse is complete or visibly not.
    (args.dest / "requirements.txt").write_text(text)
    wanted = sorted(wheels.glob("*.whl"))
    partial = archive.with_suffix(".tar.partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in [args.dest / "requirements.txt", *wanted]:
            info = tar.gettarinfo(str(path), arcname=path.relative_to(args.dest).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
            with path.open("rb") as handle:
                tar.addfile(info, handle)
    partial.replace(archive)
    for old in [*args.dest.glob(".complete-*"), *args.dest.glob("wheelhouse-*.tar")]:
        if old not in (archive, marker):
            old.unlink()
    marker.write_text(text)
    print(json.dumps({"tar": str(archive), "hash": digest, "built": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
