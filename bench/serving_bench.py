"""Serving benchmark: cold start, HTTP overhead at one client, throughput at 16, and a soak.

For each bundle (default: ``dist/demo/latest`` and ``dist/minilm/latest``, those that exist):

* **cold start**: spawn ``python -m serving`` and poll ``/v2/health/ready`` until 200 (median of 3);
* **1 client**: p50 latency of sequential requests vs raw in-process ``session.run`` at batch 1,
  on the variant the server chose, with the server's own session options;
* **16 clients**: requests per second vs raw in-process batch-1 throughput;
* **soak**: 16 clients for 60 s: errors, and the server's resident memory at 10 s and at the end.

The load generator is a separate process (``--loadgen``, asyncio on raw sockets, keep-alive)
and sends the binary tensor data extension, as standard clients do. Ratios are measured side
by side in one run on this machine. Prints a table; writes ``bench/results/serving.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import uvloop
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/serving_bench.py` from the repository root

from contract.bundle import load_tensors, read_manifest  # noqa: E402
from serving.loadgen import ServerProcess, encode_request, load  # noqa: E402
from serving.model import session_options  # noqa: E402

TARGETS = {
    "demo": {"cold_start_s": 0.8, "throughput_ratio": 1.0},
    "minilm": {"cold_start_s": 3.0, "throughput_ratio": 1.5},
}
DEFAULT_TARGET = {"cold_start_s": 3.0, "throughput_ratio": 1.0}
OVERHEAD_TARGET_MS = 1.0
RSS_GROWTH_TARGET = 0.10


# --------------------------------------------------------------------------- load generator (child process)


def loadgen_main(args: argparse.Namespace) -> int:
    """Child process: load the request bytes, run the clients, print one JSON line."""
    request = Path(args.request_file).read_bytes()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(
            load(
                args.host, args.port, request, clients=args.clients, seconds=args.seconds, warmup=args.warmup
            )
        )
    print(json.dumps(result))
    return 0


# --------------------------------------------------------------------------- orchestration (parent)


class Server(ServerProcess):
    """A ``python -m serving`` process for the benchmark (``serving.loadgen``), with what it reads back."""

    def rss_mb(self) -> float:
        """The server's resident set size, from /proc."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def info(self) -> dict[str, str]:
        """The labels of ``dualdeploy_model_info`` (variant, version, ...)."""
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        text = data.split(b"\r\n\r\n", 1)[1].decode()
        for family in text_string_to_metric_families(text):
            if family.name in ("dualdeploy_model", "dualdeploy_model_info"):
                return dict(family.samples[0].labels)
        raise RuntimeError("no dualdeploy_model_info")


