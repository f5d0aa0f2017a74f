"""Helpers for the serving tests: real signed bundles of tiny ONNX models, and real server processes.

The bundles follow the manifest contract of BRIEF.md and ``contract/bundle.py``
exactly; the golden outputs come from ONNX Runtime on the FP32 model (the
prebuild takes them from PyTorch instead).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from contract import bundle
from serving import device

REPO = Path(__file__).resolve().parents[1]


def _classifier(path: Path) -> None:
    """x FP32 [batch, 4] -> logits FP32 [batch, 3]: two dense layers with a ReLU."""
    rng = np.random.default_rng(7)
    w1 = numpy_helper.from_array(rng.normal(size=(4, 16)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.normal(size=(16,)).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(size=(16, 3)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "b2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [w1, b1, w2, b2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _embedder(path: Path) -> None:
    """ids, mask INT64 [batch, sequence] -> embedding FP32 [batch, 8]: masked mean of a lookup table."""
    rng = np.random.default_rng(11)
    table = numpy_helper.from_array(rng.normal(size=(32, 8)).astype(np.float32), "table")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"]),
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "two"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axes"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["maskf", "axes"], ["count"], keepdims=1),
        helper.make_node("Max", ["count", "one"], ["safe"]),
        helper.make_node("Div", ["summed", "safe"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_embedder",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 8])],
        [
            table,
            axes,
            numpy_helper.from_array(np.array([2], np.int64), "two"),
            numpy_helper.from_array(np.array([1.0], np.float32), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, path)


class _Calibration(CalibrationDataReader):
    def __init__(self, sample: dict[str, np.ndarray]) -> None:
        self.rows = iter(
            [{k: v[i : i + 1] for k, v in sample.items()} for i in range(len(next(iter(sample.values()))))]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.rows, None)


def _quantize(fp32: Path, int8: Path, sample: dict[str, np.ndarray]) -> None:
    """Static QDQ INT8 with per-channel weights, as the prebuild makes it (batch-independent results)."""
    quantize_static(
        str(fp32),
        str(int8),
        _Calibration(sample),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QInt8,
    )


def _slow(path: Path) -> None:
    """x FP32 [batch, 4, 256, 256] -> features FP32 [batch, 32]: convolutions, tens of ms a row on a CPU."""
    rng = np.random.default_rng(5)
    w1 = numpy_helper.from_array((rng.normal(size=(32, 4, 3, 3)) * 0.1).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.normal(size=(32, 32, 3, 3)) * 0.05).astype(np.float32), "w2")
    w3 = numpy_helper.from_array((rng.normal(size=(32, 32, 3, 3)) * 0.05).astype(np.float32), "w3")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c3"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow_convnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 256, 256])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 32])],
        [w1, w2, w3],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, path)


@dataclass
class Bundle:
    """A signed test bundle and the public key that verifies it."""

    path: Path
    public_key: Path
    manifest: dict[str, Any] = field(default_factory=dict)


def make_bundle(
    root: Path,
    *,
    kind: str = "classifier",
    max_batch_size: int = 8,
    max_queue_delay_ms: float = 2.0,
    int8_faster: bool = True,
    corrupt_golden: bool = False,
    int8_cpu_classes: Sequence[str] | None = None,
    mask_axis: str = "sequence",
    sequence_max: int = 64,
) -> Bundle:
    """Build and sign a bundle ``root/<model>/<version>`` with an fp32 and an int8 variant.

    Args:
        root: a scratch folder (``tmp_path``).
        kind: ``"classifier"`` (FP32 input, top-1 tolerance), ``"embedder"`` (INT64 inputs, cosine),
            or ``"slow"`` (convolutions on 4x256x256, tens of milliseconds a row).
        max_batch_size: the manifest's ``serving.max_batch_size``.
        max_queue_delay_ms: the manifest's ``serving.max_queue_delay_ms``.
        int8_faster: whether the manifest measures int8 faster than fp32.
        corrupt_golden: write negated golden outputs, which no variant reproduces (to fail warm-up).
        int8_cpu_classes: the CPU classes the manifest records the int8 variant as validated on
            (default: this machine's, as a build here would).
        mask_axis: the embedder's ``mask`` axis name; another name than ``sequence`` lets a request
            give ids and mask of different lengths, which the model itself then refuses.
        sequence_max: the embedder's ``axes`` maximum.

    Returns:
        The bundle and its public key.
    """
    name = {"classifier": "tiny", "embedder": "tinyemb", "slow": "slow"}[kind]
    out = root / name / "v1"
    out.mkdir(parents=True)
    key_path = root / "keys" / "signer.pem"
    key = bundle.generate_key(key_path) if not key_path.exists() else bundle.load_private_key(key_path)
    fp32 = out / "model.fp32.onnx"
    int8 = out / "model.int8.onnx"
    rng = np.random.default_rng(3)
    if kind == "classifier":
        _classifier(fp32)
        golden_in = {"x": rng.normal(size=(4, 4)).astype(np.float32)}
        inputs = [{"name": "x", "dtype": "float32", "shape": ["batch", 4], "allow_nonfinite": False}]
        outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", 3]}]
        tolerances = (
            {"kind": "allclose", "atol": 1e-4, "rtol": 1e-4},
            {"kind": "top1", "min_agreement": 0.75},
        )
        task = "classification"
    elif kind == "slow":
        _slow(fp32)
        golden_in = {"x": rng.normal(size=(2, 4, 256, 256)).astype(np.float32)}
        inputs = [
            {"name": "x", "dtype": "float32", "shape": ["batch", 4, 256, 256], "allow_nonfinite": False}
        ]
        outputs = [{"name": "features", "dtype": "float32", "shape": ["batch", 32]}]
        tolerances = ({"kind": "cosine", "min_cosine": 0.9999}, {"kind": "cosine", "min_cosine": 0.9})
        task = "embedding"
    else:
        _embedder(fp32)
        golden_in = {
            "ids": rng.integers(0, 32, size=(3, 5)).astype(np.int64),
            "mask": np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], np.int64),
        }
        inputs = [
            {"name": "ids", "dtype": "int64", "shape": ["batch", "sequence"], "allow_nonfinite": True},
            {"name": "mask", "dtype": "int64", "shape": ["batch", mask_axis], "allow_nonfinite": True},
        ]
        outputs = [{"name": "embedding", "dtype": "float32", "shape": ["batch", 8]}]
        tolerances = ({"kind": "cosine", "min_cosine": 0.9999}, {"kind": "cosine", "min_cosine": 0.98})
        task = "embedding"
    _quantize(fp32, int8, golden_in)
    session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    names: list[str] = [str(o["name"]) for o in outputs]
    golden_out: dict[str, np.ndarray] = dict(zip(names, session.run(None, golden_in), strict=True))
    if corrupt_golden:
        golden_out = {k: -v for k, v in golden_out.items()}
    bundle.save_tensors(out / "golden" / "inputs.npz", golden_in)
    bundle.save_tensors(out / "golden" / "outputs.npz", golden_out)
    p50 = (0.05, 0.03) if int8_faster else (0.03, 0.05)
    variants = []
    for vname, file, precision, tol, latency in (
        ("fp32", fp32.name, "fp32", tolerances[0], p50[0]),
        ("int8", int8.name, "int8", tolerances[1], p50[1]),
    ):
        variants.append(
            {
                "name": vname,
                "file": file,
                "format": "onnx",
                "precision": precision,
                "device_classes": ["x86_cpu", "arm64_cpu", "nvidia_gpu", "ascend"],
                "tolerance": tol,
                "metrics": {
                    "latency_ms_p50": latency,
                    "latency_ms_p99": latency * 2,
                    "throughput_b8": 1000.0 / latency,
                    "size_bytes": (out / file).stat().st_size,
                },
            }
        )
    if int8_cpu_classes is None:
        host = device.gather_facts(device.load_table(), device.load_cpu_classes()).cpu_class
        int8_cpu_classes = [host] if host else []
    variants[1]["cpu"] = {
        "validated": list(int8_cpu_classes),
        "results": {c: {"status": "passed", "via": "native"} for c in int8_cpu_classes},
    }
    manifest: dict[str, Any] = {
        "schema_version": bundle.SCHEMA_VERSION,
        "model": name,
        "version": "v1",
        "task": task,
        "inputs": inputs,
        "outputs": outputs,
        "variants": variants,
        "golden": {"inputs": "golden/inputs.npz", "outputs": "golden/outputs.npz"},
        "axes": {"sequence": sequence_max, mask_axis: sequence_max} if kind == "embedder" else {},
        "serving": {"max_batch_size": max_batch_size, "max_queue_delay_ms": max_queue_delay_ms},
        "dropped": [],
        "skipped": [{"stage": "tensorrt", "reason": "test bundle"}],
        "tools": {"onnx": onnx.__version__, "onnxruntime": ort.__version__},
    }
    rels = [fp32.name, int8.name, "golden/inputs.npz", "golden/outputs.npz"]
    manifest["files"] = bundle.file_entries(out, rels)
    bundle.write_manifest(out, manifest, key)
    return Bundle(out, bundle.public_path(key_path), manifest)


# --------------------------------------------------------------------------- server processes


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A running ``python -m serving`` and how to reach it."""

    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    verify: ssl.SSLContext | bool = True

    def log(self) -> str:
        """Everything the server wrote to stderr and stdout so far."""
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs: Any) -> httpx.Client:
        """An HTTP client bound to this server."""
        return httpx.Client(**{"base_url": self.base_url, "verify": self.verify, "timeout": 10.0, **kwargs})


