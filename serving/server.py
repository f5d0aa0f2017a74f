"""The command line: flags and ``DUALDEPLOY_*`` environment variables, load, serve, drain.

Start-up order: verify the bundle, choose the variant, open the session, match the
golden outputs, and only then bind the port and report ready. A bundle that fails
any step is never served: the process exits 2 with the reason.

On SIGTERM the server stops reporting ready, stops accepting connections,
lets in-flight requests finish within the grace period, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from serving import __version__, logs, systemd
from serving.app import Settings, State, build_app
from serving.batching import Batcher
from serving.cascade import EscalationConfigError, EscalationSettings, Escalator
from serving.device import DEFAULT_TABLE, MAX_INSTANCES, memory_limit_bytes
from serving.fastpath import FastInfer, timed_protocol
from serving.metrics import Metrics
from serving.model import LoadedModel, ModelLoadError, load

if TYPE_CHECKING:  # imported in main() only with --grpc-port: see serving/grpc_v2/__init__.py
    from serving.grpc_api import GrpcEndpoint

log = logging.getLogger("serving")
_IMPORTED = time.monotonic()
DEV_PUBLIC_KEY = Path(".keys/dev-ed25519.pub")
EXIT_REFUSED = 2


def process_age() -> float:
    """Seconds since this process started (from /proc; since import where /proc is absent)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"DUALDEPLOY_{name}", default)


def _env_list(name: str) -> list[str]:
    value = os.environ.get(f"DUALDEPLOY_{name}", "")
    return [part.strip() for part in value.split(",") if part.strip()]


def parse_axis_max(values: Sequence[str]) -> dict[str, int]:
    """``["sequence=256"]`` → ``{"sequence": 256}``.

    Raises:
        ConfigError: naming the value that is not ``AXIS=N`` with N a positive integer.
    """
    bounds = {}
    for value in values:
        axis, sep, size = value.partition("=")
        if (
            not sep
            or not axis.strip()
            or not (size.strip().isascii() and size.strip().isdigit())
            or int(size) < 1
        ):
            raise ConfigError(
                f"--axis-max {value!r}: expected AXIS=N with N a positive integer, e.g. sequence=256"
            )
        bounds[axis.strip()] = int(size)
    return bounds


