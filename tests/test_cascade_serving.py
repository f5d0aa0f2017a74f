"""The edge-cloud cascade with real processes: a teacher server (the demo bundle, HTTPS and a token) and
an escalating student server (the demo-distilled bundle), both ``python -m serving`` on 127.0.0.1.

The bundles come from ``make bundles`` (dist/demo/latest, dist/demo-distilled/latest); the student's
manifest names the teacher's version, so the two must come from the same build. Faults are real: the
teacher process killed or stopped (SIGSTOP), a wrong token, a certificate from another CA, a teacher
serving another version, and an HTTPS process answering 500.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serving_support import (
    REPO,
    ServerProcess,
    fault_server,
    free_port,
    metric_value,
    resign_bundle,
    run_refused,
    running_server,
    self_signed_cert,
)

from contract.bundle import read_manifest
from contract.codec import decode_infer_response, encode_infer_request
from models.demo_net import sample_inputs

TEACHER = REPO / "dist" / "demo" / "latest"
STUDENT = REPO / "dist" / "demo-distilled" / "latest"
PUBLIC_KEY = REPO / ".keys" / "dev-ed25519.pub"
DEV_KEY = REPO / ".keys" / "dev-ed25519.pem"
DEADLINE_S = 0.4
MARGIN_S = 0.6  # this 2-core machine is shared: the local model and HTTP take tens of ms, sometimes more
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The teacher's certificate (its own CA), another CA's certificate, the token and a wrong one."""
    root = tmp_path_factory.mktemp("pki")
    (root / "teacher").mkdir()
    (root / "other").mkdir()
    self_signed_cert(root / "teacher")
    self_signed_cert(root / "other")
    (root / "token").write_text("teacher-token-1\n")
    (root / "wrong-token").write_text("not-the-token\n")
    return {
        "cert": root / "teacher" / "server.crt",
        "key": root / "teacher" / "server.key",
        "other_cert": root / "other" / "server.crt",
        "other_key": root / "other" / "server.key",
        "token": root / "token",
        "wrong_token": root / "wrong-token",
    }


