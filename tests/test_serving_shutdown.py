"""Graceful shutdown: SIGTERM during load lets in-flight requests finish, refuses new ones, exits 0."""

from __future__ import annotations

import concurrent.futures
import signal
import socket
import time
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from serving_support import make_bundle, running_server

from contract.codec import encode_infer_request

CLIENTS = 12


def inflight(client: httpx.Client) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "dualdeploy_inflight_requests":
            return family.samples[0].value
    raise AssertionError("no dualdeploy_inflight_requests gauge")


def read_status(sock: socket.socket) -> int:
    """Read one whole response (the server closes the connection while draining); return its status."""
    data = b""
    with sock:
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]) if data else 0


def test_sigterm_during_load_drains_in_flight_and_refuses_new(tmp_path: Path) -> None:
    # Eight rows a request, one request a run: each takes long enough for all to be in flight.
    built = make_bundle(tmp_path / "b", kind="slow", max_batch_size=8)
    x = np.random.default_rng(0).normal(size=(8, 4, 256, 256)).astype(np.float32)
    body, headers = encode_infer_request({"x": x})
    extra = ["--grace-period-s", "30", "--max-queue", "64"]
    with running_server(built.path, built.public_key, tmp_path / "logs", extra) as proc:
        port = int(proc.base_url.rsplit(":", 1)[1])
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        start = f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}"
        request = f"{start}Content-Length: {len(body)}\r\n\r\n".encode() + body

        def send(_: int) -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", port), timeout=60)
            sock.sendall(request)  # 8 MiB: returns once the server has read most of it
            return sock

        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            socks = list(pool.map(send, range(CLIENTS)))
        with proc.client() as probe:
            assert inflight(probe) >= 1, "the load finished before SIGTERM: make the requests heavier"
            proc.proc.send_signal(signal.SIGTERM)
            # The probe's keep-alive connection may still be open while draining: readiness is gone.
            try:
                ready = probe.get("/v2/health/ready").status_code
            except httpx.TransportError:
                ready = None
            assert ready in (503, None)
        statuses = [read_status(sock) for sock in socks]
        assert statuses == [200] * CLIENTS
        # New connections are refused once the listener is closed.
        time.sleep(0.3)
        try:
            late = httpx.get(proc.base_url + "/v2/health/live", timeout=2).status_code
        except httpx.TransportError:
            late = None
        assert late is None, f"a new connection was served during shutdown ({late})"
        assert proc.proc.wait(timeout=30) == 0
    log = proc.log()
    assert "SIGTERM: draining" in log and "Traceback" not in log


def test_the_one_private_uvicorn_api_is_wrapped_and_pinned_to_the_installed_release() -> None:
    """serving.server.forget_captured_signal reads uvicorn's private Server._captured_signals."""
    import signal

    import uvicorn

    from serving.fastpath import UVICORN_PRIVATE_API_VERSION
    from serving.server import forget_captured_signal

    pinned = next(
        line.split("==")[1].strip()
        for line in (Path(__file__).resolve().parent.parent / "serving" / "requirements.txt")
        .read_text()
        .splitlines()
        if line.startswith("uvicorn==")
    )
    assert uvicorn.__version__ == UVICORN_PRIVATE_API_VERSION == pinned
    server = uvicorn.Server(uvicorn.Config(app="serving.app:unused"))
    server._captured_signals.append(signal.SIGTERM)  # what uvicorn's capture_signals does
    forget_captured_signal(server, signal.SIGTERM)
    assert server._captured_signals == []
