"""The v2 gRPC endpoint: KServe's ``inference.GRPCInferenceService`` beside the REST one (``--grpc-port``).

It serves the REST app's :class:`~serving.app.State`: the same model, batch queue, metrics, token and TLS
files. A request goes through the same checks as a REST body (:func:`serving.protocol.parse_inputs`: names,
datatypes, shapes, axis bounds and the element budget before any tensor is built), then the same memory
budget, queue and escalation (:meth:`serving.app.V2Api.execute`). Only reading the values out of the
message and writing the response are gRPC's own (:func:`parse_request`, :func:`encode_response`).

Values come typed (``contents``, one repeated field a datatype) or raw (``raw_input_contents``, one entry
an input, little-endian); the answer comes back the same way (``raw_output_contents`` for a raw request),
or raw for every request with the request parameter ``binary_data_output: true``.

Refusals carry a status code and a message naming the field, and the server goes on:

* ``INVALID_ARGUMENT``: anything REST answers 400 (a name, datatype, shape, element count, an axis or the
  element budget, NaN where the model refuses it, values the model rejects), and the gRPC-only mistakes
  (a ``contents`` field of another datatype, raw and typed values in one request, a raw entry's size);
* ``NOT_FOUND``: another model or version (REST's 404);
* ``UNAUTHENTICATED``: a missing or wrong ``authorization: Bearer <token>`` (REST's 401); ``ServerLive``
  and ``ServerReady`` stay open, like ``/v2/health/*``;
* ``RESOURCE_EXHAUSTED``: the queue is full (REST's 503), or the message is above ``--max-body-bytes``
  (REST's 413; gRPC refuses it from its length prefix, before reading it);
* ``UNAVAILABLE``: not ready yet, no result within the request timeout (REST's 503), and every new call
  once the drain has begun (gRPC refuses them itself; calls already in flight finish);
* ``INTERNAL``: an internal fault (REST's 500).

Metrics: the REST ones, with endpoints ``grpc_infer``, ``grpc_live``, ... and the status code's name as
``status``; overload and faults (``RESOURCE_EXHAUSTED``, ``UNAVAILABLE``, ``INTERNAL``) also count in
``dualdeploy_server_errors_total``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import numpy as np

from serving import logs
from serving.app import RequestIds, State, V2Api, bearer_refusal
from serving.batching import QueueFull, QueueTimeout
from serving.grpc_v2 import grpc_predict_v2_pb2 as pb
from serving.grpc_v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.model import ModelRunError
from serving.protocol import (
    Cursor,
    InferRequest,
    ModelSpec,
    ProtocolError,
    TensorSpec,
    check_int_range,
    complete_request,
    parse_inputs,
)

log = logging.getLogger("serving.grpc")

SERVICE = "inference.GRPCInferenceService"
OPEN_METHODS = frozenset({f"/{SERVICE}/ServerLive", f"/{SERVICE}/ServerReady"})
"""Open without the token, like REST's ``/v2/health/live`` and ``/ready`` (probes carry no secret)."""

CONTENTS: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
"""The typed ``InferTensorContents`` field of each numeric v2 datatype (FP16 has none: it travels raw)."""

_FIELD_DTYPES: dict[str, np.dtype[Any]] = {
    "bool_contents": np.dtype("?"),
    "int_contents": np.dtype("<i4"),
    "int64_contents": np.dtype("<i8"),
    "uint_contents": np.dtype("<u4"),
    "uint64_contents": np.dtype("<u8"),
    "fp32_contents": np.dtype("<f4"),
    "fp64_contents": np.dtype("<f8"),
}
_ALL_FIELDS = (*_FIELD_DTYPES, "bytes_contents")

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}
"""The gRPC code of each HTTP status a :class:`ProtocolError` carries (another 4xx: INVALID_ARGUMENT)."""

FAULTS = frozenset(
    {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL}
)
"""Answers counted in ``dualdeploy_server_errors_total``, as REST counts its 5xx."""


class EndpointError(Exception):
    """The gRPC port can't be served (taken, or an address that does not resolve)."""


