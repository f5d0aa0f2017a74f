"""Start-up: trust before load, variant choice, honest readiness, configuration by environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serving_support import REPO, Bundle, copy_bundle, free_port, make_bundle, run_refused, running_server

from contract import bundle as contract


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/v2/health/ready").status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return make_bundle(tmp_path_factory.mktemp("bundles"))


def test_tampered_model_file_is_refused_at_start(tiny: Bundle, tmp_path: Path) -> None:
    copy = copy_bundle(tiny.path, tmp_path / "copy")
    model = copy / "model.int8.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    code, output = run_refused(copy, tiny.public_key)
    assert code == 2
    assert "refused to serve" in output and "model.int8.onnx: sha256" in output
    assert "Uvicorn running" not in output


def test_tampered_manifest_is_refused_at_start(tiny: Bundle, tmp_path: Path) -> None:
    copy = copy_bundle(tiny.path, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["serving"]["max_batch_size"] = 4096
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, output = run_refused(copy, tiny.public_key)
    assert code == 2 and "signature does not verify" in output


def test_bundle_signed_by_another_key_is_refused(tiny: Bundle, tmp_path: Path) -> None:
    other = contract.generate_key(tmp_path / "other.pem")
    assert other is not None
    code, output = run_refused(tiny.path, contract.public_path(tmp_path / "other.pem"))
    assert code == 2 and "signature does not verify" in output


def test_stray_file_in_bundle_is_refused(tiny: Bundle, tmp_path: Path) -> None:
    copy = copy_bundle(tiny.path, tmp_path / "copy")
    (copy / "extra.onnx").write_bytes(b"smuggled")
    code, output = run_refused(copy, tiny.public_key)
    assert code == 2 and "extra.onnx: present in the bundle but not in the manifest" in output


def test_golden_mismatch_keeps_the_server_from_becoming_ready(tmp_path: Path) -> None:
    built = make_bundle(tmp_path, corrupt_golden=True)
    code, output = run_refused(built.path, built.public_key)
    assert code == 2 and "warm-up" in output and "does not reproduce the golden outputs" in output


def test_unknown_variant_fails_clearly(tiny: Bundle) -> None:
    code, output = run_refused(tiny.path, tiny.public_key, ["--variant", "fp64"])
    assert code == 2 and "--variant 'fp64' is not in the bundle (it has fp32, int8)" in output


def test_variant_this_machine_cannot_run_fails_clearly(tmp_path: Path) -> None:
    # A TensorRT variant needs ONNX Runtime's TensorRT provider, which the CPU build lacks.
    built = make_bundle(tmp_path)
    manifest = json.loads((built.path / "manifest.json").read_text())
    manifest["variants"].append(
        {
            **manifest["variants"][0],
            "name": "trt-sm_86-fp16",
            "format": "tensorrt",
            "precision": "fp16",
            "gpu_arch": "sm_86",
        }
    )
    contract.write_manifest(built.path, manifest, contract.load_private_key(tmp_path / "keys" / "signer.pem"))
    code, output = run_refused(
        built.path, built.public_key, ["--variant", "trt-sm_86-fp16", "--device-class", "nvidia_gpu"]
    )
    assert code == 2
    assert "variant 'trt-sm_86-fp16' cannot run on this machine" in output
    assert "TensorrtExecutionProvider" in output


def test_missing_public_key_is_named(tiny: Bundle, tmp_path: Path) -> None:
    code, output = run_refused(tiny.path, tmp_path / "absent.pub")
    assert code == 2 and "absent.pub: cannot load" in output


def test_auto_picks_faster_int8_logs_ready_time_and_variant_overrides(tiny: Bundle, tmp_path: Path) -> None:
    with running_server(tiny.path, tiny.public_key, tmp_path, ["--variant", "fp32"]) as proc:
        with proc.client() as c:
            metrics = c.get("/metrics").text
        assert 'variant="fp32"' in metrics
        assert "variant fp32 (requested with --variant)" in proc.log()
    with running_server(tiny.path, tiny.public_key, tmp_path) as proc:
        log = proc.log()
    assert "device class x86_cpu; variant int8 (fastest measured" in log
    assert "warm-up matched the golden outputs" in log
    assert "ready: process start to ready" in log


def test_environment_variables_configure_the_server_and_logs_are_json(tiny: Bundle, tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALDEPLOY_")}
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "DUALDEPLOY_BUNDLE": str(tiny.path),
            "DUALDEPLOY_PUBLIC_KEY": str(tiny.public_key),
            "DUALDEPLOY_PORT": str(port),
            "DUALDEPLOY_VARIANT": "fp32",
            "DUALDEPLOY_LOG_FORMAT": "json",
            "DUALDEPLOY_MAX_BATCH_SIZE": "2",
        }
    )
    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serving"], cwd=REPO, env=env, stderr=sink, stdout=sink
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not _ready(base):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        body = {"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": [0.0] * 12}]}
        refused = httpx.post(f"{base}/v2/models/tiny/infer", json=body, headers={"x-request-id": "abc123"})
        assert refused.status_code == 400 and "above the maximum of 2" in refused.json()["error"]
        assert refused.headers["x-request-id"] == "abc123"
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "request_id", "message"} <= set(line) for line in lines)
    refusal = next(line for line in lines if "above the maximum" in line["message"])
    assert refusal["request_id"] == "abc123"
    assert any("variant fp32" in line["message"] for line in lines)
