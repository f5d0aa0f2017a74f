"""The fast inference path (serving/fastpath.py) on a real server: what takes it, what does not, the wire.

A plain inference request is answered from the HTTP protocol; everything else goes through Starlette. The
two must be indistinguishable to a client except in speed: the same answers, errors, request ids,
keep-alive and ordering. ``dualdeploy_fast_path_requests_total`` tells which way a request went.
"""

from __future__ import annotations

import gzip
import json
import socket
from collections.abc import Iterator

import numpy as np
import pytest
from serving_support import Bundle, ServerProcess, make_bundle, metric_value, running_server

from contract.codec import decode_infer_response, encode_infer_request

TOKEN = "fast-path-token"
MAX_BODY = 64 * 1024
X = np.arange(8, dtype=np.float32).reshape(2, 4) / 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return make_bundle(tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="module")
def server(tiny: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("fast")
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    extra = ["--token-file", str(token_file), "--max-body-bytes", str(MAX_BODY)]
    with running_server(tiny.path, tiny.public_key, folder / "logs", extra) as proc:
        yield proc


def _fast_count(server: ServerProcess) -> float:
    with server.client() as c:
        text = c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    return metric_value(text, "dualdeploy_fast_path_requests_total")


def _metrics(server: ServerProcess) -> str:
    with server.client() as c:
        return c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text


def _request(path: str, body: bytes, headers: dict[str, str], *, version: str = "1.1") -> bytes:
    lines = [f"POST {path} HTTP/{version}", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Wire:
    """One TCP connection to the server, reading responses one by one (status, headers, body)."""

    def __init__(self, server: ServerProcess) -> None:
        host, port = server.base_url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status_line = self.file.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        headers: dict[str, str] = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self.file.read(int(headers["content-length"]))
        return int(status_line.split()[1]), headers, body

    def closed_by_server(self) -> bool:
        return self.file.read(1) == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def wire(server: ServerProcess) -> Iterator[Wire]:
    connection = Wire(server)
    yield connection
    connection.close()


def _auth(**more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", **more}


def _logits(status: int, headers: dict[str, str], body: bytes) -> np.ndarray:
    assert status == 200, body
    length = headers.get("inference-header-content-length")
    return decode_infer_response(body, length)[1]["logits"]


def test_a_plain_request_takes_the_fast_path_and_answers_as_starlette_does(
    server: ServerProcess, wire: Wire
) -> None:
    body, headers = encode_infer_request({"x": X})
    before = _fast_count(server)
    wire.send(_request("/v2/models/tiny/infer", body, _auth(**headers, **{"X-Request-Id": "abc-1"})))
    fast = wire.response()
    assert _fast_count(server) == before + 1
    # The same request gzip-compressed goes through Starlette (the fast path takes identity bodies only).
    wire.send(
        _request(
            "/v2/models/tiny/infer", gzip.compress(body), _auth(**headers, **{"Content-Encoding": "gzip"})
        )
    )
    slow = wire.response()
    assert _fast_count(server) == before + 1
    np.testing.assert_array_equal(_logits(*fast), _logits(*slow))
    assert fast[1]["x-request-id"] == "abc-1" and slow[1]["x-request-id"]
    for name in ("content-type", "inference-header-content-length"):
        assert fast[1][name] == slow[1][name], name
    # JSON bodies and the versioned path take it too.
    doc = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.reshape(-1).tolist()}]}
    wire.send(_request("/v2/models/tiny/versions/v1/infer", json.dumps(doc).encode(), _auth()))
    status, _, answer = wire.response()
    assert status == 200 and _fast_count(server) == before + 2
    np.testing.assert_allclose(
        np.asarray(json.loads(answer)["outputs"][0]["data"]).reshape(2, 3), _logits(*fast), atol=1e-6
    )


def test_refusals_on_the_fast_path_are_the_protocol_errors(server: ServerProcess, wire: Wire) -> None:
    body, headers = encode_infer_request({"x": X})
    wire.send(_request("/v2/models/other/infer", body, _auth(**headers)))
    status, _, answer = wire.response()
    assert status == 404 and "unknown model 'other'" in json.loads(answer)["error"]
    wire.send(
        _request(
            "/v2/models/tiny/infer", body, _auth(**{**headers, "Inference-Header-Content-Length": "+12"})
        )
    )
    status, _, answer = wire.response()
    assert status == 400 and "is not a decimal integer" in json.loads(answer)["error"]
    nan = encode_infer_request({"x": np.full((1, 4), np.nan, np.float32)})
    wire.send(_request("/v2/models/tiny/infer", nan[0], _auth(**nan[1])))
    status, _, answer = wire.response()
    assert status == 400 and "NaN or Inf" in json.loads(answer)["error"]
    # The connection survived every refusal.
    wire.send(_request("/v2/models/tiny/infer", body, _auth(**headers)))
    assert wire.response()[0] == 200


