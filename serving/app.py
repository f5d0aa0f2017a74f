"""The HTTP layer: Open Inference Protocol (KServe v2) REST endpoints on Starlette.

The handlers are thin: they read the body within its limit, hand it to
:mod:`serving.protocol` to parse, queue it on the :class:`~serving.batching.Batcher`,
and encode the result. Every refusal is a 4xx with ``{"error": "..."}``; a 5xx
means an internal fault, overload or shutdown, and is counted.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving import __version__, logs
from serving.batching import Batcher, QueueFull, QueueTimeout
from serving.cascade import Escalator, with_parameters
from serving.metrics import CONTENT_TYPE, Metrics
from serving.model import LoadedModel, ModelRunError
from serving.openapi import openapi_document
from serving.protocol import (
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    dumps,
    encode_response,
    parse_infer_request,
    precheck_header,
)

log = logging.getLogger("serving.app")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")


@dataclass
class Settings:
    """Serving limits and options (the CLI fills them from flags and environment)."""

    max_queue_delay_ms: float = 1.0
    max_queue: int = 256
    request_timeout_s: float = 30.0
    max_body_bytes: int = 16 * 1024 * 1024
    token: str | None = None
    metrics_token: str | None = None
    retry_after_s: int = 1


class Endpoint(Protocol):
    """Another listener serving the same :class:`State` (the gRPC endpoint, ``--grpc-port``)."""

    async def start(self) -> None:
        """Start serving; raise to refuse the server's start-up."""

    async def stop(self) -> None:
        """Stop taking requests and finish those in flight (called again: wait for the same stop)."""


@dataclass
class State:
    """What the handlers share: the model, the batcher, metrics and the lifecycle flags."""

    model: LoadedModel
    settings: Settings
    metrics: Metrics
    batcher: Batcher
    escalator: Escalator | None = None
    """Edge -> cloud escalation (``--escalate-to``); None keeps every answer local and opens no socket."""
    endpoints: list[Endpoint] = field(default_factory=list)
    """Listeners beside the REST one that share this state: started once the batcher runs, before the server
    reports ready, and stopped before the batcher stops."""
    ready: bool = False
    draining: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    def set_draining(self) -> None:
        """Stop reporting ready and refuse new inference requests (SIGTERM)."""
        self.draining = True
        self.metrics.ready.set(0)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def bearer_refusal(given: bytes | None, accepted: Sequence[bytes]) -> str | None:
    """None when the ``Authorization`` value ``given`` carries one of the ``accepted`` tokens, else why not.

    RFC 9110: the scheme is case-insensitive; the token is compared in constant time. The REST middleware
    and the gRPC endpoint (the ``authorization`` metadata) both check with this.
    """
    scheme, _, credentials = (given or b"").strip().partition(b" ")
    matches = [hmac.compare_digest(credentials.strip(), expected) for expected in accepted]
    if given is None or scheme.lower() != b"bearer" or not any(matches):
        return "missing bearer token" if given is None else "wrong bearer token"
    return None


class RequestIds:
    """Request ids: the client's own (cut to 128 characters), else a per-process prefix and a counter
    (cheaper than a uuid4 a request)."""

    def __init__(self) -> None:
        """A fresh random prefix."""
        self.prefix = uuid.uuid4().hex[:12]
        self.counter = itertools.count(1)

    def take(self, given: str) -> str:
        """``given`` when the client sent one, else the next id of this process."""
        return given[:128] or f"{self.prefix}-{next(self.counter)}"


