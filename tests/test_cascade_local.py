"""``make hybrid-local`` (issue 13): the teacher and the escalating student come up on 127.0.0.1 with a
private CA, the table is printed, and ``down`` stops both processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from serving_support import REPO, free_port

pytestmark = pytest.mark.slow


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALDEPLOY_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "serving.hybrid_local", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_hybrid_local_starts_measures_and_stops(tmp_path: Path) -> None:
    assert (REPO / "dist" / "demo-distilled" / "latest" / "manifest.json").is_file(), "run make bundles"
    state = tmp_path / "state"
    ports = ["--teacher-port", str(free_port()), "--student-port", str(free_port())]
    up = _run("up", "--state", str(state), *ports)
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        header, values = next(
            (line, up.stdout.splitlines()[i + 1])
            for i, line in enumerate(up.stdout.splitlines())
            if line.split()[:3] == ["requests", "escalated", "fallbacks"]
        )
        requests, escalated, fallbacks = (int(v) for v in values.split()[:3])
        assert header and requests == 512 and 0 < escalated < 512 * 0.1 and fallbacks == 0
        assert float(values.split()[3].rstrip("%")) >= 99.8
        pids = [int((state / f"{name}.pid").read_text()) for name in ("teacher", "student")]
        assert (state / "pki" / "server.key").stat().st_mode & 0o077 == 0
    finally:
        down = _run("down", "--state", str(state))
    assert (
        down.returncode == 0 and "stopped the student" in down.stdout and "stopped the teacher" in down.stdout
    )
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
        )
    assert _run("down", "--state", str(state)).stdout.strip() == "nothing was running"
