"""The server as a client sees it: a real ``python -m serving`` process on a free 127.0.0.1 port."""

from __future__ import annotations

import concurrent.futures
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from serving_support import (
    Bundle,
    ServerProcess,
    make_bundle,
    running_server,
)
from tritonclient.utils import InferenceServerException

from contract.codec import decode_infer_response, encode_infer_request

MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return make_bundle(tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="module")
def server(tiny: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(
        tiny.path, tiny.public_key, tmp_path_factory.mktemp("logs"), ["--max-body-bytes", str(MAX_BODY)]
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Bundle, ServerProcess]]:
    built = make_bundle(tmp_path_factory.mktemp("emb"), kind="embedder")
    with running_server(built.path, built.public_key, tmp_path_factory.mktemp("emblogs")) as proc:
        yield built, proc


def reference(bundle: Bundle, inputs: dict[str, np.ndarray], variant: str = "int8") -> np.ndarray:
    """The same variant run in-process by ONNX Runtime, to compare the server's answer with."""
    file = next(v["file"] for v in bundle.manifest["variants"] if v["name"] == variant)
    session = ort.InferenceSession(str(bundle.path / file), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, inputs)[0])


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


# --------------------------------------------------------------------------- endpoints


def test_health_and_metadata_endpoints_answer_in_v2_json(server: ServerProcess, tiny: Bundle) -> None:
    with server.client() as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}
        meta = c.get("/v2").json()
        assert meta["name"] == "dualdeploy" and "binary_tensor_data" in meta["extensions"]
        model = c.get("/v2/models/tiny").json()
        assert model["versions"] == ["v1"]
        assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        assert model["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]
        assert c.get("/v2/models/tiny/versions/v1").json() == model
        assert c.get("/v2/models/tiny/ready").json() == {"name": "tiny", "ready": True}
        assert c.get("/v2/models/tiny/versions/v1/ready").status_code == 200
        assert c.get("/openapi.json").json()["openapi"].startswith("3.")


def test_json_inference_matches_the_variant_run_in_process(server: ServerProcess, tiny: Bundle) -> None:
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    body = {"id": "req-1", "inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": x.tolist()}]}
    with server.client() as c:
        response = c.post("/v2/models/tiny/infer", json=body)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["id"] == "req-1" and doc["model_name"] == "tiny" and doc["model_version"] == "v1"
    (out,) = doc["outputs"]
    assert out["name"] == "logits" and out["datatype"] == "FP32" and out["shape"] == [3, 3]
    got = np.asarray(out["data"], np.float32).reshape(3, 3)
    np.testing.assert_allclose(got, reference(tiny, {"x": x}), rtol=1e-6, atol=1e-6)


def test_binary_inference_round_trips_raw_tensors(server: ServerProcess, tiny: Bundle) -> None:
    x = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
    body, headers = encode_infer_request({"x": x})
    with server.client() as c:
        response = c.post("/v2/models/tiny/versions/v1/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    doc, arrays = decode_infer_response(
        response.content, int(response.headers["inference-header-content-length"])
    )
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == 2 * 3 * 4
    np.testing.assert_array_equal(arrays["logits"], reference(tiny, {"x": x}))


def test_binary_input_with_json_output_on_request(server: ServerProcess, tiny: Bundle) -> None:
    x = np.ones((1, 4), np.float32)
    body, headers = encode_infer_request(
        {"x": x}, binary_outputs=False, outputs=[{"name": "logits", "parameters": {"binary_data": False}}]
    )
    with server.client() as c:
        response = c.post("/v2/models/tiny/infer", content=body, headers=headers)
    assert response.status_code == 200
    assert "inference-header-content-length" not in response.headers
    got = np.asarray(response.json()["outputs"][0]["data"], np.float32).reshape(1, 3)
    np.testing.assert_allclose(got, reference(tiny, {"x": x}), rtol=1e-6)


def test_gzip_request_body_is_accepted(server: ServerProcess, tiny: Bundle) -> None:
    x = np.full((1, 4), 0.5, np.float32)
    raw = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}
    )
    with server.client() as c:
        response = c.post(
            "/v2/models/tiny/infer", content=gzip.compress(raw.encode()), headers={"Content-Encoding": "gzip"}
        )
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(
        np.asarray(response.json()["outputs"][0]["data"], np.float32).reshape(1, 3), reference(tiny, {"x": x})
    )