class Guard:
    """ASGI middleware: request id on every log line and response, bearer token check."""

    def __init__(
        self, app: ASGIApp, token: str | None, metrics_token: str | None = None, api: V2Api | None = None
    ) -> None:
        """Wrap ``app``; with ``token`` set, every path except the health checks needs it.

        ``metrics_token`` (Prometheus's) is accepted on ``/metrics`` only, beside ``token``; with it set,
        ``/metrics`` needs one of the two even when inference is open. ``api``: the handlers behind ``app``
        (the fast inference path answers with them, :mod:`serving.fastpath`).
        """
        self.app = app
        self.api = api
        self.expected = token.encode() if token else None
        self.metrics = metrics_token.encode() if metrics_token else None
        self.ids = RequestIds()

    def refusal(self, path: str, authorization: bytes | None) -> str | None:
        """None when a request for ``path`` with this ``Authorization`` value may pass, else why not.

        The ASGI path (:meth:`__call__`) and the inference fast path (:mod:`serving.fastpath`) both ask.
        """
        accepted = [self.expected] if self.expected is not None else []
        if path == "/metrics" and self.metrics is not None:
            accepted.append(self.metrics)
        if accepted and path not in OPEN_PATHS:
            return bearer_refusal(authorization, accepted)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection scope."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        rid = self.ids.take(headers.get(b"x-request-id", b"").decode("latin-1"))
        token = logs.request_id.set(rid)
        try:
            reason = self.refusal(scope["path"], headers.get(b"authorization"))
            if reason is not None:
                log.warning("refused %s %s: %s", scope["method"], scope["path"], reason)
                response = _error(
                    401,
                    f"{reason}: send 'Authorization: Bearer <token>'",
                    {"WWW-Authenticate": 'Bearer realm="dualdeploy"', "x-request-id": rid},
                )
                await response(scope, receive, send)
                return

            async def send_with_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
                await send(message)

            await self.app(scope, receive, send_with_id)
        finally:
            logs.request_id.reset(token)


ALIGN = 64
"""Bytes of alignment for the binary tail of a request body (a cache line, and every SIMD width)."""


