"""Peer benchmark: dualdeploy against the servers a user would pick instead, on the same bundle.

The peers are NVIDIA PyTriton (Triton Inference Server), KServe and MLServer. Each is installed from PyPI
into its own venv under ``.bench-venvs/`` (ignored by git; never the project's ``.venv``) and serves the
ONNX file that dualdeploy serves from the same bundle, with ONNX Runtime on one intra-op thread, as
dualdeploy runs with ``--threads 1``:

* **Triton** through PyTriton 0.7.0: PyTriton ships ``tritonserver`` with the Python backend only, so the
  model runs in a Python callback (``@batch``) holding an ONNX Runtime session; dynamic batching with the
  bundle's own ``max_batch_size`` and queue delay (the ONNX Runtime backend that Triton's documentation
  recommends for ONNX is not in the wheel). ``tritonserver`` needs ``LD_LIBRARY_PATH`` to name the
  interpreter's libpython folder.
* **KServe** 0.21: a custom ``kserve.Model`` whose ``predict`` runs ONNX Runtime (KServe's documentation
  serves ONNX through the Triton runtime on Kubernetes; its Python server takes a callback only); no
  dynamic batching (KServe batches in its Kubernetes agent, not in the Python server).
* **MLServer** 1.7.1: a custom runtime (``MLModel``) running ONNX Runtime, as MLServer has no ONNX runtime
  of its own; ``parallel_workers=0`` (its worker pool halves throughput on one core) and adaptive batching
  off (the default). MLServer 1.7.1 pins ``uvloop==0.21.0``. It has no binary tensor extension: its binary
  cells are null.

Every server is pinned to core 0 (``taskset -c 0``, children included) and the load generator to core 1:
``wrk`` from Debian (compiled, one thread), replaying one pre-encoded request body, the same bytes for
every server. Rows: demo and MiniLM × JSON and binary bodies × 1 and 16 connections. For reference, raw
in-process ``session.run`` on core 0: batch 1 and the best batch size (samples/s). Before a server is
timed on a row, one request is checked against the raw ONNX Runtime output; a server that answers
wrongly gets null with the reason.

The machine is shared and noisy, so all servers of a model run at once (idle but for the one measured),
every row is measured in the same run, and in rounds: each server once a round, in a rotating order,
``--rounds`` times (default 3 × 4 s, after a 2 s warm-up); a cell is the median of its rounds. Compare
within a row, not across runs. The raw reference is measured before the servers start and after they
stop; the rows carry the mean of the two.

Writes ``bench/results/peers.json`` and ``bench/results/peers.png``; prints a table.

    .venv/bin/python bench/peers_bench.py            # or: make bench-peers
    .venv/bin/python bench/peers_bench.py --seconds 5 --models demo
"""

# The peer venvs import this file to serve, and they hold neither the project's packages nor each
# other's: every import past the standard library is made where it is used.
# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Only the standard library at the top: the peer venvs import this file to serve (see serve_*).
REPO = Path(__file__).resolve().parents[1]
VENVS = REPO / ".bench-venvs"
RESULTS = REPO / "bench" / "results"
SERVER_CORE = "0"
CLIENT_CORE = "1"
SERVERS = ("dualdeploy", "triton", "kserve", "mlserver")
WARMUP_S = 2


@dataclass(frozen=True)
class Peer:
    """A peer server: what to install in its venv and how it was set up."""

    packages: tuple[str, ...]
    dist: str
    setup: str


