"""``make hybrid-local``: the edge-cloud cascade on this machine, on 127.0.0.1 only.

``up`` makes a private CA and a certificate for 127.0.0.1 it signs, and a bearer token (under
``.cache/hybrid-local/``), starts the teacher (the demo bundle, HTTPS and the token) and the escalating
student (the demo-distilled bundle, ``--escalate-to`` the teacher), waits until both are ready, sends the
student's 512 quality-set images one request each, and prints the endpoints and a table: requests,
escalated, fallbacks, agreement with the teacher. ``down`` stops the two processes it started (by the
process ids it wrote) and says so; running ``up`` twice stops the first pair first.

Run from the repository root: ``python -m serving.hybrid_local up`` (or ``down``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import ipaddress
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from contract.bundle import iter_quality_inputs, read_manifest
from contract.codec import decode_infer_response, encode_infer_request

TEACHER_PORT, STUDENT_PORT = 8471, 8472


class HybridLocalError(Exception):
    """Something ``up`` or ``down`` could not do; the message says what to run."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_pki(folder: Path, address: str = "127.0.0.1") -> None:
    """A CA (``ca.crt``) and a certificate for ``address`` it signed (``server.crt``, ``server.key`` 0600)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("dualdeploy hybrid-local CA"))
        .issuer_name(_name("dualdeploy hybrid-local CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(address))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = folder / "server.key"
    key_path.write_bytes(b"")
    key_path.chmod(0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    token = folder / "token"
    token.write_text("")
    token.chmod(0o600)
    token.write_text(secrets.token_urlsafe(32) + "\n")


def _start(name: str, args: Sequence[str], state: Path) -> int:
    """Start ``python -m serving ARGS`` in its own session, logging to ``state/NAME.log``; its pid."""
    with (state / f"{name}.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serving", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives `make`; `down` stops it by the pid written here
        )
    (state / f"{name}.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def _wait_ready(url: str, verify: object, pid: int, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v2/health/ready", verify=verify, timeout=2.0).status_code == 200:  # type: ignore[arg-type]
                return
        if not _alive(pid):
            raise HybridLocalError(f"the server at {url} exited; its log ({log}):\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    raise HybridLocalError(f"the server at {url} was not ready within {timeout:.0f} s; see {log}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def down(state: Path) -> list[str]:
    """Stop the servers ``up`` started (SIGTERM, then SIGKILL after 30 s); return what it did."""
    done = []
    for name in ("student", "teacher"):
        pid_file = state / f"{name}.pid"
        if not pid_file.is_file():
            continue
        pid = int(pid_file.read_text())
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
            done.append(f"stopped the {name} (pid {pid})")
        pid_file.unlink()
    return done


def _infer(client: httpx.Client, path: str, image: np.ndarray) -> tuple[dict[str, object], np.ndarray]:
    body, headers = encode_infer_request({"image": image})
    response = client.post(path, content=body, headers=headers)
    response.raise_for_status()
    doc, arrays = decode_infer_response(
        response.content, response.headers.get("Inference-Header-Content-Length")
    )
    return doc, arrays["logits"]


def up(
    dist: Path, state: Path, public_key: Path, ports: tuple[int, int] = (TEACHER_PORT, STUDENT_PORT)
) -> str:
    """Start the pair, send the quality set, return the printed report.

    Raises:
        HybridLocalError: a bundle is not built, or a server does not come up.
    """
    teacher_dir, student_dir = dist / "demo" / "latest", dist / "demo-distilled" / "latest"
    for bundle in (teacher_dir, student_dir):
        if not (bundle / "manifest.json").is_file():
            raise HybridLocalError(f"{bundle} is not built: run make bundles")
    manifest = read_manifest(student_dir)
    if manifest.cascade is None or manifest.quality is None:
        raise HybridLocalError(f"{student_dir} has no cascade section: rebuild it with make bundles")
    down(state)
    pki = state / "pki"
    make_pki(pki)
    common = ["--public-key", str(public_key), "--host", "127.0.0.1"]
    teacher_url, student_url = f"https://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}"
    tls = ["--tls-cert", str(pki / "server.crt"), "--tls-key", str(pki / "server.key")]
    teacher_pid = _start(
        "teacher",
        [
            "--bundle",
            str(teacher_dir),
            "--port",
            str(ports[0]),
            *common,
            *tls,
            "--token-file",
            str(pki / "token"),
        ],
        state,
    )
    escalate = [
        "--escalate-to",
        teacher_url,
        "--escalate-token-file",
        str(pki / "token"),
        "--escalate-ca",
        str(pki / "ca.crt"),
    ]
    student_pid = _start(
        "student", ["--bundle", str(student_dir), "--port", str(ports[1]), *common, *escalate], state
    )
    verify = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    _wait_ready(teacher_url, verify, teacher_pid, state / "teacher.log")
    _wait_ready(student_url, True, student_pid, state / "student.log")
    token = (pki / "token").read_text().strip()
    requests = escalated = fallbacks = agree = 0
    with (
        httpx.Client(base_url=student_url, timeout=10) as edge,
        httpx.Client(
            base_url=teacher_url, verify=verify, timeout=10, headers={"Authorization": f"Bearer {token}"}
        ) as cloud,
    ):
        for batch in iter_quality_inputs(
            manifest.quality, lambda rel: io.BytesIO((student_dir / rel).read_bytes())
        ):
            for image in batch["image"]:
                doc, logits = _infer(edge, "/v2/models/demo-distilled/infer", image[None])
                _, teacher = _infer(cloud, "/v2/models/demo/infer", image[None])
                params = doc.get("parameters", {})
                assert isinstance(params, dict)
                requests += 1
                escalated += params.get("served_by") != "edge" or params.get("fallback") is True
                fallbacks += params.get("fallback") is True
                agree += int(logits.argmax() == teacher.argmax())
    c = manifest.cascade
    return "\n".join(
        [
            f"teacher (cloud)  {teacher_url}  demo {c.teacher.version}, HTTPS (CA {pki / 'ca.crt'}), "
            f"bearer token in {pki / 'token'}",
            f"student (edge)   {student_url}  demo-distilled {manifest.version}, "
            f"escalates {c.measure} < {c.threshold:.4f}",
            "",
            f"{'requests':>10} {'escalated':>10} {'fallbacks':>10} {'agreement with the teacher':>28}",
            f"{requests:>10} {escalated:>10} {fallbacks:>10} {agree / requests:>28.2%}",
            f"(the build expected {c.expected_escalation_rate:.2%} escalated and "
            f"{c.expected_agreement:.2%} agreement)",
            "",
            f"logs in {state}/; stop with make hybrid-local-stop",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``up`` or ``down``; exit 1 with the reason when something fails."""
    parser = argparse.ArgumentParser(
        prog="python -m serving.hybrid_local", description=__doc__.splitlines()[0]
    )
    parser.add_argument("action", choices=["up", "down"], help="start the pair and measure, or stop it")
    parser.add_argument("--dist", type=Path, default=Path("dist"), help="folder of the built bundles")
    parser.add_argument(
        "--state", type=Path, default=Path(".cache/hybrid-local"), help="certificates, pids and logs"
    )
    parser.add_argument("--teacher-port", type=int, default=TEACHER_PORT, help="the teacher's port")
    parser.add_argument("--student-port", type=int, default=STUDENT_PORT, help="the student's port")
    parser.add_argument("--public-key", type=Path, default=Path(".keys/dev-ed25519.pub"), help="signer's key")
    args = parser.parse_args(argv)
    args.state.mkdir(parents=True, exist_ok=True)
    try:
        if args.action == "down":
            print("\n".join(down(args.state)) or "nothing was running")
        else:
            print(up(args.dist, args.state, args.public_key, (args.teacher_port, args.student_port)))
    except HybridLocalError as exc:
        print(f"hybrid-local: {exc}", file=sys.stderr)
        if args.action == "up":
            down(args.state)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
