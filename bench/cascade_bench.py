"""Cascade benchmark (issue 13, item 6): the edge student escalating to the cloud teacher, measured.

Real processes on 127.0.0.1: the teacher (``dist/demo/latest``, HTTPS and a token) and the student
(``dist/demo-distilled/latest``) started with ``--escalate-to``. The images are a held-out set drawn with
seeds that neither training, the evaluation gates nor the build's calibration (``cascade.seed``) used.

* **sweep**: the student's and the teacher's answers on every image (each from its own server), then, for
  every threshold, the share of images that escalate and the cascade's top-1 agreement with the teacher;
* **default threshold, live**: every image sent to the escalating student one request each; escalation
  rate and agreement from what came back, p50/p99 latency of local and of escalated requests;
* **teacher down**: the teacher killed; every low-confidence image plus as many others: errors (non-200
  answers), fallback rate of escalated requests, their latency against the deadline;
* **5 % packet loss**: the teacher in a network namespace this bench makes (as root), whose nftables drop
  5 % of the packets each way at random; skipped, with the reason in the JSON, where that can't be made.

Prints a table, writes ``bench/results/cascade.json`` and ``bench/results/cascade.png`` (agreement against
escalation rate). Usage: ``.venv/bin/python bench/cascade_bench.py [--images 1024]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import os
import platform
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import matplotlib
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

matplotlib.use("Agg")
import matplotlib.pyplot as plt

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from serving_support import ServerProcess, running_server, self_signed_cert  # noqa: E402

from contract.bundle import read_manifest  # noqa: E402
from contract.codec import decode_infer_response, encode_infer_request  # noqa: E402
from contract.manifest import confidence  # noqa: E402
from models.demo_net import sample_inputs  # noqa: E402

TEACHER = REPO / "dist" / "demo" / "latest"
STUDENT = REPO / "dist" / "demo-distilled" / "latest"
PUBLIC_KEY = REPO / ".keys" / "dev-ed25519.pub"
RESULTS = REPO / "bench" / "results"
SEED_BASE = 7_700_000  # far from the build's seeds (evaluation 2, calibration 1, cascade 3 * 1_000_003 + i)
DEADLINE_MS = 300.0
GOAL = {"cascade_agreement": 0.998, "escalation_rate": 0.10, "errors_with_teacher_down": 0}
NETNS = "ddcascade"
NETNS_ADDR = ("10.213.0.1", "10.213.0.2")  # (host side, namespace side)


def images(count: int) -> np.ndarray:
    """The held-out images, drawn in chunks of 64."""
    chunks = [
        sample_inputs(count=min(64, count - i), seed=SEED_BASE + i)["image"] for i in range(0, count, 64)
    ]
    return np.concatenate(chunks)


def infer(
    client: httpx.Client, model: str, batch: np.ndarray
) -> tuple[int, dict[str, Any], np.ndarray | None]:
    """One v2 request: status, JSON document, logits."""
    body, headers = encode_infer_request({"image": batch})
    response = client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
    if response.status_code != 200:
        return response.status_code, {}, None
    doc, arrays = decode_infer_response(
        response.content, response.headers.get("Inference-Header-Content-Length")
    )
    return 200, doc, arrays["logits"]


def answers(server: ServerProcess, model: str, data: np.ndarray, **client: Any) -> np.ndarray:
    """Every image's logits from one server, eight images a request."""
    out = []
    with server.client(**client) as http:
        for start in range(0, len(data), 8):
            status, _, logits = infer(http, model, data[start : start + 8])
            assert status == 200 and logits is not None, f"{model} answered {status}"
            out.append(logits)
    return np.concatenate(out)


def sweep_curve(student: np.ndarray, teacher: np.ndarray, measure: str) -> list[dict[str, float]]:
    """Escalation rate and cascade agreement for thresholds at every 0.5 % of escalation."""
    conf = confidence(student, measure)
    agree = student.argmax(1) == teacher.argmax(1)
    points = []
    for threshold in sorted({0.0, *np.quantile(conf, np.linspace(0, 0.3, 61)).tolist()}):
        escalated = conf < threshold
        points.append(
            {
                "threshold": float(threshold),
                "escalation_rate": float(escalated.mean()),
                "agreement": float((escalated | agree).mean()),
            }
        )
    return points


