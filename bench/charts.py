"""The benchmarks' charts, drawn with matplotlib from their JSON in ``bench/results/``.

Each benchmark calls :func:`draw` right after it writes its JSON; ``make charts`` redraws every chart
from the JSON already there, without re-running anything:

    .venv/bin/python bench/charts.py                # all of them
    .venv/bin/python bench/charts.py serving edge   # some
    .venv/bin/python bench/charts.py --results DIR  # another results folder

The JSON is read through small pydantic models that name only the keys a chart uses, so a malformed
or stale result stops with an error naming the file and the key (``serving.json: key
results.0.http_16_clients.throughput_rps: Field required``) instead of drawing a wrong chart.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display here, in CI or on a build host

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field, ValidationError

RESULTS = Path(__file__).resolve().parent / "results"


class ChartInputError(ValueError):
    """A benchmark's JSON is missing, not JSON, or lacks a key its chart needs (the message names both)."""


class _Result(BaseModel):
    # Benchmarks record more than their charts draw; only the keys named here are required.
    model_config = ConfigDict(extra="ignore", frozen=True)


# --- prebuild: size and latency by variant --------------------------------------------------------
class Timing(_Result):
    """The prebuild's own benchmark of one variant."""

    latency_ms_p50: float
    latency_ms_p99: float
    throughput_b8: float


class PrebuildModel(_Result):
    """One model's variants, measured side by side."""

    latency_ms: dict[str, Timing] = Field(min_length=1)
    size_bytes: dict[str, int] = Field(default_factory=dict)


class PrebuildDetails(_Result):
    """``details`` of ``prebuild.json``."""

    demo: PrebuildModel
    minilm: PrebuildModel


class Prebuild(_Result):
    """``prebuild.json``."""

    details: PrebuildDetails


# --- serving: throughput and latency against clients -----------------------------------------------
class Load(_Result):
    """One HTTP load run."""

    clients: int = Field(ge=1)
    throughput_rps: float
    p50_ms: float
    p99_ms: float


class Raw(_Result):
    """``session.run`` in-process, batch 1: the server's ceiling without HTTP."""

    throughput_rps: float


class ServedModel(_Result):
    """One bundle's serving results."""

    model: str
    variant: str
    raw_in_process: Raw
    http_1_client: Load
    http_16_clients: Load

    def loads(self) -> list[Load]:
        """The load runs in client order."""
        return sorted((self.http_1_client, self.http_16_clients), key=lambda load: load.clients)


class Serving(_Result):
    """``serving.json``."""

    results: list[ServedModel] = Field(min_length=1)


# --- edge: rollout time against devices ------------------------------------------------------------
class Edge(_Result):
    """``edge.json``: the same rollouts to 1 and to 8 devices."""

    fresh_1_s: float
    fresh_8_s: float
    update_1_s: float
    update_8_s: float
    rerun_8_s: float


# --- cloud: the Pulumi program under mocks ----------------------------------------------------------
class Runs(_Result):
    """Repeated timings."""

    runs: list[float] = Field(min_length=1)


class Cloud(_Result):
    """``cloud.json``."""

    stack: str
    resources: int
    target_s: float
    program_s: Runs
    process_s: Runs


# --- INT8 portability: 8-bit vs 7-bit weights -------------------------------------------------------
class Int8Row(_Result):
    """One quantization of the demo CNN."""

    variant: str
    agreement_native: float
    agreement_avx2_emulated: float
    latency_ms_p50: float


class Int8Portability(_Result):
    """``int8_portability.json``."""

    rows: list[Int8Row] = Field(min_length=1)


def _prebuild(data: Prebuild) -> Figure:
    fig, (size, latency, throughput) = plt.subplots(1, 3, figsize=(13, 4))
    mini = data.details.minilm
    names = list(mini.size_bytes)
    size.bar(names, [mini.size_bytes[n] / 1e6 for n in names], color="tab:blue")
    size.set_ylabel("MiniLM model file (MB)")
    size.set_title("size by variant")
    models = {"demo CNN": data.details.demo, "MiniLM": mini}
    for offset, (label, model) in zip((-0.2, 0.2), models.items(), strict=True):
        variants = list(model.latency_ms)
        x = [i + offset for i in range(len(variants))]
        latency.bar(x, [model.latency_ms[v].latency_ms_p50 for v in variants], 0.4, label=label)
        throughput.bar(x, [model.latency_ms[v].throughput_b8 for v in variants], 0.4, label=label)
    variants = list(data.details.demo.latency_ms)
    for ax in (latency, throughput):
        ax.set_xticks(range(len(variants)), variants)
        ax.legend(fontsize=8)
    latency.set_ylabel("batch-1 p50 (ms)")
    latency.set_title("latency by variant")
    throughput.set_ylabel("batch-8 throughput (items/s)")
    throughput.set_title("throughput by variant")
    fig.suptitle("Prebuild: the bundle's variants, measured side by side on the build host")
    return fig


