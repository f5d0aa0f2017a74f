"""The v2 gRPC endpoint (``--grpc-port``) as clients see it: real server processes, ``tritonclient.grpc``.

Every server here serves REST and gRPC from one process, so the two answers can be compared for the same
input. Requests that ``tritonclient`` can't make (typed ``contents``, bad messages) are built with its own
generated messages (``tritonclient.grpc.service_pb2``, Triton's superset of KServe's proto): the server's
messages (``serving.grpc_v2``) register the same names in protobuf's default pool, so this process never
imports them (see serving/grpc_v2/__init__.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import filecmp
import math
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from serving_support import (
    REPO,
    Bundle,
    ServerProcess,
    free_port,
    make_bundle,
    metric_value,
    run_refused,
    running_server,
    self_signed_cert,
)
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from contract.codec import decode_infer_response, encode_infer_request

MAX_BODY = 64 * 1024
X = np.arange(1, 5, dtype=np.float32).reshape(1, 4)
Code = grpc.StatusCode
PUBLIC_KEY = REPO / ".keys" / "dev-ed25519.pub"
REAL_BUNDLES = [REPO / "dist" / "demo" / "latest", REPO / "dist" / "minilm" / "latest"]


@dataclass
class Served:
    """One server process: its REST side and the address of its gRPC port."""

    rest: ServerProcess
    address: str


@contextlib.contextmanager
def serving(
    bundle: Path, public_key: Path, log_dir: Path, extra: Sequence[str] = (), **kwargs: Any
) -> Iterator[Served]:
    port = free_port()
    with running_server(bundle, public_key, log_dir, ["--grpc-port", str(port), *extra], **kwargs) as proc:
        yield Served(proc, f"127.0.0.1:{port}")


@contextlib.contextmanager
def stub(address: str, credentials: grpc.ChannelCredentials | None = None) -> Iterator[Any]:
    """The raw service stub (for the messages tritonclient never sends), on a channel without size limits."""
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    channel = (
        grpc.secure_channel(address, credentials, options)
        if credentials is not None
        else grpc.insecure_channel(address, options)
    )
    try:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    finally:
        channel.close()


@contextlib.contextmanager
def triton(address: str, **kwargs: Any) -> Iterator[tgrpc.InferenceServerClient]:
    client = tgrpc.InferenceServerClient(address, **kwargs)
    try:
        yield client
    finally:
        client.close()


def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status code and message of a failing call."""
    with pytest.raises(grpc.RpcError) as failure:
        call()
    return failure.value.code(), failure.value.details() or ""


def typed(
    name: str = "x",
    datatype: str = "FP32",
    shape: Sequence[int] = (1, 4),
    values: Sequence[Any] = (1.0, 2.0, 3.0, 4.0),
    field: str = "fp32_contents",
) -> Any:
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(shape))
    getattr(tensor.contents, field).extend(values)
    return tensor


def head(name: str = "x", datatype: str = "FP32", shape: Sequence[int] = (1, 4)) -> Any:
    return service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(shape))


def request(
    *tensors: Any,
    model: str = "tiny",
    version: str = "",
    raw: Sequence[bytes] = (),
    outputs: Sequence[str] = (),
    **parameters: Any,
) -> Any:
    message = service_pb2.ModelInferRequest(model_name=model, model_version=version, id="req-7")
    message.inputs.extend(tensors)
    message.raw_input_contents.extend(raw)
    for name in outputs:
        message.outputs.add(name=name)
    for key, value in parameters.items():
        kind = "bool_param" if isinstance(value, bool) else "string_param"
        setattr(message.parameters[key], kind, value)
    return message


