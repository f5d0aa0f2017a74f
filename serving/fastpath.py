"""HTTP/1.1 on uvicorn's httptools protocol, with the two timeouts it lacks and a fast inference path.

Every request is parsed by uvicorn's protocol. Most go the ASGI way, to Starlette and the
:class:`~serving.app.Guard`. A plain inference request is answered from the protocol instead, without the
ASGI messages, task hops and copies of the body in between (they cost about as much as the demo model's
run on one core; ``bench/peers_bench.py``). Plain means all of:

* ``POST /v2/models/{name}[/versions/{version}]/infer``, the path in plain ASCII (no ``%`` escapes);
* a ``Content-Length`` within ``--max-body-bytes``, no ``Transfer-Encoding``, no ``Content-Encoding`` but
  ``identity``, no ``Expect: 100-continue``, no ``Upgrade``;
* not pipelined behind an unanswered request on its connection;
* admitted by the guard's token check (a refusal goes the ASGI way and is answered there).

Both ways end in :meth:`serving.app.V2Api.handle_infer`, which parses, checks, queues and answers: the
same limits, errors, metrics, request ids, drain behaviour and binary-header precheck
(:class:`~serving.app.BodyCollector`). What this module adds is the wire: collecting the body from the
parser's callbacks and writing the status line and headers uvicorn would write.

The uvicorn attributes used here (``cycle``, ``pipeline``, ``tasks``, ``server_state``, the keep-alive
timer, :data:`STATUS_LINE`) belong to its private API, pinned with :data:`UVICORN_PRIVATE_API_VERSION`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.httptools_impl import HEADER_VALUE_RE, STATUS_LINE, HttpToolsProtocol

from serving import logs
from serving.app import Answer, BodyCollector, Guard, V2Api
from serving.protocol import ProtocolError

log = logging.getLogger("serving")

UVICORN_PRIVATE_API_VERSION = "0.54.0"
"""The uvicorn release whose private attributes this module and :func:`serving.server.forget_captured_signal`
use (pinned in serving/requirements.txt; a test fails when the two part)."""


INFER_PATH = "/v2/models/{name}/infer"
"""What the guard is asked about for a fast-path request (its answer depends on the kind of path only)."""


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a body future's exception as seen: a request answered without its body never awaits it."""
    if not future.cancelled():
        future.exception()


@dataclass
class FastInfer:
    """What the fast path answers with: one app's handlers and guard (:func:`serving.app.build_app`)."""

    api: V2Api
    guard: Guard


@dataclass
class _FastCycle:
    """One request on the fast path, standing in for uvicorn's ``RequestResponseCycle``.

    uvicorn's protocol reads ``response_complete``, ``disconnected``, ``keep_alive``, ``more_body`` and
    ``message_event`` of the current cycle (a pipelined request behind this one, a lost connection, a
    shutdown); the rest is the fast path's own.
    """

    keep_alive: bool
    collector: BodyCollector
    arrived: asyncio.Future[None]
    target: tuple[str, str | None]
    """The model name and version (None) in the path."""
    header_length: str | None
    """The ``Inference-Header-Content-Length`` header."""
    rid: str
    started: float
    response_complete: bool = False
    disconnected: bool = False
    more_body: bool = True
    message_event: asyncio.Event = field(default_factory=asyncio.Event)


def _infer_target(url: bytes) -> tuple[str, str | None] | None:
    """``(model name, version or None)`` when ``url`` is a plain inference path, else None."""
    path = httptools.parse_url(url).path
    if b"%" in path or not path.isascii():
        return None
    parts = path.split(b"/")
    if len(parts) == 5 and parts[:3] == [b"", b"v2", b"models"] and parts[4] == b"infer" and parts[3]:
        return parts[3].decode("ascii"), None
    if (
        len(parts) == 7
        and parts[:3] == [b"", b"v2", b"models"]
        and parts[4] == b"versions"
        and parts[6] == b"infer"
        and parts[3]
        and parts[5]
    ):
        return parts[3].decode("ascii"), parts[5].decode("ascii")
    return None


class TimedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the two timeouts it lacks and the fast inference path.

    * A new connection that sends nothing is closed after the keep-alive timeout, as an idle keep-alive
      connection already is (uvicorn arms that timer only after a first response).
    * A request's head and body must arrive within ``read_timeout_s`` of its first byte, however slowly
      the bytes trickle in; then the connection is closed (the handler sees a client disconnect).
    * With ``fast`` set, plain inference requests are answered without ASGI (the module's docstring).

    Set the class attributes on a subclass (:func:`timed_protocol`): uvicorn makes one per connection.
    """

    read_timeout_s = 30.0
    on_connection: Callable[[], None] | None = None
    fast: FastInfer | None = None
    _read_deadline: asyncio.TimerHandle | None = None
    _reading: _FastCycle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.on_connection is not None:
            self.on_connection()
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._cancel_read_deadline()
        self._read_deadline = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def on_headers_complete(self) -> None:
        if self.fast is None or not self._start_fast(self.fast):
            super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        cycle = self._reading
        if cycle is None:
            super().on_body(body)
            return
        if cycle.arrived.done():
            return  # already refused (above the limit): the rest is dropped
        try:
            cycle.collector.add(body)
        except ProtocolError as exc:
            cycle.arrived.set_exception(exc)

    def on_message_complete(self) -> None:
        self._cancel_read_deadline()
        cycle = self._reading
        if cycle is None:
            super().on_message_complete()
            return
        self._reading = None
        cycle.more_body = False
        if not cycle.arrived.done():
            cycle.arrived.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_deadline()
        cycle = self._reading
        if cycle is not None and not cycle.arrived.done():
            cycle.arrived.set_exception(ClientDisconnect())
        super().connection_lost(exc)

    def _cancel_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if not self.transport.is_closing():
            log.info(
                "closed a connection from %s: its request did not arrive within %.0f s",
                f"{self.client[0]}:{self.client[1]}" if self.client else "?",
                self.read_timeout_s,
            )
            self.transport.close()

    # ------------------------------------------------------------------ the fast inference path

    def _start_fast(self, fast: FastInfer) -> bool:
        """Take the request whose head just arrived on the fast path; False leaves it to uvicorn."""
        parser = self.parser
        if (
            parser.get_method() != b"POST"
            or self.expect_100_continue
            or parser.should_upgrade()
            or self.limit_concurrency is not None
            or not (self.cycle is None or self.cycle.response_complete)
        ):
            return False
        target = _infer_target(self.url)
        if target is None:
            return False
        length = encoding = header_length = authorization = request_id = None
        for name, value in self.headers:
            if name == b"content-length":
                if length is not None:
                    return False
                length = value
            elif name == b"transfer-encoding":
                return False
            elif name == b"content-encoding":
                encoding = value
            elif name == b"inference-header-content-length":
                header_length = value
            elif name == b"authorization":
                authorization = value
            elif name == b"x-request-id":
                request_id = value
        api = fast.api
        limit = api.settings.max_body_bytes
        if (
            length is None
            or not (length.isdigit() and len(length) <= 12 and int(length) <= limit)
            or (encoding is not None and encoding.strip().lower() != b"identity")
            or fast.guard.refusal(INFER_PATH, authorization) is not None
        ):
            return False
        head_text = header_length.decode("latin-1") if header_length is not None else None
        head = int(head_text) if head_text is not None and head_text.isascii() and head_text.isdigit() else 0
        keep_alive = parser.get_http_version() != "1.0" and parser.should_keep_alive()
        arrived: asyncio.Future[None] = self.loop.create_future()
        arrived.add_done_callback(_retrieve)
        cycle = _FastCycle(
            keep_alive,
            BodyCollector(limit, head, api.precheck),
            arrived,
            target,
            head_text,
            fast.guard.ids.take((request_id or b"").decode("latin-1")),
            api.infer_started(),
        )
        self.cycle = cycle  # type: ignore[assignment]  # uvicorn reads the fields it knows (the class docstring)
        self._reading = cycle
        api.metrics.fast_path.inc()
        task = self.loop.create_task(self._answer(api, cycle))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)
        return True

    async def _answer(self, api: V2Api, cycle: _FastCycle) -> None:
        logs.request_id.set(cycle.rid)  # this task's own context

        async def read() -> bytes | memoryview:
            await cycle.arrived
            return cycle.collector.body()

        try:
            answer = await api.handle_infer(*cycle.target, read, cycle.header_length, cycle.started)
        finally:
            cycle.collector = BodyCollector(0)  # drop the body now, not when the connection closes
        if answer is None or cycle.disconnected or self.transport.is_closing():
            cycle.response_complete = True
            return
        if not cycle.arrived.done():
            # Answered before the body was in (an unknown model): the rest of it is read and dropped.
            cycle.arrived.cancel()
        self._write(cycle, answer)

    def _write(self, cycle: _FastCycle, answer: Answer) -> None:
        """Write the answer as uvicorn would (its default headers: date), then finish like its cycle."""
        keep_alive = cycle.keep_alive and answer.headers.get("connection") != "close"
        rid_bytes = cycle.rid.encode("latin-1", "replace")
        if HEADER_VALUE_RE.search(rid_bytes) and self.fast is not None:
            rid_bytes = self.fast.guard.ids.take("").encode("ascii")  # the client's can't go in a header line
        lines = [STATUS_LINE[answer.status]]
        for name, value in self.server_state.default_headers:
            lines += [name, b": ", value, b"\r\n"]
        lines += [
            b"content-type: ",
            answer.content_type.encode("latin-1"),
            b"\r\ncontent-length: ",
            str(len(answer.body)).encode("ascii"),
            b"\r\nx-request-id: ",
            rid_bytes,
            b"\r\n",
        ]
        for key, text in answer.headers.items():
            if key.lower() != "connection":
                lines += [key.lower().encode("latin-1"), b": ", text.encode("latin-1"), b"\r\n"]
        if not keep_alive:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        self.transport.writelines([b"".join(lines), answer.body])
        cycle.response_complete = True
        cycle.keep_alive = keep_alive
        if not keep_alive:
            self.transport.close()
        self.on_response_complete()


def timed_protocol(
    read_timeout_s: float, on_connection: Callable[[], None] | None = None, fast: FastInfer | None = None
) -> type[TimedHttpProtocol]:
    """A :class:`TimedHttpProtocol` class with its read timeout (uvicorn makes one per connection).

    ``on_connection`` is called for every accepted connection (``dualdeploy_connections_total``);
    ``fast`` turns the fast inference path on.
    """
    attrs: dict[str, object] = {"read_timeout_s": read_timeout_s, "fast": fast}
    if on_connection is not None:
        attrs["on_connection"] = staticmethod(on_connection)
    return type("TimedHttpProtocol", (TimedHttpProtocol,), attrs)