def _margin(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 softmax probability, computed here independently of the server's code."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    top = np.sort(p, axis=1)
    return np.asarray(top[:, -1] - top[:, -2])


@pytest.fixture(scope="module")
def batch() -> dict[str, Any]:
    """Eight images: four the student is unsure of (margin under the threshold), four it is sure of."""
    import onnxruntime as ort

    assert (STUDENT / "manifest.json").is_file(), f"{STUDENT} is not built: run make bundles"
    manifest = read_manifest(STUDENT)
    assert manifest.cascade is not None
    session = ort.InferenceSession(str(STUDENT / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    low: list[np.ndarray] = []
    high: list[np.ndarray] = []
    for seed in range(100, 140):  # bounded: ~1.7 % of inputs are under the threshold
        images = sample_inputs(count=64, seed=seed)["image"]
        margins = _margin(session.run(None, {"image": images})[0])
        low += [images[i] for i in np.flatnonzero(margins < manifest.cascade.threshold - 1e-3)]
        high += [images[i] for i in np.flatnonzero(margins > manifest.cascade.threshold + 1e-3)][:4]
        if len(low) >= 4:
            break
    assert len(low) >= 4, "fewer than 4 low-confidence images in 2,560 draws"
    order = [0, 4, 1, 5, 2, 6, 3, 7]  # low rows at 0, 2, 4, 6
    rows = [low[0], low[1], low[2], low[3], high[0], high[1], high[2], high[3]]
    images = np.stack([rows[i] for i in order])
    return {"images": images, "low": [0, 2, 4, 6], "threshold": manifest.cascade.threshold}


def _infer(
    server: ServerProcess, model: str, images: np.ndarray, **kwargs: Any
) -> tuple[dict[str, Any], np.ndarray, float]:
    body, headers = encode_infer_request({"image": images})
    with server.client(**kwargs) as client:
        started = time.perf_counter()
        response = client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
        elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    doc, arrays = decode_infer_response(
        response.content, response.headers.get("Inference-Header-Content-Length")
    )
    return doc, arrays["logits"], elapsed


def _metrics(server: ServerProcess, **kwargs: Any) -> str:
    with server.client(**kwargs) as client:
        return client.get("/metrics").text


@pytest.fixture(scope="module")
def teacher(pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The cloud teacher: the demo bundle over HTTPS with a bearer token."""
    assert (TEACHER / "manifest.json").is_file(), f"{TEACHER} is not built: run make bundles"
    with running_server(
        TEACHER,
        PUBLIC_KEY,
        tmp_path_factory.mktemp("teacher"),
        ["--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]), "--token-file", str(pki["token"])],
        scheme="https",
        verify=_ssl(pki["cert"]),
    ) as proc:
        yield proc


def _ssl(cert: Path) -> Any:
    import ssl

    return ssl.create_default_context(cafile=str(cert))


def _auth(pki: dict[str, Path]) -> dict[str, Any]:
    return {"headers": {"Authorization": f"Bearer {pki['token'].read_text().strip()}"}}


def _escalating(
    url: str, pki: dict[str, Path], token: str = "token", ca: str = "cert", **extra: str
) -> list[str]:
    flags = ["--escalate-to", url, "--escalate-token-file", str(pki[token]), "--escalate-ca", str(pki[ca])]
    flags += ["--escalate-deadline-ms", str(DEADLINE_S * 1000)]
    for name, value in {"circuit-failures": "100", **extra}.items():
        flags += [f"--{name}", value]
    return flags


@pytest.fixture(scope="module")
def local(batch: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """The student's own answer to the batch, from a student server that does not escalate."""
    with running_server(STUDENT, PUBLIC_KEY, tmp_path_factory.mktemp("local")) as proc:
        doc, logits, _ = _infer(proc, "demo-distilled", batch["images"])
    assert "parameters" not in doc  # escalation off: the response is exactly as before
    return logits


def test_escalates_exactly_the_rows_under_the_threshold_in_one_request(
    teacher: ServerProcess, pki: dict[str, Path], batch: dict[str, Any], local: np.ndarray, tmp_path: Path
) -> None:
    images = batch["images"]
    assert list(np.flatnonzero(_margin(local) < batch["threshold"])) == batch["low"]
    _, teacher_logits, _ = _infer(teacher, "demo", images, **_auth(pki))
    before = _metrics(teacher, **_auth(pki))
    with running_server(STUDENT, PUBLIC_KEY, tmp_path, _escalating(teacher.base_url, pki)) as edge:
        doc, logits, _ = _infer(edge, "demo-distilled", images)
        sure_doc, sure_logits, _ = _infer(edge, "demo-distilled", images[[1, 3, 5, 7]])
        edge_metrics = _metrics(edge)
    after = _metrics(teacher, **_auth(pki))
    assert doc["parameters"] == {"served_by": "edge+cloud", "fallback": False, "escalated_rows": "0,2,4,6"}
    np.testing.assert_allclose(logits[batch["low"]], teacher_logits[batch["low"]], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(logits[[1, 3, 5, 7]], local[[1, 3, 5, 7]])
    assert sure_doc["parameters"] == {"served_by": "edge", "fallback": False, "escalated_rows": ""}
    np.testing.assert_array_equal(sure_logits, local[[1, 3, 5, 7]])
    # The four rows went to the teacher in one request of four rows; the confident batch sent nothing.
    infer_ok = 'endpoint="infer",model="demo",status="200"'
    assert metric_value(after, "dualdeploy_requests_total", infer_ok) - metric_value(
        before, "dualdeploy_requests_total", infer_ok
    ) == pytest.approx(1)
    assert metric_value(after, "dualdeploy_batch_size_sum") - metric_value(
        before, "dualdeploy_batch_size_sum"
    ) == pytest.approx(4)
    assert metric_value(edge_metrics, "dualdeploy_escalations_total") == 4
    assert metric_value(edge_metrics, "dualdeploy_escalation_cloud_rows_total") == 4
    assert metric_value(edge_metrics, "dualdeploy_escalation_circuit_state") == 0
    assert metric_value(edge_metrics, "dualdeploy_escalation_cloud_seconds_count") == 1


def _expect_fallbacks(
    edge: ServerProcess, images: np.ndarray, local: np.ndarray, reason: str, count: int = 3
) -> None:
    """``count`` requests all answered 200 with the local answer, marked fallback, within the deadline."""
    for _ in range(count):
        doc, logits, elapsed = _infer(edge, "demo-distilled", images)
        assert doc["parameters"] == {"served_by": "edge", "fallback": True, "escalated_rows": ""}
        np.testing.assert_array_equal(logits, local)
        assert elapsed < DEADLINE_S + MARGIN_S, f"{elapsed:.3f} s"
    text = _metrics(edge)
    assert metric_value(text, "dualdeploy_escalation_fallbacks_total", f'reason="{reason}"') == count
    assert metric_value(text, "dualdeploy_server_errors_total", 'endpoint="infer"') == 0


def _teacher_process(pki: dict[str, Path], log_dir: Path, bundle: Path = TEACHER) -> Any:
    return running_server(
        bundle,
        PUBLIC_KEY,
        log_dir,
        ["--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]), "--token-file", str(pki["token"])],
        scheme="https",
        verify=_ssl(pki["cert"]),
    )


def test_a_killed_teacher_gives_the_local_answer(
    pki: dict[str, Path], batch: dict[str, Any], local: np.ndarray, tmp_path: Path
) -> None:
    with _teacher_process(pki, tmp_path / "teacher") as doomed:
        url = doomed.base_url
        with running_server(STUDENT, PUBLIC_KEY, tmp_path / "edge", _escalating(url, pki)) as edge:
            doomed.proc.kill()
            doomed.proc.wait()
            _expect_fallbacks(edge, batch["images"], local, "unreachable")


def test_a_teacher_hanging_past_the_deadline_gives_the_local_answer_in_time(
    pki: dict[str, Path], batch: dict[str, Any], local: np.ndarray, tmp_path: Path
) -> None:
    with _teacher_process(pki, tmp_path / "teacher") as hung:
        flags = _escalating(hung.base_url, pki)
        with running_server(STUDENT, PUBLIC_KEY, tmp_path / "edge", flags) as edge:
            os.kill(hung.proc.pid, signal.SIGSTOP)  # accepts TCP (the kernel does), never answers
            try:
                _expect_fallbacks(edge, batch["images"], local, "deadline")
            finally:
                os.kill(hung.proc.pid, signal.SIGCONT)


@pytest.mark.parametrize(
    ("case", "reason"),
    [("wrong_token", "http_error"), ("untrusted_cert", "tls"), ("answers_500", "http_error")],
)
def test_a_refusing_or_untrusted_teacher_gives_the_local_answer(  # noqa: PLR0917 - pytest fixtures
    case: str,
    reason: str,
    teacher: ServerProcess,
    pki: dict[str, Path],
    batch: dict[str, Any],
    local: np.ndarray,
    tmp_path: Path,
) -> None:
    if case == "answers_500":
        with (
            fault_server(500, pki["cert"], pki["key"]) as url,
            running_server(STUDENT, PUBLIC_KEY, tmp_path, _escalating(url, pki)) as edge,
        ):
            _expect_fallbacks(edge, batch["images"], local, reason)
        return
    flags = (
        _escalating(teacher.base_url, pki, token="wrong_token")
        if case == "wrong_token"
        else _escalating(teacher.base_url, pki, ca="other_cert")
    )
    with running_server(STUDENT, PUBLIC_KEY, tmp_path, flags) as edge:
        _expect_fallbacks(edge, batch["images"], local, reason)


def test_a_teacher_serving_another_version_gives_the_local_answer(
    pki: dict[str, Path], batch: dict[str, Any], local: np.ndarray, tmp_path: Path
) -> None:
    other = resign_bundle(TEACHER, tmp_path / "demo-other", DEV_KEY, version="0000other000")
    with _teacher_process(pki, tmp_path / "teacher", other) as wrong:
        assert json.loads(wrong.client(**_auth(pki)).get("/v2/models/demo").text)["versions"] == [
            "0000other000"
        ]
        with running_server(STUDENT, PUBLIC_KEY, tmp_path / "edge", _escalating(wrong.base_url, pki)) as edge:
            _expect_fallbacks(edge, batch["images"], local, "wrong_model")


def test_the_circuit_opens_after_repeated_failures_and_recovers(
    pki: dict[str, Path], batch: dict[str, Any], local: np.ndarray, tmp_path: Path
) -> None:
    with _teacher_process(pki, tmp_path / "teacher") as flaky:
        flags = _escalating(flaky.base_url, pki, **{"circuit-failures": "2", "circuit-open-s": "2"})
        with running_server(STUDENT, PUBLIC_KEY, tmp_path / "edge", flags) as edge:
            os.kill(flaky.proc.pid, signal.SIGSTOP)
            try:
                for _ in range(2):
                    doc, _, _ = _infer(edge, "demo-distilled", batch["images"])
                    assert doc["parameters"]["fallback"] is True
                assert metric_value(_metrics(edge), "dualdeploy_escalation_circuit_state") == 2
                # Open: the local answer at once, without waiting for the deadline.
                doc, logits, elapsed = _infer(edge, "demo-distilled", batch["images"])
                assert doc["parameters"]["fallback"] is True and elapsed < DEADLINE_S
                np.testing.assert_array_equal(logits, local)
                text = _metrics(edge)
                assert (
                    metric_value(text, "dualdeploy_escalation_fallbacks_total", 'reason="circuit_open"') == 1
                )
                assert metric_value(text, "dualdeploy_escalation_cloud_seconds_count") == 2
            finally:
                os.kill(flaky.proc.pid, signal.SIGCONT)
            time.sleep(2.2)  # past --circuit-open-s: the next escalation is the half-open trial
            doc, _, _ = _infer(edge, "demo-distilled", batch["images"])
            assert doc["parameters"] == {
                "served_by": "edge+cloud",
                "fallback": False,
                "escalated_rows": "0,2,4,6",
            }
            assert metric_value(_metrics(edge), "dualdeploy_escalation_circuit_state") == 0


def test_with_escalation_off_no_connection_reaches_the_teacher(
    teacher: ServerProcess, pki: dict[str, Path], batch: dict[str, Any], local: np.ndarray, tmp_path: Path
) -> None:
    before = metric_value(_metrics(teacher, **_auth(pki)), "dualdeploy_connections_total")
    with running_server(STUDENT, PUBLIC_KEY, tmp_path) as edge:
        for _ in range(3):
            doc, logits, _ = _infer(edge, "demo-distilled", batch["images"])
            assert "parameters" not in doc
            np.testing.assert_array_equal(logits, local)
        assert metric_value(_metrics(edge), "dualdeploy_escalations_total") == 0
    after = metric_value(_metrics(teacher, **_auth(pki)), "dualdeploy_connections_total")
    assert after - before == 1  # the second scrape's own connection, nothing else


@pytest.mark.parametrize(
    ("bundle", "flags", "message"),
    [
        (TEACHER, "cascade", "has no cascade section"),
        (STUDENT, "http", "must be an https:// URL"),
        (STUDENT, "no-ca", "--escalate-to needs --escalate-ca"),
    ],
)
def test_the_server_refuses_escalation_it_cannot_do(
    bundle: Path, flags: str, message: str, pki: dict[str, Path]
) -> None:
    url = f"https://127.0.0.1:{free_port()}"
    extra = _escalating(url, pki)
    if flags == "http":
        extra[1] = url.replace("https", "http")
    if flags == "no-ca":
        extra = extra[:4]
    code, output = run_refused(bundle, PUBLIC_KEY, extra)
    assert code == 2 and message in output, output