def rest_binary(proc: ServerProcess, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    body, headers = encode_infer_request(inputs)
    with proc.client() as c:
        response = c.post(f"/v2/models/{model}/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    return decode_infer_response(response.content, response.headers["inference-header-content-length"])[1]


def rest_json(proc: ServerProcess, model: str, tensors: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    with proc.client() as c:
        response = c.post(f"/v2/models/{model}/infer", json={"inputs": tensors})
    assert response.status_code == 200, response.text
    return decode_infer_response(response.content, None)[1]


def infer_raw(address: str, model: str, inputs: dict[str, np.ndarray], **kwargs: Any) -> Any:
    """A tritonclient.grpc inference (raw tensors both ways, as tritonclient always sends them)."""
    with triton(address) as client:
        tensors = []
        for name, value in inputs.items():
            tensor = tgrpc.InferInput(
                name, list(value.shape), "FP32" if value.dtype == np.float32 else "INT64"
            )
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        return client.infer(model, tensors, **kwargs)


# --------------------------------------------------------------------------- the generated code


def test_the_committed_stubs_are_what_protoc_makes_of_the_proto(tmp_path: Path) -> None:
    folder = Path("serving") / "grpc_v2"
    (tmp_path / folder).mkdir(parents=True)
    shutil.copy(REPO / folder / "grpc_predict_v2.proto", tmp_path / folder)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            str(folder / "grpc_predict_v2.proto"),
        ],
        cwd=tmp_path,
        check=True,
    )
    for name in ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / folder / name, REPO / folder / name, shallow=False), (
            f"{folder / name} differs from protoc's output: run make grpc-stubs and commit the result"
        )


def test_the_server_imports_the_grpc_code_only_when_it_serves_grpc() -> None:
    code = (
        "import sys, serving.server; assert not [m for m in sys.modules if 'grpc' in m], sorted(sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]


# --------------------------------------------------------------------------- a tiny classifier and embedder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return make_bundle(tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="module")
def server(tiny: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving(
        tiny.path, tiny.public_key, tmp_path_factory.mktemp("logs"), ["--max-body-bytes", str(MAX_BODY)]
    ) as s:
        yield s


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    built = make_bundle(tmp_path_factory.mktemp("emb"), kind="embedder")
    extra = ["--max-request-elements", "64"]
    with serving(built.path, built.public_key, tmp_path_factory.mktemp("emblogs"), extra) as s:
        yield s


def test_grpc_host_binds_grpc_apart_from_the_rest_address(tiny: Bundle, tmp_path: Path) -> None:
    """--grpc-host: on a device the REST port may be a loopback gate while gRPC serves the site address
    (here 127.0.0.2, another loopback address of this machine)."""
    port = free_port()
    extra = ["--grpc-port", str(port), "--grpc-host", "127.0.0.2"]
    with running_server(tiny.path, tiny.public_key, tmp_path, extra):
        with triton(f"127.0.0.2:{port}") as client:
            assert client.is_server_ready()
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, "gRPC also listens on --host"


def test_health_and_metadata_answer_as_rest_does(server: Served) -> None:
    with server.rest.client() as c:
        rest_server, rest_model = c.get("/v2").json(), c.get("/v2/models/tiny").json()
    with triton(server.address) as client:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "v1")
        meta = client.get_server_metadata(as_json=True)
        assert meta == {k: rest_server[k] for k in ("name", "version", "extensions")}
        model = client.get_model_metadata("tiny", as_json=True)
        assert client.get_model_metadata("tiny", "v1", as_json=True) == model
    for tensors in ("inputs", "outputs"):  # protobuf's JSON writes int64 as strings
        for t in model[tensors]:
            t["shape"] = [int(d) for d in t["shape"]]
    # The REST answer's "parameters" (the variant chosen here) has no field in the gRPC message.
    assert model == {k: v for k, v in rest_model.items() if k != "parameters"}


def test_unknown_model_or_version_is_not_found_in_every_rpc(server: Served) -> None:
    with stub(server.address) as s:
        for call in (
            lambda: s.ModelMetadata(service_pb2.ModelMetadataRequest(name="nope"), timeout=10),
            lambda: s.ModelReady(service_pb2.ModelReadyRequest(name="tiny", version="v9"), timeout=10),
            lambda: s.ModelInfer(request(typed(), model="nope"), timeout=10),
        ):
            code, message = code_of(call)
            assert code == Code.NOT_FOUND and (
                "unknown model 'nope'" in message or "unknown version 'v9'" in message
            )


def test_raw_inference_equals_the_rest_binary_answer(server: Served) -> None:
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    result = infer_raw(server.address, "tiny", {"x": x}, request_id="r-1")
    assert result.get_response().id == "r-1"
    assert len(result.get_response().raw_output_contents) == 1
    np.testing.assert_array_equal(
        result.as_numpy("logits"), rest_binary(server.rest, "tiny", {"x": x})["logits"]
    )


def test_typed_contents_in_get_typed_contents_out_equal_to_the_rest_json_answer(server: Served) -> None:
    x = np.random.default_rng(2).normal(size=(2, 4)).astype(np.float32)
    message = request(typed(shape=x.shape, values=x.ravel().tolist()), outputs=["logits"])
    with stub(server.address) as s:
        response, call = s.ModelInfer.with_call(message, timeout=10, metadata=(("x-request-id", "mine-1"),))
    assert ("x-request-id", "mine-1") in tuple(call.trailing_metadata())
    assert response.model_name == "tiny" and response.model_version == "v1" and response.id == "req-7"
    (out,) = response.outputs
    assert out.name == "logits" and out.datatype == "FP32" and list(out.shape) == [2, 3]
    assert not response.raw_output_contents
    got = np.asarray(out.contents.fp32_contents, np.float32).reshape(2, 3)
    want = rest_json(
        server.rest, "tiny", [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}]
    )
    np.testing.assert_array_equal(got, want["logits"])