def run_load(
    port: int, request_file: Path, clients: int, seconds: float, warmup: float = 1.0
) -> dict[str, Any]:
    """Run the load generator as a separate process and return its JSON result."""
    cmd = [
        sys.executable,
        __file__,
        "--loadgen",
        "--port",
        str(port),
        "--request-file",
        str(request_file),
        "--clients",
        str(clients),
        "--seconds",
        str(seconds),
        "--warmup",
        str(warmup),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=seconds + warmup + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode})")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def raw_baseline(
    bundle: Path, variant_file: str, inputs: dict[str, np.ndarray], seconds: float
) -> dict[str, Any]:
    """In-process ``session.run`` at batch 1 with the server's session options: p50 and throughput."""
    session = ort.InferenceSession(
        str(bundle / variant_file), session_options(0), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    for _ in range(50):
        session.run(names, inputs)
    times = []
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        session.run(names, inputs)
        times.append(time.perf_counter() - started)
    return {
        "p50_ms": statistics.median(times) * 1000,
        "throughput_rps": len(times) / sum(times),
        "runs": len(times),
    }


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each numeric figure over rounds; ``rounds`` keeps every round's figures."""
    merged: dict[str, Any] = {}
    for key, value in rounds[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            merged[key] = statistics.median(r[key] for r in rounds)
    merged["errors"] = sum(r.get("errors", 0) for r in rounds)
    merged["rounds"] = rounds
    return merged


def bench_bundle(
    bundle: Path,
    public_key: Path,
    *,
    soak_seconds: float,
    load_seconds: float,
    workdir: Path,
    rounds: int = 3,
) -> dict[str, Any]:
    """Every measurement for one bundle."""
    manifest = read_manifest(bundle)
    model = manifest.model
    target = TARGETS.get(model, DEFAULT_TARGET)
    golden = load_tensors(bundle / manifest.golden.inputs)
    inputs = {t.name: np.ascontiguousarray(golden[t.name][:1]) for t in manifest.inputs}

    cold = []
    for _ in range(5):
        server = Server(bundle, public_key)
        cold.append(server.cold_start_s)
        server.stop()

    server = Server(bundle, public_key)
    try:
        info = server.info()
        variant = manifest.variant(info["variant"])
        request_file = workdir / f"{model}.request"
        request_file.write_bytes(encode_request(inputs, model, "127.0.0.1", server.port))

        # Side by side, interleaved in rounds (the machine is shared, its load drifts): raw
        # in-process numbers, then the same variant over HTTP; each figure is the median of rounds.
        raws, ones, sixteens = [], [], []
        for _ in range(rounds):
            raws.append(raw_baseline(bundle, variant.file, inputs, load_seconds))
            ones.append(run_load(server.port, request_file, 1, load_seconds))
            sixteens.append(run_load(server.port, request_file, 16, load_seconds))
        raw, one, sixteen = _median_round(raws), _median_round(ones), _median_round(sixteens)

        # RSS at about 10 s into the soak (the load generator starts, warms up 1 s, then soaks).
        rss: dict[str, float] = {}
        timer = threading.Timer(11.0, lambda: rss.update(at_10s_mb=server.rss_mb()))
        timer.start()
        soak = run_load(server.port, request_file, 16, soak_seconds)
        timer.join()
        rss["at_end_mb"] = server.rss_mb()
    finally:
        exit_code = server.stop()

    growth = (rss["at_end_mb"] - rss["at_10s_mb"]) / rss["at_10s_mb"]
    overhead = one["p50_ms"] - raw["p50_ms"]
    ratio = sixteen["throughput_rps"] / raw["throughput_rps"]
    cold_median = statistics.median(cold)
    return {
        "model": model,
        "bundle_version": manifest.version,
        "variant": info["variant"],
        "request_bytes": request_file.stat().st_size,
        "cold_start_s": {
            "median": cold_median,
            "runs": cold,
            "target": target["cold_start_s"],
            "meets": cold_median <= target["cold_start_s"],
        },
        "raw_in_process": raw,
        "http_1_client": one,
        "overhead_p50_ms": {
            "value": overhead,
            "target": OVERHEAD_TARGET_MS,
            "meets": overhead <= OVERHEAD_TARGET_MS,
        },
        "http_16_clients": sixteen,
        "throughput_ratio_16_vs_raw_b1": {
            "value": ratio,
            "target": target["throughput_ratio"],
            "meets": ratio >= target["throughput_ratio"],
        },
        "soak": {
            **soak,
            "rss_at_10s_mb": rss["at_10s_mb"],
            "rss_at_end_mb": rss["at_end_mb"],
            "rss_growth": growth,
            "meets": soak["errors"] == 0 and growth < RSS_GROWTH_TARGET,
        },
        "server_exit_code_after_sigterm": exit_code,
    }


def table(results: list[dict[str, Any]]) -> str:
    """The printed summary."""
    rows = [
        (
            "model (variant)",
            "cold start s",
            "raw p50 ms",
            "http p50 ms",
            "overhead ms",
            "raw b1 rps",
            "16-client rps",
            "ratio",
            "soak req",
            "soak err",
            "RSS growth",
        )
    ]
    for r in results:
        rows.append(
            (
                f"{r['model']} ({r['variant']})",
                f"{r['cold_start_s']['median']:.3f} (≤{r['cold_start_s']['target']})",
                f"{r['raw_in_process']['p50_ms']:.3f}",
                f"{r['http_1_client']['p50_ms']:.3f}",
                f"{r['overhead_p50_ms']['value']:+.3f} (≤{OVERHEAD_TARGET_MS})",
                f"{r['raw_in_process']['throughput_rps']:.0f}",
                f"{r['http_16_clients']['throughput_rps']:.0f}",
                "{:.2f}× (≥{})".format(*(r["throughput_ratio_16_vs_raw_b1"][k] for k in ("value", "target"))),
                str(r["soak"]["requests"]),
                str(r["soak"]["errors"]),
                f"{r['soak']['rss_growth'] * 100:+.1f}% (<10%)",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with --loadgen, be the load generator)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--bundle",
        type=Path,
        action="append",
        help="bundle folder (repeatable); default dist/demo/latest and dist/minilm/latest",
    )
    p.add_argument(
        "--public-key",
        type=Path,
        default=REPO / ".keys" / "dev-ed25519.pub",
        help="the bundles' signer (default .keys/dev-ed25519.pub)",
    )
    p.add_argument("--soak-seconds", type=float, default=60.0, help="soak duration (default 60)")
    p.add_argument("--load-seconds", type=float, default=3.0, help="duration of each latency/throughput run")
    p.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds of raw / 1-client / 16-client runs"
    )
    p.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "serving.json", help="JSON results"
    )
    p.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--request-file", help=argparse.SUPPRESS)
    p.add_argument("--clients", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=5.0, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=float, default=1.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.loadgen:
        return loadgen_main(args)

    bundles = args.bundle or [REPO / "dist" / "demo" / "latest", REPO / "dist" / "minilm" / "latest"]
    missing = [str(b) for b in bundles if not (b / "manifest.json").is_file()]
    present = [b for b in bundles if (b / "manifest.json").is_file()]
    for m in missing:
        print(f"skipping {m}: no bundle there (build it with `make build SPEC=...`)")
    if not present:
        print("no bundle to benchmark: nothing measured, results left as they were")
        return 0
    load_before = os.getloadavg()
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "serving-bench"
    workdir.mkdir(parents=True, exist_ok=True)
    results = [
        bench_bundle(
            b.resolve(),
            args.public_key,
            soak_seconds=args.soak_seconds,
            load_seconds=args.load_seconds,
            workdir=workdir,
            rounds=args.rounds,
        )
        for b in present
    ]
    print(table(results))
    doc = {
        "benchmark": "serving",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            # The machine is shared: the 1-minute load average before and after the run.
            "loadavg_1m_before": load_before[0],
            "loadavg_1m_after": os.getloadavg()[0],
        },
        "soak_seconds": args.soak_seconds,
        "load_seconds": args.load_seconds,
        "rounds": args.rounds,
        "skipped": missing,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    # Imported here: the load generator (this same script with --loadgen) never draws.
    import charts  # noqa: PLC0415 - bench/charts.py, beside this script

    print(f"wrote {args.out} and {charts.draw('serving', args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
