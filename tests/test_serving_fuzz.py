"""Schema-driven fuzz: schemathesis generates requests from the server's own /openapi.json.

Every generated request must get an answer that is not a 5xx, with a status code the
document declares and a body that matches its schema; the server must still be ready after.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from serving_support import ServerProcess, make_bundle, running_server


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("fuzz")
    built = make_bundle(folder / "bundles")
    with running_server(built.path, built.public_key, folder / "logs", ["--max-body-bytes", "65536"]) as proc:
        yield proc


@pytest.fixture(scope="module")
def api_schema(fuzz_server: ServerProcess) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json")


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_generated_requests_never_get_a_5xx(api_schema: schemathesis.BaseSchema) -> None:
    # schemathesis' own pytest plugin does not load under pytest 9 yet, so each operation's
    # strategy is driven by Hypothesis directly; the checks are schemathesis' own.
    operations = []
    for result in api_schema.get_all_operations():
        assert isinstance(result, Ok), f"the OpenAPI document has an invalid operation: {result.err()}"
        operations.append(result.ok())
    assert {o.label for o in operations} >= {"GET /v2/health/ready", "POST /v2/models/{name}/infer"}

    for operation in operations:

        @given(case=operation.as_strategy(), served=st.booleans())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case: schemathesis.Case, served: bool) -> None:
            # Half the cases name the served model, so bodies reach the parser instead of a 404.
            if served and case.path_parameters:
                case.path_parameters.update(
                    {"name": "tiny", "version": "v1"}
                    if "version" in case.path_parameters
                    else {"name": "tiny"}
                )
            case.call_and_validate(checks=CHECKS)

        fuzz()


_numbers = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.integers(-(2**70), 2**70),
    st.booleans(),
    st.text(max_size=3),
)


@st.composite
def near_valid_requests(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """Requests close to the model's contract, wrong in one or several ways, JSON or binary."""
    shape = draw(st.lists(st.integers(-1, 10), min_size=0, max_size=3))
    tensor: dict[str, object] = {
        "name": draw(st.sampled_from(["x", "x", "x", "y"])),
        "datatype": draw(st.sampled_from(["FP32", "FP32", "INT64", "FP16", "BYTES"])),
        "shape": shape,
    }
    if draw(st.booleans()):
        raw = draw(st.binary(max_size=200))
        size = draw(st.one_of(st.just(len(raw)), st.integers(-2, 300)))
        tensor["parameters"] = {"binary_data_size": size}
        head = json.dumps({"inputs": [tensor]}).encode()
        delta = draw(st.sampled_from([0, 0, 0, -1, 1, 500]))
        return head + raw, {"Inference-Header-Content-Length": str(len(head) + delta)}
    tensor["data"] = draw(st.lists(_numbers, max_size=40))
    doc = {"inputs": [tensor]}
    if draw(st.booleans()):
        doc["outputs"] = [
            {"name": draw(st.sampled_from(["logits", "z"])), "parameters": {"binary_data": True}}
        ]
    return json.dumps(doc).encode(), {}


def test_near_valid_tensors_get_200_or_a_named_4xx(fuzz_server: ServerProcess) -> None:
    with fuzz_server.client() as client:

        @given(request=near_valid_requests())
        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(request: tuple[bytes, dict[str, str]]) -> None:
            body, headers = request
            response = client.post("/v2/models/tiny/infer", content=body, headers=headers)
            assert response.status_code in (200, 400), response.text
            if response.status_code == 400:
                assert response.json()["error"]

        fuzz()


def test_server_is_healthy_and_counted_no_5xx_after_the_fuzz(fuzz_server: ServerProcess) -> None:
    with fuzz_server.client() as c:
        assert c.get("/v2/health/ready").status_code == 200
        text = c.get("/metrics").text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    fuzzed = sum(s.value for s in samples if s.name == "dualdeploy_requests_total")
    errors = sum(s.value for s in samples if s.name == "dualdeploy_server_errors_total")
    assert fuzzed > 100, "the fuzz sent fewer requests than expected"
    assert errors == 0
    parsed = sum(
        s.value
        for s in samples
        if s.name == "dualdeploy_requests_total"
        and s.labels["endpoint"] == "infer"
        and s.labels["status"] == "400"
    )
    assert parsed > 20, "too few generated bodies reached the request parser"
    assert "Traceback" not in fuzz_server.log()