def test_typed_request_can_ask_for_raw_outputs(server: Served) -> None:
    with stub(server.address) as s:
        response = s.ModelInfer(
            request(typed(values=X.ravel().tolist()), binary_data_output=True), timeout=10
        )
    assert not response.outputs[0].contents.fp32_contents and len(response.raw_output_contents) == 1
    got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(1, 3)
    np.testing.assert_array_equal(got, rest_binary(server.rest, "tiny", {"x": X})["logits"])


def test_int64_inputs_raw_and_typed_equal_rest(embedder: Served) -> None:
    ids = np.array([[1, 5, 7, 9], [2, 3, 0, 0]], np.int64)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.int64)
    want = rest_binary(embedder.rest, "tinyemb", {"ids": ids, "mask": mask})["embedding"]
    np.testing.assert_array_equal(
        infer_raw(embedder.address, "tinyemb", {"ids": ids, "mask": mask}).as_numpy("embedding"), want
    )
    message = request(
        typed("ids", "INT64", ids.shape, ids.ravel().tolist(), "int64_contents"),
        typed("mask", "INT64", mask.shape, mask.ravel().tolist(), "int64_contents"),
        model="tinyemb",
    )
    with stub(embedder.address) as s:
        response = s.ModelInfer(message, timeout=10)
    np.testing.assert_array_equal(
        np.asarray(response.outputs[0].contents.fp32_contents, np.float32).reshape(2, 8), want
    )


def test_rest_and_grpc_share_one_queue_and_one_set_of_metrics(server: Served) -> None:
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(1, 4)).astype(np.float32) for _ in range(32)]
    with server.rest.client() as c:
        before = c.get("/metrics").text

    def call(i: int) -> np.ndarray:
        if i % 2:
            return rest_binary(server.rest, "tiny", {"x": xs[i]})["logits"]
        return infer_raw(server.address, "tiny", {"x": xs[i]}).as_numpy("logits")

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(len(xs))))
    for i, got in enumerate(results):
        np.testing.assert_array_equal(got, rest_binary(server.rest, "tiny", {"x": xs[i]})["logits"])
    with server.rest.client() as c:
        after = c.get("/metrics").text
    ok = 'endpoint="grpc_infer",model="tiny",status="OK"'
    assert (
        metric_value(after, "dualdeploy_requests_total", ok)
        - metric_value(before, "dualdeploy_requests_total", ok)
        == 16
    )
    # One queue: the queue histogram counts REST and gRPC requests alike (32 + the 32 checks above).
    queued = metric_value(after, "dualdeploy_queue_seconds_count") - metric_value(
        before, "dualdeploy_queue_seconds_count"
    )
    assert queued == 64


