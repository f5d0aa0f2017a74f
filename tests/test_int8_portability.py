"""INT8 that is right on every CPU class it claims, checked on each class it runs on.

ONNX Runtime picks its integer kernels by CPU features. On x86-64 without VNNI the u8s8 kernels sum
pairs of products in 16 bits and saturate with 8-bit weights; ``qemu-x86_64 -cpu Haswell`` runs a
process as such a CPU on any x86-64 host, so these tests check that class on every machine that runs
the suite, VNNI or not. qemu-user is installed by ``make test`` (``.ci/system-packages``).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from serving_support import REPO, running_server, server_command

from contract import bundle
from contract.codec import decode_infer_response, encode_infer_request
from model_build import cpu_gate
from model_build.pipeline import Reporter, build
from model_build.spec import load_spec

QEMU = ("qemu-x86_64", "-cpu", "Haswell")
DEMO = REPO / "dist" / "demo" / "latest"
DEV_KEY = REPO / ".keys" / "dev-ed25519.pub"
TABLE = cpu_gate.load_table()
VNNI_FLAGS = frozenset({"avx2", "fma", "avx512bw", "avx512_vnni"})

needs_qemu = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="qemu-x86_64 -cpu Haswell emulates the AVX2 class on x86-64 hosts"
)


def _require_qemu() -> None:
    # make test installs qemu-user (.ci/system-packages); a missing one is a broken set-up, not a skip.
    assert shutil.which(QEMU[0]), "qemu-x86_64 is missing: run .ci/system-packages (Debian qemu-user)"


def _demo() -> Path:
    assert (DEMO / "manifest.json").is_file(), "dist/demo/latest is missing: make test builds it first"
    return DEMO


def test_plan_gates_each_claimed_class_natively_emulated_or_unverified() -> None:
    spec = load_spec(REPO / "models" / "demo.yaml")
    on_vnni = {p.cpu_class: p for p in cpu_gate.plan(spec, TABLE, arch="x86_64", flags=VNNI_FLAGS)}
    assert set(on_vnni) == set(TABLE["cpu_classes"])  # demo claims x86 and Arm device classes
    assert on_vnni["x86_64_avx512_vnni"].via == "native"
    assert on_vnni["x86_64_avx2"].via == ("emulated" if shutil.which(QEMU[0]) else "unverified")
    assert on_vnni["x86_64_avx_vnni"].via == "unverified"
    assert "lacking avx_vnni" in on_vnni["x86_64_avx_vnni"].reason
    assert on_vnni["aarch64"].via == "unverified"
    on_avx2 = {
        p.cpu_class: p.via
        for p in cpu_gate.plan(spec, TABLE, arch="x86_64", flags=frozenset({"avx2", "fma"}))
    }
    assert on_avx2["x86_64_avx2"] == "native"
    assert on_avx2["x86_64_avx512_vnni"] == "unverified"


def test_unknown_cpu_class_in_the_spec_is_an_error_naming_the_key(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "models" / "demo.yaml").read_text())
    data["quantize"]["cpu_classes"] = ["x86_64_avx10"]
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(data))
    spec = load_spec(path)
    with pytest.raises(Exception, match=r"quantize.cpu_classes: \['x86_64_avx10'\] not in"):
        cpu_gate.plan(spec, TABLE)


TEACHER_MADE_ON = "x86_64_avx2"
"""The CPU class of the machine that ran `python -m models.demo_net train` for the committed weights."""


@needs_qemu
def test_reduce_range_int8_computes_the_same_numbers_under_the_avx2_emulator() -> None:
    """7-bit weights keep the u8s8 sums exact: the emulated AVX2 run is bit-identical to the native one."""
    _require_qemu()
    demo = _demo()
    manifest = bundle.read_manifest(demo)
    int8 = manifest.variant("int8")
    assert manifest.quality is not None and int8.quantization is not None
    assert int8.quantization["reduce_range"] is True
    inputs = next(bundle.iter_quality_inputs(manifest.quality, lambda rel: demo / rel))
    session = ort.InferenceSession(str(demo / int8.file), providers=["CPUExecutionProvider"])
    native = session.run(None, inputs)[0]
    (emulated,) = cpu_gate.run_emulated(QEMU, demo / int8.file, [inputs])
    np.testing.assert_array_equal(emulated["logits"], native)


def test_the_demo_manifest_records_the_quantization_and_each_cpu_class() -> None:
    manifest = json.loads((_demo() / "manifest.json").read_text())  # the file format itself
    assert manifest["schema_version"] == bundle.SCHEMA_VERSION
    int8 = next(v for v in manifest["variants"] if v["name"] == "int8")
    q = int8["quantization"]
    assert q == {
        "mode": "static",
        "format": "QDQ",
        "per_channel": True,
        "reduce_range": True,
        "activation_type": "quint8",
        "weight_type": "qint8",
        "op_types": [],
        "calibration": {"method": "percentile", "samples": 128},
    }
    results = int8["cpu"]["results"]
    assert set(results) == set(TABLE["cpu_classes"])
    host = cpu_gate.host_cpu_class(TABLE)
    assert results[host]["status"] == "passed" and results[host]["via"] == "native"
    if host != "x86_64_avx2" and shutil.which(QEMU[0]):
        assert results["x86_64_avx2"]["via"] == " ".join(QEMU)
    assert results["x86_64_avx2"]["status"] == "passed"  # natively here, or emulated on a VNNI host
    assert results["aarch64"]["status"] == "unverified" and results["aarch64"]["reason"]
    assert sorted(int8["cpu"]["validated"]) == sorted(
        c for c, r in results.items() if r["status"] == "passed"
    )
    for name, result in results.items():
        assert result["requires"] == TABLE["cpu_classes"][name]["requires"]
    quality = manifest["quality"]
    assert quality["count"] == 512 and quality["inputs"]["noise"]["std"] == 1.0
    assert 0 <= int8["quality"]["near_ties"] < 0.01  # a 1-point top-1 drop cannot hide under the tolerance


@needs_qemu
@pytest.mark.slow
def test_server_under_the_avx2_emulator_serves_the_demo_within_half_a_point_of_fp32(tmp_path: Path) -> None:
    """The issue's acceptance check: python -m serving under qemu-x86_64 -cpu Haswell, real HTTP."""
    _require_qemu()
    demo = _demo()
    manifest = bundle.read_manifest(demo)
    assert manifest.quality is not None
    reference = bundle.load_tensors(demo / manifest.quality.reference)["logits"]
    batch = {k: v[:8] for k, v in next(bundle.iter_quality_inputs(manifest.quality, demo.joinpath)).items()}
    with (
        running_server(demo, DEV_KEY, tmp_path, timeout=240, prefix=QEMU) as server,
        server.client(timeout=120) as http,
    ):
        params = http.get("/v2/models/demo").json()["parameters"]
        body, headers = encode_infer_request(batch)
        answer = http.post("/v2/models/demo/infer", content=body, headers=headers)
    assert answer.status_code == 200, answer.text
    gate = dict(item.split("=") for item in params["quality_gate"].split(", "))
    assert params["variant"] == "int8"
    # The gate ran all 512 evaluation images through the server's model on the emulated kernels.
    assert float(gate["agreement"]) >= 0.995, params
    int8_quality = manifest.variant("int8").quality
    assert int8_quality is not None and float(gate["max_abs_diff"]) <= int8_quality.atol, params
    _, outputs = decode_infer_response(answer.content, answer.headers.get("Inference-Header-Content-Length"))
    logits = outputs["logits"]
    assert logits.shape == (8, 10)
    # This batch over HTTP, on the emulated kernels, against FP32 computed natively at build.
    assert np.mean(np.argmax(logits, -1) == np.argmax(reference[: len(logits)], -1)) >= 0.995


