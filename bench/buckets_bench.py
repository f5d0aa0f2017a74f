"""Length bucketing benchmark (issue 14, item 4): MiniLM with mixed sentence lengths.

Real sentences of ``models/minilm_sentences.txt`` and joins of up to eight of them give requests of
distinct token lengths (about 10 to 100). Each is one pre-encoded v2 binary request of batch one. ``wrk``
(Debian, one thread, pinned to core 1) replays them in turn, so concurrent requests have different
lengths; the server runs pinned to core 0 with one ONNX Runtime thread, as in ``bench/peers_bench.py``.

Rows, measured in the same run, in rounds (each configuration once a round, the median kept):

* ``raw batch 1``: in-process ``session.run`` of the served variant on core 0, the same requests one at a
  time (what a server without batching could reach at best);
* ``dualdeploy, no batching``: the server with ``--max-batch-size 1``, 16 connections;
* ``dualdeploy, buckets``: the server as the bundle asks (``serving.buckets``: lengths that share a
  bucket batch together, padded), 1 and 16 connections.

Goal (issue 14): buckets at 16 connections ≥ 1.3 × raw batch 1. Before timing, every request's answer is
checked against raw ONNX Runtime on the same input. The run also measures what batching can gain at all:
raw ``session.run`` rows/s at equal lengths (16, 48, 96 tokens) and batch sizes 1, 4, 16, no padding.
Writes ``bench/results/buckets.json`` and its chart.

    .venv/bin/python bench/buckets_bench.py [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/buckets_bench.py` from the repository root

import peers_bench  # noqa: E402 - bench/peers_bench.py, beside this script: wrk and the core pinning

from contract.bundle import read_manifest  # noqa: E402
from contract.codec import decode_infer_response, encode_infer_request  # noqa: E402

BUNDLE = REPO / "dist" / "minilm" / "latest"
RESULT = REPO / "bench" / "results" / "buckets.json"
GOAL = 1.3


def texts() -> list[str]:
    """Sentences and joins of up to eight, one per distinct token length."""
    from models.minilm import sentences, tokenize  # noqa: PLC0415 - loads the tokenizer

    base, chosen, seen = sentences(), [], set()
    for count in range(1, 9):
        for start in range(0, 48, 3):
            text = " ".join(base[start : start + count])
            length = int(tokenize([text])["attention_mask"].sum())
            if length not in seen:
                seen.add(length)
                chosen.append(text)
    return chosen


def _one_thread_session(onnx: str) -> Any:
    """An ONNX Runtime CPU session on one intra-op and one inter-op thread (the server's ``--threads 1``)."""
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])


def raw_main(onnx: str, inputs_file: str, seconds: float) -> None:
    """(child, pinned to the server core) requests/s of batch-1 ``session.run`` over the requests in turn."""
    session = _one_thread_session(onnx)
    with np.load(inputs_file) as data:
        count = len([k for k in data.files if k.startswith("input_ids.")])
        feeds = [{n: data[f"{n}.{i}"] for n in ("input_ids", "attention_mask")} for i in range(count)]
    for feed in feeds:
        session.run(None, feed)
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, feeds[runs % count])
        runs += 1
    print(json.dumps({"rps": runs / (time.perf_counter() - started)}))


SCALING_LENGTHS = (16, 48, 96)
SCALING_BATCHES = (1, 4, 16)


def scaling_main(onnx: str, seconds: float) -> None:
    """(child, pinned to the server core) rows/s of ``session.run`` at equal lengths, by batch size: what
    batching can gain at all for this model on this core, before any padding."""
    session = _one_thread_session(onnx)
    rng = np.random.default_rng(0)
    figures: dict[str, dict[str, float]] = {}
    for length in SCALING_LENGTHS:
        figures[str(length)] = {}
        for batch in SCALING_BATCHES:
            ids = rng.integers(1000, 2000, size=(batch, length), dtype=np.int64)
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            for _ in range(3):
                session.run(None, feed)
            runs, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                session.run(None, feed)
                runs += 1
            figures[str(length)][str(batch)] = round(runs * batch / (time.perf_counter() - started), 1)
    print(json.dumps(figures))