# --------------------------------------------------------------------------- bad input

INVALID = Code.INVALID_ARGUMENT

BAD_REQUESTS: list[tuple[str, Any, grpc.StatusCode, str]] = [
    ("unknown version", request(typed(), version="v9"), Code.NOT_FOUND, "unknown version 'v9'"),
    # Echoed names and shapes are cut: the status message travels as a header of at most 16 KiB.
    (
        "a model name of 50 kB",
        request(typed(), model="m" * 50_000),
        Code.NOT_FOUND,
        "(cut at 1000 characters)",
    ),
    ("8000 dimensions", request(typed(shape=(2,) * 8000)), INVALID, "... (8000 dimensions)] has rank 8000"),
    ("no inputs", request(), INVALID, "inputs must be a non-empty list"),
    ("unknown tensor", request(typed(name="y")), INVALID, "input 'y' is not an input"),
    (
        "wrong datatype",
        request(typed(datatype="INT64", values=(1, 2, 3, 4), field="int64_contents")),
        INVALID,
        "datatype 'INT64' is wrong",
    ),
    ("wrong rank", request(typed(shape=(4,))), INVALID, "has rank 1"),
    ("wrong fixed dim", request(typed(shape=(2, 2))), INVALID, "does not match"),
    ("dimension below 1", request(typed(shape=(-1, 4))), INVALID, "has a dimension below 1"),
    ("huge dimension", request(typed(shape=(1 << 40, 4))), INVALID, "above the maximum of 8"),
    (
        "element count",
        request(typed(shape=(2, 4))),
        INVALID,
        "contents.fp32_contents has 4 elements, shape [2, 4] needs 8",
    ),
    (
        "contents of another datatype",
        request(typed(field="int64_contents", values=(1, 2, 3, 4))),
        INVALID,
        "contents.int64_contents given, datatype FP32 takes contents.fp32_contents",
    ),
    ("batch above max", request(typed(shape=(9, 4), values=[0.0] * 36)), INVALID, "above the maximum of 8"),
    ("NaN typed", request(typed(values=(1.0, math.nan, 3.0, 4.0))), INVALID, "NaN or Inf"),
    (
        "Inf raw",
        request(head(), raw=[np.array([[1, math.inf, 3, 4]], np.float32).tobytes()]),
        INVALID,
        "NaN or Inf",
    ),
    (
        "raw entry size",
        request(head(), raw=[b"\0" * 12]),
        INVALID,
        "raw_input_contents[0] holds 12 bytes, shape [1, 4] FP32 needs 16",
    ),
    (
        "raw entries vs inputs",
        request(head(), raw=[X.tobytes()] * 2),
        INVALID,
        "raw_input_contents has 2 entries for 1 inputs",
    ),
    (
        "raw and typed",
        request(typed(), raw=[X.tobytes()]),
        INVALID,
        "has contents, and the request has raw_input_contents",
    ),
    ("input twice", request(typed(), typed()), INVALID, "input 'x' is given twice"),
    ("unknown output", request(typed(), outputs=["z"]), INVALID, "outputs[0].name 'z'"),
    (
        "output twice",
        request(typed(), outputs=["logits", "logits"]),
        INVALID,
        "outputs[1].name 'logits' is asked",
    ),
    (
        "binary_data_output not a boolean",
        request(typed(), binary_data_output="yes"),
        INVALID,
        "binary_data_output must be a boolean",
    ),
    (
        "oversized message",
        request(head(), raw=[b"\0" * (MAX_BODY + 16)]),
        Code.RESOURCE_EXHAUSTED,
        "larger than max",
    ),
]


