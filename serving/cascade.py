"""Edge → cloud escalation: the student's least confident rows go to the teacher, or it answers alone.

Off unless the server is started with ``--escalate-to``. The bundle's manifest says how (its ``cascade``
section, calibrated at build): the confidence measure, the threshold, and the teacher's model and version.
For each inference request, after the local model ran:

* the rows whose confidence is below the threshold go to the teacher in **one** v2 request (binary
  tensors, HTTPS verified against ``--escalate-ca``, a bearer token), to the teacher's exact version;
* the teacher's rows replace the student's; the others stay the student's;
* anything that goes wrong (the deadline passes, the connection or TLS handshake fails, the teacher
  answers an HTTP error, another model or version, or an answer of the wrong shape) leaves the student's
  rows in place and marks the response ``fallback: true``: the client never sees the cloud's failure;
* a circuit breaker stops trying after repeated failures, and lets one request through again later.

Each response carries v2 ``parameters``: ``served_by`` (``edge``, ``cloud`` or ``edge+cloud``),
``fallback``, and ``escalated_rows`` (the rows the teacher answered, comma-separated).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from contract.codec import decode_infer_response, encode_infer_request
from contract.manifest import Cascade

log = logging.getLogger("serving.cascade")

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
CIRCUIT_STATES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
"""The value of ``dualdeploy_circuit_state`` for each state."""


class EscalationConfigError(ValueError):
    """The escalation settings cannot work (the message names the flag)."""


@dataclass(frozen=True)
class EscalationSettings:
    """Where and how the edge escalates (the CLI fills them from the ``--escalate-*`` flags)."""

    url: str
    """The teacher server's base URL, ``https://host:port``."""
    token: str
    """The teacher's bearer token."""
    ca_file: Path
    """PEM certificates the teacher's certificate must chain to (and nothing else is trusted)."""
    deadline_s: float = 0.5
    """Longest time one escalation may add to a request; then the edge answers alone."""
    failures_to_open: int = 5
    """Consecutive failures that open the circuit."""
    open_s: float = 10.0
    """How long the circuit stays open before one trial request (half-open)."""