class BodyCollector:
    """A request body arriving in chunks, within ``limit`` bytes, with the binary header's early check.

    ``precheck`` gets the first ``head`` bytes (the JSON header of a binary request, per
    ``Inference-Header-Content-Length``) as soon as they are in; when it refuses them, the rest of the
    body is dropped as it arrives, not kept, and :meth:`body` raises the refusal: a huge tensor is refused
    without being buffered. Both HTTP paths collect through this (:func:`_read_body`, the fast path).

    The body of a binary request is put together so that its tensors (the bytes after ``head``) start on
    an :data:`ALIGN`-byte boundary, in the one copy the join made anyway: a header of 166 bytes would
    otherwise leave a float32 tensor at an odd address (NumPy's finite check of the demo's image took
    26 µs there against 12 µs aligned).
    """

    def __init__(self, limit: int, head: int = 0, precheck: Callable[[bytes], None] | None = None) -> None:
        """Collect up to ``limit`` bytes; ``head`` > 0: the JSON header's length (checked by ``precheck``)."""
        self.limit = limit
        self.tail = head
        self.head = head if precheck is not None else 0
        self.precheck = precheck
        self.size = 0
        self.chunks: list[bytes] = []
        self.refusal: ProtocolError | None = None

    def add(self, chunk: bytes) -> None:
        """Take the next chunk.

        Raises:
            ProtocolError: (413) the body grew above the limit.
        """
        self.size += len(chunk)
        if self.size > self.limit:
            raise ProtocolError(f"request body is above the limit of {self.limit} bytes", 413)
        if self.refusal is not None:
            return
        self.chunks.append(chunk)
        if self.head and self.size >= self.head and self.precheck is not None:
            joined = b"".join(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
            self.chunks = [joined]
            try:
                self.precheck(joined[: self.head])
            except ProtocolError as exc:
                self.refusal = exc
                self.chunks = []
            self.head = 0

    def body(self) -> bytes | memoryview:
        """The whole body, copied at most once: into one buffer whose binary tail is aligned.

        Raises:
            ProtocolError: the header's early check refused it.
        """
        if self.refusal is not None:
            raise self.refusal
        if not self.tail or self.tail >= self.size:
            return self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        buffer = np.empty(self.size + ALIGN, np.uint8)
        shift = -(buffer.ctypes.data + self.tail) % ALIGN
        view = buffer.data[shift : shift + self.size]
        at = 0
        for chunk in self.chunks:
            view[at : at + len(chunk)] = chunk
            at += len(chunk)
        self.chunks = []
        return view


async def _read_body(
    request: Request, limit: int, precheck: Callable[[bytes], None] | None = None
) -> bytes | memoryview:
    """The request body, within ``limit`` bytes after decompression (``precheck``: :class:`BodyCollector`)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ProtocolError(f"request body of {length} bytes is above the limit of {limit} bytes", 413)
    encoding = request.headers.get("content-encoding", "identity").lower()
    head_length = request.headers.get(HEADER_LENGTH, "")
    head = int(head_length) if encoding in ("identity", "") and head_length.isdigit() else 0
    collector = BodyCollector(limit, head, precheck)
    async for chunk in request.stream():
        collector.add(chunk)
    body = collector.body()
    if encoding in ("identity", ""):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ProtocolError(f"Content-Encoding {encoding!r} is not supported (gzip, deflate)", 415)
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16 if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(f"body is not valid {encoding} data ({exc})") from exc
    if len(data) > limit or inflater.unconsumed_tail:
        raise ProtocolError(f"decompressed body is above the limit of {limit} bytes", 413)
    return data


class _Overloaded(Exception):
    """Answer 503 with Retry-After."""


@dataclass
class Answer:
    """An inference answer, before either HTTP path writes it."""

    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def error(cls, status: int, message: str, headers: dict[str, str] | None = None) -> Answer:
        """A refusal: the v2 ``{"error": ...}`` body."""
        return cls(status, dumps({"error": message}), "application/json", headers or {})


class V2Api:
    """The endpoint handlers, bound to one served model."""

    def __init__(self, state: State) -> None:
        """Bind the handlers to ``state``."""
        self.state = state
        self.spec = state.model.spec
        self.metrics = state.metrics
        self.settings = state.settings
        self.batcher = state.batcher
        self.server_meta = {
            "name": "dualdeploy",
            "version": __version__,
            "extensions": ["binary_tensor_data"],
        }
        self.openapi = openapi_document(self.spec.name, self.spec.version, bool(self.settings.token))
        self._answers: dict[tuple[str, str], Any] = {}  # the requests counter's child per answer

    def _known(self, request: Request) -> str | None:
        """None when the path names the served model (and version), else the error message."""
        return self.unknown_model(request.path_params["name"], request.path_params.get("version"))

    def unknown_model(self, name: str, version: str | None) -> str | None:
        """None when ``name`` (and ``version``, if given) is the served model, else the error message."""
        if name != self.spec.name:
            return f"unknown model {name!r}: this server serves {self.spec.name!r}"
        if version is not None and version != self.spec.version:
            return f"unknown version {version!r} of model {name!r}: this server serves {self.spec.version!r}"
        return None

    def is_ready(self) -> bool:
        """Warmed up and not draining (what the readiness answers say, REST and gRPC)."""
        return self.state.ready and not self.state.draining

    def count(self, endpoint: str, status: int) -> None:
        """Count an answer; 5xx answers also in ``dualdeploy_server_errors_total``."""
        self.count_answer(endpoint, str(status), fault=status >= 500)

    def count_answer(self, endpoint: str, status: str, *, fault: bool) -> None:
        """Count an answer by its status (an HTTP status, or a gRPC code's name); a ``fault`` (overload,
        internal error, shutdown) also in ``dualdeploy_server_errors_total``."""
        counter = self._answers.get((endpoint, status))
        if counter is None:
            counter = self._answers[endpoint, status] = self.metrics.requests.labels(
                self.spec.name, endpoint, status
            )
        counter.inc()
        if fault:
            self.metrics.server_errors.labels(endpoint).inc()

    async def execute(
        self, parsed: InferRequest, timeout_s: float
    ) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
        """Run a parsed request: the memory budget, the batch queue, then escalation (REST and gRPC alike).

        Returns:
            The outputs, and the response ``parameters`` escalation adds (None without escalation).

        Raises:
            ProtocolError: the request alone is above the memory budget of one run (400).
            QueueFull: the queue is at its bound.
            QueueTimeout: no result within ``timeout_s``.
            ModelRunError: the model rejected the request's values.
        """
        cost = self.batcher.fits(parsed)
        if cost is not None:
            raise ProtocolError(
                f"the request would need about {cost / 2**20:,.0f} MiB to run ({parsed.batch_size} rows), "
                "above "
                f"this server's memory budget of {self.batcher.max_cost / 2**20:,.0f} MiB for one run "
                "(--batch-memory-mb): send fewer rows or shorter inputs"
            )
        outputs, stats = await self.batcher.submit(parsed, timeout_s)
        parameters: dict[str, Any] | None = None
        if self.state.escalator is not None:
            outputs, parameters = await self.state.escalator.answer(parsed.inputs, outputs)
        self.metrics.queue_seconds.observe(stats.queue_seconds)
        return outputs, parameters

    async def live(self, _request: Request) -> Response:
        """GET /v2/health/live."""
        self.count("live", 200)
        return JSONResponse({"live": True})

    async def ready(self, _request: Request) -> Response:
        """GET /v2/health/ready: 200 after warm-up, 503 before and while draining."""
        ok = self.is_ready()
        self.count("ready", 200 if ok else 503)
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def server_metadata(self, _request: Request) -> Response:
        """GET /v2."""
        self.count("server_metadata", 200)
        return JSONResponse(self.server_meta)

    async def model_metadata(self, request: Request) -> Response:
        """GET /v2/models/{name}[/versions/{version}]."""
        problem = self._known(request)
        self.count("model_metadata", 404 if problem else 200)
        return _error(404, problem) if problem else JSONResponse(self.spec.metadata())

    async def model_ready(self, request: Request) -> Response:
        """GET /v2/models/{name}[/versions/{version}]/ready."""
        problem = self._known(request)
        if problem:
            self.count("model_ready", 404)
            return _error(404, problem)
        ok = self.is_ready()
        self.count("model_ready", 200 if ok else 503)
        return JSONResponse({"name": self.spec.name, "ready": ok}, status_code=200 if ok else 503)

    async def metrics_text(self, _request: Request) -> Response:
        """GET /metrics."""
        self.count("metrics", 200)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def openapi_json(self, _request: Request) -> Response:
        """GET /openapi.json."""
        self.count("openapi", 200)
        return JSONResponse(self.openapi)

    def precheck(self, head: bytes) -> None:
        """The early check of a binary request's JSON header (:class:`BodyCollector`)."""
        precheck_header(head, self.spec, self.spec.max_batch_size)

    async def _infer(
        self,
        name: str,
        version: str | None,
        read: Callable[[], Awaitable[bytes | memoryview]],
        header_length: str | None,
        arriving: list[bool],
    ) -> Answer:
        problem = self.unknown_model(name, version)
        if problem:
            raise ProtocolError(problem, 404)
        body = await read()
        parsed = parse_infer_request(body, header_length, self.spec, self.spec.max_batch_size)
        self.batcher.arriving -= 1
        arriving[0] = False
        try:
            outputs, parameters = await self.execute(parsed, self.settings.request_timeout_s)
        except (QueueFull, QueueTimeout) as exc:
            raise _Overloaded(str(exc)) from exc
        payload, header_length_out = encode_response(self.spec, parsed, outputs)
        if parameters is not None:
            payload, header_length_out = with_parameters(payload, header_length_out, parameters)
        if header_length_out is None:
            return Answer(200, payload, "application/json")
        return Answer(
            200,
            payload,
            "application/octet-stream",
            {"Inference-Header-Content-Length": str(header_length_out)},
        )

    def infer_started(self) -> float:
        """Count a request whose head has arrived (in flight, being read); returns its start time.

        :meth:`handle_infer` ends what this begins; the fast path calls this as the head arrives and
        :meth:`handle_infer` with ``started`` once the body is in.
        """
        self.metrics.inflight.inc()
        self.batcher.arriving += 1
        return time.perf_counter()

    async def handle_infer(
        self,
        name: str,
        version: str | None,
        read: Callable[[], Awaitable[bytes | memoryview]],
        header_length: str | None,
        started: float | None = None,
    ) -> Answer | None:
        """One inference request, from its path's model name to the answer (both HTTP paths).

        ``read`` returns the body (raising :class:`ProtocolError` or ``ClientDisconnect``); ``started``
        is :meth:`infer_started`'s time when the caller already counted the request. Every refusal is an
        answer; None means the client went away and nobody is listening.
        """
        if started is None:
            started = self.infer_started()
        arriving = [True]
        answer: Answer | None
        try:
            answer = await self._infer(name, version, read, header_length, arriving)
        except ProtocolError as exc:
            log.info("refused inference request (%d): %s", exc.status, exc.message)
            answer = Answer.error(exc.status, exc.message)
        except ModelRunError as exc:
            log.info("model rejected the input values: %s", exc)
            answer = Answer.error(400, f"the model rejected the input values: {exc}")
        except ClientDisconnect:
            # Not a server fault: one line, its own counter, and no answer (no one is listening).
            log.info("client disconnected before its request body was read")
            self.metrics.client_disconnects.labels("infer").inc()
            answer = None
        except _Overloaded as exc:
            log.warning("refused inference request (503): %s", exc)
            answer = Answer.error(503, str(exc), {"Retry-After": str(self.settings.retry_after_s)})
        except Exception:
            log.exception("internal error while serving an inference request")
            answer = Answer.error(500, "internal server error (see the server log for the request id)")
        finally:
            if arriving[0]:
                self.batcher.arriving -= 1
            self.metrics.inflight.dec()
            self.metrics.request_seconds.observe(time.perf_counter() - started)
        if answer is not None:
            self.count("infer", answer.status)
            if self.state.draining:
                # A request that was already on its way when the drain began is served, not refused: the
                # model runs until the in-flight work is done. Its connection then closes, so the client's
                # next request opens a new one, which reaches the server that takes over (the release
                # switch's shared socket, or the load balancer once readiness fails).
                answer.headers["connection"] = "close"
        return answer

    async def infer(self, request: Request) -> Response:
        """POST /v2/models/{name}[/versions/{version}]/infer."""
        answer = await self.handle_infer(
            request.path_params["name"],
            request.path_params.get("version"),
            lambda: _read_body(request, self.settings.max_body_bytes, self.precheck),
            request.headers.get(HEADER_LENGTH),
        )
        if answer is None:
            return Response(status_code=499)
        return Response(answer.body, answer.status, answer.headers, answer.content_type)

    async def http_error(self, request: Request, exc: Exception) -> Response:
        """Unknown paths and wrong methods: the v2 JSON error body."""
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "error"
        headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else None
        self.count("other", status)
        return _error(status, f"{request.method} {request.url.path}: {detail}", headers)

    async def internal_error(self, _request: Request, exc: Exception) -> Response:
        """Anything unhandled: 500, logged and counted."""
        log.error("unhandled error: %r", exc)
        self.count("other", 500)
        return _error(500, "internal server error (see the server log for the request id)")

    def routes(self) -> list[Route]:
        """The v2 routes, with the optional ``/versions/{version}`` forms."""
        # Inference first: Starlette tries routes in order, and it is the hot path.
        routes = [
            Route("/v2/models/{name}/infer", self.infer, methods=["POST"]),
            Route("/v2/models/{name}/versions/{version}/infer", self.infer, methods=["POST"]),
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/metrics", self.metrics_text, methods=["GET"]),
            Route("/openapi.json", self.openapi_json, methods=["GET"]),
        ]
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            routes += [
                Route(prefix, self.model_metadata, methods=["GET"]),
                Route(f"{prefix}/ready", self.model_ready, methods=["GET"]),
            ]
        return routes


def build_app(state: State) -> Guard:
    """The ASGI application serving ``state.model``, wrapped in the :class:`Guard` (which holds its
    :class:`V2Api` as ``api``)."""
    api = V2Api(state)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        state.batcher.start()
        if state.escalator is not None:
            await state.escalator.start()
        for endpoint in state.endpoints:
            await endpoint.start()
        state.ready = True
        state.metrics.ready.set(1)
        try:
            yield
        finally:
            state.ready = False
            state.metrics.ready.set(0)
            # In-flight requests of every endpoint finish before the queue they wait on stops.
            for endpoint in state.endpoints:
                await endpoint.stop()
            await state.batcher.stop()
            if state.escalator is not None:
                await state.escalator.close()

    app = Starlette(
        routes=api.routes(),
        lifespan=lifespan,
        exception_handlers={HTTPException: api.http_error, Exception: api.internal_error},
    )
    return Guard(app, state.settings.token, state.settings.metrics_token, api)
