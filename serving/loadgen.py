"""A closed-loop load generator for a v2 server, and a server process to aim it at.

Used by the tuner (``python -m serving.tune``, on the device being tuned) and by
``bench/serving_bench.py``. The clients are asyncio coroutines on raw keep-alive sockets, each sending
one binary-tensor request (the v2 binary data extension) and waiting for its answer before the next, so
the measured latency is what a client sees. Run it in a process of its own, never in the server's.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from contract.codec import encode_infer_request

REPO = Path(__file__).resolve().parent.parent


def encode_request(inputs: dict[str, np.ndarray], model: str, host: str, port: int) -> bytes:
    """A complete HTTP/1.1 request using the binary tensor data extension."""
    body, headers = encode_infer_request(inputs)
    lines = [
        f"POST /v2/models/{model}/infer HTTP/1.1",
        f"Host: {host}:{port}",
        *(f"{name}: {value}" for name, value in headers.items()),
        f"Content-Length: {len(body)}",
        "",
        "",
    ]
    return "\r\n".join(lines).encode() + body


async def _client(
    host: str, port: int, request: bytes, *, stop_at: float, latencies: list[float], errors: list[str]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            writer.write(request)
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            parts = status_line.split()
            if len(parts) < 2 or parts[1] != b"200":
                errors.append(f"{status_line!r} {body[:200]!r}")
                continue
            latencies.append(time.perf_counter() - started)
    except (OSError, asyncio.IncompleteReadError) as exc:
        errors.append(repr(exc))
    finally:
        writer.close()


async def load(
    host: str, port: int, request: bytes, *, clients: int, seconds: float, warmup: float
) -> dict[str, Any]:
    """``clients`` closed-loop clients for ``seconds`` after ``warmup``; throughput, p50 and p99."""
    latencies: list[float] = []
    errors: list[str] = []
    if warmup > 0:
        warm: list[float] = []
        await asyncio.gather(
            *(
                _client(
                    host, port, request, stop_at=time.perf_counter() + warmup, latencies=warm, errors=errors
                )
                for _ in range(clients)
            )
        )
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(
        *(
            _client(host, port, request, stop_at=stop_at, latencies=latencies, errors=errors)
            for _ in range(clients)
        )
    )
    elapsed = time.perf_counter() - started
    lat_ms = sorted(x * 1000 for x in latencies)
    return {
        "clients": clients,
        "seconds": elapsed,
        "requests": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:3],
        "throughput_rps": len(latencies) / elapsed,
        "p50_ms": statistics.median(lat_ms) if lat_ms else None,
        "p99_ms": lat_ms[max(int(len(lat_ms) * 0.99) - 1, 0)] if lat_ms else None,
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ready(port: int) -> bool:
    """Whether the server on ``port`` answers ``/v2/health/ready`` with 200."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


class ServerProcess:
    """A ``python -m serving`` process on 127.0.0.1, started and ready (or an error with its log)."""

    def __init__(
        self,
        bundle: Path,
        public_key: Path,
        extra: Sequence[str] = (),
        *,
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        ready_timeout_s: float = 60.0,
    ) -> None:
        """Spawn the server and wait until it is ready; ``cold_start_s`` is spawn to ready.

        Args:
            bundle: the bundle folder.
            public_key: the signer's public key.
            extra: more server flags.
            env: extra environment (``DUALDEPLOY_*`` from the caller's environment is never inherited).
            log_dir: where the server's log goes (``$TMPDIR`` by default).
            ready_timeout_s: how long to wait for ready.

        Raises:
            RuntimeError: the server exited or was not ready in time (with its log).
        """
        self.port = free_port()
        folder = log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
        self.log = folder / f"dualdeploy-server-{self.port}.log"
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("DUALDEPLOY_")}
        child_env["PYTHONPATH"] = str(REPO)
        child_env.update(env or {})
        command = [sys.executable, "-m", "serving", "--bundle", str(bundle), "--public-key", str(public_key)]
        started = time.perf_counter()
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen(
                [*command, "--port", str(self.port), *extra],
                cwd=REPO,
                env=child_env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        while not ready(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.log.read_text()}")
            if time.perf_counter() - started > ready_timeout_s:
                self.stop()
                raise RuntimeError(f"server not ready in {ready_timeout_s:g} s: {self.log.read_text()}")
            time.sleep(0.002)
        self.cold_start_s = time.perf_counter() - started

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)