@pytest.mark.parametrize("bad", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_its_status_code_naming_the_problem(
    server: Served, bad: tuple[str, Any, grpc.StatusCode, str]
) -> None:
    case, message, want_code, want_message = bad
    with stub(server.address) as s:
        code, details = code_of(lambda: s.ModelInfer(message, timeout=10))
        assert code == want_code, f"{case}: {code} {details}"
        assert want_message in details, f"{case}: {details}"
        assert s.ServerReady(service_pb2.ServerReadyRequest(), timeout=10).ready


def test_a_compressed_message_above_the_limit_is_refused(server: Served) -> None:
    """gzip on the wire: the limit applies to the message once inflated, as REST's does to the body."""
    message = request(head(shape=(1, 4)), raw=[b"\0" * (MAX_BODY * 4)])
    with stub(server.address) as s:
        code, details = code_of(lambda: s.ModelInfer(message, timeout=10, compression=grpc.Compression.Gzip))
        assert code == Code.RESOURCE_EXHAUSTED, details
        assert s.ServerLive(service_pb2.ServerLiveRequest(), timeout=10).live


BAD_EMBEDDER: list[tuple[str, Any, str]] = [
    (
        "missing input",
        request(typed("ids", "INT64", (1, 2), (1, 2), "int64_contents"), model="tinyemb"),
        "missing input(s) 'mask'",
    ),
    (
        "axes that disagree",
        request(
            typed("ids", "INT64", (1, 3), (1, 2, 3), "int64_contents"),
            typed("mask", "INT64", (1, 2), (1, 1), "int64_contents"),
            model="tinyemb",
        ),
        "axis 'sequence' is 2 but 3 in input 'ids'",
    ),
    (
        "axis above its maximum",
        request(
            head("ids", "INT64", (1, 65)),
            head("mask", "INT64", (1, 65)),
            raw=[b"\0" * 520] * 2,
            model="tinyemb",
        ),
        "axis 'sequence' is 65, above its maximum of 64",
    ),
    (
        "element budget",
        request(
            head("ids", "INT64", (4, 16)),
            head("mask", "INT64", (4, 16)),
            raw=[b"\0" * 512] * 2,
            model="tinyemb",
        ),
        "above the per-request budget of 64",
    ),
    (
        "values the model rejects",
        request(
            typed("ids", "INT64", (1, 2), (1, 99), "int64_contents"),
            typed("mask", "INT64", (1, 2), (1, 1), "int64_contents"),
            model="tinyemb",
        ),
        "the model rejected the input values",
    ),
    (
        "float contents for an INT64 input",
        request(typed("ids", "INT64", (1, 1), (1.0,), "fp32_contents"), model="tinyemb"),
        "contents.fp32_contents given, datatype INT64 takes contents.int64_contents",
    ),
]


@pytest.mark.parametrize("bad", BAD_EMBEDDER, ids=[c[0] for c in BAD_EMBEDDER])
def test_bad_embedder_request_is_invalid_argument(embedder: Served, bad: tuple[str, Any, str]) -> None:
    case, message, want = bad
    with stub(embedder.address) as s:
        code, details = code_of(lambda: s.ModelInfer(message, timeout=10))
        assert code == INVALID and want in details, f"{case}: {code} {details}"
        assert s.ServerReady(service_pb2.ServerReadyRequest(), timeout=10).ready


def test_no_fault_was_counted_and_nothing_crashed(server: Served, embedder: Served) -> None:
    for served in (server, embedder):
        with served.rest.client() as c:
            text = c.get("/metrics").text
        assert metric_value(text, "dualdeploy_server_errors_total", 'endpoint="grpc_infer"') == 0
        assert "Traceback" not in served.rest.log()


# --------------------------------------------------------------------------- the real bundles


@pytest.mark.slow
@pytest.mark.parametrize("bundle", REAL_BUNDLES, ids=[b.parent.name for b in REAL_BUNDLES])
def test_real_bundle_answers_grpc_as_it_answers_rest(bundle: Path, tmp_path: Path) -> None:
    from contract.bundle import load_tensors, read_manifest

    assert (bundle / "manifest.json").is_file(), f"{bundle} is not built: run make bundles"
    manifest = read_manifest(bundle)
    golden = load_tensors(bundle / manifest.golden.inputs)
    inputs = {spec.name: np.ascontiguousarray(golden[spec.name][:2]) for spec in manifest.inputs}
    with serving(bundle, PUBLIC_KEY, tmp_path) as served:
        with triton(served.address) as client:
            assert client.is_model_ready(manifest.model, manifest.version)
            meta = client.get_model_metadata(manifest.model, as_json=True)
        assert [t["name"] for t in meta["inputs"]] == [t.name for t in manifest.inputs]
        rest = rest_binary(served.rest, manifest.model, inputs)
        raw = infer_raw(served.address, manifest.model, inputs)
        tensors = []
        for spec in manifest.inputs:
            value = inputs[spec.name]
            field = "fp32_contents" if value.dtype == np.float32 else "int64_contents"
            tensors.append(
                typed(
                    spec.name,
                    "FP32" if field == "fp32_contents" else "INT64",
                    value.shape,
                    value.ravel().tolist(),
                    field,
                )
            )
        with stub(served.address) as s:
            response = s.ModelInfer(request(*tensors, model=manifest.model), timeout=30)
    for index, out in enumerate(manifest.outputs):
        np.testing.assert_array_equal(raw.as_numpy(out.name), rest[out.name])
        got = np.asarray(response.outputs[index].contents.fp32_contents, np.float32).reshape(
            rest[out.name].shape
        )
        np.testing.assert_array_equal(got, rest[out.name])


# --------------------------------------------------------------------------- TLS and the token


@pytest.fixture(scope="module")
def secured(tiny: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, Path]]:
    folder = tmp_path_factory.mktemp("tls")
    self_signed_cert(folder)
    (folder / "token").write_text("s3cret-token\n")
    extra = [
        "--tls-cert",
        str(folder / "server.crt"),
        "--tls-key",
        str(folder / "server.key"),
        "--token-file",
        str(folder / "token"),
    ]
    import ssl

    context = ssl.create_default_context(cafile=str(folder / "server.crt"))
    with serving(tiny.path, tiny.public_key, folder, extra, scheme="https", verify=context) as served:
        yield served, folder / "server.crt"