def _serving(data: Serving) -> Figure:
    fig, (rps, p99) = plt.subplots(1, 2, figsize=(11, 4))
    for served in data.results:
        loads = served.loads()
        clients = [load.clients for load in loads]
        label = f"{served.model} ({served.variant})"
        (line,) = rps.plot(clients, [load.throughput_rps for load in loads], marker="o", label=label)
        rps.axhline(
            served.raw_in_process.throughput_rps,
            color=line.get_color(),
            linestyle=":",
            linewidth=1,
            label=f"{served.model}: raw session.run, batch 1",
        )
        p99.plot(clients, [load.p99_ms for load in loads], marker="o", label=label)
    rps.set_xlabel("concurrent HTTP clients")
    rps.set_ylabel("throughput (requests/s)")
    rps.set_yscale("log")
    rps.legend(fontsize=7)
    p99.set_xlabel("concurrent HTTP clients")
    p99.set_ylabel("p99 latency (ms)")
    p99.legend(fontsize=7)
    fig.suptitle("Serving: throughput and p99 against clients (load generator on the same host)")
    return fig


def _edge(data: Edge) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4))
    devices = [1, 8]
    ax.plot(devices, [data.fresh_1_s, data.fresh_8_s], marker="o", label="fresh rollout")
    ax.plot(devices, [data.update_1_s, data.update_8_s], marker="o", label="bundle update")
    ax.plot([8], [data.rerun_8_s], marker="s", linestyle="none", label="unchanged re-run")
    ax.plot(
        devices, [data.update_1_s, 2.5 * data.update_1_s], color="grey", linestyle="--", label="2.5x target"
    )
    ax.set_xticks(devices)
    ax.set_xlabel("devices in the rollout")
    ax.set_ylabel("wall time (s)")
    ax.legend(fontsize=8)
    ax.set_title("Edge: rollout time against devices (all devices on this one host)")
    return fig


def _cloud(data: Cloud) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4))
    series = {"program, in-process": data.program_s.runs, "fresh interpreter": data.process_s.runs}
    for label, runs in series.items():
        ax.plot(range(1, len(runs) + 1), runs, marker="o", label=label)
    ax.axhline(data.target_s, color="grey", linestyle="--", label=f"target {data.target_s:g} s")
    ax.set_ylim(0, data.target_s * 1.1)
    ax.set_xlabel("run")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)
    ax.set_title(f"Cloud: Pulumi program for {data.stack} under mocks ({data.resources} resources)")
    return fig


def _int8(data: Int8Portability) -> Figure:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r.variant for r in data.rows]
    x = range(len(names))
    left.bar([i - 0.2 for i in x], [100 * r.agreement_native for r in data.rows], 0.4, label="native")
    emulated = [100 * r.agreement_avx2_emulated for r in data.rows]
    left.bar([i + 0.2 for i in x], emulated, 0.4, label="AVX2 (qemu Haswell)")
    left.axhline(99.0, color="grey", linestyle="--", linewidth=1, label="gate 99 %")
    left.set_xticks(list(x), names)
    left.set_ylim(95, 100.5)
    left.set_ylabel("top-1 agreement with FP32 (%)")
    left.legend(loc="lower left", fontsize=8)
    right.bar(list(x), [r.latency_ms_p50 for r in data.rows], 0.5, color="tab:green")
    right.set_xticks(list(x), names)
    right.set_ylabel("batch-1 p50 (ms), native")
    fig.suptitle("Demo CNN INT8: 8-bit vs 7-bit (reduce_range) weights, 512 images")
    return fig


@dataclass(frozen=True)
class Chart:
    """One benchmark's chart: the JSON model it reads, how it draws, what produces the JSON."""

    model: type[_Result]
    draw: Callable[[Any], Figure]
    command: str