def parser() -> argparse.ArgumentParser:
    """The argument parser; every flag's default comes from its ``DUALDEPLOY_*`` variable."""
    p = argparse.ArgumentParser(
        prog="python -m serving",
        description="Serve a signed dualdeploy bundle over the Open Inference Protocol (KServe v2 REST). "
        "Every flag can also be set by the environment variable named in its help.",
    )
    p.add_argument(
        "--bundle",
        type=Path,
        default=_env("BUNDLE"),
        help="bundle folder, e.g. dist/demo/latest (DUALDEPLOY_BUNDLE)",
    )
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="address to bind (DUALDEPLOY_HOST)")
    p.add_argument("--port", type=int, default=_env("PORT", "8000"), help="port to bind (DUALDEPLOY_PORT)")
    p.add_argument(
        "--grpc-port",
        type=int,
        default=_env("GRPC_PORT"),
        help="also serve the v2 gRPC API (inference.GRPCInferenceService) on this port of --grpc-host, with "
        "the same model, queue, metrics, TLS and token; off when not given (DUALDEPLOY_GRPC_PORT)",
    )
    p.add_argument(
        "--grpc-host",
        default=_env("GRPC_HOST"),
        help="address the gRPC port binds; default --host (with --inherited-socket, where --host is the "
        "gate's loopback, the site address) (DUALDEPLOY_GRPC_HOST)",
    )
    p.add_argument(
        "--variant",
        default=_env("VARIANT", "auto"),
        help="'auto' or a variant name from the manifest (DUALDEPLOY_VARIANT)",
    )
    p.add_argument(
        "--public-key",
        type=Path,
        default=_env("PUBLIC_KEY"),
        help=f"trusted signer's PEM public key; default {DEV_PUBLIC_KEY} with a warning "
        "(DUALDEPLOY_PUBLIC_KEY)",
    )
    p.add_argument(
        "--device-class",
        default=_env("DEVICE_CLASS", "auto"),
        help="'auto' to detect, or a class of the device table (DUALDEPLOY_DEVICE_CLASS)",
    )
    p.add_argument(
        "--device-table",
        type=Path,
        default=_env("DEVICE_TABLE", str(DEFAULT_TABLE)),
        help="the device-class table (DUALDEPLOY_DEVICE_TABLE)",
    )
    p.add_argument(
        "--tls-cert",
        type=Path,
        default=_env("TLS_CERT"),
        help="PEM certificate: serve HTTPS (DUALDEPLOY_TLS_CERT)",
    )
    p.add_argument(
        "--tls-key",
        type=Path,
        default=_env("TLS_KEY"),
        help="PEM private key of --tls-cert (DUALDEPLOY_TLS_KEY)",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        default=_env("TOKEN_FILE"),
        help="file holding the bearer token; health checks stay open (DUALDEPLOY_TOKEN_FILE)",
    )
    p.add_argument(
        "--metrics-token-file",
        type=Path,
        default=_env("METRICS_TOKEN_FILE"),
        help="file holding a second bearer token that can read /metrics and nothing else (for Prometheus); "
        "the inference token reads it too (DUALDEPLOY_METRICS_TOKEN_FILE)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=_env("MAX_BATCH_SIZE"),
        help="override the manifest's serving.max_batch_size (DUALDEPLOY_MAX_BATCH_SIZE)",
    )
    p.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=_env("MAX_QUEUE_DELAY_MS"),
        help="override the manifest's serving.max_queue_delay_ms (DUALDEPLOY_MAX_QUEUE_DELAY_MS)",
    )
    p.add_argument(
        "--axis-max",
        action="append",
        default=_env_list("AXIS_MAX"),
        metavar="AXIS=N",
        help="lower a named input axis's maximum below the manifest's axes (or give one that a bundle "
        "older than schema 3 lacks); repeatable (DUALDEPLOY_AXIS_MAX, comma-separated)",
    )
    p.add_argument(
        "--max-request-elements",
        type=int,
        default=_env("MAX_REQUEST_ELEMENTS"),
        help="most tensor elements one request may carry; default the largest request the bounds allow "
        "(DUALDEPLOY_MAX_REQUEST_ELEMENTS)",
    )
    p.add_argument(
        "--batch-memory-mb",
        type=int,
        default=_env("BATCH_MEMORY_MB"),
        help="memory budget of one model run, against the build's measure per sample; default half of "
        "the memory this process may use (its cgroup limit or the machine's) (DUALDEPLOY_BATCH_MEMORY_MB)",
    )
    p.add_argument(
        "--read-timeout-s",
        type=float,
        default=_env("READ_TIMEOUT_S", "30"),
        help="longest time a request's head and body may take to arrive; a new or idle keep-alive "
        "connection is closed after --keep-alive-s (DUALDEPLOY_READ_TIMEOUT_S)",
    )
    p.add_argument(
        "--keep-alive-s",
        type=float,
        default=_env("KEEP_ALIVE_S", "5"),
        help="close a connection that sends nothing for this long (DUALDEPLOY_KEEP_ALIVE_S)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=_env("MAX_QUEUE", "256"),
        help="requests that may wait; beyond, 503 with Retry-After (DUALDEPLOY_MAX_QUEUE)",
    )
    p.add_argument(
        "--request-timeout-s",
        type=float,
        default=_env("REQUEST_TIMEOUT_S", "30"),
        help="longest wait for a result (DUALDEPLOY_REQUEST_TIMEOUT_S)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=_env("MAX_BODY_BYTES", str(16 << 20)),
        help="largest request body, after decompression (DUALDEPLOY_MAX_BODY_BYTES)",
    )
    p.add_argument(
        "--grace-period-s",
        type=float,
        default=_env("GRACE_PERIOD_S", "25"),
        help="how long SIGTERM waits for in-flight requests (DUALDEPLOY_GRACE_PERIOD_S)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=_env("THREADS", "0"),
        help="ONNX Runtime intra-op threads, 0 for its default (DUALDEPLOY_THREADS)",
    )
    p.add_argument(
        "--instances",
        type=int,
        default=_env("INSTANCES", "1"),
        help="model runs at once, each on its own thread through the one session; the memory budget of "
        "a run is --batch-memory-mb divided among them (DUALDEPLOY_INSTANCES)",
    )
    p.add_argument(
        "--trt-cache-dir",
        type=Path,
        default=_env("TRT_CACHE_DIR"),
        help="writable folder where the TensorRT EP caches engines it builds from an ONNX variant "
        "(Jetson; the edge role sets it beside the release) (DUALDEPLOY_TRT_CACHE_DIR)",
    )
    p.add_argument(
        "--escalate-to",
        default=_env("ESCALATE_TO"),
        metavar="URL",
        help="escalate the rows below the bundle's cascade threshold to this teacher server "
        "(https://host:port); off by default, and then no connection leaves this server "
        "(DUALDEPLOY_ESCALATE_TO)",
    )
    p.add_argument(
        "--escalate-token-file",
        type=Path,
        default=_env("ESCALATE_TOKEN_FILE"),
        help="file holding the teacher's bearer token (DUALDEPLOY_ESCALATE_TOKEN_FILE)",
    )
    p.add_argument(
        "--escalate-ca",
        type=Path,
        default=_env("ESCALATE_CA"),
        help="PEM CA certificates the teacher's certificate must chain to (DUALDEPLOY_ESCALATE_CA)",
    )
    p.add_argument(
        "--escalate-deadline-ms",
        type=float,
        default=_env("ESCALATE_DEADLINE_MS", "500"),
        help="longest time an escalation may add to a request; then the local answer goes out, marked "
        "fallback (DUALDEPLOY_ESCALATE_DEADLINE_MS)",
    )
    p.add_argument(
        "--circuit-failures",
        type=int,
        default=_env("CIRCUIT_FAILURES", "5"),
        help="consecutive escalation failures that open the circuit (DUALDEPLOY_CIRCUIT_FAILURES)",
    )
    p.add_argument(
        "--circuit-open-s",
        type=float,
        default=_env("CIRCUIT_OPEN_S", "10"),
        help="seconds the open circuit answers locally before one trial escalation "
        "(DUALDEPLOY_CIRCUIT_OPEN_S)",
    )
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=_env("LOG_FORMAT", "text"),
        help="'json' for one JSON object a line (DUALDEPLOY_LOG_FORMAT)",
    )
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "info"), help="(DUALDEPLOY_LOG_LEVEL)")
    p.add_argument(
        "--inherited-socket",
        choices=["serve", "standby"],
        default=_env("INHERITED_SOCKET"),
        help="serve the listening socket that systemd passed (socket activation) instead of binding "
        "--host/--port; 'standby' binds --host/--port (a release's private gate port) and starts serving "
        "the inherited socket too on SIGUSR2, once the gate passed (DUALDEPLOY_INHERITED_SOCKET)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="verify, load and warm up the bundle, then exit 0 without serving "
        "(image builds and edge installs use it)",
    )
    p.add_argument("--version", action="version", version=f"dualdeploy serving {__version__}")
    return p


