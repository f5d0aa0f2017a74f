"""Filter plugin: choose the bundle variant that a device class runs on the edge."""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleFilterError
from ansible_collections.dualdeploy.edge.plugins.module_utils.detect import int8_cpu_refusal


def _cpu_refusal(variant: dict[str, Any], found: dict[str, Any]) -> str | None:
    """The server's INT8 CPU rule (module_utils/detect.py is contract/detect.py), named by variant."""
    problem = int8_cpu_refusal(
        variant, found.get("cpu_class"), str(found.get("arch", "")), found.get("cpu_flags") or []
    )
    return f"{variant.get('name')}: {problem}" if problem else None


def select_variant(
    manifest: dict[str, Any], device_class: str, entry: dict[str, Any], found: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Pick what the server on this device should run.

    Args:
        manifest: the bundle manifest.
        device_class: the device's class name.
        entry: the class's entry in contract/device_classes.yaml.
        found: the device's detection facts (``device_facts``' ``found``): ``arch``, ``gpu_arch``
            (``sm_87``) when known, ``cpu_class`` (None when none fits) and ``cpu_flags``.

    Returns:
        ``{"variant": "auto" | NAME, "trt_engine_cache": bool, "reason": str, "cpu_note": str}``. ``auto``
        leaves the choice to the server (it reads the same table and applies the same CPU rule). A named
        ONNX variant is forced when the class builds TensorRT engines on the device and the bundle has no
        engine for this GPU: the server then runs it on ONNX Runtime's TensorRT execution provider with a
        persistent engine cache. ``cpu_note`` says which INT8 variant the device will not serve, and why.

    Raises:
        AnsibleFilterError: the bundle has no variant for the class, naming the classes it does serve, or
            nothing it has is validated for the device's CPU, naming the CPU features the device lacks.
    """
    variants = manifest.get("variants") or []
    formats = entry.get("formats") or ["onnx"]
    usable = [
        v for v in variants if device_class in (v.get("device_classes") or []) and v.get("format") in formats
    ]
    if not usable:
        served = sorted({c for v in variants for c in (v.get("device_classes") or [])})
        raise AnsibleFilterError(
            f"bundle {manifest.get('model')}/{manifest.get('version')} has no variant for device class "
            f"{device_class!r} (formats {formats}); it serves: {', '.join(served) or 'nothing'}"
        )
    found = found or {}
    gpu_arch = found.get("gpu_arch")
    refusals = {str(v.get("name")): r for v in usable if (r := _cpu_refusal(v, found))}
    cpu_note = "; ".join(refusals.values())
    usable = [v for v in usable if str(v.get("name")) not in refusals]
    if not usable:
        raise AnsibleFilterError(
            f"bundle {manifest.get('model')}/{manifest.get('version')} has nothing validated for this "
            f"device's CPU: {cpu_note}"
        )
    cache = bool(entry.get("trt_engine_cache"))
    engines = [v for v in usable if v.get("format") == "tensorrt"]
    if not cache or gpu_arch is None:
        return {
            "variant": "auto",
            "trt_engine_cache": cache,
            "reason": "the server picks from the table",
            "cpu_note": cpu_note,
        }
    if any(v.get("gpu_arch") == gpu_arch for v in engines):
        return {
            "variant": "auto",
            "trt_engine_cache": cache,
            "reason": f"the bundle has an engine for {gpu_arch}",
            "cpu_note": cpu_note,
        }
    onnx = [v for v in usable if v.get("format") == "onnx"]
    if not onnx:
        raise AnsibleFilterError(
            f"bundle has no TensorRT engine for {gpu_arch} and no ONNX variant for {device_class!r}"
        )
    order = {p: i for i, p in enumerate(entry.get("precisions") or [])}
    best = min(onnx, key=lambda v: order.get(v.get("precision"), len(order)))
    return {
        "variant": best["name"],
        "trt_engine_cache": True,
        "reason": f"no engine for {gpu_arch} in the bundle: {best['name']} on the TensorRT EP, engine cached",
        "cpu_note": cpu_note,
    }


class FilterModule:
    """Ansible filter plugin entry point."""

    def filters(self) -> dict[str, Any]:
        return {"select_variant": select_variant}