@dataclass(frozen=True)
class GrpcSettings:
    """Where and how the gRPC endpoint listens; the server fills it from the REST server's own flags."""

    host: str
    port: int
    max_message_bytes: int
    """``--max-body-bytes``: the largest request message, as the largest REST body."""
    grace_s: float
    """``--grace-period-s``: how long a drain waits for calls in flight."""
    idle_s: float
    """``--keep-alive-s``: a connection with no call for this long is closed (GOAWAY)."""
    handshake_s: float
    """``--read-timeout-s``: a new connection must finish its handshake within it."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    share_port: bool = False
    """SO_REUSEPORT on the port, so the next release can bind it beside this one (systemd socket
    activation, ``--inherited-socket``); off otherwise, so a port already taken refuses the start."""
    deferred: bool = False
    """Bind only on :meth:`GrpcEndpoint.promote` (``--inherited-socket standby``: a release takes its share
    of the public gRPC port once its gate passed, as it does with the REST socket)."""


# --------------------------------------------------------------------------- the message <-> the protocol


def _parameter_value(parameter: pb.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def _parameter(value: Any) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    return pb.InferParameter(string_param=str(value))


def _raw_tensor(blob: bytes, index: int, spec: TensorSpec, shape: tuple[int, ...], where: str) -> np.ndarray:
    expected = math.prod(shape) * spec.dtype.itemsize
    if len(blob) != expected:
        raise ProtocolError(
            f"{where}: raw_input_contents[{index}] holds {len(blob)} bytes, shape {list(shape)} "
            f"{spec.datatype} needs {expected}"
        )
    return np.frombuffer(blob, dtype=spec.dtype).reshape(shape)


def _typed_tensor(
    contents: pb.InferTensorContents, spec: TensorSpec, shape: tuple[int, ...], where: str
) -> np.ndarray:
    field = CONTENTS.get(spec.datatype)
    takes = f"contents.{field}" if field else "raw_input_contents (it has no typed field)"
    wrong = [f for f in _ALL_FIELDS if f != field and len(getattr(contents, f))]
    if wrong:
        raise ProtocolError(f"{where}: contents.{wrong[0]} given, datatype {spec.datatype} takes {takes}")
    if field is None:
        raise ProtocolError(f"{where}: datatype {spec.datatype} takes {takes}")
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise ProtocolError(
            f"{where}: contents.{field} has {len(values)} elements, shape {list(shape)} needs {count}"
        )
    arr = np.array(values, dtype=_FIELD_DTYPES[field])
    if spec.dtype.kind in "iu":
        check_int_range(arr, spec, f"{where}: contents.{field}")
    return arr.astype(spec.dtype, copy=False).reshape(shape)


def parse_request(request: pb.ModelInferRequest, model: ModelSpec, max_batch: int) -> InferRequest:
    """Validate a ``ModelInferRequest`` against the served model, with the checks a REST body goes through.

    The model name and version are the caller's to check (:meth:`serving.app.V2Api.unknown_model`).

    Raises:
        ProtocolError: naming the input, output or field that is wrong.
    """
    # Counted, not copied: a message of a million empty entries costs nothing more here.
    raw = request.raw_input_contents
    tensors = request.inputs
    if raw and len(raw) != len(tensors):
        raise ProtocolError(
            f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs (one an input, in the "
            "order of inputs)"
        )
    # One at a time, as parse_inputs reaches them: it stops at the first input it refuses.
    heads = ({"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors)

    def read(
        index: int, _head: Mapping[str, Any], spec: TensorSpec, shape: tuple[int, ...], where: str
    ) -> np.ndarray:
        tensor = tensors[index]
        if not raw:
            return _typed_tensor(tensor.contents, spec, shape, where)
        if tensor.HasField("contents"):
            raise ProtocolError(
                f"{where} has contents, and the request has raw_input_contents: send every input one way"
            )
        return _raw_tensor(raw[index], index, spec, shape, where)

    cursor = Cursor(memoryview(b""))
    inputs = parse_inputs(heads, read, model, max_batch, cursor)
    params = {key: _parameter_value(value) for key, value in request.parameters.items()}
    # Answered the way it asked: raw for a raw request. parse_outputs checks a client's value is a boolean.
    params.setdefault("binary_data_output", bool(raw))
    doc = {"outputs": [{"name": o.name} for o in request.outputs]} if request.outputs else {}
    return complete_request(request.id or None, inputs, cursor=cursor, doc=doc, params=params, model=model)


def encode_response(
    model: ModelSpec,
    request: InferRequest,
    results: Mapping[str, np.ndarray],
    parameters: Mapping[str, Any] | None = None,
) -> pb.ModelInferResponse:
    """The ``ModelInferResponse``: every output raw or every output typed (the protocol allows no mix)."""
    by_name = {t.name: t for t in model.outputs}
    raw = any(as_binary for _, as_binary in request.outputs) or any(
        by_name[name].datatype not in CONTENTS for name, _ in request.outputs
    )
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id or "")
    for name, _ in request.outputs:
        arr = results[name]
        spec = by_name[name]
        tensor = response.outputs.add(name=name, datatype=spec.datatype, shape=arr.shape)
        if raw:
            response.raw_output_contents.append(np.ascontiguousarray(arr, dtype=spec.dtype).tobytes())
        else:
            getattr(tensor.contents, CONTENTS[spec.datatype]).extend(arr.reshape(-1).tolist())
    for key, value in (parameters or {}).items():
        response.parameters[key].CopyFrom(_parameter(value))
    return response


def brief(message: str, limit: int = 1000) -> str:
    """A status message cut to ``limit`` characters: it travels as a header (``grpc-message``), which a client
    refuses beyond its metadata limit (16 KiB by default), and a model name of megabytes would be echoed."""
    return message if len(message) <= limit else f"{message[:limit]}... (cut at {limit} characters)"


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str:
    for item in context.invocation_metadata() or ():
        if item[0] == key and isinstance(item[1], str):
            return str(item[1])
    return ""


# --------------------------------------------------------------------------- the service


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The six RPCs of ``inference.GRPCInferenceService`` on a :class:`~serving.app.V2Api`.

    The two repository RPCs keep the generated base's answer, UNIMPLEMENTED: one bundle a process.
    """

    def __init__(self, api: V2Api) -> None:
        """Serve ``api``'s model, queue and metrics."""
        self.api = api
        self.spec = api.spec
        self.metrics = api.metrics
        self.ids = RequestIds()

    def _count(self, endpoint: str, code: grpc.StatusCode) -> None:
        self.api.count_answer(f"grpc_{endpoint}", code.name, fault=code in FAULTS)

    async def _check_model(
        self, endpoint: str, name: str, version: str, context: grpc.aio.ServicerContext
    ) -> None:
        """Abort the call with NOT_FOUND unless it names the served model (and version, if any)."""
        problem = self.api.unknown_model(name, version or None)
        if problem is not None:
            self._count(endpoint, grpc.StatusCode.NOT_FOUND)
            await context.abort(grpc.StatusCode.NOT_FOUND, brief(problem))

    async def ServerLive(  # noqa: N802 (the RPC's name)
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        """``GET /v2/health/live``."""
        self._count("live", grpc.StatusCode.OK)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(  # noqa: N802
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        """``GET /v2/health/ready``: ready after warm-up, not while draining."""
        self._count("ready", grpc.StatusCode.OK)
        return pb.ServerReadyResponse(ready=self.api.is_ready())

    async def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        """``GET /v2``."""
        self._count("server_metadata", grpc.StatusCode.OK)
        meta = self.api.server_meta
        return pb.ServerMetadataResponse(
            name=str(meta["name"]), version=str(meta["version"]), extensions=list(meta["extensions"])
        )

    async def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        """``GET /v2/models/{name}[/versions/{version}]``, less ``parameters`` (the message has no field)."""
        await self._check_model("model_metadata", request.name, request.version, context)
        self._count("model_metadata", grpc.StatusCode.OK)
        meta = self.spec.metadata()
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def ModelReady(  # noqa: N802
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        """``GET /v2/models/{name}[/versions/{version}]/ready``."""
        await self._check_model("model_ready", request.name, request.version, context)
        self._count("model_ready", grpc.StatusCode.OK)
        return pb.ModelReadyResponse(ready=self.api.is_ready())

    async def ModelInfer(  # noqa: N802
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        """``POST /v2/models/{name}[/versions/{version}]/infer``."""
        started = time.perf_counter()
        rid = self.ids.take(_metadata(context, "x-request-id"))
        reset = logs.request_id.set(rid)
        self.metrics.inflight.inc()
        code: grpc.StatusCode | None = grpc.StatusCode.OK
        refusal: _Status | None = None
        try:
            # Trailing, not initial, metadata: it goes out with the status, where initial metadata would cost
            # a send of its own (about 10 % of the requests/s of the demo bundle).
            context.set_trailing_metadata((("x-request-id", rid),))
            try:
                return await self._infer(request, context)
            except asyncio.CancelledError:
                # The client's deadline passed or it cancelled: not a server fault, and no one to answer.
                log.info("gRPC client cancelled or its deadline passed before the answer")
                self.metrics.client_disconnects.labels("grpc_infer").inc()
                code = None
                raise
            except Exception as exc:  # every refusal and fault becomes a status; the server goes on
                refusal = self._refusal(exc)
                code = refusal.code
        finally:
            self.metrics.inflight.dec()
            self.metrics.request_seconds.observe(time.perf_counter() - started)
            if code is not None:
                self._count("infer", code)
            logs.request_id.reset(reset)
        assert refusal is not None  # the try either returned, raised, or set it
        await context.abort(refusal.code, refusal.message)
        raise AssertionError("context.abort returned")  # it raises; this satisfies the return type

    async def _infer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        if not self.api.state.ready:
            raise ProtocolError("the server is not ready yet (warming up)", 503)
        problem = self.api.unknown_model(request.model_name, request.model_version or None)
        if problem is not None:
            raise ProtocolError(problem, 404)
        parsed = parse_request(request, self.spec, self.spec.max_batch_size)
        timeout = self.api.settings.request_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, max(remaining, 0.0))
        outputs, parameters = await self.api.execute(parsed, timeout)
        return encode_response(self.spec, parsed, outputs, parameters)

    @staticmethod
    def _refusal(exc: Exception) -> _Status:
        """The status of a failed call, logged as REST logs its refusals (called in the except block)."""
        if isinstance(exc, ProtocolError):
            code = _CODES.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT)
            message = brief(exc.message)
            log.info("refused gRPC inference request (%s): %s", code.name, message)
            return _Status(code, message)
        if isinstance(exc, ModelRunError):
            log.info("model rejected the input values: %s", exc)
            return _Status(grpc.StatusCode.INVALID_ARGUMENT, f"the model rejected the input values: {exc}")
        if isinstance(exc, QueueFull | QueueTimeout):
            code = (
                grpc.StatusCode.RESOURCE_EXHAUSTED
                if isinstance(exc, QueueFull)
                else grpc.StatusCode.UNAVAILABLE
            )
            log.warning("refused gRPC inference request (%s): %s", code.name, exc)
            return _Status(code, str(exc))
        log.exception("internal error while serving a gRPC inference request")
        return _Status(
            grpc.StatusCode.INTERNAL, "internal server error (see the server log for the request id)"
        )


class _Status(NamedTuple):
    """How a call ends that does not end with a response."""

    code: grpc.StatusCode
    message: str


# --------------------------------------------------------------------------- the token


class _TokenCheck(grpc.aio.ServerInterceptor):
    """Every call but ``ServerLive`` and ``ServerReady`` needs ``authorization: Bearer <token>``.

    Checked before the message is read: a caller without the token never has its payload parsed.
    """

    def __init__(self, token: str) -> None:
        self.accepted = [token.encode()]

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method in OPEN_METHODS:
            return await continuation(details)
        given = next(
            (value for key, value in details.invocation_metadata or () if key == "authorization"), None
        )
        reason = bearer_refusal(given.encode() if isinstance(given, str) else given, self.accepted)
        if reason is None:
            return await continuation(details)
        log.warning("refused gRPC %s: %s", details.method, reason)
        message = f"{reason}: send the metadata 'authorization: Bearer <token>'"

        async def refuse(_request: bytes, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return grpc.unary_unary_rpc_method_handler(refuse)


# --------------------------------------------------------------------------- the listener


class GrpcEndpoint:
    """The gRPC server of one :class:`~serving.app.State` (an :class:`~serving.app.Endpoint`).

    :meth:`bind` takes the port (so a taken one refuses the start-up with a clear line, before the server
    reports ready); the lifespan then calls :meth:`start` and, at shutdown, :meth:`stop`, which stops new
    calls at once and lets those in flight finish within the grace period. With ``deferred`` settings the
    port is bound and served only on :meth:`promote`.
    """

    def __init__(self, state: State, settings: GrpcSettings) -> None:
        """Serve ``state`` as ``settings`` say (nothing is bound yet)."""
        self.state = state
        self.settings = settings
        self.servicer = InferenceServicer(V2Api(state))
        self.server: grpc.aio.Server | None = None
        self._started = False
        self._stopping: asyncio.Future[None] | None = None

    @property
    def address(self) -> str:
        """``host:port`` as gRPC writes it (an IPv6 host in brackets)."""
        host = self.settings.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.settings.port}"

    def options(self) -> list[tuple[str, Any]]:
        """The server's channel arguments: the message limit, the port sharing, the connection timers."""
        s = self.settings
        return [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 1 if s.share_port else 0),
            ("grpc.max_connection_idle_ms", max(1, int(s.idle_s * 1000))),
            ("grpc.server_handshake_timeout_ms", max(1, int(s.handshake_s * 1000))),
        ]

    def bind(self) -> None:
        """Take the port (not with deferred settings; call :meth:`promote` then).

        Raises:
            EndpointError: the port is taken or the address can't be bound.
        """
        if self.settings.deferred or self.server is not None:
            return
        interceptors = [_TokenCheck(self.state.settings.token)] if self.state.settings.token else []
        server = grpc.aio.server(interceptors=interceptors, options=self.options())
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        try:
            if self.settings.tls_cert is not None and self.settings.tls_key is not None:
                credentials = grpc.ssl_server_credentials(
                    [(self.settings.tls_key.read_bytes(), self.settings.tls_cert.read_bytes())]
                )
                server.add_secure_port(self.address, credentials)
            else:
                server.add_insecure_port(self.address)
        except (RuntimeError, OSError) as exc:
            raise EndpointError(
                f"--grpc-port: cannot serve gRPC on {self.address} (taken, or an address this machine "
                f"does not have): {exc}"
            ) from exc
        self.server = server

    async def start(self) -> None:
        """Start serving the bound port (the lifespan calls it once the batch queue runs)."""
        if self.server is None or self._started:
            return
        await self.server.start()
        self._started = True
        log.info(
            "serving gRPC (%s) on %s, %s, messages up to %d bytes",
            SERVICE,
            self.address,
            "TLS" if self.settings.tls_cert else "plain text",
            self.settings.max_message_bytes,
        )

    async def promote(self) -> None:
        """Bind and serve the port now (a deferred endpoint, once its release passed the gate).

        Raises:
            EndpointError: the port can't be bound.
        """
        if self.server is not None or self._stopping is not None:
            return
        self.settings = dataclasses.replace(self.settings, deferred=False)
        self.bind()
        await self.start()

    async def stop(self) -> None:
        """Refuse new calls (UNAVAILABLE), let those in flight finish within the grace period; idempotent."""
        if self.server is None or not self._started:
            return
        if self._stopping is None:
            log.info("gRPC: draining (no new calls, %.0f s grace)", self.settings.grace_s)
            self._stopping = asyncio.ensure_future(self.server.stop(self.settings.grace_s))
        await asyncio.shield(self._stopping)
