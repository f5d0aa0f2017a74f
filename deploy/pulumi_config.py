"""The stack's ``dualdeploy:*`` keys as a plain dict, read from the running Pulumi program.

``pulumi.Config`` answers for a key it is asked about, but has no public way to list the keys a
stack sets; a typo (``dualdeploy:requireEngine``) would then be silently ignored. The list comes
from ``pulumi.runtime.config.CONFIG`` (private) and ``get_config_env`` (public), read only in
:func:`configured_names`; ``tests/test_config.py`` pins that function to the installed pulumi
version, so an SDK upgrade that moves the private name fails there first, by name.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import Any

import pulumi

PINNED_PULUMI_VERSION = "3.272.0"
"""The pulumi SDK whose private ``runtime.config.CONFIG`` :func:`configured_names` reads."""


def configured_names(namespace: str) -> set[str]:
    """Names of all ``<namespace>:`` keys the engine passed in, typos included."""
    from pulumi.runtime import config as runtime_config  # noqa: PLC0415 - the one private read

    keys = set(runtime_config.CONFIG.get()) | set(runtime_config.get_config_env())
    return {k.split(":", 1)[1] for k in keys if k.startswith(f"{namespace}:")}


def read_stack_dict(
    config: pulumi.Config, known: Mapping[str, str], configured: set[str], secrets: set[str]
) -> dict[str, Any]:
    """Collect every key of ``config``'s namespace into a plain dict, secrets left out.

    Objects and booleans arrive from Pulumi as JSON text; they are decoded here so the parser sees
    YAML-shaped values. Unknown keys are passed through so the parser can name them.

    Args:
        config: the namespace's ``pulumi.Config``.
        known: every key the parser knows → how Pulumi stores it (``string``, ``bool``, ``object``).
        configured: the keys the stack sets (:func:`configured_names`).
        secrets: keys read elsewhere with ``get_secret``, never here.
    """
    raw: dict[str, Any] = {}
    for name in sorted((set(known) | configured) - secrets):
        value = config.get(name)
        if value is None:
            continue
        if known.get(name) in ("object", "bool") or name not in known:
            # Not JSON: the parser reports the key with what it expected.
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        raw[name] = value
    return raw
