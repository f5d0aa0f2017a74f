#!/usr/bin/env python3
"""Choose what a device's server runs, on the controller, with the contract's typed manifest.

Run by the edge playbook once per device, after the bundle was verified, with the device's class entry
and detection facts. Prints one JSON line ``{"variant", "trt_engine_cache", "reason", "cpu_note"}`` and
exits 0, or prints why nothing in the bundle suits the device and exits 1.

``variant`` is ``auto`` (the server picks from the same table and applies the same CPU rule), or a named
ONNX variant when the class builds TensorRT engines on the device and the bundle has no engine for its
GPU: the server then runs it on ONNX Runtime's TensorRT execution provider with a persistent engine
cache. ``cpu_note`` names the INT8 variant the device will not serve, and why.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from contract.bundle import BundleError, read_manifest
from contract.detect import int8_cpu_refusal
from contract.manifest import Manifest, Variant


class NoVariant(Exception):
    """Nothing in the bundle suits the device; the message says why."""


def _cpu_refusal(variant: Variant, found: Mapping[str, Any]) -> str | None:
    problem = int8_cpu_refusal(
        variant.model_dump(exclude_none=True),
        found.get("cpu_class"),
        str(found.get("arch", "")),
        found.get("cpu_flags") or [],
    )
    return f"{variant.name}: {problem}" if problem else None


def choose(
    manifest: Manifest, device_class: str, entry: Mapping[str, Any], found: Mapping[str, Any]
) -> dict[str, Any]:
    """The choice for one device (see the module docstring).

    Args:
        manifest: the verified bundle's manifest.
        device_class: the device's class name.
        entry: the class's row in contract/device_classes.yaml.
        found: the device's detection facts (``device_facts``' ``found``): ``arch``, ``gpu_arch``,
            ``cpu_class`` and ``cpu_flags``.

    Raises:
        NoVariant: the bundle has no variant for the class (naming the classes it serves), or nothing it
            has is validated for the device's CPU (naming the features the device lacks).
    """
    formats = list(entry.get("formats") or ["onnx"])
    usable = [v for v in manifest.variants if device_class in v.device_classes and v.format in formats]
    if not usable:
        served = sorted({c for v in manifest.variants for c in v.device_classes})
        raise NoVariant(
            f"bundle {manifest.model}/{manifest.version} has no variant for device class {device_class!r} "
            f"(formats {formats}); it serves: {', '.join(served) or 'nothing'}"
        )
    refusals = {v.name: r for v in usable if (r := _cpu_refusal(v, found))}
    cpu_note = "; ".join(refusals.values())
    usable = [v for v in usable if v.name not in refusals]
    if not usable:
        raise NoVariant(
            f"bundle {manifest.model}/{manifest.version} has nothing validated for this device's CPU: "
            f"{cpu_note}"
        )
    cache = bool(entry.get("trt_engine_cache"))
    gpu_arch = found.get("gpu_arch")
    if not cache or gpu_arch is None:
        return {"variant": "auto", "trt_engine_cache": cache, "reason": "the server picks from the table",
                "cpu_note": cpu_note}  # fmt: skip
    if any(v.format == "tensorrt" and v.gpu_arch == gpu_arch for v in usable):
        return {"variant": "auto", "trt_engine_cache": cache,
                "reason": f"the bundle has an engine for {gpu_arch}", "cpu_note": cpu_note}  # fmt: skip
    onnx = [v for v in usable if v.format == "onnx"]
    if not onnx:
        raise NoVariant(
            f"bundle has no TensorRT engine for {gpu_arch} and no ONNX variant for {device_class!r}"
        )
    order = {p: i for i, p in enumerate(entry.get("precisions") or [])}
    best = min(onnx, key=lambda v: order.get(v.precision, len(order)))
    return {
        "variant": best.name,
        "trt_engine_cache": True,
        "reason": f"no engine for {gpu_arch} in the bundle: {best.name} on the TensorRT EP, engine cached",
        "cpu_note": cpu_note,
    }


def main() -> int:
    """Parse the command line, choose, print the JSON line (exit 0) or the reason (exit 1)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="the verified bundle folder")
    parser.add_argument("--device-class", required=True, help="the device's class name")
    parser.add_argument("--class-entry", required=True, help="the class's table row, as JSON")
    parser.add_argument("--found", required=True, help="the device's detection facts, as JSON")
    args = parser.parse_args()
    try:
        choice = choose(
            read_manifest(args.bundle),
            args.device_class,
            json.loads(args.class_entry),
            json.loads(args.found),
        )
    except (BundleError, NoVariant, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(json.dumps(choice))
    return 0


if __name__ == "__main__":
    sys.exit(main())