def live_run(edge: ServerProcess, data: np.ndarray, teacher: np.ndarray) -> dict[str, Any]:
    """Every image through the escalating student, one request each."""
    local_ms: list[float] = []
    escalated_ms: list[float] = []
    errors = fallbacks = escalated = agree = 0
    with edge.client() as http:
        for i in range(len(data)):
            started = time.perf_counter()
            status, doc, logits = infer(http, "demo-distilled", data[i : i + 1])
            elapsed = (time.perf_counter() - started) * 1000
            if status != 200 or logits is None:
                errors += 1
                continue
            params = doc.get("parameters", {})
            went = params.get("served_by") != "edge" or params.get("fallback") is True
            escalated += went
            fallbacks += params.get("fallback") is True
            (escalated_ms if went else local_ms).append(elapsed)
            agree += int(logits.argmax(1)[0] == teacher[i].argmax())
    n = len(data)

    def pct(values: list[float], q: float) -> float | None:
        return float(np.percentile(values, q)) if values else None

    return {
        "requests": n,
        "errors": errors,
        "escalation_rate": escalated / n,
        "fallbacks": fallbacks,
        "fallback_rate": fallbacks / escalated if escalated else 0.0,
        "agreement": agree / n,
        "local_ms": {"p50": pct(local_ms, 50), "p99": pct(local_ms, 99), "count": len(local_ms)},
        "escalated_ms": {
            "p50": pct(escalated_ms, 50),
            "p99": pct(escalated_ms, 99),
            "count": len(escalated_ms),
        },
    }


def fault_set(
    data: np.ndarray, student: np.ndarray, threshold: float, measure: str
) -> tuple[np.ndarray, np.ndarray]:
    """Every low-confidence image and as many confident ones (indices into ``data``)."""
    low = np.flatnonzero(confidence(student, measure) < threshold)
    high = np.setdiff1d(np.arange(len(data)), low)[: max(len(low), 16)]
    idx = np.sort(np.concatenate([low, high]))
    return data[idx], idx


def teacher_flags(pki: Path) -> list[str]:
    """The teacher's TLS and token flags (certificate, key and token in ``pki``)."""
    return [
        "--tls-cert",
        str(pki / "server.crt"),
        "--tls-key",
        str(pki / "server.key"),
        "--token-file",
        str(pki / "token"),
    ]


def edge_flags(url: str, pki: Path) -> list[str]:
    """The student's escalation flags towards ``url``."""
    return [
        "--escalate-to",
        url,
        "--escalate-token-file",
        str(pki / "token"),
        "--escalate-ca",
        str(pki / "server.crt"),
        "--escalate-deadline-ms",
        str(DEADLINE_MS),
    ]


@contextlib.contextmanager
def lossy_teacher(pki: Path, work: Path, loss: float) -> Iterator[str]:
    """The teacher inside a network namespace whose link drops ``loss`` of packets; yields its URL.

    Raises:
        RuntimeError: namespaces or netem are not available (not root, no ``ip``/``tc``).
    """
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft"):
        raise RuntimeError("needs root with ip (iproute2) and nft to make a lossy network namespace")
    host, inner = NETNS_ADDR

    def run(*cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True)

    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)
    proc = None
    try:
        run("ip", "netns", "add", NETNS)
        run("ip", "link", "add", f"{NETNS}0", "type", "veth", "peer", "name", f"{NETNS}1")
        run("ip", "link", "set", f"{NETNS}1", "netns", NETNS)
        run("ip", "addr", "add", f"{host}/30", "dev", f"{NETNS}0")
        run("ip", "link", "set", f"{NETNS}0", "up")
        run("ip", "netns", "exec", NETNS, "ip", "addr", "add", f"{inner}/30", "dev", f"{NETNS}1")
        run("ip", "netns", "exec", NETNS, "ip", "link", "set", f"{NETNS}1", "up")
        run("ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up")
        # Random loss in both directions, in the namespace only: nftables' numgen (netem needs a kernel
        # module that containers often lack). Each packet in or out of the namespace drops with p = loss.
        percent = round(loss * 100)
        rules = (
            "table inet ddloss {\n"
            + "".join(
                f"  chain {name} {{\n    type filter hook {hook} priority 0; policy accept;\n"
                f"    numgen random mod 100 < {percent} drop\n  }}\n"
                for name, hook in (("inbound", "input"), ("outbound", "output"))
            )
            + "}\n"
        )
        subprocess.run(
            ["ip", "netns", "exec", NETNS, "nft", "-f", "-"],
            input=rules.encode(),
            check=True,
            capture_output=True,
        )
        cert_dir = work / "netns-pki"
        cert_dir.mkdir(exist_ok=True)
        _cert_for(cert_dir, inner)
        (cert_dir / "token").write_text((pki / "token").read_text())
        log = (work / "teacher-netns.log").open("wb")
        cmd = [
            "ip", "netns", "exec", NETNS, sys.executable, "-m", "serving", "--bundle", str(TEACHER),
            "--public-key", str(PUBLIC_KEY), "--host", inner, "--port", "8443", *teacher_flags(cert_dir),
        ]  # fmt: skip
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)}
        )
        url = f"https://{inner}:8443"
        context = ssl.create_default_context(cafile=str(cert_dir / "server.crt"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v2/health/ready", verify=context, timeout=2).status_code == 200:
                    break
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the namespaced teacher exited: {(work / 'teacher-netns.log').read_text()}"
                )
            time.sleep(0.2)
        shutil.copyfile(cert_dir / "server.crt", pki / "netns.crt")
        yield url
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=20)
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", f"{NETNS}0"], capture_output=True, check=False)