def _build_without_reduce_range(tmp_path: Path) -> tuple[Path, Path]:
    """A demo bundle quantized with 8-bit weights, as a build host with VNNI would have made it.

    Such a host measures 100 % agreement natively and keeps the variant with min_agreement 0.99. This
    host may lack VNNI and then (rightly) refuses it, so the build gate is relaxed to 0.95 here and the
    signed manifest is then given the 0.99 tolerance that the VNNI host would have recorded.
    """
    data = yaml.safe_load((REPO / "models" / "demo.yaml").read_text())
    data["quantize"].update(reduce_range=False, min_agreement=0.95, cpu_classes=["x86_64_avx2"])
    data["model"]["kwargs"]["weights"] = str(REPO / "models" / "demo_teacher.npz")
    data["tensorrt"] = {"archs": [], "precisions": ["fp16"]}
    data["benchmark"].update(max_slowdown=10.0, iterations=20, warmup=2)
    spec_path = tmp_path / "demo.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    key = tmp_path / "keys" / "signer.pem"
    bundle.generate_key(key)
    with open(os.devnull, "w") as sink:
        result = build(
            load_spec(spec_path),
            tmp_path / "dist",
            key_path=key,
            cache_root=tmp_path / "cache",
            report=Reporter(sink),
        )
    manifest = dict(result.manifest)
    int8 = next(v for v in manifest["variants"] if v["name"] == "int8")
    assert int8["quantization"]["reduce_range"] is False
    int8["tolerance"] = {"kind": "top1", "min_agreement": 0.99}
    bundle.write_manifest(result.bundle_dir, manifest, bundle.load_private_key(key))
    return result.bundle_dir, bundle.public_path(key)