def test_tritonclient_interoperates_in_binary_and_json(server: ServerProcess, tiny: Bundle) -> None:
    client = triton.InferenceServerClient(server.base_url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
        assert client.get_model_metadata("tiny")["name"] == "tiny"
        x = np.random.default_rng(2).normal(size=(4, 4)).astype(np.float32)
        for binary in (True, False):
            tensor = triton.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            wanted = [triton.InferRequestedOutput("logits", binary_data=binary)]
            result = client.infer("tiny", [tensor], outputs=wanted, request_id=f"b{binary}")
            np.testing.assert_allclose(result.as_numpy("logits"), reference(tiny, {"x": x}), rtol=1e-6)
        with pytest.raises(InferenceServerException, match="unknown model"):
            client.infer("other", [tensor])
    finally:
        client.close()


def test_int64_inputs_with_a_sequence_axis(embedder: tuple[Bundle, ServerProcess]) -> None:
    built, proc = embedder
    ids = np.array([[1, 5, 7, 9], [2, 3, 0, 0]], np.int64)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.int64)
    body, headers = encode_infer_request({"ids": ids, "mask": mask})
    with proc.client() as c:
        response = c.post("/v2/models/tinyemb/infer", content=body, headers=headers)
        assert response.status_code == 200, response.text
        _, arrays = decode_infer_response(
            response.content, int(response.headers["inference-header-content-length"])
        )
        want = reference(built, {"ids": ids, "mask": mask})
        np.testing.assert_allclose(arrays["embedding"], want, rtol=1e-6)
        # An index outside the lookup table is the model's refusal: still a 4xx, and the server goes on.
        bad = {"ids": np.array([[1, 99]], np.int64), "mask": np.ones((1, 2), np.int64)}
        body, headers = encode_infer_request(bad)
        refused = c.post("/v2/models/tinyemb/infer", content=body, headers=headers)
        assert refused.status_code == 400 and "out of data bounds" in refused.json()["error"]
        mismatched = encode_infer_request({"ids": ids, "mask": mask[:, :3].copy()})
        refused = c.post("/v2/models/tinyemb/infer", content=mismatched[0], headers=mismatched[1])
        assert refused.status_code == 400 and "axis 'sequence'" in refused.json()["error"]
        assert c.get("/v2/health/ready").status_code == 200


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(
    server: ServerProcess, tiny: Bundle
) -> None:
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(1, 4)).astype(np.float32) for _ in range(48)]

    def call(x: np.ndarray) -> np.ndarray:
        body, headers = encode_infer_request({"x": x})
        with server.client() as c:
            response = c.post("/v2/models/tiny/infer", content=body, headers=headers)
        assert response.status_code == 200, response.text
        return decode_infer_response(
            response.content, int(response.headers["inference-header-content-length"])
        )[1]["logits"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, xs))
    for x, got in zip(xs, results, strict=True):
        np.testing.assert_allclose(got, reference(tiny, {"x": x}), rtol=1e-5, atol=1e-6)
    with server.client() as c:
        values = metric_values(c.get("/metrics").text)
    batches = values[("dualdeploy_batch_size_count", ())]
    rows = values[("dualdeploy_batch_size_sum", ())]
    assert rows > batches, "no run ever carried more than one row"


# --------------------------------------------------------------------------- metrics


