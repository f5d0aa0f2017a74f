"""Filter plugin: choose the bundle variant that a device class runs on the edge."""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleFilterError


def _cpu_refusal(variant: dict[str, Any], cpu_class: str | None, cpu_flags: list[str]) -> str | None:
    """Why an INT8 ONNX variant must not serve on this CPU class (the server applies the same rule)."""
    if variant.get("precision") != "int8" or variant.get("format") != "onnx":
        return None
    record = variant.get("cpu")
    if not isinstance(record, dict):
        return f"{variant.get('name')}: no per-CPU-class validation in the manifest (schema 1 bundle)"
    validated = list(record.get("validated") or [])
    if cpu_class in validated:
        return None
    results = record.get("results") or {}
    lacking = []
    for name in validated:
        missing = [f for f in (results.get(name) or {}).get("requires", []) if f not in cpu_flags]
        lacking.append(f"{name} (the device lacks {', '.join(missing)})" if missing else name)
    status = (results.get(cpu_class) or {}).get("status", "not claimed")
    return (
        f"{variant.get('name')}: not validated for CPU class {cpu_class or 'unknown'} ({status}); "
        f"validated on {', '.join(lacking) or 'no class'}"
    )


def select_variant(  # noqa: PLR0917 - a Jinja filter receives its arguments by position
    manifest: dict[str, Any],
    device_class: str,
    entry: dict[str, Any],
    gpu_arch: str | None = None,
    cpu_class: str | None = None,
    cpu_flags: list[str] | None = None,
) -> dict[str, Any]:
    """Pick what the server on this device should run.

    Args:
        manifest: the bundle manifest.
        device_class: the device's class name.
        entry: the class's entry in serving/device_classes.yaml.
        gpu_arch: the device GPU's compute capability (``sm_87``) when known.
        cpu_class: the device's CPU class (``cpu_classes`` of the table), None when none fits.
        cpu_flags: the device's CPU features that some CPU class names.

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
    refusals = [r for v in usable if (r := _cpu_refusal(v, cpu_class, list(cpu_flags or [])))]
    cpu_note = "; ".join(refusals)
    usable = [v for v in usable if not _cpu_refusal(v, cpu_class, list(cpu_flags or []))]
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
