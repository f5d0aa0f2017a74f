#!/usr/bin/env python3
"""Prepare an offline wheelhouse for one device platform (runs on the controller).

Renders the device's requirements (the server's pinned list with the device class's ONNX Runtime
package swapped in, plus extras such as the supervisor), then ``pip download``s binary wheels for the
device's CPU architecture and Python version. A marker keyed by the requirements' hash makes a re-run a
no-op. Prints ``wheelhouse ready (built)`` or ``wheelhouse ready (cached)``.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import re
import subprocess
import sys
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
    if marker.exists():
        print("wheelhouse ready (cached)")
        return 0
    args.dest.mkdir(parents=True, exist_ok=True)
    wheels = args.dest / "wheels"
    native = (args.machine == platform.machine()
              and args.python_version == "%d.%d" % sys.version_info[:2])
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write(text)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
           "--dest", str(wheels), "-r", handle.name]
    if not native:
        tags = [f"manylinux2014_{args.machine}", f"manylinux_2_28_{args.machine}",
                f"manylinux_2_34_{args.machine}", f"linux_{args.machine}"]
        cmd += [a for t in tags for a in ("--platform", t)]
        cmd += ["--python-version", args.python_version, "--implementation", "cp"]
    cmd += [f"--find-links={d}" for d in args.find_links]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    Path(handle.name).unlink()
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        print(f"pip download failed for {args.dest.name}: see stderr", file=sys.stderr)
        return result.returncode
    # Write the requirements last, then the marker: a wheelhouse is complete or visibly not.
    (args.dest / "requirements.txt").write_text(text)
    for old in args.dest.glob(".complete-*"):
        old.unlink()
    marker.write_text(text)
    print("wheelhouse ready (built)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
