"""Errors of the prebuild: each names the stage and the key, file or figure that failed."""

from __future__ import annotations

from pathlib import Path


class BuildError(Exception):
    """A build stage failed; the message names the stage and what to fix.

    Attributes:
        stage: the stage that failed (``spec``, ``load``, ``export``, ``parity`` …).
    """

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"stage {stage}: {message}")
        self.stage = stage


class SpecError(BuildError):
    """The model spec is invalid: an unknown or mistyped key, a missing file.

    Attributes:
        path: the spec file.
        key: dotted path of the offending key, e.g. ``quantize.per_chanel``.
    """

    def __init__(self, path: Path, key: str, message: str) -> None:
        super().__init__("spec", f"{path}: key {key!r}: {message}")
        self.path = path
        self.key = key
