"""The batcher on a real event loop with real worker threads: instances, timeouts, cancellation.

The model here is a plain function (the batcher's subject is scheduling, not ONNX Runtime); the server
tests run the same batcher with real models.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping

import numpy as np
import pytest

from serving.batching import Batcher, QueueTimeout
from serving.protocol import InferRequest


def _request(value: float = 0.0) -> InferRequest:
    return InferRequest(None, {"x": np.full((1, 4), value, np.float32)}, 1, [("y", False)], elements=4)


def _batcher(run: object, **kwargs: object) -> Batcher:
    settings: dict[str, object] = {"max_batch_size": 1, "max_queue_delay_s": 0.0, "max_queue": 16, **kwargs}
    return Batcher(run, **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("instances", [1, 2, 3])
def test_instances_run_that_many_batches_at_once_and_no_more(instances: int) -> None:
    """Four one-row requests; the model counts how many runs overlap."""
    lock = threading.Lock()
    running, peak = [0], [0]

    def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)  # long enough for every free instance to start its batch meanwhile
        with lock:
            running[0] -= 1
        return {"y": inputs["x"] * 2}

    async def main() -> list[float]:
        batcher = _batcher(run, instances=instances)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(_request(i), 10) for i in range(4)))
        await batcher.stop()
        return [float(out["y"][0, 0]) for out, _ in results]

    started = time.perf_counter()
    assert asyncio.run(main()) == [0.0, 2.0, 4.0, 6.0]  # each request its own answer
    elapsed = time.perf_counter() - started
    assert peak[0] == instances
    waves = -(-4 // instances)
    assert elapsed >= 0.2 * waves - 0.05, f"{elapsed:.2f} s for {waves} waves of runs"


def test_a_request_that_waits_past_its_timeout_gets_queue_timeout_and_the_batcher_goes_on() -> None:
    gate = threading.Event()

    def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        gate.wait(5)
        return {"y": inputs["x"]}

    async def main() -> None:
        batcher = _batcher(run)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(_request(1), 10))
        await asyncio.sleep(0.05)  # the first is running; the second waits behind it
        with pytest.raises(QueueTimeout, match=r"within the request timeout of 0\.1 s"):
            await batcher.submit(_request(2), 0.1)
        gate.set()
        out, _ = await first
        assert out["y"][0, 0] == 1.0
        again, _ = await batcher.submit(_request(3), 5)
        assert again["y"][0, 0] == 3.0
        await batcher.stop()

    asyncio.run(main())


def test_a_cancelled_request_is_not_run() -> None:
    """A caller that goes away (a gRPC deadline) takes its queued request with it."""
    gate = threading.Event()
    ran: list[float] = []

    def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        gate.wait(5)
        ran.append(float(inputs["x"][0, 0]))
        return {"y": inputs["x"]}

    async def main() -> None:
        batcher = _batcher(run)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(_request(1), 10))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(batcher.submit(_request(2), 10))
        await asyncio.sleep(0.05)
        second.cancel()
        gate.set()
        await first
        with pytest.raises(asyncio.CancelledError):
            await second
        await batcher.stop()

    asyncio.run(main())
    assert ran == [1.0]
