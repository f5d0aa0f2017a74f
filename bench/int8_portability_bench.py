"""INT8 portability benchmark: what 7-bit weights (``reduce_range``) cost and what they buy, per CPU class.

The demo CNN's FP32 model (from the built bundle) is quantized twice with the spec's settings (static
QDQ, per-channel, percentile calibration on the same 128 samples), with 8-bit and with 7-bit weights.
Side by side in this one run, for each:

* top-1 agreement with FP32 on the bundle's 512-image quality set, natively and under
  ``qemu-x86_64 -cpu Haswell`` (the AVX2 CPU class: ORT's u8s8 kernels without VNNI);
* the largest difference between the native and the emulated outputs;
* batch-1 p50 and batch-8 throughput, natively (interleaved timing, the prebuild's own benchmark).

The host's CPU class is in the JSON: on a host without VNNI, "native" and "emulated" run the same kernel
family, so the VNNI column of the cost stays unmeasured here and is recorded as such.

Prints a table, writes ``bench/results/int8_portability.json`` and draws ``int8_portability.png``.
Run: ``.venv/bin/python bench/int8_portability_bench.py`` (about a minute; needs qemu-user and the demo
bundle, ``make build``).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import charts  # noqa: E402 - bench/charts.py, beside this script

from contract import bundle  # noqa: E402
from model_build import cpu_gate  # noqa: E402
from model_build.benchmark import benchmark  # noqa: E402
from model_build.onnx_stages import EVAL_BATCH, run_onnx, session  # noqa: E402
from model_build.spec import BenchmarkSpec, load_spec  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "int8_portability.json"
CHART = RESULTS.with_suffix(".png")  # drawn by bench/charts.py from the JSON
QEMU = ("qemu-x86_64", "-cpu", "Haswell")


def _quantize(fp32: Path, target: Path, reduce_range: bool, calibration: dict[str, np.ndarray]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader:
        def __init__(self) -> None:
            count = len(calibration["image"])
            self.batches = iter([{"image": calibration["image"][i : i + 16]} for i in range(0, count, 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    pre = target.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(
        str(pre),
        str(target),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.Percentile,
    )


def _agreement(reference: np.ndarray, got: np.ndarray) -> float:
    return float(np.mean(np.argmax(reference, -1) == np.argmax(got, -1)))


def main() -> int:
    demo = ROOT / "dist" / "demo" / "latest"
    if not (demo / "manifest.json").is_file():
        print("dist/demo/latest is missing: run `make build` first", file=sys.stderr)
        return 1
    if not shutil.which(QEMU[0]):
        print("qemu-x86_64 is missing: run .ci/system-packages (Debian qemu-user)", file=sys.stderr)
        return 1
    from models.demo_net import sample_inputs

    manifest = bundle.read_manifest(demo)
    spec = load_spec(ROOT / "models" / "demo.yaml")
    quality = manifest.quality
    if quality is None:
        print("the demo bundle has no quality set (built before schema 2): run `make build`", file=sys.stderr)
        return 1
    inputs = {
        "image": np.concatenate([b["image"] for b in bundle.iter_quality_inputs(quality, demo.joinpath)])
    }
    reference = bundle.load_tensors(demo / quality.reference)["logits"]
    calibration = sample_inputs(spec.calibration.samples, spec.calibration.seed)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="int8-bench.") as scratch:
        files = {}
        for name, reduce_range in (("int8-8bit", False), ("int8-7bit", True)):
            files[name] = Path(scratch) / f"{name}.onnx"
            _quantize(demo / "model.fp32.onnx", files[name], reduce_range, calibration)
        timing = benchmark(
            {"fp32": demo / "model.fp32.onnx", **files},
            {"image": inputs["image"][:8]},
            BenchmarkSpec(warmup=10, iterations=200, throughput_batch=8),
            lambda message: print(f"[bench] {message}", file=sys.stderr),
        )
        for name, path in files.items():
            native = run_onnx(session(path), spec, inputs)["logits"]
            started = time.perf_counter()
            chunks = [
                {"image": inputs["image"][i : i + EVAL_BATCH]} for i in range(0, len(reference), EVAL_BATCH)
            ]
            emulated = np.concatenate([o["logits"] for o in cpu_gate.run_emulated(QEMU, path, chunks)])
            rows.append(
                {
                    "variant": name,
                    "reduce_range": name.endswith("7bit"),
                    "agreement_native": _agreement(reference, native),
                    "agreement_avx2_emulated": _agreement(reference, emulated),
                    "max_abs_diff_native_vs_emulated": float(np.max(np.abs(native - emulated))),
                    "emulated_seconds": round(time.perf_counter() - started, 1),
                    **timing[name],
                }
            )
    host = cpu_gate.host_cpu_class(cpu_gate.load_table())
    result = {
        "host": {"machine": platform.machine(), "cpu_class": host, "load_avg": os.getloadavg()},
        "samples": len(reference),
        "fp32": timing["fp32"],
        "rows": rows,
        "vnni_cost": (
            "measured natively"
            if host in ("x86_64_avx512_vnni", "x86_64_avx_vnni")
            else f"not measured: this host is {host}; the VNNI kernels ran nowhere in this run"
        ),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    charts.draw("int8_portability", RESULTS)
    fp32_p50 = timing["fp32"]["latency_ms_p50"]
    print(f"host CPU class {host}; {len(reference)} images; FP32 p50 {fp32_p50:.3f} ms")
    print(
        f"{'variant':<10} {'agree native':>13} {'agree AVX2 emu':>15} {'max |nat-emu|':>14} "
        f"{'p50 ms':>8} {'b8 /s':>8}"
    )
    for r in rows:
        print(
            f"{r['variant']:<10} {100 * r['agreement_native']:>12.2f}% "
            f"{100 * r['agreement_avx2_emulated']:>14.2f}% {r['max_abs_diff_native_vs_emulated']:>14.4g} "
            f"{r['latency_ms_p50']:>8.3f} {r['throughput_b8']:>8.1f}"
        )
    print(f"VNNI cost: {result['vnni_cost']}")
    print(f"wrote {RESULTS.relative_to(ROOT)} and {CHART.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