def test_what_the_fast_path_leaves_to_starlette(server: ServerProcess, wire: Wire) -> None:
    body, headers = encode_infer_request({"x": X})
    before = _fast_count(server)
    # No token: the guard's 401, from Starlette.
    wire.send(_request("/v2/models/tiny/infer", body, headers))
    status, answer_headers, _ = wire.response()
    assert status == 401 and answer_headers["www-authenticate"].startswith("Bearer")
    # A body above --max-body-bytes: Starlette's 413, before the body is read.
    big = encode_infer_request({"x": np.zeros((MAX_BODY // 16 + 1, 4), np.float32)})
    wire.send(_request("/v2/models/tiny/infer", big[0], _auth(**big[1])))
    status, _, answer = wire.response()
    assert status == 413 and "above the limit" in json.loads(answer)["error"]
    assert _fast_count(server) == before


def test_pipelined_requests_are_answered_in_order(server: ServerProcess, wire: Wire) -> None:
    """A fast request, a health check and a second inference in one write: three answers, in order."""
    first = encode_infer_request({"x": X})
    second = encode_infer_request({"x": X[:1] * 2})
    health = b"GET /v2/health/ready HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    wire.send(
        _request("/v2/models/tiny/infer", first[0], _auth(**first[1]))
        + health
        + _request("/v2/models/tiny/infer", second[0], _auth(**second[1]))
    )
    one, ready, two = wire.response(), wire.response(), wire.response()
    assert _logits(*one).shape == (2, 3)
    assert ready[0] == 200 and json.loads(ready[2]) == {"ready": True}
    assert _logits(*two).shape == (1, 3)
    assert not np.allclose(_logits(*two)[0], _logits(*one)[0])


def test_connection_close_and_http_1_0_close_after_the_answer(server: ServerProcess) -> None:
    body, headers = encode_infer_request({"x": X})
    for version, more in (("1.1", {"Connection": "close"}), ("1.0", {})):
        connection = Wire(server)
        try:
            connection.send(
                _request("/v2/models/tiny/infer", body, _auth(**headers, **more), version=version)
            )
            status, answer_headers, _ = connection.response()
            assert status == 200 and answer_headers["connection"] == "close", version
            assert connection.closed_by_server(), version
        finally:
            connection.close()


def test_a_client_hanging_up_mid_body_is_counted_and_the_server_goes_on(server: ServerProcess) -> None:
    body, headers = encode_infer_request({"x": X})
    before = _metrics(server)
    for _ in range(5):
        connection = Wire(server)
        request = _request("/v2/models/tiny/infer", body, _auth(**headers))
        connection.send(request[: len(request) - len(body) // 2])
        connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        connection.close()  # a reset: the server sees the connection go
    with server.client() as c:
        answer = c.post("/v2/models/tiny/infer", content=body, headers=_auth(**headers))
    assert answer.status_code == 200
    after = _metrics(server)
    name = "dualdeploy_client_disconnects_total"
    assert metric_value(after, name, 'endpoint="infer"') == metric_value(before, name, 'endpoint="infer"') + 5
    errors = "dualdeploy_server_errors_total"
    assert metric_value(after, errors, 'endpoint="infer"') == metric_value(before, errors, 'endpoint="infer"')
    assert "Traceback" not in server.log()


def test_a_request_id_that_cannot_be_echoed_is_replaced(server: ServerProcess, wire: Wire) -> None:
    body, headers = encode_infer_request({"x": X})
    wire.send(_request("/v2/models/tiny/infer", body, _auth(**headers)))
    status, answer_headers, _ = wire.response()
    assert status == 200 and answer_headers["x-request-id"]  # the server's own
    long_id = "r" * 300
    wire.send(_request("/v2/models/tiny/infer", body, _auth(**headers, **{"X-Request-Id": long_id})))
    assert wire.response()[1]["x-request-id"] == long_id[:128]


def test_a_slow_request_head_still_takes_the_fast_path(server: ServerProcess, wire: Wire) -> None:
    """Head and body trickling in byte by byte (within the read timeout) are collected all the same."""
    body, headers = encode_infer_request({"x": X})
    before = _fast_count(server)
    request = _request("/v2/models/tiny/infer", body, _auth(**headers))
    for start in range(0, len(request), 7):
        wire.send(request[start : start + 7])
    assert _logits(*wire.response()).shape == (2, 3)
    assert _fast_count(server) == before + 1
