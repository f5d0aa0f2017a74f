"""The device-class table and the variant choice, from facts alone (serving/device.py), and the
TensorRT variant's eligibility, refusal and fallback (also through the server's start-up path)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from serving_support import Bundle, make_bundle, run_refused, running_server

from contract import bundle as contract
from contract import detect
from contract.manifest import Variant
from model_build.tensorrt import write_engine_wrapper
from serving import device
from serving.model import execution_providers

TABLE = device.load_table()
CPU_CLASSES = device.load_cpu_classes()
AVX2 = frozenset({"avx2", "fma"})
X86 = device.DeviceFacts(arch="x86_64", cpu_class="x86_64_avx2", cpu_flags=AVX2)
VNNI = frozenset({"avx2", "fma", "avx512bw", "avx512_vnni"})


def validated(
    *classes: str, failed: tuple[str, ...] = (), unverified: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A manifest ``cpu`` record: the classes an INT8 variant passed, failed, or could not be checked on."""
    results: dict[str, Any] = {}
    for status, names in (("passed", classes), ("failed", failed), ("unverified", unverified)):
        for name in names:
            row = CPU_CLASSES[name]
            results[name] = {
                "status": status,
                "via": "native",
                "arch": row["arch"],
                "requires": row["requires"],
            }
            if status != "passed":
                results[name]["reason"] = f"{status} at build"
    return {"validated": list(classes), "results": results}


CPU = ["CPUExecutionProvider"]
GPU_EPS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def variant(
    name: str,
    precision: str,
    p50: float,
    fmt: str = "onnx",
    classes: tuple[str, ...] = ("x86_cpu",),
    **extra: Any,
) -> Variant:
    return Variant.model_validate(variant_data(name, precision, p50, fmt, classes, **extra))


