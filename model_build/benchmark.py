"""Stage 7: CPU benchmark of the ONNX variants, measured side by side.

Variants are timed in interleaved blocks (a block of runs of each in turn, repeated) rather
than one after another, so a neighbour's load on a shared machine slows them alike and the
ratios stay fair. Blocks rather than single alternating runs because ONNX Runtime's intra-op
threads keep spinning for a moment after each run: alternating sessions run by run would have
one session's idle spinners compete with the other's work, which penalises the faster variant.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .onnx_stages import session
from .spec import BenchmarkSpec

Progress = Callable[[str], None]


_BLOCK = 25
_SETTLE = 3  # runs at the start of each block that are not counted (the other session's spinners settle)


def _block(sess: Any, feed: Mapping[str, np.ndarray]) -> list[float]:
    """Time ``_BLOCK`` consecutive runs; return all but the first ``_SETTLE``."""
    times = []
    for _ in range(_BLOCK):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return times[_SETTLE:]


def benchmark(
    variants: Mapping[str, Path],
    sample: Mapping[str, np.ndarray],
    cfg: BenchmarkSpec,
    progress: Progress,
) -> dict[str, dict[str, float]]:
    """Measure batch-1 p50/p99 latency and batch-N throughput of each ONNX file.

    Args:
        variants: variant name → ONNX file.
        sample: model inputs with at least one sample (tiled up to the throughput batch).
        cfg: iterations, warm-up, threads and the throughput batch size.
        progress: receives one-line progress messages.

    Returns:
        name → ``{latency_ms_p50, latency_ms_p99, throughput_b8}`` (throughput in samples/s).
    """
    from .tensors import batch_of

    sessions = {name: session(path, cfg.threads) for name, path in variants.items()}
    one = batch_of(sample, 1)
    many = batch_of(sample, cfg.throughput_batch)
    for sess in sessions.values():
        for _ in range(cfg.warmup):
            sess.run(None, one)
            sess.run(None, many)
    single: dict[str, list[float]] = {name: [] for name in sessions}
    batched: dict[str, list[float]] = {name: [] for name in sessions}
    rounds = max(1, cfg.iterations // _BLOCK)
    batched_rounds = max(2, rounds // 2)
    progress(
        f"batch 1 × {rounds * _BLOCK} and batch {cfg.throughput_batch} × {batched_rounds * _BLOCK} "
        "per variant, "
        f"interleaved in blocks of {_BLOCK}"
    )
    for _ in range(rounds):
        for name, sess in sessions.items():
            single[name].extend(_block(sess, one))
    for _ in range(batched_rounds):
        for name, sess in sessions.items():
            batched[name].extend(_block(sess, many))
    results: dict[str, dict[str, float]] = {}
    for name in sessions:
        lat = np.array(single[name]) * 1e3
        results[name] = {
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 4),
            "latency_ms_p99": round(float(np.percentile(lat, 99)), 4),
            "throughput_b8": round(cfg.throughput_batch / float(np.median(batched[name])), 2),
        }
        progress(
            f"{name}: p50 {results[name]['latency_ms_p50']:.3f} ms, "
            f"p99 {results[name]['latency_ms_p99']:.3f} ms, "
            f"{results[name]['throughput_b8']:.1f} samples/s at batch {cfg.throughput_batch}"
        )
    return results
