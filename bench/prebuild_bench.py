"""Prebuild benchmark: builds demo, demo-distilled and minilm from a cold cache, then measures.

Everything is measured side by side in this one run:

* MiniLM INT8 vs FP32: file size ratio, batch-1 p50 latency ratio (interleaved timing), and the
  minimum cosine similarity between the two on the fixed sentence set (models/minilm_sentences.txt).
* Demo: the CPU variant a server would choose (the fastest ONNX variant for ``x86_cpu`` in this
  run) vs FP32 latency, and its top-1 agreement with FP32 on 512 fresh samples.
* Distilled student: parameter ratio (from the build) and top-1 agreement with the teacher's
  ONNX model on 512 fresh samples.
* Caching: wall time of an unchanged ``python -m model_build build`` vs the first (cold) build.

Prints a table and writes ``bench/results/prebuild.json``.
Run: ``.venv/bin/python bench/prebuild_bench.py`` (a few minutes; builds use a temporary cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
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
from contract.manifest import Manifest, Variant  # noqa: E402
from model_build.benchmark import benchmark  # noqa: E402
from model_build.onnx_stages import session  # noqa: E402
from model_build.spec import BenchmarkSpec  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "prebuild.json"


def _build(spec: str, dist: Path, cache: Path, key: Path) -> float:
    """Run the real CLI; return its wall time in seconds."""
    started = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "model_build",
            "build",
            spec,
            "--out",
            str(dist),
            "--key",
            str(key),
            "--cache-dir",
            str(cache),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"build of {spec} failed:\n{proc.stderr[-3000:]}")
    return elapsed


def _variant(manifest: Manifest, name: str) -> Variant | None:
    return next((v for v in manifest.variants if v.name == name), None)


def _run(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    sess = session(path)
    out = []
    count = len(next(iter(feed.values())))
    for start in range(0, count, 32):
        out.append(sess.run(None, {k: v[start : start + 32] for k, v in feed.items()})[0])
    return np.concatenate(out)


def _quiet(_: str) -> None:
    pass


def _measure_minilm(mini: bundle.VerifiedBundle, cfg: BenchmarkSpec) -> dict[str, Any]:
    """INT8 vs FP32: size ratio, batch-1 latency ratio (interleaved), min cosine on the sentence set."""
    from models import minilm

    m_fp32, m_int8 = _variant(mini.manifest, "fp32"), _variant(mini.manifest, "int8")
    assert m_fp32 is not None
    if m_int8 is None:
        reason = next(d["reason"] for d in mini.manifest.dropped if d["variant"] == "int8")
        sys.exit(f"minilm int8 was dropped at build time: {reason}")
    sentences = minilm.sentence_inputs(count=10_000, seed=0)
    pair = {"fp32": mini.file(m_fp32.file), "int8": mini.file(m_int8.file)}
    lat = benchmark(pair, {k: v[:1] for k, v in sentences.items()}, cfg, _quiet)
    e32, e8 = _run(pair["fp32"], sentences), _run(pair["int8"], sentences)
    cosines = np.sum(e32 * e8, axis=1) / (np.linalg.norm(e32, axis=1) * np.linalg.norm(e8, axis=1))
    return {
        "size_ratio": m_int8.metrics["size_bytes"] / m_fp32.metrics["size_bytes"],
        "latency_ratio": lat["int8"]["latency_ms_p50"] / lat["fp32"]["latency_ms_p50"],
        "min_cosine": float(cosines.min()),
        "latency_ms": lat,
        "size_bytes": {"fp32": m_fp32.metrics["size_bytes"], "int8": m_int8.metrics["size_bytes"]},
        "sentences": len(e32),
    }


def _measure_demo(
    demo: bundle.VerifiedBundle, student: bundle.VerifiedBundle, cfg: BenchmarkSpec
) -> dict[str, Any]:
    """The variant a server would pick for x86_cpu vs FP32, and the student vs the teacher."""
    from models import demo_net

    cpu_variants = {
        v.name: demo.file(v.file)
        for v in demo.manifest.variants
        if v.format == "onnx" and "x86_cpu" in v.device_classes
    }
    samples = demo_net.sample_inputs(512, seed=2024)
    lat = benchmark(cpu_variants, {"image": samples["image"][:1]}, cfg, _quiet)
    chosen = min(lat, key=lambda n: lat[n]["latency_ms_p50"])
    fp32_logits = _run(cpu_variants["fp32"], {"image": samples["image"]})
    chosen_logits = _run(cpu_variants[chosen], {"image": samples["image"]})
    # The demo's FP32 ONNX model is the teacher: demo-distilled shares its load stage.
    s_fp32 = _variant(student.manifest, "fp32")
    assert s_fp32 is not None
    s_logits = _run(student.file(s_fp32.file), {"image": samples["image"]})
    return {
        "chosen": chosen,
        "latency_ratio": lat[chosen]["latency_ms_p50"] / lat["fp32"]["latency_ms_p50"],
        "agreement": float(np.mean(fp32_logits.argmax(-1) == chosen_logits.argmax(-1))),
        "student_agreement": float(np.mean(s_logits.argmax(-1) == fp32_logits.argmax(-1))),
        "param_ratio": (student.manifest.distillation or {})["param_ratio"],
        "latency_ms": lat,
        "samples": len(samples["image"]),
        "dropped": list(demo.manifest.dropped),
        "student": student.manifest.distillation,
        "student_dropped": list(student.manifest.dropped),
    }


def main() -> int:
    """Build, measure, print the table, write the JSON; exit 1 when a target is missed."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--iterations", type=int, default=400, help="batch-1 timed runs per variant (default 400)"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS.relative_to(ROOT)})"
    )
    args = parser.parse_args()
    cfg = BenchmarkSpec(warmup=20, iterations=args.iterations, throughput_batch=8)
    with tempfile.TemporaryDirectory(prefix="prebuild-bench.") as tmp_name:
        tmp = Path(tmp_name)
        key = tmp / "bench.pem"
        bundle.generate_key(key)
        dist, cache = tmp / "dist", tmp / "cache"
        timings = {}
        for spec in ("models/demo.yaml", "models/demo-distilled.yaml", "models/minilm.yaml"):
            print(f"building {spec} (cold cache) …", flush=True)
            timings[spec] = _build(spec, dist, cache, key)
        print("rebuilding models/demo.yaml unchanged …", flush=True)
        rebuild = _build("models/demo.yaml", dist, cache, key)
        pub = bundle.load_public_key(bundle.public_path(key))
        print("measuring side by side …", flush=True)
        mini = _measure_minilm(bundle.verify_bundle(dist / "minilm" / "latest", pub), cfg)
        demo = _measure_demo(
            bundle.verify_bundle(dist / "demo" / "latest", pub),
            bundle.verify_bundle(dist / "demo-distilled" / "latest", pub),
            cfg,
        )
    rows = [
        ("minilm int8/fp32 size", mini["size_ratio"], "<=", 0.30),
        ("minilm int8/fp32 batch-1 p50", mini["latency_ratio"], "<=", 0.60),
        ("minilm int8 vs fp32 min cosine", mini["min_cosine"], ">=", 0.98),
        (f"demo chosen ({demo['chosen']})/fp32 batch-1 p50", demo["latency_ratio"], "<=", 1.05),
        (f"demo {demo['chosen']} vs fp32 top-1 agreement", demo["agreement"], ">=", 0.99),
        ("student/teacher parameters", demo["param_ratio"], "<=", 0.125),
        ("student vs teacher top-1 agreement", demo["student_agreement"], ">=", 0.95),
        ("unchanged rebuild / first build time", rebuild / timings["models/demo.yaml"], "<=", 0.05),
    ]
    results: list[dict[str, Any]] = []
    print(f"\n{'measure':<44} {'value':>9} {'target':>10}  ok")
    for name, value, op, target in rows:
        ok = value <= target if op == "<=" else value >= target
        results.append({"measure": name, "value": round(value, 5), "target": f"{op} {target}", "ok": ok})
        print(f"{name:<44} {value:>9.4f} {op:>3} {target:>6}  {'yes' if ok else 'NO'}")
    build_seconds = {k: round(v, 2) for k, v in timings.items()}
    build_seconds["models/demo.yaml (unchanged rebuild)"] = round(rebuild, 2)
    print(f"\nbuild seconds: {build_seconds}")
    payload = {
        "benchmark": "prebuild",
        "machine": {
            "cpu": _cpu(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_after": os.getloadavg(),
        },
        "results": results,
        "details": {"minilm": mini, "demo": demo, "build_seconds": build_seconds},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out} and {charts.draw('prebuild', args.out)}")
    return 0 if all(r["ok"] for r in results) else 1


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