def _lua(bodies: list[tuple[bytes, dict[str, str]]], work: Path) -> Path:
    """A wrk script that sends the bodies in turn, each with its own headers."""
    lines = ["local bodies, headers = {}, {}"]
    for index, (body, heads) in enumerate(bodies, start=1):
        path = work / f"body-{index}.bin"
        path.write_bytes(body)
        lines.append(
            f'do local f = assert(io.open("{path}", "rb")); bodies[{index}] = f:read("*a"); f:close() end'
        )
        pairs = ", ".join(f'["{k}"] = "{v}"' for k, v in heads.items())
        lines.append(f"headers[{index}] = {{{pairs}}}")
    lines += [
        "local n = 0",
        "request = function()",
        f"  n = n % {len(bodies)} + 1",
        '  return wrk.format("POST", nil, headers[n], bodies[n])',
        "end",
    ]
    script = work / "mixed.lua"
    script.write_text("\n".join(lines) + "\n")
    return script


def _wrk(binary: str, url: str, script: Path, conns: int, seconds: float) -> dict[str, Any]:
    cmd = ["taskset", "-c", peers_bench.CLIENT_CORE, binary, "-t1", f"-c{conns}", f"-d{int(seconds)}s"]
    cmd += ["--timeout", "10s", "--latency", "-s", str(script), url]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if result.returncode != 0:
        raise peers_bench.BenchError(f"wrk failed on {url}: {(result.stdout + result.stderr)[-500:]}")
    return peers_bench.parse_wrk(result.stdout)