def server_command(bundle_dir: Path, public_key: Path, port: int, extra: Sequence[str] = ()) -> list[str]:
    """The command line that starts a server on 127.0.0.1:port."""
    return [
        sys.executable,
        "-m",
        "serving",
        "--bundle",
        str(bundle_dir),
        "--public-key",
        str(public_key),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALDEPLOY_")}
    env["PYTHONPATH"] = str(REPO)
    return env


def run_refused(
    bundle_dir: Path, public_key: Path, extra: Sequence[str] = (), timeout: float = 30
) -> tuple[int, str]:
    """Run a server that is expected to refuse to start; return (exit code, output)."""
    proc = subprocess.run(
        server_command(bundle_dir, public_key, free_port(), extra),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


@contextlib.contextmanager
def running_server(
    bundle_dir: Path,
    public_key: Path,
    log_dir: Path,
    extra: Sequence[str] = (),
    *,
    scheme: str = "http",
    verify: ssl.SSLContext | bool = True,
    timeout: float = 30.0,
    prefix: Sequence[str] = (),
) -> Iterator[ServerProcess]:
    """Start a server process, wait until it reports ready, stop it afterwards.

    ``prefix`` runs the server under another program, e.g. ``qemu-x86_64 -cpu Haswell``.
    """
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{port}.log"
    with log_path.open("wb") as sink:
        proc = subprocess.Popen(
            [*prefix, *server_command(bundle_dir, public_key, port, extra)],
            cwd=REPO,
            env=_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    server = ServerProcess(proc, f"{scheme}://127.0.0.1:{port}", log_path, verify)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
            try:
                with server.client() as client:
                    if client.get("/v2/health/ready").status_code == 200:
                        break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready within {timeout} s:\n{server.log()}")
            time.sleep(0.05)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def self_signed_cert(folder: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM text (cryptography).

    Also writes them to ``folder/server.crt`` and ``folder/server.key`` (0600). The certificate
    is its own CA (basicConstraints CA:TRUE), so clients can trust it as a ``cafile``.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    (folder / "server.crt").write_text(cert_pem)
    (folder / "server.key").write_text(key_pem)
    (folder / "server.key").chmod(0o600)
    return cert_pem, key_pem


def copy_bundle(src: Path, dst: Path) -> Path:
    """A copy of a bundle folder (to tamper with)."""
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- cascade (issue 13) helpers

_FAULT_SERVER = r"""
import http.server, ssl, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body = b'{"error": "injected fault"}'
        self.send_response(int(sys.argv[2]))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[3], sys.argv[4])
server.socket = context.wrap_socket(server.socket, server_side=True)
print("listening", flush=True)
server.serve_forever()
"""


@contextlib.contextmanager
def fault_server(status: int, cert: Path, key: Path) -> Iterator[str]:
    """A real HTTPS process on 127.0.0.1 that answers every POST with ``status``; yields its base URL.

    It stands in for a teacher whose server fails (an injected fault, not the thing under test).
    """
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _FAULT_SERVER, str(port), str(status), str(cert), str(key)],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"listening"
        yield f"https://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def resign_bundle(src: Path, dst: Path, key_path: Path, **changes: Any) -> Path:
    """A copy of a real bundle whose manifest has ``changes`` (e.g. another ``version``), re-signed with
    ``key_path`` (so a server trusting that key serves it)."""
    import json

    copy_bundle(src.resolve(), dst)
    manifest = json.loads((dst / bundle.MANIFEST_NAME).read_bytes())
    manifest.update(changes)
    bundle.write_manifest(dst, manifest, bundle.load_private_key(key_path))
    return dst


def metric_value(metrics_text: str, name: str, labels: str = "") -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in metrics_text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