class CircuitBreaker:
    """Closed (escalate), open (don't, for ``open_s``), half-open (one trial; its outcome decides).

    Args:
        failures_to_open: consecutive failures that open the circuit.
        open_s: seconds the circuit stays open.
        on_state: called with the new state on every change.
        clock: monotonic seconds (a parameter so that the state machine can be checked without sleeping).
    """

    def __init__(
        self,
        failures_to_open: int,
        open_s: float,
        on_state: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures_to_open = failures_to_open
        self.open_s = open_s
        self.on_state = on_state or (lambda _state: None)
        self.clock = clock
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.trial_in_flight = False

    def _set(self, state: str) -> None:
        if state != self.state:
            log.warning("escalation circuit %s -> %s", self.state, state)
            self.state = state
            self.on_state(state)

    def allow(self) -> bool:
        """Whether a request may go to the cloud now (in half-open, only the one trial may)."""
        if self.state == OPEN and self.clock() - self.opened_at >= self.open_s:
            self._set(HALF_OPEN)
        if self.state == OPEN or (self.state == HALF_OPEN and self.trial_in_flight):
            return False
        if self.state == HALF_OPEN:
            self.trial_in_flight = True
        return True

    def success(self) -> None:
        """The cloud answered: close the circuit."""
        self.failures = 0
        self.trial_in_flight = False
        self._set(CLOSED)

    def failure(self) -> None:
        """The cloud failed: open after ``failures_to_open`` in a row, or at once after a failed trial."""
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self.failures_to_open:
            self.trial_in_flight = False
            self.opened_at = self.clock()
            self._set(OPEN)


class _Failed(Exception):
    """The cloud did not give a usable answer; ``reason`` labels the fallback metric."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def ssl_context(ca_file: Path) -> ssl.SSLContext:
    """A client TLS context that trusts ``ca_file`` only, with host name checks.

    Raises:
        EscalationConfigError: the file is not readable PEM.
    """
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise EscalationConfigError(f"--escalate-ca {ca_file}: cannot load ({exc})") from exc


def with_parameters(
    payload: bytes, header_length: int | None, parameters: Mapping[str, Any]
) -> tuple[bytes, int | None]:
    """Add response-level ``parameters`` to an encoded v2 response (its JSON header is an object).

    ``serving.protocol.encode_response`` takes no parameters; the header always starts with ``{``, so the
    field is spliced in front of the others rather than decoding and re-encoding the whole body.
    """
    field = b'"parameters":' + json.dumps(dict(parameters), separators=(",", ":")).encode() + b","
    if not payload.startswith(b"{"):
        raise ValueError("an encoded v2 response starts with its JSON object")
    spliced = b"{" + field + payload[1:]
    return spliced, None if header_length is None else header_length + len(field)


class Escalator:
    """Sends a request's low-confidence rows to the teacher and merges its answer.

    Args:
        settings: where and how to escalate.
        cascade: the bundle's calibrated cascade (threshold, measure, teacher).
        metrics: the server's metrics (escalations, fallbacks, circuit state, cloud latency).
    """

    def __init__(self, settings: EscalationSettings, cascade: Cascade, metrics: Any) -> None:
        self.settings = settings
        self.cascade = cascade
        self.metrics = metrics
        self.ssl = ssl_context(settings.ca_file)
        self.breaker = CircuitBreaker(
            settings.failures_to_open,
            settings.open_s,
            on_state=lambda state: metrics.circuit_state.set(CIRCUIT_STATES[state]),
        )
        teacher = cascade.teacher
        self.path = f"/v2/models/{teacher.model}/versions/{teacher.version}/infer"
        self.client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        """Create the HTTP client (no connection opens until the first escalation)."""
        self.client = httpx.AsyncClient(
            base_url=self.settings.url.rstrip("/"),
            verify=self.ssl,
            timeout=httpx.Timeout(self.settings.deadline_s),
            headers={"Authorization": f"Bearer {self.settings.token}"},
            trust_env=False,  # no proxy or netrc from the environment: exactly the configured endpoint
        )
        self.metrics.circuit_state.set(CIRCUIT_STATES[self.breaker.state])

    async def close(self) -> None:
        """Close the client and its connections."""
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def answer(
        self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The request's outputs with its low-confidence rows answered by the teacher where it can.

        Args:
            inputs: the request's inputs (rows along the first axis).
            outputs: the student's outputs for them.

        Returns:
            The outputs to send and the response ``parameters``.
        """
        rows = np.flatnonzero(self.cascade.escalate(outputs[self.cascade.output]))
        if len(rows) == 0:
            return dict(outputs), {"served_by": "edge", "fallback": False, "escalated_rows": ""}
        self.metrics.escalations.inc(len(rows))
        reason = None
        if not self.breaker.allow():
            reason, detail = "circuit_open", "the circuit is open"
        else:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self.settings.deadline_s):
                    cloud = await self._ask({name: array[rows] for name, array in inputs.items()})
                self._check(cloud, outputs, len(rows))
            except _Failed as exc:
                reason, detail = exc.reason, str(exc)
            except TimeoutError:
                reason, detail = "deadline", f"no answer within {self.settings.deadline_s:.3g} s"
            except asyncio.CancelledError:
                self.breaker.failure()  # the client left: never leave a half-open trial in flight
                raise
            self.metrics.cloud_seconds.observe(time.perf_counter() - started)
            if reason is None:
                self.breaker.success()
            else:
                self.breaker.failure()
        if reason is not None:
            # While the circuit is open every escalation falls back; the state change was logged once.
            log.log(
                logging.DEBUG if reason == "circuit_open" else logging.WARNING,
                "escalation of %d row(s) fell back to the local answer (%s): %s",
                len(rows),
                reason,
                detail,
            )
            self.metrics.fallbacks.labels(reason).inc()
            return dict(outputs), {"served_by": "edge", "fallback": True, "escalated_rows": ""}
        merged = {name: np.array(array, copy=True) for name, array in outputs.items()}
        for name, array in merged.items():
            array[rows] = cloud[name]
        self.metrics.cloud_rows.inc(len(rows))
        served_by = "cloud" if len(rows) == len(outputs[self.cascade.output]) else "edge+cloud"
        return merged, {
            "served_by": served_by,
            "fallback": False,
            "escalated_rows": ",".join(str(int(r)) for r in rows),
        }

    async def _ask(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One v2 request to the teacher; its outputs.

        Raises:
            _Failed: labelled by what went wrong.
        """
        assert self.client is not None, "Escalator.start() was not awaited"
        body, headers = encode_infer_request(inputs, binary_outputs=True)
        try:
            response = await self.client.post(self.path, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise _Failed("deadline", f"timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            tls = isinstance(exc.__cause__ or exc.__context__, ssl.SSLError) or "SSL" in str(exc)
            raise _Failed("tls" if tls else "unreachable", f"{type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            reason = "wrong_model" if response.status_code == 404 else "http_error"
            raise _Failed(reason, f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            doc, arrays = decode_infer_response(
                response.content, response.headers.get("Inference-Header-Content-Length")
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise _Failed("bad_answer", f"undecodable answer ({exc})") from exc
        teacher = self.cascade.teacher
        if doc.get("model_name") != teacher.model or doc.get("model_version") != teacher.version:
            raise _Failed(
                "wrong_model",
                f"answered by {doc.get('model_name')!r} {doc.get('model_version')!r}, "
                f"expected {teacher.model!r} {teacher.version!r}",
            )
        return arrays

    @staticmethod
    def _check(cloud: Mapping[str, np.ndarray], local: Mapping[str, np.ndarray], rows: int) -> None:
        """The teacher's answer has every local output, ``rows`` rows each, in the local row shape."""
        for name, array in local.items():
            got = cloud.get(name)
            if got is None or got.shape != (rows, *array.shape[1:]):
                raise _Failed(
                    "bad_answer",
                    f"output {name!r}: expected shape {(rows, *array.shape[1:])}, got "
                    f"{None if got is None else got.shape}",
                )