def _server(port: int, extra: list[str], log: Path) -> subprocess.Popen[bytes]:
    cmd = ["taskset", "-c", peers_bench.SERVER_CORE, sys.executable, "-m", "serving", "--bundle", str(BUNDLE)]
    cmd += ["--port", str(port), "--threads", "1", "--log-level", "warning", *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALDEPLOY_")}
    env["PYTHONPATH"] = str(REPO)
    with log.open("wb") as sink:
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def _ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> str:
    """Wait until the server is ready; return the variant it serves."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise peers_bench.BenchError(f"server exited: {log.read_text()[-2000:]}")
        try:
            with peers_bench._http("GET", f"{url}/v2/models/minilm") as response:
                return str(json.loads(response.read())["parameters"]["variant"])
        except OSError:
            time.sleep(0.2)
    raise peers_bench.BenchError(f"server not ready: {log.read_text()[-2000:]}")


def _check(url: str, bodies: list[tuple[bytes, dict[str, str]]], reference: list[np.ndarray]) -> float:
    """The largest difference between the server's answers and raw ONNX Runtime (one request each)."""
    worst = 0.0
    for (body, headers), want in zip(bodies, reference, strict=True):
        with peers_bench._http("POST", f"{url}/v2/models/minilm/infer", body, headers) as response:
            content = response.read()
            length = response.headers.get("Inference-Header-Content-Length")
        _, arrays = decode_infer_response(content, length)
        worst = max(worst, float(np.max(np.abs(arrays["embedding"] - want))))
    return worst


def run(seconds: float, rounds: int) -> dict[str, Any]:
    """Measure every configuration in ``rounds`` rotating rounds; return the result document."""
    import onnxruntime as ort  # noqa: PLC0415

    from models.minilm import tokenize  # noqa: PLC0415

    manifest = read_manifest(BUNDLE)
    assert manifest.serving.buckets is not None, "dist/minilm predates serving.buckets: run make bundles"
    wrk_bin = peers_bench.ensure_wrk()
    chosen = texts()
    feeds = [tokenize([t]) for t in chosen]
    lengths = [int(f["attention_mask"].sum()) for f in feeds]
    bodies = [encode_infer_request(f) for f in feeds]
    with tempfile.TemporaryDirectory(prefix="buckets-bench-") as tmp:
        work = Path(tmp)
        script = _lua(bodies, work)
        configs = {"buckets": [], "no batching": ["--max-batch-size", "1"]}
        procs, urls, variant = {}, {}, ""
        try:
            for name, extra in configs.items():
                port = peers_bench._free_port()
                procs[name] = _server(port, extra, work / f"{name}.log")
                urls[name] = f"http://127.0.0.1:{port}"
            for name, url in urls.items():
                variant = _ready(url, procs[name], work / f"{name}.log")
            onnx = BUNDLE / manifest.variant(variant).file
            session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
            reference = [session.run(None, f)[0] for f in feeds]
            checked = {name: _check(url, bodies, reference) for name, url in urls.items()}
            inputs_file = work / "inputs.npz"
            arrays: dict[str, Any] = {f"{n}.{i}": f[n] for i, f in enumerate(feeds) for n in f}
            np.savez(inputs_file, **arrays)
            cells: dict[str, list[float]] = {
                "raw batch 1": [],
                "buckets, 1 conn": [],
                "buckets, 16 conns": [],
            }
            cells["no batching, 16 conns"] = []
            for index in range(rounds):
                print(f"round {index + 1}/{rounds}", file=sys.stderr)
                raw = subprocess.run(
                    ["taskset", "-c", peers_bench.SERVER_CORE, sys.executable, __file__, "--raw", str(onnx),
                     str(inputs_file), "--seconds", str(seconds)],
                    capture_output=True, text=True, timeout=seconds * 10 + 60, check=True,
                )  # fmt: skip
                cells["raw batch 1"].append(json.loads(raw.stdout.strip().splitlines()[-1])["rps"])
                for label, name, conns in (
                    ("buckets, 1 conn", "buckets", 1),
                    ("buckets, 16 conns", "buckets", 16),
                    ("no batching, 16 conns", "no batching", 16),
                ):
                    figures = _wrk(wrk_bin, f"{urls[name]}/v2/models/minilm/infer", script, conns, seconds)
                    if figures["non_2xx"] or figures["socket_errors"]:
                        raise peers_bench.BenchError(f"{label}: {figures}")
                    cells[label].append(figures["rps"])
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=30)
            scaling = subprocess.run(
                ["taskset", "-c", peers_bench.SERVER_CORE, sys.executable, __file__, "--scaling", str(onnx),
                 "--seconds", str(min(seconds, 2.0))],
                capture_output=True, text=True, timeout=600, check=True,
            )  # fmt: skip
    medians = {label: statistics.median(values) for label, values in cells.items()}
    ratio = medians["buckets, 16 conns"] / medians["raw batch 1"]
    return {
        "model": manifest.model,
        "version": manifest.version,
        "variant": variant,
        "buckets": list(manifest.serving.buckets.lengths),
        "requests": len(chosen),
        "lengths": {"min": min(lengths), "max": max(lengths), "distinct": len(set(lengths))},
        "max_abs_diff_vs_raw": checked,
        "seconds": seconds,
        "rounds": rounds,
        "rows": [
            {"config": label, "rps": round(value, 1), "rounds": cells[label]}
            for label, value in medians.items()
        ],
        "ratio_buckets16_to_raw_batch1": round(ratio, 3),
        "raw_rows_per_s_by_length_and_batch": json.loads(scaling.stdout.strip().splitlines()[-1]),
        "goal": GOAL,
        "met": ratio >= GOAL,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each timed run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every configuration")
    parser.add_argument("--raw", nargs=2, metavar=("ONNX", "INPUTS"), help=argparse.SUPPRESS)
    parser.add_argument("--scaling", metavar="ONNX", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    if args.raw:
        raw_main(args.raw[0], args.raw[1], args.seconds)
        return 0
    if args.scaling:
        scaling_main(args.scaling, args.seconds)
        return 0
    result = run(args.seconds, args.rounds)
    print(
        f"\nMiniLM ({result['variant']}), {result['requests']} requests of {result['lengths']['distinct']} "
        f"lengths {result['lengths']['min']}..{result['lengths']['max']} tokens, buckets {result['buckets']}"
    )
    print(f"{'configuration':<24}{'requests/s':>12}")
    for row in result["rows"]:
        print(f"{row['config']:<24}{row['rps']:>12.1f}")
    print("\nraw session.run rows/s at equal lengths, by batch size (what batching can gain at all):")
    print(f"{'tokens':<8}" + "".join(f"{'batch ' + str(b):>12}" for b in SCALING_BATCHES))
    for length, row in result["raw_rows_per_s_by_length_and_batch"].items():
        print(f"{length:<8}" + "".join(f"{row[str(b)]:>12.1f}" for b in SCALING_BATCHES))
    print(
        f"buckets at 16 conns / raw batch 1: {result['ratio_buckets16_to_raw_batch1']:.2f} "
        f"(goal >= {GOAL}: {'met' if result['met'] else 'NOT met'})"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    import charts  # noqa: PLC0415 - bench/charts.py, beside this script

    print(f"wrote {args.out} and {charts.draw('buckets', args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