def variant_data(
    name: str,
    precision: str,
    p50: float,
    fmt: str = "onnx",
    classes: tuple[str, ...] = ("x86_cpu",),
    **extra: Any,
) -> dict[str, Any]:
    """A manifest variant entry as plain data (what the manifest's JSON holds)."""
    if precision == "int8" and fmt == "onnx":
        extra.setdefault("cpu", validated("x86_64_avx2", "x86_64_avx512_vnni"))
    return {
        "name": name,
        "file": f"{name}.onnx",
        "format": fmt,
        "precision": precision,
        "device_classes": list(classes),
        "tolerance": {"kind": "top1", "min_agreement": 0.99},
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
    assert device.choose_variant(fast_int8, TABLE["x86_cpu"], CPU, X86).variant.name == "int8"
    assert device.choose_variant(slow_int8, TABLE["x86_cpu"], CPU, X86).variant.name == "fp32"


def test_equal_latency_falls_back_to_the_class_precision_order() -> None:
    tie = [variant("fp32", "fp32", 1.0), variant("int8", "int8", 1.0)]
    assert device.choose_variant(tie, TABLE["x86_cpu"], CPU, X86).variant.name == "int8"


def test_int8_serves_only_on_the_cpu_classes_the_build_validated() -> None:
    only_vnni = [
        variant("fp32", "fp32", 2.0),
        variant("int8", "int8", 1.1, cpu=validated("x86_64_avx512_vnni")),
    ]
    on_vnni = device.DeviceFacts(arch="x86_64", cpu_class="x86_64_avx512_vnni", cpu_flags=VNNI)
    assert device.choose_variant(only_vnni, TABLE["x86_cpu"], CPU, on_vnni).variant.name == "int8"
    choice = device.choose_variant(only_vnni, TABLE["x86_cpu"], CPU, X86)
    assert choice.variant.name == "fp32"
    (note,) = choice.cpu_refused
    assert "not validated for this CPU class x86_64_avx2" in note
    assert "x86_64_avx512_vnni (this CPU lacks avx512bw, avx512_vnni)" in note


def test_int8_that_failed_or_was_unverified_on_this_class_says_so() -> None:
    failed = [
        variant("fp32", "fp32", 2.0),
        variant("int8", "int8", 1.1, cpu=validated("x86_64_avx512_vnni", failed=("x86_64_avx2",))),
    ]
    (note,) = device.choose_variant(failed, TABLE["x86_cpu"], CPU, X86).cpu_refused
    assert "(failed: failed at build)" in note
    arm = device.DeviceFacts(arch="aarch64", cpu_class="aarch64")
    unverified = [
        variant("fp32", "fp32", 2.0, classes=("arm64_cpu",)),
        variant(
            "int8", "int8", 1.1, classes=("arm64_cpu",), cpu=validated("x86_64_avx2", unverified=("aarch64",))
        ),
    ]
    choice = device.choose_variant(unverified, TABLE["arm64_cpu"], CPU, arm)
    assert choice.variant.name == "fp32"
    assert "(unverified: unverified at build)" in choice.cpu_refused[0]


def test_int8_from_a_schema_1_bundle_or_on_an_unknown_cpu_is_not_served() -> None:
    old = [variant("fp32", "fp32", 2.0), variant("int8", "int8", 1.1).model_copy(update={"cpu": None})]
    assert "before schema 2" in device.choose_variant(old, TABLE["x86_cpu"], CPU, X86).cpu_refused[0]
    no_avx2 = device.DeviceFacts(arch="x86_64", cpu_class=None, cpu_flags=frozenset())
    fast = [variant("fp32", "fp32", 2.0), variant("int8", "int8", 1.1)]
    assert "is of no CPU class" in device.choose_variant(fast, TABLE["x86_cpu"], CPU, no_avx2).cpu_refused[0]


def test_a_bundle_with_nothing_validated_for_this_cpu_is_refused_naming_the_missing_features() -> None:
    int8_only = [variant("int8", "int8", 1.1, cpu=validated("x86_64_avx512_vnni"))]
    with pytest.raises(device.DeviceError, match=r"this CPU lacks avx512bw, avx512_vnni"):
        device.choose_variant(int8_only, TABLE["x86_cpu"], CPU, X86)


def test_a_requested_int8_variant_on_an_unvalidated_cpu_is_served_with_a_warning() -> None:
    only_vnni = [
        variant("fp32", "fp32", 2.0),
        variant("int8", "int8", 1.1, cpu=validated("x86_64_avx512_vnni")),
    ]
    choice = device.choose_variant(only_vnni, TABLE["x86_cpu"], CPU, X86, "int8")
    assert choice.variant.name == "int8"
    assert "not validated for this CPU class x86_64_avx2" in choice.cpu_refused[0]


@pytest.mark.parametrize(
    ("flags", "arch", "expected"),
    [
        ({"avx2", "fma", "avx512bw", "avx512_vnni"}, "x86_64", "x86_64_avx512_vnni"),
        ({"avx2", "fma", "avx_vnni"}, "x86_64", "x86_64_avx_vnni"),
        ({"avx2", "fma", "avx512bw"}, "x86_64", "x86_64_avx512"),
        ({"avx2", "fma"}, "x86_64", "x86_64_avx2"),
        ({"sse4_2"}, "x86_64", None),
        ({"asimd", "asimddp"}, "aarch64", "aarch64"),
    ],
)
def test_cpu_class_is_the_first_whose_features_the_cpu_has(flags: set[str], arch: str, expected: str) -> None:
    assert detect.cpu_class(CPU_CLASSES, arch, flags) == expected


def test_cpu_flags_are_read_from_cpuinfo_on_x86_and_arm() -> None:
    x86 = "processor\t: 0\nflags\t\t: fpu avx2 fma avx512_vnni\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd asimddp\n"
    assert {"avx2", "fma", "avx512_vnni"} <= detect.parse_cpu_flags(x86)
    assert detect.parse_cpu_flags(arm) == {"fp", "asimd", "asimddp"}


def test_this_machine_has_a_cpu_class() -> None:
    facts = device.gather_facts(TABLE, CPU_CLASSES)
    assert facts.cpu_class in CPU_CLASSES, facts


def test_variants_not_built_for_the_class_are_skipped_with_reasons() -> None:
    only_gpu = [variant("fp32", "fp32", 1.0, classes=("nvidia_gpu",))]
    with pytest.raises(device.DeviceError, match="fp32: not built for x86_cpu"):
        device.choose_variant(only_gpu, TABLE["x86_cpu"], CPU, X86)


def trt(name: str, arch: str, version: str = "10.3.0", p50: float = 0.4) -> Variant:
    """A TensorRT variant as the prebuild writes it: the file is the EP context wrapper."""
    return variant(
        name,
        "fp16",
        p50,
        fmt="tensorrt",
        classes=("nvidia_gpu",),
        gpu_arch=arch,
        tensorrt_version=version,
        cuda_version="12.4",
        engine=f"engines/{name}.engine",
    )


GPU_86 = device.DeviceFacts(arch="x86_64", nvidia_gpu=True, gpu_arch="sm_86", tensorrt_version="10.3.1")
FP32_GPU = variant("fp32", "fp32", 3.0, classes=("nvidia_gpu", "x86_cpu"))


def test_gpu_prefers_the_tensorrt_engine_for_its_arch_and_falls_back_without_it() -> None:
    facts = GPU_86
    variants = [
        FP32_GPU,
        trt("trt-sm_86-fp16", "sm_86"),
        trt("trt-sm_89-fp16", "sm_89", p50=0.3),
        trt("trt-raw", "sm_86", p50=0.1).model_copy(update={"file": "trt-raw.engine"}),
    ]
    chosen = device.choose_variant(variants, TABLE["nvidia_gpu"], GPU_EPS, facts)
    assert chosen.variant.name == "trt-sm_86-fp16"
    assert chosen.providers == tuple(GPU_EPS)
    # The CPU build of ONNX Runtime has no TensorRT or CUDA provider: the onnx variant, on CPU.
    fallback = device.choose_variant(variants, TABLE["nvidia_gpu"], CPU, facts)
    assert fallback.variant.name == "fp32" and fallback.providers == ("CPUExecutionProvider",)


def test_requested_variant_that_cannot_run_here_says_why() -> None:
    variants = [trt("trt-sm_86-fp16", "sm_86")]
    facts = device.DeviceFacts(arch="x86_64", nvidia_gpu=True, gpu_arch="sm_75", tensorrt_version="10.3.0")
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
    facts = GPU_86
    raw = trt("trt", "sm_86", p50=0.1).model_copy(update={"file": "model.trt-sm_86-fp16.engine"})
    onnx = variant("fp32", "fp32", 3.0, classes=("nvidia_gpu",))
    assert device.choose_variant([raw, onnx], TABLE["nvidia_gpu"], GPU_EPS, facts).variant.name == "fp32"
    with pytest.raises(device.DeviceError, match="is a raw TensorRT engine"):
        device.choose_variant([raw, onnx], TABLE["nvidia_gpu"], GPU_EPS, facts, "trt")


@pytest.mark.parametrize(
    ("output", "arch"),
    [
        ("8.6\n", "sm_86"),
        ("9.0\n9.0\n", "sm_90"),  # several GPUs: the first one's
        ("12.1", "sm_121"),
        ("10.0\n", "sm_100"),
        ("", None),
        ("[N/A]\n", None),
        ("No devices were found\n", None),
    ],
)
def test_gpu_arch_from_nvidia_smi_compute_cap(output: str, arch: str | None) -> None:
    assert device.gpu_arch_from_compute_cap(output) == arch


@pytest.mark.parametrize(
    ("value", "version"), [(100300, "10.3.0"), (101601, "10.16.1"), (8601, "8.6.1"), (8502, "8.5.2")]
)
def test_tensorrt_version_from_the_library_integer(value: int, version: str) -> None:
    assert device.tensorrt_version_from_int(value) == version


def test_engine_for_this_arch_and_tensorrt_minor_is_chosen_without_refusals() -> None:
    # 10.3.1 here, 10.3.0 in the manifest: same major.minor, so the engine is eligible.
    chosen = device.choose_variant(
        [FP32_GPU, trt("trt-sm_86-fp16", "sm_86")], TABLE["nvidia_gpu"], GPU_EPS, GPU_86
    )
    assert chosen.variant.name == "trt-sm_86-fp16" and chosen.refused == ()


@pytest.mark.parametrize(
    ("facts", "reason"),
    [
        (
            device.DeviceFacts(arch="x86_64", nvidia_gpu=True, gpu_arch="sm_89", tensorrt_version="10.3.0"),
            "engine built for sm_86, this GPU is sm_89",
        ),
        (
            device.DeviceFacts(arch="x86_64", nvidia_gpu=True, gpu_arch="sm_86", tensorrt_version="8.6.1"),
            "engine built with TensorRT 10.3.0, this machine has TensorRT 8.6.1 (major.minor must match)",
        ),
        (
            device.DeviceFacts(arch="x86_64", nvidia_gpu=True, gpu_arch="sm_86", tensorrt_version="10.4.0"),
            "engine built with TensorRT 10.3.0, this machine has TensorRT 10.4.0",
        ),
        (
            device.DeviceFacts(arch="x86_64", nvidia_gpu=True, gpu_arch="sm_86"),
            "engine built with TensorRT 10.3.0, the TensorRT version here is unknown",
        ),
        (
            device.DeviceFacts(arch="x86_64", nvidia_gpu=True),
            "engine built for sm_86, no NVIDIA GPU compute capability detected here",
        ),
    ],
)
def test_engine_that_cannot_run_here_is_refused_and_the_onnx_variant_serves(
    facts: device.DeviceFacts, reason: str
) -> None:
    choice = device.choose_variant(
        [FP32_GPU, trt("trt-sm_86-fp16", "sm_86")], TABLE["nvidia_gpu"], GPU_EPS, facts
    )
    assert choice.variant.name == "fp32"
    assert choice.providers == tuple(GPU_EPS)  # the onnx variant still gets TensorRT/CUDA EPs
    [refusal] = choice.refused
    assert refusal.startswith("trt-sm_86-fp16: ") and reason in refusal


def test_requested_engine_for_another_gpu_and_tensorrt_names_both_sides() -> None:
    facts = device.DeviceFacts(arch="x86_64", nvidia_gpu=True, gpu_arch="sm_75", tensorrt_version="8.6.1")
    with pytest.raises(device.DeviceError) as info:
        device.choose_variant(
            [trt("trt-sm_86-fp16", "sm_86")], TABLE["nvidia_gpu"], GPU_EPS, facts, "trt-sm_86-fp16"
        )
    message = str(info.value)
    assert message.startswith("variant 'trt-sm_86-fp16' cannot run on this machine: ")
    assert "engine built for sm_86, this GPU is sm_75" in message
    assert "engine built with TensorRT 10.3.0, this machine has TensorRT 8.6.1" in message


def test_a_variant_that_failed_at_start_up_is_set_aside_with_its_reason() -> None:
    variants = [FP32_GPU, trt("trt-sm_86-fp16", "sm_86")]
    failed = {"trt-sm_86-fp16": "failed here at start-up (warm-up mismatch)"}
    choice = device.choose_variant(variants, TABLE["nvidia_gpu"], GPU_EPS, GPU_86, exclude=failed)
    assert choice.variant.name == "fp32"
    assert choice.refused == ("trt-sm_86-fp16: failed here at start-up (warm-up mismatch)",)


def test_wrapper_session_uses_the_prebuilt_engine_and_writes_nothing(tmp_path: Path) -> None:
    wrapper = tmp_path / "bundle" / "engines" / "trt-sm_86-fp16.onnx"
    providers = execution_providers(trt("trt-sm_86-fp16", "sm_86"), GPU_EPS, wrapper)
    assert providers[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    first = providers[0]
    assert isinstance(first, tuple) and first[0] == "TensorrtExecutionProvider"
    options = first[1]
    assert options["trt_engine_cache_enable"] is True
    assert options["trt_ep_context_file_path"] == str(wrapper.parent)
    # Read-only bundle: no context-model dump, no timing cache, no engine cache folder to create.
    assert options["trt_dump_ep_context_model"] is False and options["trt_timing_cache_enable"] is False
    assert "trt_engine_cache_path" not in options
    # onnx variants keep plain provider names (TensorRT EP builds from the ONNX model, as before).
    assert execution_providers(FP32_GPU, GPU_EPS, tmp_path / "model.fp32.onnx") == GPU_EPS


def test_onnx_variant_on_tensorrt_caches_its_engine_where_the_device_says(tmp_path: Path) -> None:
    cache = tmp_path / "release.trt-cache"
    providers = execution_providers(FP32_GPU, GPU_EPS, tmp_path / "model.fp32.onnx", trt_cache_dir=cache)
    assert providers[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    first = providers[0]
    assert isinstance(first, tuple) and first[0] == "TensorrtExecutionProvider"
    options = first[1]
    assert options["trt_engine_cache_enable"] is True and options["trt_engine_cache_path"] == str(cache)


def test_cpu_providers_ignore_the_tensorrt_cache(tmp_path: Path) -> None:
    providers = execution_providers(FP32_GPU, ["CPUExecutionProvider"], tmp_path / "m.onnx", tmp_path / "c")
    assert providers == ["CPUExecutionProvider"]


def _bundle_with_engine(tmp_path: Path) -> Bundle:
    """The tiny test bundle plus a TensorRT variant as the prebuild writes it (fake engine bytes)."""
    built = make_bundle(tmp_path)
    engines = built.path / "engines"
    engines.mkdir()
    (engines / "trt-sm_86-fp16.engine").write_bytes(b"engine bytes; never deserialised here")
    write_engine_wrapper(
        built.path / "model.fp32.onnx",
        engines / "trt-sm_86-fp16.engine",
        engines / "trt-sm_86-fp16.onnx",
        gpu_arch="sm_86",
        tensorrt_version="10.3.0",
    )
    manifest = json.loads((built.path / "manifest.json").read_text())
    manifest["variants"].append(
        {
            **trt("trt-sm_86-fp16", "sm_86", p50=0.001).model_dump(exclude_none=True),
            "file": "engines/trt-sm_86-fp16.onnx",
            "tolerance": {"kind": "top1", "min_agreement": 0.75},
        }
    )
    rels = [p.relative_to(built.path).as_posix() for p in built.path.rglob("*") if p.is_file()]
    manifest["files"] = contract.file_entries(
        built.path, [r for r in rels if r not in (contract.MANIFEST_NAME, contract.SIGNATURE_NAME)]
    )
    contract.write_manifest(built.path, manifest, contract.load_private_key(tmp_path / "keys" / "signer.pem"))
    return built


def test_server_refuses_a_requested_engine_it_cannot_run_and_says_why(tmp_path: Path) -> None:
    built = _bundle_with_engine(tmp_path)
    code, output = run_refused(
        built.path, built.public_key, ["--variant", "trt-sm_86-fp16", "--device-class", "nvidia_gpu"]
    )
    assert code == 2
    assert "variant 'trt-sm_86-fp16' cannot run on this machine" in output
    # This machine has no GPU, no TensorRT and the CPU build of ONNX Runtime: all three are named.
    assert "engine built for sm_86, no NVIDIA GPU compute capability detected here" in output
    assert "engine built with TensorRT 10.3.0, the TensorRT version here is unknown" in output
    assert "needs ONNX Runtime's TensorrtExecutionProvider" in output


def test_server_on_the_gpu_class_falls_back_to_the_onnx_variant_and_logs_why(tmp_path: Path) -> None:
    built = _bundle_with_engine(tmp_path)
    with running_server(
        built.path, built.public_key, tmp_path / "logs", ["--device-class", "nvidia_gpu"]
    ) as proc:
        with proc.client() as client:
            metrics = client.get("/metrics").text
        log = proc.log()
    assert 'variant="int8"' in metrics
    assert "TensorRT variant not used: trt-sm_86-fp16: engine built for sm_86" in log
    assert "device class nvidia_gpu; variant int8 (fastest measured" in log