def _cert_for(folder: Path, address: str) -> None:
    """A self-signed certificate (its own CA) for ``address``: the teacher's inside the namespace."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)])
    now = datetime.datetime.now(datetime.UTC)
    builder = x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
    builder = builder.serial_number(x509.random_serial_number()).not_valid_before(
        now - datetime.timedelta(minutes=5)
    )
    builder = builder.not_valid_after(now + datetime.timedelta(days=1))
    builder = builder.add_extension(
        x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]), False
    )
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    cert = builder.sign(key, hashes.SHA256())
    (folder / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def plot(result: dict[str, Any], path: Path) -> None:
    """Agreement with the teacher against escalation rate: the bench set's sweep and the build's."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bench = result["sweep"]
    ax.plot(
        [100 * p["escalation_rate"] for p in bench],
        [100 * p["agreement"] for p in bench],
        "-",
        label=f"held-out bench set ({result['images']} images)",
    )
    build = result["calibration"]["sweep"]
    ax.plot(
        [100 * p["escalation_rate"] for p in build],
        [100 * p["agreement"] for p in build],
        "o--",
        ms=3,
        label="build's calibration sweep (2048 images)",
    )
    ax.plot(
        [100 * result["escalation_rate"]],
        [100 * result["cascade_agreement"]],
        "r*",
        ms=12,
        label="default threshold, live servers",
    )
    ax.axhline(100 * GOAL["cascade_agreement"], color="grey", lw=0.8, ls=":", label="goal: 99.8 % agreement")
    ax.axvline(
        100 * GOAL["escalation_rate"], color="grey", lw=0.8, ls="-.", label="goal: at most 10 % escalated"
    )
    ax.set_xlim(0, 15)
    ax.set_ylim(min(98.8, 100 * result["student_agreement"] - 0.2), 100.05)
    ax.set_xlabel("escalated to the cloud teacher (% of requests)")
    ax.set_ylabel("top-1 agreement with the teacher (%)")
    ax.set_title("demo-distilled → demo cascade (softmax margin)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when it ran (goals met or not: the JSON says), 2 without bundles."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024, help="held-out images (default 1024)")
    parser.add_argument("--out", type=Path, default=RESULTS / "cascade.json", help="JSON result path")
    args = parser.parse_args(argv)
    for bundle in (TEACHER, STUDENT):
        if not (bundle / "manifest.json").is_file():
            print(f"{bundle} is not built: run make bundles", file=sys.stderr)
            return 2
    cascade = read_manifest(STUDENT).cascade
    assert cascade is not None, "the student bundle has no cascade section"
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"cascade-bench-{os.getpid()}"
    work.mkdir(parents=True)
    pki = work / "pki"
    pki.mkdir()
    self_signed_cert(pki)
    (pki / "token").write_text("bench-token\n")
    auth = {"headers": {"Authorization": "Bearer bench-token"}}
    verify = ssl.create_default_context(cafile=str(pki / "server.crt"))
    data = images(args.images)
    started = time.time()
    result: dict[str, Any] = {}
    with running_server(STUDENT, PUBLIC_KEY, work / "local") as plain:
        student = answers(plain, "demo-distilled", data)
    with running_server(
        TEACHER, PUBLIC_KEY, work / "teacher", teacher_flags(pki), scheme="https", verify=verify
    ) as teacher_proc:
        teacher = answers(teacher_proc, "demo", data, **auth)
        with running_server(
            STUDENT, PUBLIC_KEY, work / "edge", edge_flags(teacher_proc.base_url, pki)
        ) as edge:
            live = live_run(edge, data, teacher)
    faults_data, idx = fault_set(data, student, cascade.threshold, cascade.measure)
    with (
        running_server(
            TEACHER, PUBLIC_KEY, work / "doomed", teacher_flags(pki), scheme="https", verify=verify
        ) as doomed,
        running_server(STUDENT, PUBLIC_KEY, work / "edge-dead", edge_flags(doomed.base_url, pki)) as edge,
    ):
        doomed.proc.kill()
        doomed.proc.wait()
        dead = live_run(edge, faults_data, teacher[idx])
    try:
        with lossy_teacher(pki, work, 0.05) as url:
            flags = edge_flags(url, pki)
            flags[flags.index("--escalate-ca") + 1] = str(pki / "netns.crt")
            with running_server(STUDENT, PUBLIC_KEY, work / "edge-lossy", flags) as edge:
                lossy: dict[str, Any] = live_run(edge, faults_data, teacher[idx])
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        detail = (
            exc.stderr.decode(errors="replace")
            if isinstance(exc, subprocess.CalledProcessError)
            else str(exc)
        )
        lossy = {"skipped": f"no namespaced teacher: {detail.strip()[:300]}"}
    curve = sweep_curve(student, teacher, cascade.measure)
    student_agreement = float((student.argmax(1) == teacher.argmax(1)).mean())
    result = {
        "threshold": cascade.threshold,
        "escalation_rate": live["escalation_rate"],
        "cascade_agreement": live["agreement"],
        "student_agreement": student_agreement,
        "errors_with_teacher_down": dead["errors"],
        "measure": cascade.measure,
        "images": len(data),
        "deadline_ms": DEADLINE_MS,
        "goal": GOAL,
        "goal_met": {
            "cascade_agreement": live["agreement"] >= GOAL["cascade_agreement"],
            "escalation_rate": live["escalation_rate"] <= GOAL["escalation_rate"],
            "errors_with_teacher_down": dead["errors"] == GOAL["errors_with_teacher_down"],
        },
        "live": live,
        "teacher_down": dead,
        "packet_loss_5pct": lossy,
        "sweep": curve,
        "calibration": {
            "expected_escalation_rate": cascade.expected_escalation_rate,
            "expected_agreement": cascade.expected_agreement,
            "student_agreement": cascade.student_agreement,
            "samples": cascade.samples,
            "sweep": [p.model_dump() for p in cascade.sweep],
        },
        "teacher": cascade.teacher.model_dump(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg": os.getloadavg()},
        "seconds": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(table(result))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def table(r: dict[str, Any]) -> str:
    """The printed summary."""

    def ms(block: dict[str, Any], key: str) -> str:
        v = block.get(key, {})
        nan = float("nan")
        return f"{v.get('p50') or nan:.1f} / {v.get('p99') or nan:.1f} ms (n={v.get('count', 0)})"

    lines = [
        f"cascade bench: {r['images']} held-out images, {r['measure']} < {r['threshold']:.4f}, "
        f"deadline {r['deadline_ms']:.0f} ms",
        f"{'':<34} {'measured':>22} {'goal':>10}",
        f"{'escalation rate':<34} {r['escalation_rate']:>21.2%} {'<= 10 %':>10}",
        f"{'agreement with teacher, cascade':<34} {r['cascade_agreement']:>21.2%} {'>= 99.8 %':>10}",
        f"{'agreement with teacher, student':<34} {r['student_agreement']:>21.2%}",
        f"{'local requests p50 / p99':<34} {ms(r['live'], 'local_ms'):>22}",
        f"{'escalated requests p50 / p99':<34} {ms(r['live'], 'escalated_ms'):>22}",
        f"{'teacher down: errors':<34} {r['teacher_down']['errors']:>22} {'0':>10}",
        f"{'teacher down: fallback rate':<34} {r['teacher_down']['fallback_rate']:>21.0%}",
        f"{'teacher down: escalated p50 / p99':<34} {ms(r['teacher_down'], 'escalated_ms'):>22}",
    ]
    lossy = r["packet_loss_5pct"]
    if "skipped" in lossy:
        lines.append(f"{'5 % packet loss':<34} skipped: {lossy['skipped']}")
    else:
        lines += [
            f"{'5 % loss: errors':<34} {lossy['errors']:>22}",
            f"{'5 % loss: fallback rate':<34} {lossy['fallback_rate']:>21.0%}",
            f"{'5 % loss: escalated p50 / p99':<34} {ms(lossy, 'escalated_ms'):>22}",
        ]
    lines.append(
        "sweep (bench set): "
        + ", ".join(f"{100 * p['escalation_rate']:.1f}%→{100 * p['agreement']:.2f}%" for p in r["sweep"][::6])
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
