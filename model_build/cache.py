"""Content-addressed stage cache under ``.cache/model_build/``.

A stage's key is the hash of everything it depends on: its settings, the keys of the stages
before it, the source files of the factories it calls and the versions of the tools it runs.
Keys are computed before anything runs, so an unchanged build is recognised without importing
torch. A stage writes into a temporary folder beside its final one and renames it into place
only when it completed, so an interrupted stage never looks cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contract.bundle import sha256_file

DEFAULT_CACHE = Path(".cache/model_build")
_COMPLETE = ".complete"


def digest(*parts: Any) -> str:
    """Stable short hash (16 hex) of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (hex)."""
    return sha256_file(path)


STALE_S = 3600.0


def sweep_stale(folder: Path, prefix: str, max_age_s: float = STALE_S) -> None:
    """Remove hidden temporary folders ``<prefix>*`` older than ``max_age_s``.

    They are what a killed process (SIGKILL, power loss) leaves behind; nothing ever reads them,
    and the age limit keeps a concurrent build's live temporary folder safe.
    """
    if not folder.is_dir():
        return
    now = time.time()
    for path in folder.iterdir():
        if path.name.startswith(prefix) and path.is_dir() and now - path.stat().st_mtime > max_age_s:
            shutil.rmtree(path, ignore_errors=True)


class StageCache:
    """Folders ``<root>/<stage>-<key>/`` holding each completed stage's outputs."""

    def __init__(self, root: Path) -> None:
        """Create the cache rooted at ``root`` (made on first use); sweep stale temporary folders."""
        self.root = root
        sweep_stale(root, ".")

    def folder(self, stage: str, key: str) -> Path:
        """Where the outputs of ``stage`` with ``key`` live once complete."""
        return self.root / f"{stage}-{key}"

    def has(self, stage: str, key: str) -> bool:
        """Whether ``stage`` with ``key`` has completed before."""
        return (self.folder(stage, key) / _COMPLETE).is_file()

    def run(self, stage: str, key: str, produce: Callable[[Path], None]) -> tuple[Path, bool]:
        """Return the stage's output folder, running ``produce(tmp_dir)`` only on a miss.

        Args:
            stage: stage name.
            key: the stage key.
            produce: writes the stage's outputs into the folder it is given.

        Returns:
            ``(folder, ran)``: the completed folder, and whether ``produce`` ran.
        """
        final = self.folder(stage, key)
        if self.has(stage, key):
            return final, False
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{stage}-{key}.", dir=self.root))
        try:
            produce(tmp)
            (tmp / _COMPLETE).write_text(key + "\n")
            if final.exists():  # an incomplete leftover from an older layout
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final, True
