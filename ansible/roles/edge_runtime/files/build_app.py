#!/usr/bin/env python3
"""Pack the server code for the devices into one deterministic tar (runs on the controller).

The archive's name carries the sha256 of its content, so an unchanged server means an unchanged file
and nothing to send. Prints one JSON line ``{"tar", "hash", "built", "files"}``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

STALE_AFTER_S = 24 * 3600


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="the repository root")
    parser.add_argument("--dest", type=Path, required=True, help="folder for app-<hash>.tar")
    parser.add_argument(
        "--add", action="append", default=[], metavar="SRC=NAME", help="also pack file SRC as NAME"
    )
    parser.add_argument("patterns", nargs="+", help="globs relative to the root (serving/*.py, ...)")
    args = parser.parse_args()

    found = sorted({p for pattern in args.patterns for p in args.root.glob(pattern) if p.is_file()})
    if not found:
        print(f"no files match {args.patterns} under {args.root}", file=sys.stderr)
        return 1
    members = [(p, p.relative_to(args.root).as_posix()) for p in found]
    for spec in args.add:
        src, _, name = spec.partition("=")
        members.append((Path(src), name or Path(src).name))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, name in members:
            data = path.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    content = buffer.getvalue()
    digest = hashlib.sha256(content).hexdigest()[:16]
    archive = args.dest / f"app-{digest}.tar"
    built = not archive.exists()
    if built:
        args.dest.mkdir(parents=True, exist_ok=True)
        partial = args.dest / f".app-{digest}.{os.getpid()}.partial"
        partial.write_bytes(content)
        partial.replace(archive)
    else:
        os.utime(archive)  # its time says when a rollout last used it
    # Archives another rollout from this checkout may still be sending (two sites at once, or a rollout
    # while the code changes) stay; only those unused for a day go.
    for old in args.dest.glob("app-*.tar"):
        if old != archive and time.time() - old.stat().st_mtime > STALE_AFTER_S:
            old.unlink(missing_ok=True)
    print(
        json.dumps(
            {
                "tar": str(archive),
                "hash": digest,
                "built": built,
                "files": [name for _, name in members],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