# --- length buckets: MiniLM with mixed lengths ------------------------------------------------------
class BucketRow(_Result):
    """One configuration's requests/s."""

    config: str
    rps: float


class Buckets(_Result):
    """``buckets.json``."""

    variant: str
    rows: list[BucketRow] = Field(min_length=1)
    goal: float
    ratio_buckets16_to_raw_batch1: float


def _buckets(data: Buckets) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [row.config for row in data.rows]
    ax.bar(
        labels,
        [row.rps for row in data.rows],
        color=["#999999", "#4c72b0", "#4c72b0", "#dd8452"][: len(labels)],
    )
    raw = next((row.rps for row in data.rows if row.config == "raw batch 1"), None)
    if raw is not None:
        ax.axhline(raw * data.goal, color="black", linestyle=":", label=f"goal: {data.goal} x raw batch 1")
        ax.legend(fontsize=8)
    ax.set_ylabel("requests/s (one core)")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(
        f"MiniLM ({data.variant}), mixed lengths: buckets at 16 conns = "
        f"{data.ratio_buckets16_to_raw_batch1:.2f} x raw batch 1"
    )
    return fig


CHARTS: dict[str, Chart] = {
    "prebuild": Chart(Prebuild, _prebuild, "bench/prebuild_bench.py"),
    "serving": Chart(Serving, _serving, "bench/serving_bench.py"),
    "edge": Chart(Edge, _edge, "bench/edge_bench.py"),
    "cloud": Chart(Cloud, _cloud, "bench/cloud_bench.py"),
    "int8_portability": Chart(Int8Portability, _int8, "bench/int8_portability_bench.py"),
    "buckets": Chart(Buckets, _buckets, "bench/buckets_bench.py"),
}


def _key(loc: Sequence[int | str]) -> str:
    # A key with a dot in it (an instance type, g5.xlarge) is quoted so the path stays readable.
    parts = [f'"{part}"' if isinstance(part, str) and "." in part else str(part) for part in loc]
    return ".".join(parts) or "(top level)"


def describe(error: ValidationError) -> str:
    """Every problem pydantic found, as ``key a.b.0.c: message`` joined by ``; ``."""
    return "; ".join(f"key {_key(e['loc'])}: {e['msg']}" for e in error.errors())


def load(name: str, path: Path) -> _Result:
    """Read and check one benchmark's JSON.

    Args:
        name: the chart's name, a key of :data:`CHARTS`.
        path: the JSON file.

    Raises:
        ChartInputError: the file is missing or not JSON, or a key the chart needs is missing or of
            the wrong type; the message names the file and every such key.
    """
    chart = CHARTS[name]
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ChartInputError(f"{path}: missing; `.venv/bin/python {chart.command}` writes it") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise ChartInputError(f"{path}: not JSON: {error.msg} at line {error.lineno}") from None
    try:
        return chart.model.model_validate(raw)
    except ValidationError as error:
        raise ChartInputError(f"{path}: {describe(error)}") from None


def figure(name: str, path: Path) -> Figure:
    """The chart of one benchmark as a matplotlib figure (the caller closes it)."""
    fig = CHARTS[name].draw(load(name, path))
    fig.tight_layout()
    return fig


def draw(name: str, path: Path | None = None) -> Path:
    """Draw one benchmark's chart next to its JSON (``serving.json`` → ``serving.png``).

    Args:
        name: the chart's name, a key of :data:`CHARTS`.
        path: the JSON file; ``bench/results/<name>.json`` by default.

    Returns:
        The PNG written.

    Raises:
        ChartInputError: see :func:`load`.
    """
    path = path or RESULTS / f"{name}.json"
    fig = figure(name, path)
    out = path.with_suffix(".png")
    try:
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Redraw charts from the JSON already in the results folder; exit 1 naming any bad file."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", help=f"charts to draw, of {', '.join(CHARTS)} (default: all)")
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="folder with the JSON (default bench/results)"
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in CHARTS]
    if unknown:
        parser.error(f"no chart named {', '.join(unknown)}; the charts are {', '.join(CHARTS)}")
    failed = 0
    for name in args.names or CHARTS:
        try:
            out = draw(name, args.results / f"{name}.json")
        except ChartInputError as error:
            print(f"charts: {error}", file=sys.stderr)
            failed += 1
            continue
        print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