def test_tls_serves_grpc_and_health_stays_open_without_the_token(secured: tuple[Served, Path]) -> None:
    served, cert = secured
    with triton(served.address, ssl=True, root_certificates=str(cert)) as client:
        assert client.is_server_live() and client.is_server_ready()


def test_a_plain_text_client_gets_nothing_from_the_tls_port(secured: tuple[Served, Path]) -> None:
    served, _ = secured
    with stub(served.address) as s:
        code, _ = code_of(lambda: s.ServerLive(service_pb2.ServerLiveRequest(), timeout=5))
    assert code == Code.UNAVAILABLE


@pytest.mark.parametrize(
    "headers", [None, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret-token"}]
)
def test_everything_but_health_needs_the_token(
    secured: tuple[Served, Path], headers: dict[str, str] | None
) -> None:
    served, cert = secured
    x = np.ones((1, 4), np.float32)
    with triton(served.address, ssl=True, root_certificates=str(cert)) as client:
        tensor = tgrpc.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(x)
        for call in (
            lambda: client.get_server_metadata(headers=headers),
            lambda: client.get_model_metadata("tiny", headers=headers),
            lambda: client.is_model_ready("tiny", headers=headers),
            lambda: client.infer("tiny", [tensor], headers=headers),
        ):
            with pytest.raises(InferenceServerException) as refused:
                call()
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED", refused.value
            assert ("missing" if headers is None else "wrong") + " bearer token" in refused.value.message()
        assert client.is_server_ready()


def test_the_token_opens_inference_over_tls_with_the_rest_answer(secured: tuple[Served, Path]) -> None:
    served, cert = secured
    x = np.random.default_rng(4).normal(size=(2, 4)).astype(np.float32)
    token = {"authorization": "bearer s3cret-token"}  # the scheme is case-insensitive, as in REST
    with triton(served.address, ssl=True, root_certificates=str(cert)) as client:
        tensor = tgrpc.InferInput("x", [2, 4], "FP32")
        tensor.set_data_from_numpy(x)
        got = client.infer("tiny", [tensor], headers=token).as_numpy("logits")
        assert client.is_model_ready("tiny", headers=token)
    body, headers = encode_infer_request({"x": x})
    with served.rest.client(headers={"Authorization": "Bearer s3cret-token"}) as c:
        response = c.post("/v2/models/tiny/infer", content=body, headers=headers)
    want = decode_infer_response(response.content, response.headers["inference-header-content-length"])[1]
    np.testing.assert_array_equal(got, want["logits"])


# --------------------------------------------------------------------------- overload, drain, start-up


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """Convolutions on 4x256x256, one row a run: requests that keep the model busy for a while."""
    return make_bundle(tmp_path_factory.mktemp("slow"), kind="slow", max_batch_size=1)


def _slow_input() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).normal(size=(1, 4, 256, 256)).astype(np.float32)}