PEERS = {
    "triton": Peer(
        ("nvidia-pytriton==0.7.0", "onnxruntime==1.32.0"),
        "nvidia-pytriton",
        "PyTriton, Python backend (ONNX Runtime in a @batch callback), dynamic batching as the bundle's",
    ),
    "kserve": Peer(
        ("kserve==0.21.0", "onnxruntime==1.32.0"),
        "kserve",
        "custom kserve.Model running ONNX Runtime in predict (a callback), no batching",
    ),
    "mlserver": Peer(
        ("mlserver==1.7.1", "uvloop==0.21.0", "onnxruntime==1.32.0"),
        "mlserver",
        "custom MLModel running ONNX Runtime (a callback), parallel_workers=0, no adaptive batching",
    ),
}


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message names the server, file or command."""


# --------------------------------------------------------------------------- peer servers (peer venvs)


def _peer_spec(path: str) -> dict[str, Any]:
    spec: dict[str, Any] = json.loads(Path(path).read_text())
    return spec


def _ort_session(onnx: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])


def serve_triton(spec: dict[str, Any], port: int) -> None:
    """PyTriton: the ONNX Runtime session in a batched Python callback."""
    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    session = _ort_session(spec["onnx"])
    out_names = [o["name"] for o in spec["outputs"]]

    @batch
    def infer(**inputs: Any) -> dict[str, Any]:
        return dict(zip(out_names, session.run(out_names, inputs), strict=True))

    def tensors(entries: list[dict[str, Any]]) -> list[Any]:
        return [
            Tensor(name=e["name"], dtype=np.dtype(e["dtype"]).type, shape=tuple(e["shape"])) for e in entries
        ]

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=port,
        grpc_address="127.0.0.1",
        grpc_port=port + 1,
        metrics_port=port + 2,
        allow_metrics=False,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=spec["model"],
            infer_func=infer,
            inputs=tensors(spec["inputs"]),
            outputs=tensors(spec["outputs"]),
            config=ModelConfig(
                max_batch_size=spec["max_batch"],
                batcher=DynamicBatcher(max_queue_delay_microseconds=spec["delay_us"]),
            ),
            strict=False,
        )
        triton.serve()


def serve_kserve(spec: dict[str, Any], port: int) -> None:
    """KServe: a custom Model whose predict runs the ONNX Runtime session."""
    import kserve
    from kserve import InferOutput, InferRequest, InferResponse

    session = _ort_session(spec["onnx"])
    out_names = [o["name"] for o in spec["outputs"]]
    datatypes = {o["name"]: o["datatype"] for o in spec["outputs"]}

    class OnnxModel(kserve.Model):
        def __init__(self, name: str) -> None:
            super().__init__(name)
            self.ready = True

        def predict(self, payload: InferRequest, headers: Any = None, response_headers: Any = None) -> Any:
            inputs = {i.name: i.as_numpy() for i in payload.inputs}
            results = session.run(out_names, inputs)
            outputs = [
                InferOutput(name=n, shape=list(r.shape), datatype=datatypes[n], data=r)
                for n, r in zip(out_names, results, strict=True)
            ]
            return InferResponse(
                response_id=payload.id or str(uuid.uuid4()),  # its JSON response needs one
                model_name=self.name,
                infer_outputs=outputs,
                use_binary_outputs=payload.use_binary_outputs,
            )

    kserve.ModelServer(http_port=port, grpc_port=port + 1, enable_grpc=False, workers=1).start(
        [OnnxModel(spec["model"])]
    )


def _mlserver_runtime() -> type:
    """The MLServer runtime class, built on first use (MLServer imports it by name, ``peers_bench.X``)."""
    from mlserver import MLModel
    from mlserver.codecs import NumpyCodec
    from mlserver.types import InferenceRequest, InferenceResponse

    class OnnxRuntime(MLModel):
        async def load(self) -> bool:
            self.session = _ort_session(self.settings.parameters.uri)
            self.out_names = [o.name for o in self.session.get_outputs()]
            return True

        async def predict(self, payload: InferenceRequest) -> InferenceResponse:
            inputs = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
            results = self.session.run(self.out_names, inputs)
            return InferenceResponse(
                model_name=self.name,
                id=payload.id,
                outputs=[
                    NumpyCodec.encode_output(name=n, payload=r)
                    for n, r in zip(self.out_names, results, strict=True)
                ],
            )

    return OnnxRuntime


def __getattr__(name: str) -> Any:
    if name == "MLServerOnnx":
        return _mlserver_runtime()
    raise AttributeError(name)


def serve_mlserver(spec: dict[str, Any], port: int) -> None:
    """MLServer: the custom runtime, no worker pool."""
    import asyncio

    from mlserver import MLServer
    from mlserver.settings import ModelParameters, ModelSettings, Settings

    settings = Settings(
        host="127.0.0.1",
        http_port=port,
        grpc_port=port + 1,
        metrics_port=port + 2,
        parallel_workers=0,
        debug=False,
    )
    model = ModelSettings(
        name=spec["model"],
        implementation="peers_bench.MLServerOnnx",
        parameters=ModelParameters(uri=spec["onnx"]),
    )
    asyncio.run(MLServer(settings).start([model]))


SERVE = {"triton": serve_triton, "kserve": serve_kserve, "mlserver": serve_mlserver}


# --------------------------------------------------------------------------- setup (the project's venv)


def ensure_venv(name: str, peer: Peer) -> Path:
    """The peer's venv, created and installed once (a stamp records the package list)."""
    venv = VENVS / name
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    wanted = " ".join(peer.packages)
    if python.exists() and stamp.exists() and stamp.read_text().strip() == wanted:
        return python
    print(f"installing {name} into {venv}: {wanted}", flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    for cmd in (
        [base, "-m", "venv", "--clear", str(venv)],
        [str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"],
        [str(python), "-m", "pip", "install", "-q", *peer.packages],
    ):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        if result.returncode != 0:
            raise BenchError(
                f"{name}: {' '.join(cmd)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
    stamp.write_text(wanted + "\n")
    return python


def ensure_wrk() -> str:
    """The ``wrk`` binary; installed from Debian when running as root, else the apt-get line is named."""
    found = shutil.which("wrk")
    if found:
        return found
    line = "apt-get install -y wrk"
    if os.geteuid() != 0:
        raise BenchError(f"wrk is not installed; run as root: {line}")
    for cmd in (["apt-get", "update", "-q"], line.split()):
        subprocess.run(cmd, check=True, timeout=600, capture_output=True)
    found = shutil.which("wrk")
    if not found:
        raise BenchError(f"wrk still missing after: {line}")
    return found


def _dist_version(python: Path, dist: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    return subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


# --------------------------------------------------------------------------- processes


def _free_port(span: int = 3) -> int:
    """A port with the next ``span - 1`` also free (a peer's gRPC and metrics ports)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + span < 65536 and all(_port_free(port + i) for i in range(1, span)):
            return port
    raise BenchError("no free block of ports on 127.0.0.1")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    return urllib.request.urlopen(request, timeout=30)


@dataclass
class Proc:
    """A server process in its own session, pinned to the server core; stop() ends its whole group."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    port: int
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as sink:
            self.popen = subprocess.Popen(
                ["taskset", "-c", SERVER_CORE, *self.cmd],
                cwd=REPO,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, model: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/v2/models/{model}/ready"
        while time.monotonic() < deadline:
            if self.popen is not None and self.popen.poll() is not None:
                raise BenchError(f"{self.name} exited {self.popen.returncode}: {self.tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                if _http("GET", url).status == 200:
                    return
            time.sleep(0.25)
        raise BenchError(f"{self.name} not ready in {timeout:.0f} s: {self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.popen is None or (self.popen.poll() is not None and not _group_alive(self.popen.pid)):
            return
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(self.popen.pid):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(timeout=0.2)
            if not _group_alive(self.popen.pid):
                return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


# --------------------------------------------------------------------------- requests and checks


@dataclass
class Model:
    """One bundle: the file dualdeploy serves, the request inputs and the reference output."""

    name: str
    bundle: Path
    onnx: Path
    variant: str
    inputs: dict[str, Any]
    reference: dict[str, Any]
    spec: dict[str, Any] = field(default_factory=dict)


def load_model(bundle: Path) -> dict[str, Any]:
    """The manifest facts a peer needs (names, dtypes, shapes, batching) and the request inputs."""
    import numpy as np

    from contract.bundle import load_tensors, read_manifest

    manifest = read_manifest(bundle)
    golden = load_tensors(bundle / manifest.golden.inputs)

    def entries(tensors: Any) -> list[dict[str, Any]]:
        from contract.codec import WIRE_DTYPES

        return [
            {
                "name": t.name,
                "dtype": t.dtype,
                "datatype": WIRE_DTYPES[t.dtype][0],
                "shape": [d if isinstance(d, int) else -1 for d in t.shape[1:]],
            }
            for t in tensors
        ]

    return {
        "manifest": manifest,
        "inputs": {t.name: np.ascontiguousarray(golden[t.name][:1]) for t in manifest.inputs},
        "spec": {
            "model": manifest.model,
            "inputs": entries(manifest.inputs),
            "outputs": entries(manifest.outputs),
            "max_batch": manifest.serving.max_batch_size,
            "delay_us": int(manifest.serving.max_queue_delay_ms * 1000),
        },
    }


def request_bodies(inputs: dict[str, Any]) -> dict[str, tuple[bytes, dict[str, str]]]:
    """The JSON body (flat ``data``, as tritonclient writes it) and the binary-extension body."""
    from contract.codec import _TO_WIRE, encode_infer_request

    doc = {
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": _TO_WIRE[a.dtype], "data": a.reshape(-1).tolist()}
            for n, a in inputs.items()
        ]
    }
    return {
        "json": (json.dumps(doc).encode(), {"Content-Type": "application/json"}),
        "binary": encode_infer_request(inputs),
    }


def check_answer(url: str, body: bytes, headers: dict[str, str], reference: dict[str, Any]) -> str | None:
    """None when the server's answer matches the raw ONNX Runtime output, else why not."""
    import numpy as np

    from contract.codec import decode_infer_response

    try:
        with _http("POST", url, body, headers) as response:
            content = response.read()
            length = response.headers.get("Inference-Header-Content-Length")
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}: {exc.read()[:300]!r}"
    except (OSError, urllib.error.URLError) as exc:
        return f"no answer: {exc}"
    try:
        _, arrays = decode_infer_response(content, length)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable answer ({exc}): {content[:300]!r}"
    for name, want in reference.items():
        got = arrays.get(name)
        if got is None or got.shape != want.shape:
            return f"output {name!r}: got {None if got is None else got.shape}, want {want.shape}"
        if not np.allclose(got, want, rtol=1e-3, atol=1e-3):
            return f"output {name!r} differs from ONNX Runtime by {float(np.abs(got - want).max()):.3g}"
    return None


def wrk(
    binary: str, url: str, body: bytes, headers: dict[str, str], *, conns: int, seconds: int, work: Path
) -> dict[str, Any]:
    """One wrk run on the client core: requests/s, p50 latency, and every request that was not a 200."""
    body_file = work / f"body-{len(body)}-{abs(hash(body))}.bin"
    body_file.write_bytes(body)
    lines = [
        'wrk.method = "POST"',
        f'local f = assert(io.open("{body_file}", "rb"))',
        "wrk.body = f:read('*a')",
    ]
    lines += ["f:close()"] + [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    script = work / "request.lua"
    script.write_text("\n".join(lines) + "\n")
    cmd = ["taskset", "-c", CLIENT_CORE, binary, "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s"]
    cmd += ["--latency", "-s", str(script), url]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-500:]
        raise BenchError(f"wrk failed ({result.returncode}) on {url}: {output}")
    return parse_wrk(result.stdout)


def parse_wrk(out: str) -> dict[str, Any]:
    """Requests/s, p50 (ms), non-2xx and socket errors from wrk's report."""
    parsed: dict[str, Any] = {"non_2xx": 0, "socket_errors": 0, "p50_ms": None}
    for line in out.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            parsed["rps"] = float(words[1])
        elif line.strip().startswith("Non-2xx or 3xx responses:"):
            parsed["non_2xx"] = int(words[-1])
        elif line.strip().startswith("Socket errors:"):
            parsed["socket_errors"] = sum(int(w.rstrip(",")) for w in words if w.rstrip(",").isdigit())
        elif len(words) == 2 and words[0] == "50%":
            parsed["p50_ms"] = _ms(words[1])
    if "rps" not in parsed:
        raise BenchError(f"no Requests/sec in wrk's output: {out[-500:]}")
    return parsed


def _ms(text: str) -> float:
    for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3), ("m", 60e3)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    raise BenchError(f"wrk latency {text!r} has no unit")


# --------------------------------------------------------------------------- raw in-process reference


def raw_main(onnx: str, inputs_file: str, seconds: float, max_batch: int) -> None:
    """(child, pinned to the server core) batch-1 and best-batch samples/s of ``session.run``."""
    import numpy as np

    session = _ort_session(onnx)
    with np.load(inputs_file) as data:
        inputs = {k: data[k] for k in data.files}
    names = [o.name for o in session.get_outputs()]
    figures: dict[str, float] = {}
    size = 1
    while size <= max_batch:
        feed = {k: np.ascontiguousarray(np.repeat(v, size, axis=0)) for k, v in inputs.items()}
        for _ in range(10):
            session.run(names, feed)
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            session.run(names, feed)
            runs += 1
        figures[str(size)] = runs * size / (time.perf_counter() - started)
        size *= 2
    print(json.dumps(figures))


def raw_reference(
    onnx: Path, inputs: dict[str, Any], seconds: float, max_batch: int, work: Path
) -> dict[str, Any]:
    import numpy as np

    inputs_file = work / f"raw-{onnx.parent.parent.name}.npz"
    np.savez(inputs_file, **inputs)
    cmd = ["taskset", "-c", SERVER_CORE, sys.executable, __file__, "--raw", str(onnx), str(inputs_file)]
    cmd += ["--seconds", str(seconds), "--max-batch", str(max_batch)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 10 + 120, check=False)
    if result.returncode != 0:
        raise BenchError(f"raw session.run failed: {result.stderr[-1000:]}")
    figures: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    per_batch = {int(k): v for k, v in figures.items()}
    best = max(per_batch, key=lambda b: per_batch[b])
    return {"batch1": per_batch[1], "best": per_batch[best], "best_batch": best, "per_batch": figures}


# --------------------------------------------------------------------------- the run


def start_servers(
    model: Model, pythons: dict[str, Path], names: Sequence[str], work: Path
) -> dict[str, Proc]:
    """Start every server of one model on the server core and wait until all are ready."""
    spec_file = work / f"{model.name}-spec.json"
    spec_file.write_text(json.dumps({**model.spec, "onnx": str(model.onnx)}))
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("DUALDEPLOY_", "PYTHON"))}
    procs: dict[str, Proc] = {}
    for name in names:
        port = _free_port()
        env = dict(base_env)
        log = work / f"{model.name}-{name}.log"
        if name == "dualdeploy":
            cmd = [sys.executable, "-m", "serving", "--bundle", str(model.bundle), "--port", str(port)]
            cmd += ["--threads", "1", "--log-level", "warning"]
            key = REPO / ".keys" / "dev-ed25519.pub"
            if key.exists():
                cmd += ["--public-key", str(key)]
            env["PYTHONPATH"] = str(REPO)
        else:
            python = pythons[name]
            libdir = subprocess.run(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            # PyTriton's tritonserver loads libpython for its Python backend stub.
            env["LD_LIBRARY_PATH"] = ":".join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))
            env["PYTHONPATH"] = str(REPO / "bench")  # MLServer imports peers_bench.MLServerOnnx
            cmd = [str(python), __file__, "--serve", name, "--spec", str(spec_file), "--port", str(port)]
        procs[name] = Proc(name, cmd, env, port, log)
    try:
        for proc in procs.values():
            proc.start()
        for proc in procs.values():
            proc.wait_ready(model.name, timeout=240)
    except BaseException:
        for proc in procs.values():
            proc.stop()
        raise
    return procs


def _problems(
    procs: dict[str, Proc], model: Model, body_kind: str, body: bytes, headers: dict[str, str]
) -> dict[str, str]:
    """Why a server can't be timed on a body (no binary extension, a wrong answer), by server."""
    problems: dict[str, str] = {}
    for name, proc in procs.items():
        if name == "mlserver" and body_kind == "binary":
            problems[name] = "no binary tensor extension"
            continue
        url = f"http://127.0.0.1:{proc.port}/v2/models/{model.name}/infer"
        wrong = check_answer(url, body, headers, model.reference)
        if wrong:
            problems[name] = wrong
    return problems


def bench_model(
    model: Model,
    pythons: dict[str, Path],
    names: Sequence[str],
    *,
    wrk_binary: str,
    seconds: int,
    rounds: int,
    conns: Sequence[int],
    work: Path,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every row of one model (each body and connection count, server after server), and wrk's figures."""
    bodies = request_bodies(model.inputs)
    rows: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []
    procs = start_servers(model, pythons, names, work)
    try:
        for body_kind, (body, headers) in bodies.items():
            problems = _problems(procs, model, body_kind, body, headers)
            for conn in conns:
                row: dict[str, Any] = {"model": model.name, "body": body_kind, "conns": conn}
                detail: dict[str, Any] = {n: {"null_because": why} for n, why in problems.items()}
                live = [n for n in SERVERS if n in procs and n not in problems]
                runs: dict[str, list[dict[str, Any]]] = {n: [] for n in live}
                for name in live:  # warm-up, not counted: connections, first batches, caches
                    url = f"http://127.0.0.1:{procs[name].port}/v2/models/{model.name}/infer"
                    wrk(wrk_binary, url, body, headers, conns=conn, seconds=WARMUP_S, work=work)
                # Rounds, each server once a round in a rotating order: a burst of load from the
                # machine's other users lands on every server alike, and the median drops it.
                for index in range(rounds):
                    for name in live[index % len(live) :] + live[: index % len(live)]:
                        url = f"http://127.0.0.1:{procs[name].port}/v2/models/{model.name}/infer"
                        figures = wrk(wrk_binary, url, body, headers, conns=conn, seconds=seconds, work=work)
                        runs[name].append({**figures, "loadavg_1m": os.getloadavg()[0]})
                for name in SERVERS:
                    row[name] = None
                    if name not in runs:
                        continue
                    bad = sum(r["non_2xx"] + r["socket_errors"] for r in runs[name])
                    median = statistics.median(r["rps"] for r in runs[name])
                    detail[name] = {"rps_median": median, "runs": runs[name]}
                    if bad:
                        detail[name]["null_because"] = f"{bad} failed requests"
                    else:
                        row[name] = round(median, 1)
                    print(
                        f"  {model.name:7} {body_kind:6} c={conn:<3} {name:10} {median:8.1f} req/s",
                        flush=True,
                    )
                rows.append(row)
                details.append({"model": model.name, "body": body_kind, "conns": conn, "servers": detail})
    finally:
        for proc in procs.values():
            proc.stop()
    return rows, details


def table(rows: list[dict[str, Any]], raws: dict[str, dict[str, Any]]) -> str:
    """The printed table: requests/s per server, the raw references, and dualdeploy over the best peer."""
    head = ("model", "body", "conns", *SERVERS, "raw b1", "raw best", "dd / best peer")
    lines = [head]
    for r in rows:
        peers = [r[p] for p in SERVERS[1:] if r[p] is not None]
        ratio = f"{r['dualdeploy'] / max(peers):.2f}×" if peers and r["dualdeploy"] else "-"
        cells = [r["model"], r["body"], str(r["conns"])]
        cells += ["-" if r[s] is None else f"{r[s]:.1f}" for s in SERVERS]
        cells += [f"{r['raw_batch1']:.1f}", f"{raws[r['model']]['best']:.1f}", ratio]
        lines.append(tuple(cells))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = [" | ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars per row (log scale: the peers span two orders of magnitude), raw batch-1 as a tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(SERVERS)
    for i, name in enumerate(SERVERS):
        xs = [k + (i - (len(SERVERS) - 1) / 2) * width for k in range(len(rows))]
        ys = [r[name] or 0.0 for r in rows]
        bars = ax.bar(xs, ys, width, label=name)
        for x, r in zip(xs, rows, strict=True):
            if r[name] is None:
                ax.text(x, 1.1, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        del bars
    ax.scatter(
        range(len(rows)),
        [r["raw_batch1"] for r in rows],
        marker="_",
        s=900,
        color="black",
        label="raw batch-1",
    )
    ax.set_xticks(
        range(len(rows)), [f"{r['model']}\n{r['body']}, {r['conns']} conn" for r in rows], fontsize=8
    )
    ax.set_yscale("log")
    top = max([r[n] or 0.0 for r in rows for n in SERVERS] + [r["raw_batch1"] for r in rows])
    ax.set_ylim(1, top * 6)  # room for the legend above the bars
    ax.set_ylabel("requests/s (log)")
    ax.set_title("v2 inference requests/s, same bundle and body, server on core 0, wrk on core 1")
    ax.legend(fontsize=8, ncol=5, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Install what is missing, measure every row, write the JSON and the chart, print the table."""
    wrk_binary = ensure_wrk()
    names = [n for n in SERVERS if n in args.servers]
    pythons = {name: ensure_venv(name, PEERS[name]) for name in names if name in PEERS}
    versions = {"dualdeploy": _own_version()}
    versions.update({name: _dist_version(pythons[name], PEERS[name].dist) for name in pythons})
    versions["onnxruntime"] = _dist_version(Path(sys.executable), "onnxruntime")
    versions["wrk"] = (
        subprocess.run([wrk_binary, "-v"], capture_output=True, text=True, check=False)
        .stdout.split("[")[0]
        .strip()
    )

    rows: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []
    raws: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="peers-bench-") as tmp:
        work = Path(tmp)
        for bundle in args.bundles:
            loaded = load_model(bundle)
            manifest = loaded["manifest"]
            if args.models and manifest.model not in args.models:
                continue
            variant = manifest.variant(args.variant)
            onnx = (bundle / variant.file).resolve()
            session = _ort_session(str(onnx))
            reference = dict(
                zip([o.name for o in session.get_outputs()], session.run(None, loaded["inputs"]), strict=True)
            )
            model = Model(
                manifest.model, bundle, onnx, variant.name, loaded["inputs"], reference, loaded["spec"]
            )
            print(
                f"== {model.name} ({variant.name}, {onnx.name}): raw session.run on core {SERVER_CORE}",
                flush=True,
            )
            before = raw_reference(onnx, model.inputs, args.seconds, int(model.spec["max_batch"]), work)
            model_rows, model_details = bench_model(
                model,
                pythons,
                names,
                wrk_binary=wrk_binary,
                seconds=args.seconds,
                rounds=args.rounds,
                conns=args.conns,
                work=work,
            )
            after = raw_reference(onnx, model.inputs, args.seconds, int(model.spec["max_batch"]), work)
            # Before and after the servers: the machine's load drifts, so the reference is their mean.
            raw = {
                "variant": variant.name,
                "file": onnx.name,
                "batch1": (before["batch1"] + after["batch1"]) / 2,
                "best": (before["best"] + after["best"]) / 2,
                "before": before,
                "after": after,
            }
            raws[model.name] = raw
            for row in model_rows:
                row["raw_batch1"] = round(raw["batch1"], 1)
            rows += model_rows
            details += model_details
    result = {
        "versions": versions,
        "rows": rows,
        "raw": raws,
        "details": details,
        "setup": {name: PEERS[name].setup for name in pythons},
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(),
            "python": platform.python_version(),
            "server_core": SERVER_CORE,
            "client_core": CLIENT_CORE,
            "seconds_per_run": args.seconds,
            "rounds": args.rounds,
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / "peers.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    chart(rows, out.with_suffix(".png"))
    print(table(rows, raws))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _own_version() -> str:
    sys.path.insert(0, str(REPO))
    from serving import __version__

    return str(__version__)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--bundles",
        type=Path,
        nargs="+",
        default=[REPO / "dist" / "demo" / "latest", REPO / "dist" / "minilm" / "latest"],
        help="bundle folders (default: dist/demo/latest dist/minilm/latest)",
    )
    p.add_argument("--models", nargs="*", help="only these models (by manifest name)")
    p.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS, help="servers to run")
    p.add_argument("--variant", default="int8", help="the bundle variant every server serves (default int8)")
    p.add_argument("--seconds", type=int, default=4, help="wrk seconds per run (default 4)")
    p.add_argument(
        "--rounds", type=int, default=3, help="runs per server and row; the median counts (default 3)"
    )
    p.add_argument("--conns", type=int, nargs="+", default=[1, 16], help="connection counts (default 1 16)")
    p.add_argument("--out", type=Path, help="results JSON (default bench/results/peers.json)")
    p.add_argument("--serve", choices=sorted(SERVE), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--raw", nargs=2, metavar=("ONNX", "INPUTS"), help=argparse.SUPPRESS)
    p.add_argument("--max-batch", type=int, default=8, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        SERVE[args.serve](_peer_spec(args.spec), args.port)
        return 0
    if args.raw:
        raw_main(args.raw[0], args.raw[1], args.seconds, args.max_batch)
        return 0
    sys.path.insert(0, str(REPO))
    # SIGTERM (from `timeout`, CI, a user) unwinds like Ctrl-C, so every server started is stopped.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    try:
        return run(args)
    except BenchError as exc:
        print(f"peers_bench: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
