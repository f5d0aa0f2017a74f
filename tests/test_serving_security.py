"""Edge security options: TLS with a certificate and key, and a bearer token read from a file."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serving_support import Bundle, ServerProcess, make_bundle, run_refused, running_server, self_signed_cert

TOKEN = "s3cret-token-for-tests"
METRICS_TOKEN = "prometheus-only-token-for-tests"
INFER = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    self_signed_cert(folder)
    return folder / "server.crt", folder / "server.key"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Bundle, ServerProcess]]:
    folder = tmp_path_factory.mktemp("secure")
    built = make_bundle(folder / "bundles")
    cert, key = self_signed(folder)
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    metrics_token_file = folder / "metrics-token"
    metrics_token_file.write_text(METRICS_TOKEN + "\n")
    context = ssl.create_default_context(cafile=str(cert))
    extra = ["--tls-cert", str(cert), "--tls-key", str(key), "--token-file", str(token_file)]
    extra += ["--metrics-token-file", str(metrics_token_file)]
    with running_server(
        built.path, built.public_key, folder / "logs", extra, scheme="https", verify=context
    ) as proc:
        yield built, proc


def test_health_stays_open_over_tls(secured: tuple[Bundle, ServerProcess]) -> None:
    _, proc = secured
    with proc.client() as c:
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2/health/ready").json() == {"ready": True}


def test_plain_http_is_not_served_on_a_tls_port(secured: tuple[Bundle, ServerProcess]) -> None:
    _, proc = secured
    with pytest.raises(httpx.TransportError):
        httpx.get(proc.base_url.replace("https://", "http://") + "/v2/health/live", timeout=3)


def test_untrusted_certificate_is_rejected_by_a_verifying_client(
    secured: tuple[Bundle, ServerProcess],
) -> None:
    _, proc = secured
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(proc.base_url + "/v2/health/live", verify=ssl.create_default_context(), timeout=3)


@pytest.mark.parametrize(
    "path", ["/v2", "/v2/models/tiny", "/v2/models/tiny/ready", "/metrics", "/openapi.json"]
)
def test_everything_but_health_needs_the_token(secured: tuple[Bundle, ServerProcess], path: str) -> None:
    _, proc = secured
    with proc.client() as c:
        missing = c.get(path)
        wrong = c.get(path, headers={"Authorization": "Bearer nope"})
        right = c.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert missing.status_code == 401 and "missing bearer token" in missing.json()["error"]
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert wrong.status_code == 401 and "wrong bearer token" in wrong.json()["error"]
    assert right.status_code == 200


def test_inference_with_and_without_the_token(secured: tuple[Bundle, ServerProcess]) -> None:
    _, proc = secured
    with proc.client() as c:
        assert c.post("/v2/models/tiny/infer", json=INFER).status_code == 401
        ok = c.post("/v2/models/tiny/infer", json=INFER, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["outputs"][0]["shape"] == [1, 3]
    assert TOKEN not in proc.log()


def test_the_metrics_token_reads_metrics_and_nothing_else(secured: tuple[Bundle, ServerProcess]) -> None:
    """Prometheus's token (issue 18): /metrics yes; inference, metadata and the API document no."""
    _, proc = secured
    prometheus = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    with proc.client() as c:
        scraped = c.get("/metrics", headers=prometheus)
        infer = c.post("/v2/models/tiny/infer", json=INFER, headers=prometheus)
        refused = {path: c.get(path, headers=prometheus).status_code for path in ("/v2", "/v2/models/tiny")}
    assert scraped.status_code == 200 and "dualdeploy_model_info" in scraped.text
    assert infer.status_code == 401 and "wrong bearer token" in infer.json()["error"]
    assert refused == {"/v2": 401, "/v2/models/tiny": 401}
    assert METRICS_TOKEN not in proc.log()


def test_a_metrics_token_equal_to_the_inference_token_is_refused(tmp_path: Path) -> None:
    built = make_bundle(tmp_path)
    (tmp_path / "token").write_text("same-token-twice\n")
    extra = ["--token-file", str(tmp_path / "token"), "--metrics-token-file", str(tmp_path / "token")]
    code, output = run_refused(built.path, built.public_key, extra)
    assert code == 2 and "--metrics-token-file holds the inference token" in output


def test_empty_token_file_is_refused(tmp_path: Path) -> None:
    built = make_bundle(tmp_path)
    (tmp_path / "token").write_text("\n")
    code, output = run_refused(built.path, built.public_key, ["--token-file", str(tmp_path / "token")])
    assert code == 2 and "the file is empty" in output


def test_tls_cert_without_key_is_refused(tmp_path: Path) -> None:
    built = make_bundle(tmp_path)
    cert, _ = self_signed(tmp_path)
    code, output = run_refused(built.path, built.public_key, ["--tls-cert", str(cert)])
    assert code == 2 and "--tls-cert and --tls-key go together" in output


def test_openapi_declares_the_bearer_scheme_except_on_health(secured: tuple[Bundle, ServerProcess]) -> None:
    _, proc = secured
    with proc.client() as c:
        doc = c.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert doc["security"] == [{"bearer": []}]
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert doc["paths"]["/v2/health/ready"]["get"]["security"] == []