@needs_qemu
@pytest.mark.slow
def test_on_device_gate_under_the_avx2_emulator_refuses_int8_built_without_reduce_range(
    tmp_path: Path,
) -> None:
    _require_qemu()
    bundle_dir, public_key = _build_without_reduce_range(tmp_path)
    command = [*QEMU, *server_command(bundle_dir, public_key, 0, ["--variant", "int8", "--check"])]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    log = run.stdout + run.stderr
    assert run.returncode == 2, log[-3000:]
    assert "on-device quality gate" in log and "top-1 agreement 0.9" in log and "< min_agreement 0.99" in log
    if cpu_gate.host_cpu_class(TABLE) not in (None, "x86_64_avx2"):
        # Control on a VNNI host: its own kernels keep top-1 agreement with FP32 at 99 % and more; only
        # the AVX2 kernels' saturation drops it. The build claimed the AVX2 class alone, so the outputs it
        # recorded are the AVX2 kernels' and the numeric half of the gate (rightly) refuses this host.
        native = subprocess.run(
            server_command(bundle_dir, public_key, 0, ["--variant", "int8", "--check"]),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        refusal = native.stdout + native.stderr
        assert native.returncode == 2, refusal[-3000:]
        assert "this CPU's kernels do not compute what the build validated" in refusal, refusal[-3000:]
        agreement = float(re.search(r"\(agreement ([0-9.]+),", refusal).group(1))  # type: ignore[union-attr]
        assert agreement >= 0.99, refusal[-3000:]


@pytest.mark.slow
def test_training_command_reproduces_the_committed_demo_weights(tmp_path: Path) -> None:
    """models/demo_teacher.npz is what `python -m models.demo_net train` makes (1 thread, deterministic).

    Bit for bit on the CPU class that made it (x86_64_avx2). PyTorch's CPU kernels round differently on
    other classes (AVX-512 reductions), and 300 steps of SGD carry that into other weights (measured on an
    AVX-512 VNNI host: up to 2.6 apart, also with ATEN_CPU_CAPABILITY=avx2); there the test checks that
    the command trains an equivalent teacher: the same accuracy within 2 points, 97 % top-1 agreement.
    """
    out = tmp_path / "teacher.npz"
    subprocess.run(
        [sys.executable, "-m", "models.demo_net", "train", "--out", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
        capture_output=True,
        timeout=600,
    )
    committed = np.load(REPO / "models" / "demo_teacher.npz")
    fresh = np.load(out)
    assert committed.files == fresh.files
    worst: dict[str, Any] = {}
    for name in committed.files:
        worst[name] = (
            float(np.max(np.abs(committed[name].astype(np.float64) - fresh[name])))
            if committed[name].size
            else 0.0
        )
    if cpu_gate.host_cpu_class(TABLE) == TEACHER_MADE_ON:
        # Bit-identical on the machine that made them; another CPU of the class may move a few ulps.
        assert max(worst.values()) <= 1e-3, worst
        return
    import torch

    from models import demo_net

    theirs, _, figures = demo_net.load_teacher(weights=str(REPO / "models" / "demo_teacher.npz"))
    ours, _, fresh_figures = demo_net.load_teacher(weights=str(out))
    assert abs(figures["task_accuracy"] - fresh_figures["task_accuracy"]) <= 0.02, (figures, fresh_figures)
    data = demo_net.sample_inputs(512, seed=4242)
    with torch.inference_mode():
        image = torch.from_numpy(data["image"])
        same = (theirs(image).argmax(-1) == ours(image).argmax(-1)).float().mean().item()
    assert same >= 0.97, f"top-1 agreement {same:.4f} between the committed and a fresh teacher ({worst})"
