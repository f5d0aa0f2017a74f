"""Tune the server's settings for a bundle on the device it runs on, under real load (``make tune``).

    python -m serving.tune run --bundle dist/demo/latest --public-key K [--p99-ms 200] [--out tuned.yaml]
    python -m serving.tune env tuned.yaml --bundle dist/demo/latest      # DUALDEPLOY_* lines for the server

``run`` searches max batch size, max queue delay, ONNX Runtime intra-op threads and the instance count
(model runs at once, ``--instances``) by **successive halving**: a seeded sample of settings (the
bundle's defaults always among them) each gets a real server
(``python -m serving``) and a short closed-loop load; the best third go on with three times the load, and
so on. A setting scores its throughput when its p99 is within the bound and no request failed, nothing
otherwise. The last rung runs the winner and the defaults **interleaved, side by side**, and records the
winner only if its throughput is at least the defaults'; otherwise it records the defaults.

The result goes to a sidecar file, one entry per device class (the class detected here), which the
server takes through its environment: ``env`` prints the ``DUALDEPLOY_MAX_BATCH_SIZE``,
``DUALDEPLOY_MAX_QUEUE_DELAY_MS``, ``DUALDEPLOY_THREADS`` and ``DUALDEPLOY_INSTANCES`` lines for an
``EnvironmentFile`` or a Pod's ``env``. Only those four are ever tuned (:data:`serving.device.TUNED_ENV`):
queue limits and timeouts are safety bounds, the batch size stays within the bundle's
``serving.max_batch_size``, and the memory budget of a run is divided among the instances.

Instances and threads share the CPUs: the search keeps ``instances x threads`` within the CPUs this
process may use (threads 0, ONNX Runtime's default of one per core, goes with one instance only).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import uvloop
import yaml

from contract.bundle import load_tensors, read_manifest
from serving import device
from serving.loadgen import ServerProcess, encode_request, load

log = logging.getLogger("dualdeploy.tune")

BATCHES = (1, 2, 4, 8, 16, 32)
DELAYS_MS = (0.0, 1.0, 2.0, 5.0, 10.0)


class TuneError(Exception):
    """The tuner cannot run or cannot record (the message says why)."""


@dataclass(frozen=True)
class Setting:
    """One point of the search space."""

    max_batch_size: int
    max_queue_delay_ms: float
    threads: int
    instances: int = 1

    def flags(self) -> list[str]:
        """The server flags that apply it."""
        return [
            "--max-batch-size",
            str(self.max_batch_size),
            "--max-queue-delay-ms",
            f"{self.max_queue_delay_ms:g}",
            "--threads",
            str(self.threads),
            "--instances",
            str(self.instances),
        ]

    def label(self) -> str:
        """``b8 d5ms t0 i1``."""
        return f"b{self.max_batch_size} d{self.max_queue_delay_ms:g}ms t{self.threads} i{self.instances}"


def space(max_batch_size: int, cpus: int) -> list[Setting]:
    """Every setting the search may try: batches up to the bundle's cap, threads x instances within the
    CPUs (ONNX Runtime's default thread count, 0, with one instance only)."""
    batches = [b for b in BATCHES if b <= max_batch_size] or [1]
    cpus = max(cpus, 1)
    pairs = [(0, 1)] + [(t, i) for t in range(1, cpus + 1) for i in range(1, cpus // t + 1)]
    return [Setting(b, d, t, i) for b, d, (t, i) in itertools.product(batches, DELAYS_MS, pairs)]


def score(result: dict[str, Any], p99_bound_ms: float) -> float:
    """Throughput when the p99 is within the bound and nothing failed; 0 otherwise."""
    p99 = result.get("p99_ms")
    if result["errors"] or p99 is None or p99 > p99_bound_ms:
        return 0.0
    return float(result["throughput_rps"])


@dataclass
class Trial:
    """One measurement of one setting."""

    setting: Setting
    rung: int
    throughput_rps: float
    p99_ms: float | None
    errors: int
    score: float


class Tuner:
    """Runs servers with settings on this machine and measures them with the same request."""

    def __init__(
        self, bundle: Path, public_key: Path, *, clients: int, p99_bound_ms: float, workdir: Path
    ) -> None:
        """Read the bundle and build the request (the golden input's first row)."""
        self.bundle, self.public_key = bundle, public_key
        self.clients, self.p99_bound_ms, self.workdir = clients, p99_bound_ms, workdir
        manifest = read_manifest(bundle)
        self.manifest = manifest
        golden = load_tensors(bundle / manifest.golden.inputs)
        self.inputs = {t.name: np.ascontiguousarray(golden[t.name][:1]) for t in manifest.inputs}
        self.trials: list[Trial] = []

    def measure(self, setting: Setting, seconds: float, rung: int) -> Trial:
        """Start a server with ``setting``, load it for ``seconds``, stop it."""
        server = ServerProcess(self.bundle, self.public_key, setting.flags(), log_dir=self.workdir)
        try:
            request = encode_request(self.inputs, self.manifest.model, "127.0.0.1", server.port)
            result = self._load(server.port, request, seconds)
        finally:
            server.stop()
        trial = Trial(
            setting,
            rung,
            result["throughput_rps"],
            result["p99_ms"],
            result["errors"],
            score(result, self.p99_bound_ms),
        )
        self.trials.append(trial)
        log.info(
            "rung %d %-14s %8.1f req/s p99 %s ms errors %d",
            rung,
            setting.label(),
            trial.throughput_rps,
            f"{trial.p99_ms:.2f}" if trial.p99_ms is not None else "-",
            trial.errors,
        )
        return trial

    def _load(self, port: int, request: bytes, seconds: float) -> dict[str, Any]:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(
                load("127.0.0.1", port, request, clients=self.clients, seconds=seconds, warmup=0.5)
            )

    def side_by_side(
        self, a: Setting, b: Setting, seconds: float, rounds: int
    ) -> tuple[list[Trial], list[Trial]]:
        """``a`` and ``b`` measured interleaved, ``rounds`` times each (the machine's load drifts)."""
        first: list[Trial] = []
        second: list[Trial] = []
        for index in range(rounds):
            order = ((a, first), (b, second)) if index % 2 == 0 else ((b, second), (a, first))
            for setting, into in order:
                into.append(self.measure(setting, seconds, rung=-1))
        return first, second


def halving(tuner: Tuner, candidates: list[Setting], base_seconds: float, eta: int = 3) -> Setting:
    """Successive halving: measure all, keep the best 1/eta with eta times the load, until one is left."""
    rung, seconds = 0, base_seconds
    alive = list(candidates)
    while len(alive) > 1:
        trials = [tuner.measure(s, seconds, rung) for s in alive]
        ranked = sorted(trials, key=lambda t: t.score, reverse=True)
        alive = [t.setting for t in ranked[: max(1, len(alive) // eta)]]
        rung, seconds = rung + 1, seconds * eta
    return alive[0]


def _summary(trials: list[Trial], p99_bound_ms: float) -> dict[str, Any]:
    p99s = [t.p99_ms for t in trials if t.p99_ms is not None]
    return {
        "throughput_rps": statistics.median(t.throughput_rps for t in trials),
        "p99_ms": max(p99s) if p99s else None,
        "errors": sum(t.errors for t in trials),
        "within_bound": all(t.score > 0 for t in trials),
        "rounds": [round(t.throughput_rps, 1) for t in trials],
        "p99_bound_ms": p99_bound_ms,
    }


def detect_class(table_path: Path) -> tuple[str, str | None]:
    """This machine's device class and CPU class."""
    table, cpu = device.load_tables(table_path)
    facts = device.gather_facts(table, cpu)
    return device.detect_class(table, facts).name, facts.cpu_class


def run(args: argparse.Namespace) -> int:
    """Search, compare with the defaults, record; print the table."""
    manifest = read_manifest(args.bundle)
    cap = manifest.serving.max_batch_size
    defaults = Setting(cap, manifest.serving.max_queue_delay_ms, 0)
    device_class, cpu_class = (
        (args.device_class, None) if args.device_class != "auto" else detect_class(args.device_table)
    )
    rng = random.Random(args.seed)
    everything = [s for s in space(cap, len(os.sched_getaffinity(0))) if s != defaults]
    candidates = [defaults, *rng.sample(everything, min(args.candidates - 1, len(everything)))]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dualdeploy-tune.") as workdir:
        tuner = Tuner(
            args.bundle,
            args.public_key,
            clients=args.clients,
            p99_bound_ms=args.p99_ms,
            workdir=Path(workdir),
        )
        best = halving(tuner, candidates, args.seconds)
        if best == defaults:
            best_trials, default_trials = tuner.side_by_side(best, defaults, args.seconds * 3, 1)
        else:
            best_trials, default_trials = tuner.side_by_side(best, defaults, args.seconds * 3, args.rounds)
    found, base = _summary(best_trials, args.p99_ms), _summary(default_trials, args.p99_ms)
    chosen = best if found["within_bound"] and found["throughput_rps"] >= base["throughput_rps"] else defaults
    gain = found["throughput_rps"] / base["throughput_rps"] if base["throughput_rps"] else None
    record = {
        "settings": asdict(chosen),
        "cpu_class": cpu_class,
        "chosen": "tuned" if chosen == best and best != defaults else "defaults",
        "tuned": {"settings": asdict(best), **found},
        "defaults": {"settings": asdict(defaults), **base},
        "gain_vs_defaults": gain,
        "clients": args.clients,
        "trials": len(tuner.trials),
        "seconds": round(time.perf_counter() - started, 1),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average": os.getloadavg(),
    }
    existing: dict[str, Any] = {}
    if args.out.exists():
        existing = yaml.safe_load(args.out.read_text()) or {}
        if existing.get("model") != manifest.model:
            existing = {}
    sidecar = {
        "schema_version": device.TUNED_SCHEMA_VERSION,
        "model": manifest.model,
        "bundle_version": manifest.version,
        "classes": {**existing.get("classes", {}), device_class: record},
    }
    # The file the server will read must pass the server's own check before it is written.
    device.parse_tuned(sidecar, device_class, model=manifest.model, max_batch_size=cap, source=str(args.out))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(yaml.safe_dump(sidecar, sort_keys=False))
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        trials = [{**asdict(t), "setting": t.setting.label()} for t in tuner.trials]
        args.results.write_text(
            json.dumps({"device_class": device_class, **record, "all_trials": trials}, indent=2) + "\n"
        )
    print(
        f"tuned {manifest.model} {manifest.version} on {device_class} ({cpu_class}), "
        f"{args.clients} clients, p99 <= {args.p99_ms:g} ms"
    )
    print(f"{'':10} {'setting':>16} {'req/s (median)':>15} {'p99 ms (max)':>13}  rounds")
    for name, row in (("tuned", record["tuned"]), ("defaults", record["defaults"])):
        label = Setting(**row["settings"]).label()
        p99 = f"{row['p99_ms']:.2f}" if row["p99_ms"] is not None else "-"
        print(f"{name:10} {label:>16} {row['throughput_rps']:>15.1f} {p99:>13}  {row['rounds']}")
    kept = Setting(**record["settings"]).label()
    print(
        f"gain vs defaults: {gain:.2f}x"
        if gain
        else "gain vs defaults: not measured (defaults served nothing)"
    )
    print(f"recorded {record['chosen']} ({kept}) for {device_class} in {args.out}")
    return 0


def env(args: argparse.Namespace) -> int:
    """Print the tuned settings for this device class as ``KEY=VALUE`` lines (nothing when none)."""
    manifest = read_manifest(args.bundle)
    device_class = args.device_class if args.device_class != "auto" else detect_class(args.device_table)[0]
    settings = device.load_tuned(
        args.sidecar, device_class, model=manifest.model, max_batch_size=manifest.serving.max_batch_size
    )
    if settings is None:
        print(f"# no tuned settings for {device_class} in {args.sidecar}: the server's defaults apply")
        return 0
    for key, value in settings.environment().items():
        print(f"{key}={value}")
    return 0


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m serving.tune", description=(__doc__ or "").splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="search the settings under real load and record the best")
    e = sub.add_parser("env", help="print the tuned settings of this device class as DUALDEPLOY_* lines")
    for q in (r, e):
        q.add_argument("--bundle", type=Path, required=True, help="the bundle folder")
        q.add_argument(
            "--device-class",
            default="auto",
            help="record or read this device class (default: detect this one)",
        )
        q.add_argument(
            "--device-table", type=Path, default=device.DEFAULT_TABLE, help="the device-class table"
        )
    e.add_argument("sidecar", type=Path, help="the tuned settings file")
    r.add_argument("--public-key", type=Path, required=True, help="the bundle signer's public key")
    r.add_argument("--p99-ms", type=float, default=200.0, help="latency bound a client sees (default 200)")
    r.add_argument("--clients", type=int, default=16, help="concurrent closed-loop clients (default 16)")
    r.add_argument(
        "--candidates", type=int, default=9, help="settings in the first rung, defaults included (9)"
    )
    r.add_argument(
        "--seconds", type=float, default=1.0, help="load per trial in the first rung (x3 each rung)"
    )
    r.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the final side-by-side (3)")
    r.add_argument("--seed", type=int, default=0, help="seed of the first rung's sample")
    r.add_argument("--out", type=Path, default=Path("tuned.yaml"), help="the sidecar to write or update")
    r.add_argument("--results", type=Path, help="also write every trial as JSON here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; 2 on a refused input."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(argv)
    try:
        return run(args) if args.command == "run" else env(args)
    except (device.DeviceError, TuneError, RuntimeError) as exc:
        print(f"tune: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