def forget_captured_signal(server: uvicorn.Server, sig: int) -> None:
    """Stop uvicorn from re-raising ``sig`` after its shutdown (a private uvicorn API, as the fast path's).

    uvicorn has no public way to say that a captured signal was handled; its ``Server`` keeps them in
    ``_captured_signals`` and re-raises each one when ``serve()`` returns.
    """
    captured: list[int] = server._captured_signals  # private: pinned (fastpath.UVICORN_PRIVATE_API_VERSION)
    if sig in captured:
        captured.remove(sig)


class ConfigError(Exception):
    """A flag or environment variable has an unusable value."""


def _check_args(args: argparse.Namespace) -> str | None:
    """Validate the arguments; return the bearer token if one is configured.

    Raises:
        ConfigError: naming the flag.
    """
    if args.bundle is None:
        raise ConfigError("--bundle (or DUALDEPLOY_BUNDLE) is required")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    for flag in ("tls_cert", "tls_key"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            raise ConfigError(f"--{flag.replace('_', '-')} {path}: no such file")
    for flag, low in (
        ("max_batch_size", 1),
        ("max_queue", 1),
        ("max_body_bytes", 1024),
        ("max_request_elements", 1),
        ("batch_memory_mb", 1),
        ("instances", 1),
    ):
        value = getattr(args, flag)
        if value is not None and value < low:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least {low}, got {value}")
    for flag in ("max_queue_delay_ms", "request_timeout_s", "grace_period_s"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must not be negative, got {value}")
    _check_bounds(args)
    _check_grpc_port(args)
    if args.inherited_socket and not systemd.passed_fds():
        raise ConfigError(
            f"--inherited-socket {args.inherited_socket}, but systemd passed no listening socket "
            "(start the server through its .socket unit, or drop the flag)"
        )
    args.metrics_token = None
    if args.metrics_token_file is not None:
        args.metrics_token = read_token(args.metrics_token_file, "--metrics-token-file")
    if args.token_file is None:
        return None
    token = read_token(args.token_file, "--token-file")
    if token == args.metrics_token:
        raise ConfigError(
            "--metrics-token-file holds the inference token: give Prometheus its own token, "
            "which can read /metrics and nothing else"
        )
    return token


def read_token(path: Path, flag: str) -> str:
    """A bearer token from its file (stripped), or a ConfigError naming ``flag``."""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read ({exc})") from exc
    if not token:
        raise ConfigError(f"{flag} {path}: the file is empty")
    return token


def escalation_settings(args: argparse.Namespace) -> EscalationSettings | None:
    """The ``--escalate-*`` flags as settings, or None when escalation is off.

    Raises:
        ConfigError: naming the flag that is missing or unusable.
    """
    given = [f for f in ("escalate_token_file", "escalate_ca") if getattr(args, f) is not None]
    if args.escalate_to is None:
        if given:
            flags = ", ".join(f"--{f.replace('_', '-')}" for f in given)
            raise ConfigError(f"{flags} given without --escalate-to (escalation is off without it)")
        return None
    if not args.escalate_to.startswith("https://"):
        raise ConfigError(f"--escalate-to {args.escalate_to!r}: must be an https:// URL (TLS is required)")
    for flag in ("escalate_token_file", "escalate_ca"):
        path = getattr(args, flag)
        if path is None:
            raise ConfigError(f"--escalate-to needs --{flag.replace('_', '-')}")
        if not path.is_file():
            raise ConfigError(f"--{flag.replace('_', '-')} {path}: no such file")
    try:
        token = args.escalate_token_file.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"--escalate-token-file {args.escalate_token_file}: cannot read ({exc})") from exc
    if not token:
        raise ConfigError(f"--escalate-token-file {args.escalate_token_file}: the file is empty")
    if not args.escalate_deadline_ms > 0:
        raise ConfigError(f"--escalate-deadline-ms must be positive, got {args.escalate_deadline_ms}")
    if args.circuit_failures < 1:
        raise ConfigError(f"--circuit-failures must be at least 1, got {args.circuit_failures}")
    if not args.circuit_open_s > 0:
        raise ConfigError(f"--circuit-open-s must be positive, got {args.circuit_open_s}")
    return EscalationSettings(
        url=args.escalate_to,
        token=token,
        ca_file=args.escalate_ca,
        deadline_s=args.escalate_deadline_ms / 1000.0,
        failures_to_open=args.circuit_failures,
        open_s=args.circuit_open_s,
    )


def _check_grpc_port(args: argparse.Namespace) -> None:
    """``--grpc-port`` is a port number, and not ``--port``."""
    if args.grpc_port is None:
        return
    if not 1 <= args.grpc_port <= 65535:
        raise ConfigError(f"--grpc-port must be a port number from 1 to 65535, got {args.grpc_port}")
    if args.grpc_port == args.port:
        raise ConfigError(f"--grpc-port {args.grpc_port} is --port too: give gRPC a port of its own")


def _check_bounds(args: argparse.Namespace) -> None:
    """The instance count is within its maximum, the read timeouts are positive; ``--axis-max`` values
    become a dict (in place)."""
    if args.instances > MAX_INSTANCES:
        raise ConfigError(f"--instances must be at most {MAX_INSTANCES}, got {args.instances}")
    for flag in ("read_timeout_s", "keep_alive_s"):
        value = getattr(args, flag)
        if not value > 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    args.axis_max = parse_axis_max(args.axis_max)


class _Server(uvicorn.Server):
    """uvicorn's server, marking the state as draining on the first SIGTERM/SIGINT.

    With ``inherited`` sockets (systemd socket activation) and ``standby`` false it serves them instead of
    binding host and port. With ``standby`` it binds host and port, and adds the inherited sockets on
    SIGUSR2: a new release gates on its private port, then takes its share of the public one.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        state: State,
        inherited: Sequence[socket.socket] = (),
        standby: bool = False,
        grpc: GrpcEndpoint | None = None,
    ) -> None:
        super().__init__(config)
        self.state = state
        self.inherited = list(inherited)
        self.standby = standby
        self.promoted = False
        self.grpc = grpc

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.state.draining:
            systemd.notify("STOPPING=1")
            log.info(
                "signal %s: draining (not ready, no new connections, %.0f s grace)",
                signal.Signals(sig).name,
                self.config.timeout_graceful_shutdown or 0,
            )
            self.state.set_draining()
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after shutdown, which would turn a clean
        # drain into death by SIGTERM; a finished drain is a normal exit (0).
        if sig == signal.SIGTERM:
            forget_captured_signal(self, sig)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self.grpc is not None:
            # Taken before anything starts, so a port in use is one clear line and exit 2; the lifespan starts
            # serving it once the queue runs (State.endpoints).
            from serving.grpc_api import EndpointError  # noqa: PLC0415 (see the TYPE_CHECKING import)

            try:
                self.grpc.bind()
            except EndpointError as exc:
                log.error("refused to start: %s", exc)
                self.should_exit = True
                return
        if sockets is None and self.inherited and not self.standby:
            sockets = self.inherited
        await super().startup(sockets)
        if not self.started:
            return
        if sockets is not None:
            log.info("serving the socket systemd passed: %s", _names(sockets))
        if self.standby:
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGUSR2, lambda: asyncio.ensure_future(self.promote())
            )
        age = process_age()
        self.state.metrics.startup_seconds.set(age)
        log.info(
            "ready: process start to ready %.3f s (model load %.3f s)", age, self.state.model.load_seconds
        )
        systemd.notify("READY=1")

    async def promote(self) -> None:
        """Start accepting on the inherited sockets too (once; SIGUSR2 in standby)."""
        if self.promoted or self.state.draining or self.should_exit:
            return
        self.promoted = True
        config, loop = self.config, asyncio.get_running_loop()
        for sock in self.inherited:
            server = await loop.create_server(
                lambda: config.http_protocol_class(  # type: ignore[call-arg]
                    config=config, server_state=self.server_state, app_state=self.lifespan.state
                ),
                sock=sock,
                ssl=config.ssl,
                backlog=config.backlog,
            )
            self.servers.append(server)
        log.info("promoted: serving the socket systemd passed too: %s", _names(self.inherited))
        if self.grpc is not None:
            from serving.grpc_api import EndpointError  # noqa: PLC0415 (see the TYPE_CHECKING import)

            try:
                await self.grpc.promote()
            except EndpointError as exc:
                log.error("promoted without gRPC: %s", exc)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # The gRPC endpoint stops taking calls as the REST listener closes, not after the REST drain; the
        # lifespan waits for its calls in flight before it stops the queue.
        stops = [asyncio.ensure_future(endpoint.stop()) for endpoint in self.state.endpoints]
        await super().shutdown(sockets)
        await asyncio.gather(*stops)


def _names(sockets: Sequence[socket.socket]) -> str:
    return ", ".join(str(sock.getsockname()) for sock in sockets)


def _log_bounds(model: LoadedModel, budget: int) -> None:
    spec = model.spec
    per_sample = model.bundle.manifest.serving.max_sample_bytes
    rows = (
        f"{budget // per_sample} largest samples" if per_sample else "no measure in the bundle, so unbudgeted"
    )
    log.info(
        "input bounds: axes %s, %s elements a request; memory budget of one run %d MiB (%s)",
        ", ".join(f"{k}<={v}" for k, v in sorted(spec.axis_max.items())) or "fixed",
        f"{spec.max_request_elements:,}",
        budget >> 20,
        rows,
    )


def _escalator(settings: EscalationSettings | None, model: LoadedModel, metrics: Metrics) -> Escalator | None:
    """The escalator for ``--escalate-to``, or None when escalation is off.

    Raises:
        ConfigError: the bundle has no calibrated cascade, or the CA file is unusable.
    """
    if settings is None:
        return None
    cascade = model.bundle.manifest.cascade
    if cascade is None:
        raise ConfigError(
            f"--escalate-to: bundle {model.spec.name} ({model.spec.version}) has no cascade section; only a "
            "distilled classifier calibrated at build (a 'cascade' section in its models/*.yaml) can escalate"
        )
    try:
        escalator = Escalator(settings, cascade, metrics)
    except EscalationConfigError as exc:
        raise ConfigError(str(exc)) from exc
    log.info(
        "escalating rows with %s < %.4g (expected %.2f%% of inputs) to %s %s at %s, deadline %.0f ms",
        cascade.measure,
        cascade.threshold,
        100 * cascade.expected_escalation_rate,
        cascade.teacher.model,
        cascade.teacher.version,
        settings.url,
        settings.deadline_s * 1000,
    )
    return escalator


def _grpc_endpoint(args: argparse.Namespace, state: State) -> GrpcEndpoint | None:
    """The gRPC endpoint for ``--grpc-port`` (added to ``state.endpoints``), or None when it is off.

    It takes the REST server's limits and files: the largest message is ``--max-body-bytes``, the drain
    ``--grace-period-s``, TLS the same certificate and key. With ``--inherited-socket`` the port is shared
    (SO_REUSEPORT) so that the next release can bind it beside this one, and ``standby`` binds it only once
    promoted (SIGUSR2), as it does with the REST socket.
    """
    if args.grpc_port is None:
        return None
    # Imported here: the generated messages register inference.* in protobuf's default pool, which a
    # process that also imports tritonclient.grpc (the tests) can hold only once.
    from serving.grpc_api import GrpcEndpoint, GrpcSettings  # noqa: PLC0415

    endpoint = GrpcEndpoint(
        state,
        GrpcSettings(
            host=args.grpc_host or args.host,
            port=args.grpc_port,
            max_message_bytes=args.max_body_bytes,
            grace_s=args.grace_period_s,
            idle_s=args.keep_alive_s,
            handshake_s=args.read_timeout_s,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            share_port=args.inherited_socket is not None,
            deferred=args.inherited_socket == "standby",
        ),
    )
    state.endpoints.append(endpoint)
    return endpoint


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server; return the process exit status.

    0 after a clean shutdown, 2 when the configuration or the bundle is refused.
    """
    args = parser().parse_args(argv)
    logs.configure(args.log_format, args.log_level)
    try:
        token = _check_args(args)
        escalation = escalation_settings(args)
    except ConfigError as exc:
        log.error("refused to start: %s", exc)
        return EXIT_REFUSED
    inherited = systemd.listen_fds()
    public_key = args.public_key
    if public_key is None:
        public_key = DEV_PUBLIC_KEY
        log.warning(
            "WARNING: no --public-key given; trusting the development key %s. "
            "Production must pass the release signer's key.",
            public_key,
        )
    try:
        model = load(
            args.bundle,
            public_key,
            variant=args.variant,
            device_class=args.device_class,
            device_table=args.device_table,
            max_batch_size=args.max_batch_size,
            intra_op_threads=args.threads,
            trt_cache_dir=args.trt_cache_dir,
            axis_max=args.axis_max,
            max_request_elements=args.max_request_elements,
        )
    except ModelLoadError as exc:
        log.error("refused to serve: %s", exc)
        return EXIT_REFUSED

    if args.check:
        log.info(
            "check passed: %s version %s, variant %s, loaded and warmed up in %.3f s",
            model.spec.name,
            model.spec.version,
            model.variant.name,
            model.load_seconds,
        )
        return 0

    delay_ms = args.max_queue_delay_ms
    if delay_ms is None:
        delay_ms = model.bundle.manifest.serving.max_queue_delay_ms
    settings = Settings(
        max_queue_delay_ms=delay_ms,
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout_s,
        max_body_bytes=args.max_body_bytes,
        token=token,
        metrics_token=args.metrics_token,
    )
    metrics = Metrics()
    metrics.load_seconds.set(model.load_seconds)
    metrics.info.info(
        {
            "model": model.spec.name,
            "bundle_version": model.spec.version,
            "variant": model.variant.name,
            "precision": model.variant.precision,
            "device_class": model.device_class,
            "cpu_class": model.cpu_class or "unknown",
            "providers": ",".join(model.providers),
            "key_id": model.bundle.key_id,
            "server_version": __version__,
        }
    )
    metrics.int8_not_validated.set(1 if model.cpu_note else 0)
    for figure, value in model.quality_figures.items():
        metrics.quality_gate.labels(figure=figure).set(value)
    budget = (args.batch_memory_mb << 20) if args.batch_memory_mb else memory_limit_bytes() // 2
    budget //= args.instances  # every instance may run a batch at once
    batcher = Batcher(
        model.run,
        cost=model.memory_cost,
        max_cost=budget if model.bundle.manifest.serving.max_sample_bytes else 0,
        max_batch_size=model.spec.max_batch_size,
        max_queue_delay_s=delay_ms / 1000.0,
        max_queue=args.max_queue,
        batchable=model.batchable,
        on_depth=metrics.queue_depth.set,
        on_batch=metrics.observe_batch,
        instances=args.instances,
    )
    try:
        escalator = _escalator(escalation, model, metrics)
    except ConfigError as exc:
        log.error("refused to start: %s", exc)
        return EXIT_REFUSED
    state = State(model=model, settings=settings, metrics=metrics, batcher=batcher, escalator=escalator)
    grpc_endpoint = _grpc_endpoint(args, state)
    _log_bounds(model, batcher.max_cost)
    log.info(
        "serving model %s version %s, variant %s, max batch %d, queue delay %.3g ms, instances %d, on %s://%s:%d",
        model.spec.name,
        model.spec.version,
        model.variant.name,
        model.spec.max_batch_size,
        delay_ms,
        args.instances,
        "https" if args.tls_cert else "http",
        args.host,
        args.port,
    )
    app = build_app(state)
    assert app.api is not None
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=int(args.grace_period_s + 0.999),
        timeout_keep_alive=int(args.keep_alive_s + 0.999),
        http=timed_protocol(args.read_timeout_s, metrics.connections.inc, FastInfer(app.api, app)),
        ssl_certfile=str(args.tls_cert) if args.tls_cert else None,
        ssl_keyfile=str(args.tls_key) if args.tls_key else None,
        lifespan="on",
    )
    server = _Server(
        config,
        state,
        inherited if args.inherited_socket else (),
        args.inherited_socket == "standby",
        grpc_endpoint,
    )
    try:
        server.run()
    except OSError as exc:
        log.error("cannot serve on %s:%d: %s", args.host, args.port, exc)
        return EXIT_REFUSED
    return 0 if server.started else EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
