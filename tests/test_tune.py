"""Tuned serving settings: the sidecar's bounds, the server reading it, and a real (short) tuning run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from contract.bundle import read_manifest
from serving import device, tune
from serving.loadgen import ServerProcess
from serving.server import parser as server_parser

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "dist" / "demo" / "latest"
DEV_KEY = REPO / ".keys" / "dev-ed25519.pub"


@pytest.fixture
def demo_built() -> None:
    """The demo bundle runs here, so its absence is a failure, never a skip."""
    assert (DEMO / "manifest.json").is_file() and DEV_KEY.is_file(), (
        "the demo bundle is missing: `make bundles` builds it (make test runs it first)"
    )


def _sidecar(**settings: Any) -> dict[str, Any]:
    values = {"max_batch_size": 4, "max_queue_delay_ms": 1.0, "threads": 1} | settings
    return {"schema_version": 1, "model": "demo", "classes": {"x86_cpu": {"settings": values}}}


def _parse(data: dict[str, Any], device_class: str = "x86_cpu") -> device.TunedSettings | None:
    return device.parse_tuned(data, device_class, model="demo", max_batch_size=8, source="tuned.yaml")


def test_a_valid_sidecar_gives_the_class_settings_and_their_environment() -> None:
    settings = _parse(_sidecar())
    assert settings == device.TunedSettings("x86_cpu", 4, 1.0, 1, 1)  # no instances key: one instance
    assert settings.environment() == {
        "DUALDEPLOY_MAX_BATCH_SIZE": "4",
        "DUALDEPLOY_MAX_QUEUE_DELAY_MS": "1.0",
        "DUALDEPLOY_THREADS": "1",
        "DUALDEPLOY_INSTANCES": "1",
    }
    assert _parse(_sidecar(instances=2)) == device.TunedSettings("x86_cpu", 4, 1.0, 1, 2)
    assert _parse(_sidecar(), device_class="jetson") is None  # not tuned there: the defaults apply


def test_the_environment_names_are_the_server_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in device.TunedSettings("x86_cpu", 2, 0.5, 1, 3).environment().items():
        monkeypatch.setenv(key, value)
    args = server_parser().parse_args(["--bundle", "x"])
    assert (args.max_batch_size, args.max_queue_delay_ms, args.threads, args.instances) == (2, 0.5, 1, 3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_sidecar(max_queue=4096), "key classes.x86_cpu.settings.max_queue: not a tunable setting"),
        (_sidecar(request_timeout_s=600), "safety bounds, never tuned"),
        (_sidecar(max_batch_size=16), "max_batch_size: 16 is not an integer from 1 to the bundle's serving"),
        (_sidecar(max_batch_size=True), "max_batch_size: True"),
        (_sidecar(max_queue_delay_ms=500), "max_queue_delay_ms: 500 is not a number from 0 to 100"),
        (_sidecar(threads=-1), "threads: -1"),
        (_sidecar(instances=0), "instances: 0 is not an integer from 1 to 64"),
        (_sidecar(instances=65), "instances: 65 is not an integer from 1 to 64"),
        (_sidecar(instances=True), "instances: True"),
        ({**_sidecar(), "model": "minilm"}, "key model: tuned for 'minilm', this bundle is 'demo'"),
        ({**_sidecar(), "schema_version": 2}, "key schema_version: must be 1"),
        ({**_sidecar(), "classes": ["x86_cpu"]}, "key classes: must be a mapping"),
    ],
)
def test_a_sidecar_that_would_loosen_a_bound_or_is_malformed_is_refused(
    data: dict[str, Any], message: str
) -> None:
    with pytest.raises(device.DeviceError) as caught:
        _parse(data)
    assert "tuned.yaml" in str(caught.value) and message in str(caught.value)


def test_a_missing_setting_is_named() -> None:
    data = _sidecar()
    del data["classes"]["x86_cpu"]["settings"]["threads"]
    with pytest.raises(device.DeviceError, match=r"key classes\.x86_cpu\.settings\.threads: missing"):
        _parse(data)


def test_the_search_space_never_exceeds_the_bundle_batch_cap() -> None:
    points = tune.space(max_batch_size=8, cpus=2)
    assert {p.max_batch_size for p in points} == {1, 2, 4, 8}
    assert {(p.threads, p.instances) for p in points} == {(0, 1), (1, 1), (1, 2), (2, 1)}
    assert tune.space(max_batch_size=1, cpus=1)[0].max_batch_size == 1
    # Instances and threads never ask for more CPUs than there are; ORT's default goes with one instance.
    wide = tune.space(max_batch_size=1, cpus=8)
    assert all(p.threads * p.instances <= 8 for p in wide if p.threads)
    assert {p.instances for p in wide if p.threads == 0} == {1}
    assert max(p.instances for p in wide) == 8


def test_a_setting_over_the_latency_bound_or_with_errors_scores_nothing() -> None:
    result = {"throughput_rps": 900.0, "p99_ms": 12.0, "errors": 0}
    assert tune.score(result, p99_bound_ms=20.0) == 900.0
    assert tune.score(result, p99_bound_ms=10.0) == 0.0
    assert tune.score(result | {"errors": 1}, p99_bound_ms=20.0) == 0.0


@pytest.mark.usefixtures("demo_built")
@pytest.mark.slow
def test_the_server_serves_with_the_tuned_settings(tmp_path: Path) -> None:
    sidecar = tmp_path / "tuned.yaml"
    sidecar.write_text(
        yaml.safe_dump(_sidecar(max_batch_size=2, max_queue_delay_ms=0.5, threads=1, instances=2))
    )
    env = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.tune",
            "env",
            str(sidecar),
            "--bundle",
            str(DEMO),
            "--device-class",
            "x86_cpu",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        timeout=60,
    ).stdout
    variables = dict(line.split("=", 1) for line in env.splitlines())
    assert variables == {
        "DUALDEPLOY_MAX_BATCH_SIZE": "2",
        "DUALDEPLOY_MAX_QUEUE_DELAY_MS": "0.5",
        "DUALDEPLOY_THREADS": "1",
        "DUALDEPLOY_INSTANCES": "2",
    }
    # The server, started with that environment (what an EnvironmentFile or a Pod's env does), uses it.
    server = ServerProcess(DEMO, DEV_KEY, env=variables, log_dir=tmp_path)
    try:
        log = server.log.read_text()
    finally:
        assert server.stop() == 0
    assert "max batch 2, queue delay 0.5 ms, instances 2" in log, log


@pytest.mark.usefixtures("demo_built")
@pytest.mark.slow
def test_a_short_tuning_run_records_settings_at_least_as_fast_as_the_defaults(tmp_path: Path) -> None:
    out, results = tmp_path / "tuned.yaml", tmp_path / "tune.json"
    command = [
        sys.executable,
        "-m",
        "serving.tune",
        "run",
        "--bundle",
        str(DEMO),
        "--public-key",
        str(DEV_KEY),
    ]
    command += ["--candidates", "3", "--seconds", "0.5", "--rounds", "1", "--clients", "4"]
    command += ["--out", str(out), "--results", str(results), "--device-class", "x86_cpu"]
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=240, check=False)
    assert run.returncode == 0, run.stderr
    assert "gain vs defaults" in run.stdout
    data = yaml.safe_load(out.read_text())
    record = data["classes"]["x86_cpu"]
    manifest = read_manifest(DEMO)
    defaults = {
        "max_batch_size": manifest.serving.max_batch_size,
        "max_queue_delay_ms": manifest.serving.max_queue_delay_ms,
        "threads": 0,
        "instances": 1,
    }
    assert record["defaults"]["settings"] == defaults
    if record["chosen"] == "tuned":
        assert record["tuned"]["throughput_rps"] >= record["defaults"]["throughput_rps"]
        assert record["settings"] == record["tuned"]["settings"]
    else:
        assert record["settings"] == defaults
    # What was written is what the server's check accepts.
    settings = device.load_tuned(out, "x86_cpu", model="demo", max_batch_size=manifest.serving.max_batch_size)
    assert settings is not None and settings.max_batch_size <= manifest.serving.max_batch_size
    assert os.path.getsize(results) > 0
