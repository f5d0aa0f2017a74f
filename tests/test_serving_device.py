"""The device-class table and the variant choice, from facts alone (serving/device.py)."""

from __future__ import annotations

from typing import Any

import pytest

from serving import device

TABLE = device.load_table()
X86 = device.DeviceFacts(arch="x86_64")
CPU = ["CPUExecutionProvider"]
GPU_EPS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def variant(
    name: str,
    precision: str,
    p50: float,
    fmt: str = "onnx",
    classes: tuple[str, ...] = ("x86_cpu",),
    **extra: Any,
) -> dict[str, Any]:
    return {
        "name": name,
        "file": f"{name}.onnx",
        "format": fmt,
        "precision": precision,
        "device_classes": list(classes),
        "metrics": {"latency_ms_p50": p50},
        **extra,
    }


def test_table_has_the_agreed_classes_and_keys() -> None:
    assert set(TABLE) == {"x86_cpu", "arm64_cpu", "nvidia_gpu", "jetson", "ascend"}
    for row in TABLE.values():
        assert row.providers[-1] == "CPUExecutionProvider"
        assert row.onnxruntime_package in {"onnxruntime", "onnxruntime-gpu", "onnxruntime-cann"}


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (device.DeviceFacts(arch="x86_64"), "x86_cpu"),
        (device.DeviceFacts(arch="x86_64", nvidia_gpu=True), "nvidia_gpu"),
        (device.DeviceFacts(arch="aarch64"), "arm64_cpu"),
        (
            device.DeviceFacts(arch="aarch64", files=frozenset({"/etc/nv_tegra_release"}), nvidia_gpu=True),
            "jetson",
        ),
        (device.DeviceFacts(arch="aarch64", commands=frozenset({"npu-smi"})), "ascend"),
        (device.DeviceFacts(arch="x86_64", commands=frozenset({"npu-smi"})), "ascend"),
    ],
)
def test_detection_from_facts(facts: device.DeviceFacts, expected: str) -> None:
    assert device.detect_class(TABLE, facts).name == expected


def test_unknown_architecture_names_the_facts_and_the_classes() -> None:
    with pytest.raises(device.DeviceError, match=r"arch=riscv64.*--device-class with one of x86_cpu|jetson"):
        device.detect_class(TABLE, device.DeviceFacts(arch="riscv64"))


def test_this_machine_is_detected_as_one_of_the_classes() -> None:
    facts = device.gather_facts(TABLE)
    assert device.detect_class(TABLE, facts).name in TABLE


def test_x86_picks_whichever_the_manifest_measured_faster() -> None:
    fast_int8 = [variant("fp32", "fp32", 2.0), variant("int8", "int8", 1.1)]
    slow_int8 = [variant("fp32", "fp32", 2.0), variant("int8", "int8", 2.5)]
    assert device.choose_variant(fast_int8, TABLE["x86_cpu"], CPU, X86).variant["name"] == "int8"
    assert device.choose_variant(slow_int8, TABLE["x86_cpu"], CPU, X86).variant["name"] == "fp32"


def test_equal_latency_falls_back_to_the_class_precision_order() -> None:
    tie = [variant("fp32", "fp32", 1.0), variant("int8", "int8", 1.0)]
    assert device.choose_variant(tie, TABLE["x86_cpu"], CPU, X86).variant["name"] == "int8"


def test_variants_not_built_for_the_class_are_skipped_with_reasons() -> None:
    only_gpu = [variant("fp32", "fp32", 1.0, classes=("nvidia_gpu",))]
    with pytest.raises(device.DeviceError, match="fp32: not built for x86_cpu"):
        device.choose_variant(only_gpu, TABLE["x86_cpu"], CPU, X86)


def test_gpu_prefers_the_tensorrt_engine_for_its_arch_and_falls_back_without_it() -> None:
    facts = device.DeviceFacts(arch="x86_64", nvidia_gpu=True, gpu_arch="sm_86")
    variants = [
        variant("fp32", "fp32", 3.0, classes=("nvidia_gpu", "x86_cpu")),
        variant("trt-sm_86-fp16", "fp16", 0.4, fmt="tensorrt", classes=("nvidia_gpu",), gpu_arch="sm_86"),
        variant("trt-sm_89-fp16", "fp16", 0.3, fmt="tensorrt", classes=("nvidia_gpu",), gpu_arch="sm_89"),
        {
            **variant("trt-raw", "fp16", 0.1, fmt="tensorrt", classes=("nvidia_gpu",), gpu_arch="sm_86"),
            "file": "trt-raw.engine",
        },
    ]
    chosen = device.choose_variant(variants, TABLE["nvidia_gpu"], GPU_EPS, facts)
    assert chosen.variant["name"] == "trt-sm_86-fp16"
    assert chosen.providers == tuple(GPU_EPS)
    # The CPU build of ONNX Runtime has no TensorRT or CUDA provider: the onnx variant, on CPU.
    fallback = device.choose_variant(variants, TABLE["nvidia_gpu"], CPU, facts)
    assert fallback.variant["name"] == "fp32" and fallback.providers == ("CPUExecutionProvider",)


def test_requested_variant_that_cannot_run_here_says_why() -> None:
    variants = [
        variant("trt-sm_86-fp16", "fp16", 0.4, fmt="tensorrt", classes=("nvidia_gpu",), gpu_arch="sm_86")
    ]
    facts = device.DeviceFacts(arch="x86_64", nvidia_gpu=True, gpu_arch="sm_75")
    with pytest.raises(device.DeviceError, match="engine built for sm_86, this GPU is sm_75"):
        device.choose_variant(variants, TABLE["nvidia_gpu"], GPU_EPS, facts, "trt-sm_86-fp16")
    with pytest.raises(device.DeviceError, match="format 'tensorrt' is not run on device class x86_cpu"):
        device.choose_variant(variants, TABLE["x86_cpu"], CPU, X86, "trt-sm_86-fp16")


def test_malformed_table_names_the_class_and_key() -> None:
    with pytest.raises(device.DeviceError, match="class 'x' lacks 'providers'"):
        device.parse_table(
            {
                "schema_version": 1,
                "classes": {
                    "x": {
                        "detect": {},
                        "formats": [],
                        "precisions": [],
                        "onnxruntime_package": "onnxruntime",
                        "memory_max": "1G",
                    }
                },
            }
        )
    with pytest.raises(device.DeviceError, match="schema_version must be 1"):
        device.parse_table({"classes": {}})


def test_raw_tensorrt_engine_is_not_chosen_and_says_why() -> None:
    facts = device.DeviceFacts(arch="x86_64", nvidia_gpu=True, gpu_arch="sm_86")
    raw = {
        **variant("trt", "fp16", 0.1, fmt="tensorrt", classes=("nvidia_gpu",), gpu_arch="sm_86"),
        "file": "model.trt-sm_86-fp16.engine",
    }
    onnx = variant("fp32", "fp32", 3.0, classes=("nvidia_gpu",))
    assert device.choose_variant([raw, onnx], TABLE["nvidia_gpu"], GPU_EPS, facts).variant["name"] == "fp32"
    with pytest.raises(device.DeviceError, match="is a raw TensorRT engine"):
        device.choose_variant([raw, onnx], TABLE["nvidia_gpu"], GPU_EPS, facts, "trt")