def test_metrics_parse_and_counters_move(server: ServerProcess) -> None:
    key = ("dualdeploy_requests_total", (("endpoint", "infer"), ("model", "tiny"), ("status", "200")))
    bad_key = ("dualdeploy_requests_total", (("endpoint", "infer"), ("model", "tiny"), ("status", "400")))
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]}
    with server.client() as c:
        before = metric_values(c.get("/metrics").text)
        for _ in range(3):
            assert c.post("/v2/models/tiny/infer", json=body).status_code == 200
        assert c.post("/v2/models/tiny/infer", content=b"{").status_code == 400
        after = metric_values(c.get("/metrics").text)
    assert after[key] - before.get(key, 0) == 3
    assert after[bad_key] - before.get(bad_key, 0) == 1
    assert (
        after[("dualdeploy_request_seconds_count", ())]
        >= before[("dualdeploy_request_seconds_count", ())] + 4
    )
    assert after[("dualdeploy_queue_seconds_count", ())] >= before[("dualdeploy_queue_seconds_count", ())] + 3
    assert after[("dualdeploy_compute_seconds_count", ())] > before[("dualdeploy_compute_seconds_count", ())]
    assert ("dualdeploy_queue_depth", ()) in after and ("dualdeploy_inflight_requests", ()) in after
    assert after[("dualdeploy_model_load_seconds", ())] > 0
    assert after[("dualdeploy_startup_seconds", ())] > 0
    info = next(labels for (name, labels) in after if name == "dualdeploy_model_info")
    assert dict(info)["bundle_version"] == "v1" and dict(info)["variant"] == "int8"
    assert dict(info)["device_class"] == "x86_cpu"
    assert after[("dualdeploy_ready", ())] == 1


# --------------------------------------------------------------------------- bad input


def _json_body(**tensor: Any) -> bytes:
    base = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    base.update(tensor)
    return json.dumps({"inputs": [{k: v for k, v in base.items() if v is not None}]}).encode()


def _binary(
    header_length_delta: int = 0, extra: bytes = b"", size: int = 16, shape: tuple[int, int] = (1, 4)
) -> tuple[bytes, dict[str, str]]:
    tensor = {"name": "x", "shape": list(shape), "datatype": "FP32", "parameters": {"binary_data_size": size}}
    head = json.dumps({"inputs": [tensor]}).encode()
    body = head + np.ones(4, np.float32).tobytes() + extra
    return body, {"Inference-Header-Content-Length": str(len(head) + header_length_delta)}


BAD_INPUTS: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    ("malformed JSON", "tiny", b'{"inputs": [', {}, 400, "not valid JSON"),
    ("not an object", "tiny", b"[1, 2]", {}, 400, "must be a JSON object"),
    ("no inputs", "tiny", b'{"inputs": []}', {}, 400, "inputs must be a non-empty list"),
    ("unknown model", "nope", _json_body(), {}, 404, "unknown model 'nope'"),
    ("unknown tensor", "tiny", _json_body(name="y"), {}, 400, "input 'y' is not an input"),
    ("wrong datatype", "tiny", _json_body(datatype="INT64"), {}, 400, "datatype 'INT64' is wrong"),
    ("wrong rank", "tiny", _json_body(shape=[4]), {}, 400, "has rank 1"),
    ("wrong fixed dim", "tiny", _json_body(shape=[2, 2]), {}, 400, "does not match"),
    ("element count", "tiny", _json_body(shape=[2, 4]), {}, 400, "has 4 elements, shape [2, 4] needs 8"),
    ("strings as data", "tiny", _json_body(data=["a", "b", "c", "d"]), {}, 400, "holds strings"),
    ("ragged data", "tiny", _json_body(data=[[1, 2], [3]]), {}, 400, "not a regular array"),
    ("batch above max", "tiny", _json_body(shape=[9, 4], data=[0] * 36), {}, 400, "above the maximum of 8"),
    (
        "NaN",
        "tiny",
        b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,NaN,3,4]}]}',
        {},
        400,
        "NaN or Inf",
    ),
    (
        "Infinity",
        "tiny",
        b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,Infinity,4]}]}',
        {},
        400,
        "NaN or Inf",
    ),
    (
        "unknown output",
        "tiny",
        json.dumps({"inputs": json.loads(_json_body())["inputs"], "outputs": [{"name": "z"}]}).encode(),
        {},
        400,
        "outputs[0].name 'z'",
    ),
    (
        "output twice",
        "tiny",
        json.dumps(
            {"inputs": json.loads(_json_body())["inputs"], "outputs": [{"name": "logits"}] * 2_000}
        ).encode(),
        {},
        400,
        "outputs[1].name 'logits' is asked for twice",
    ),
    ("header length beyond body", "tiny", *_binary(header_length_delta=1000), 400, "does not fit a body"),
    (
        "header length not a number",
        "tiny",
        _binary()[0],
        {"Inference-Header-Content-Length": "abc"},
        400,
        "is not a decimal integer",
    ),
    (
        "header length too long",
        "tiny",
        *_binary(header_length_delta=8),
        400,
        "Inference-Header-Content-Length",
    ),
    (
        "binary shorter than declared",
        "tiny",
        *_binary(size=32, shape=(2, 4)),
        400,
        "binary data ends at byte 32",
    ),
    (
        "binary longer than declared",
        "tiny",
        *_binary(extra=b"\0" * 8),
        400,
        "beyond those the inputs declare",
    ),
    ("binary size vs shape", "tiny", *_binary(size=12), 400, "binary_data_size 12 != 16"),
    ("oversized body", "tiny", b"{" + b" " * (MAX_BODY + 10) + b"}", {}, 413, "above the limit"),
    ("unsupported encoding", "tiny", _json_body(), {"Content-Encoding": "br"}, 415, "not supported"),
]


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_a_4xx_naming_the_problem(
    server: ServerProcess, bad: tuple[str, str, bytes, dict[str, str], int, str]
) -> None:
    case, model, body, headers, status, message = bad
    with server.client() as c:
        response = c.post(f"/v2/models/{model}/infer", content=body, headers=headers)
        assert response.status_code == status, f"{case}: {response.status_code} {response.text}"
        assert message in response.json()["error"]
        assert c.get("/v2/health/ready").status_code == 200


