"""The server under systemd's protocols, driven the way systemd drives it (no systemd needed here).

The test plays the service manager: it binds and listens on the public socket, passes it to the server as
file descriptor 3 with ``LISTEN_PID``/``LISTEN_FDS`` (``sd_listen_fds(3)``), and listens on a datagram
``NOTIFY_SOCKET`` for ``READY=1``. The edge lab (tests/test_edge_lab.py) runs the same through real
systemd units.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc
from serving_support import REPO, Bundle, free_port, make_bundle, server_command

from serving.systemd import listen_fds, notify

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return make_bundle(tmp_path_factory.mktemp("systemd-bundle"))


@contextmanager
def public_socket() -> Iterator[socket.socket]:
    """The listening socket a .socket unit would own."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield sock
    finally:
        sock.close()


@contextmanager
def notify_socket(folder: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(folder / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(60)
    try:
        yield sock, path
    finally:
        sock.close()


def spawn(
    bundle: Bundle, listener: socket.socket, notify_path: str, log: Path, *extra: str, port: int = 0
) -> subprocess.Popen[bytes]:
    """Start a server with ``listener`` as fd 3 and LISTEN_PID set to its own pid, as systemd does."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALDEPLOY_")}
    env.update(PYTHONPATH=str(REPO), LISTEN_FDS="1", NOTIFY_SOCKET=notify_path)
    command = server_command(bundle.path, bundle.public_key, port or free_port(), extra)
    fd = listener.fileno()
    with log.open("ab") as sink:
        return subprocess.Popen(
            # The shell moves the listener to fd 3 and sets LISTEN_PID to its own pid, which exec hands
            # on to the server.
            ["/bin/bash", "-c", f'exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ exec "$@"', "sh", *command],
            env=env,
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            pass_fds=(fd,),
        )


def ready(notify: socket.socket, proc: subprocess.Popen[bytes], log: Path) -> str:
    try:
        message = notify.recv(4096).decode()
    except TimeoutError:
        pytest.fail(f"no READY=1 within 60 s (exit {proc.poll()}):\n{log.read_text()}")
    return message


def infer_ok(port: int, timeout: float) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=timeout).status_code == 200
    except httpx.TimeoutException:
        return False


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=30)


def test_serves_the_passed_socket_and_notifies_ready(bundle: Bundle, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    private = free_port()
    with public_socket() as listener, notify_socket(tmp_path) as (notify_sock, path):
        port = listener.getsockname()[1]
        proc = spawn(bundle, listener, path, log, "--inherited-socket", "serve", port=private)
        try:
            assert ready(notify_sock, proc, log) == "READY=1"
            assert infer_ok(port, 10), log.read_text()
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://127.0.0.1:{private}/v2/health/ready", timeout=2)
            print(f"\nserved the inherited socket :{port}; nothing bound on --port {private}")
        finally:
            assert stop(proc) == 0
            assert notify_sock.recv(4096).decode() == "STOPPING=1"
    assert "serving the socket systemd passed" in log.read_text()


def test_standby_gates_on_its_port_and_takes_the_public_socket_on_sigusr2(
    bundle: Bundle, tmp_path: Path
) -> None:
    """The hand-over of a release switch: the old server drains while a connection waits in the queue of
    the socket both share, and the new one (promoted) answers it: nothing is refused."""
    log = tmp_path / "server.log"
    gate = free_port()
    with public_socket() as listener, notify_socket(tmp_path) as (notify_sock, path):
        port = listener.getsockname()[1]
        old = spawn(bundle, listener, path, log, "--inherited-socket", "serve")
        new: subprocess.Popen[bytes] | None = None
        try:
            assert ready(notify_sock, old, log) == "READY=1"
            new = spawn(bundle, listener, path, log, "--inherited-socket", "standby", port=gate)
            assert ready(notify_sock, new, log) == "READY=1"
            assert infer_ok(gate, 10), "the standby server answers on its private gate port"
            assert stop(old) == 0
            assert notify_sock.recv(4096).decode() == "STOPPING=1"
            # Nobody accepts now; the kernel still completes the handshake into the shared queue.
            waiting = socket.create_connection(("127.0.0.1", port), timeout=2)
            waiting.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            waiting.settimeout(1.5)
            with pytest.raises(TimeoutError):
                waiting.recv(1)  # the standby server does not serve the public socket yet
            started = time.monotonic()
            new.send_signal(signal.SIGUSR2)
            waiting.settimeout(10)
            answer = waiting.recv(4096)
            waited = time.monotonic() - started
            waiting.close()
            assert answer.startswith(b"HTTP/1.1 200"), answer
            assert infer_ok(port, 10)
            print(f"\nqueued connection answered {waited * 1000:.0f} ms after SIGUSR2, none refused")
        finally:
            assert stop(old) == 0
            if new is not None:
                assert stop(new) == 0
    assert "promoted: serving the socket systemd passed too" in log.read_text()


def _grpc_ready(port: int) -> bool:
    client = tritonclient.grpc.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        return bool(client.is_server_ready(client_timeout=10))
    finally:
        client.close()


def test_releases_share_the_grpc_port_and_a_standby_binds_it_only_when_promoted(
    bundle: Bundle, tmp_path: Path
) -> None:
    """--grpc-port beside socket activation: the gRPC port is bound by the server itself, with SO_REUSEPORT,
    so the next release can take it beside the running one, and only once its gate passed."""
    log = tmp_path / "server.log"
    grpc_port = free_port()
    with public_socket() as listener, notify_socket(tmp_path) as (notify_sock, path):
        flags = ("--grpc-port", str(grpc_port))
        old = spawn(bundle, listener, path, log, "--inherited-socket", "serve", *flags)
        new: subprocess.Popen[bytes] | None = None
        try:
            assert ready(notify_sock, old, log) == "READY=1"
            gate = free_port()
            new = spawn(bundle, listener, path, log, "--inherited-socket", "standby", *flags, port=gate)
            assert ready(notify_sock, new, log) == "READY=1", "the standby server started beside the old one"
            assert log.read_text().count("serving gRPC") == 1, "the standby server has not bound gRPC yet"
            new.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + 10
            while log.read_text().count("serving gRPC") < 2:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            assert stop(old) == 0
            assert notify_sock.recv(4096).decode() == "STOPPING=1"
            assert _grpc_ready(grpc_port), "the promoted release answers on the shared gRPC port"
        finally:
            assert stop(old) == 0
            if new is not None:
                assert stop(new) == 0
    assert "refused to start" not in log.read_text()


def test_inherited_socket_without_one_is_refused(bundle: Bundle) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALDEPLOY_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        server_command(bundle.path, bundle.public_key, free_port(), ["--inherited-socket", "serve"]),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "systemd passed no listening socket" in proc.stderr + proc.stdout


def test_listen_fds_ignores_another_process_fds_and_notify_without_manager() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert listen_fds(env) == []
    assert "LISTEN_FDS" not in env, "unset so that children don't take them"
    assert notify("READY=1", {}) is False