def _try_slow(address: str) -> str:
    try:
        infer_raw(address, "slow", _slow_input(), client_timeout=60)
    except InferenceServerException as exc:
        return str(exc.status())
    return "OK"


@pytest.mark.slow
def test_a_full_queue_is_resource_exhausted_and_the_server_goes_on(slow: Bundle, tmp_path: Path) -> None:
    with serving(slow.path, slow.public_key, tmp_path, ["--max-queue", "1"]) as served:
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            statuses = list(pool.map(lambda _: _try_slow(served.address), range(48)))
        assert set(statuses) == {"OK", "StatusCode.RESOURCE_EXHAUSTED"}, statuses
        assert _try_slow(served.address) == "OK"
        with served.rest.client() as c:
            text = c.get("/metrics").text
        assert metric_value(
            text, "dualdeploy_server_errors_total", 'endpoint="grpc_infer"'
        ) == statuses.count("StatusCode.RESOURCE_EXHAUSTED")


@pytest.mark.slow
def test_sigterm_finishes_calls_in_flight_and_refuses_new_ones(slow: Bundle, tmp_path: Path) -> None:
    with serving(slow.path, slow.public_key, tmp_path, ["--max-queue", "64"]) as served:
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            calls = [pool.submit(_try_slow, served.address) for _ in range(24)]
            deadline = time.monotonic() + 30
            while True:
                with served.rest.client() as c:
                    if metric_value(c.get("/metrics").text, "dualdeploy_inflight_requests") >= 8:
                        break
                assert time.monotonic() < deadline, "the calls never got in flight"
                time.sleep(0.02)
            served.rest.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            late = _try_slow(served.address)
            finished = [call.result(timeout=60) for call in calls]
        assert served.rest.proc.wait(timeout=30) == 0
    assert late == "StatusCode.UNAVAILABLE"
    assert finished.count("OK") == len(finished), finished
    assert "gRPC: draining" in served.rest.log()


def test_a_taken_grpc_port_refuses_the_start_naming_it(tiny: Bundle) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, output = run_refused(tiny.path, tiny.public_key, ["--grpc-port", str(port)])
    assert code == 2 and f"cannot serve gRPC on 127.0.0.1:{port}" in output, output[-2000:]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--port", "18555", "--grpc-port", "18555"], "give gRPC a port of its own"),
        (["--grpc-port", "70000"], "--grpc-port must be a port number"),
    ],
)
def test_an_unusable_grpc_port_is_refused(tiny: Bundle, extra: list[str], message: str) -> None:
    code, output = run_refused(tiny.path, tiny.public_key, extra)
    assert code == 2 and message in output, output[-2000:]


def test_the_environment_variable_turns_grpc_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.server import parser

    monkeypatch.setenv("DUALDEPLOY_GRPC_PORT", "18556")
    assert parser().parse_args(["--bundle", "b"]).grpc_port == 18556
    monkeypatch.delenv("DUALDEPLOY_GRPC_PORT")
    assert parser().parse_args(["--bundle", "b"]).grpc_port is None