def test_oversized_gzip_bomb_is_refused(server: ServerProcess) -> None:
    bomb = gzip.compress(b"0" * (MAX_BODY * 4))
    with server.client() as c:
        response = c.post("/v2/models/tiny/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 413 and "decompressed body" in response.json()["error"]


def test_unknown_path_and_method_get_json_errors(server: ServerProcess) -> None:
    with server.client() as c:
        missing = c.get("/v2/nothing")
        wrong = c.get("/v2/models/tiny/infer")
    assert missing.status_code == 404 and "/v2/nothing" in missing.json()["error"]
    assert wrong.status_code == 405


def test_no_5xx_was_counted_during_this_module(server: ServerProcess) -> None:
    with server.client() as c:
        values = metric_values(c.get("/metrics").text)
    errors = {k: v for k, v in values.items() if k[0] == "dualdeploy_server_errors_total"}
    assert sum(errors.values()) == 0, errors
    assert "Traceback" not in server.log()


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """Convolutions on 4x256x256, one row a run: requests that keep the model busy for a while."""
    return make_bundle(tmp_path_factory.mktemp("slow"), kind="slow", max_batch_size=1)


def _slow_request() -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(0).normal(size=(1, 4, 256, 256)).astype(np.float32)
    return encode_infer_request({"x": x})


def test_queue_bound_answers_503_with_retry_after(slow: Bundle, tmp_path: Path) -> None:
    # One waiting request at most: 24 concurrent clients overflow it.
    with running_server(slow.path, slow.public_key, tmp_path, ["--max-queue", "1"]) as proc:
        body, headers = _slow_request()

        def call(_: int) -> httpx.Response:
            with proc.client() as c:
                return c.post("/v2/models/slow/infer", content=body, headers=headers)

        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(call, range(48)))
        statuses = sorted({r.status_code for r in responses})
        assert statuses == [200, 503], statuses
        refused = next(r for r in responses if r.status_code == 503)
        assert refused.headers["retry-after"] == "1" and "queue is full" in refused.json()["error"]
        with proc.client() as c:
            assert c.post("/v2/models/slow/infer", content=body, headers=headers).status_code == 200
            values = metric_values(c.get("/metrics").text)
        assert values[("dualdeploy_server_errors_total", (("endpoint", "infer"),))] == sum(
            r.status_code == 503 for r in responses
        )


def test_request_timeout_answers_503(slow: Bundle, tmp_path: Path) -> None:
    with running_server(slow.path, slow.public_key, tmp_path, ["--request-timeout-s", "0.001"]) as proc:
        body, headers = _slow_request()
        with proc.client() as c:
            response = c.post("/v2/models/slow/infer", content=body, headers=headers)
            assert response.status_code == 503 and "timeout" in response.json()["error"]
            assert response.headers["retry-after"] == "1"
            assert c.get("/v2/health/ready").status_code == 200
