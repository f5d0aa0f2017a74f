"""Dynamic batching: merge concurrent requests into one model run.

One scheduler coroutine owns a bounded queue and the worker threads that run
ONNX Runtime (which releases the GIL), so the event loop keeps parsing and
answering requests while the model computes. There is one worker per instance
(``--instances``): up to that many batches run at once, each on its own thread,
through the one session (ONNX Runtime's ``run`` is thread-safe).

Policy: a batch starts with the oldest queued request and takes every queued
request with the same non-batch shape, up to the maximum batch size. It then
waits for more, up to the maximum queue delay counted from the first request's
arrival, but only while there is reason to expect more: requests already being
read, or a recent batch larger than this one. A lone client is therefore never
delayed by the queue delay, and a crowd fills batches.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from serving.model import ModelRunError
from serving.protocol import InferRequest, stack

log = logging.getLogger("serving.batching")

RunFn = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


class QueueFull(Exception):
    """The queue holds its maximum; the caller answers 503 with Retry-After."""


class QueueTimeout(Exception):
    """The request waited longer than the request timeout."""


@dataclass
class BatchStats:
    """What one request went through, for the metrics."""

    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    batch_size: int = 0


@dataclass
class _Item:
    request: InferRequest
    future: asyncio.Future[dict[str, np.ndarray]]
    enqueued: float
    deadline: float
    signature: object
    """``request.signature()``, computed once: the scheduler compares it for every queued item."""
    cost: int
    """The request's memory estimate (0 without a budget), computed once."""
    stats: BatchStats = field(default_factory=BatchStats)


def _settle(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


def _expire(future: asyncio.Future[dict[str, np.ndarray]], timeout_s: float) -> None:
    if not future.done():
        future.set_exception(QueueTimeout(f"no result within the request timeout of {timeout_s:g} s"))


class Batcher:
    """A bounded queue in front of one model, feeding a worker thread in batches."""

    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue: int,
        batchable: bool = True,
        on_depth: Callable[[int], None] = lambda _n: None,
        on_batch: Callable[[int, float], None] = lambda _n, _s: None,
        cost: Callable[[InferRequest], int] = lambda _r: 0,
        max_cost: int = 0,
        instances: int = 1,
    ) -> None:
        """Set up the batcher; :meth:`start` must be called inside the event loop.

        Args:
            run: runs the model on stacked inputs (blocking).
            max_batch_size: the most rows one run takes.
            max_queue_delay_s: the longest a batch waits to fill.
            max_queue: the most requests waiting; more are refused with QueueFull.
            batchable: whether requests may be stacked (every tensor has a leading batch axis).
            on_depth: called with the queue depth whenever it changes.
            on_batch: called with the size and compute seconds of every run.
            cost: a request's estimated run-time memory in bytes.
            max_cost: the memory budget of one run; a batch stops growing before it would exceed it
                (0: no budget). A request alone above it is refused by the caller (:meth:`fits`).
            instances: the most batches running at once, each on its own worker thread (the caller
                divides its memory budget among them: ``max_cost`` is one run's).
        """
        self._run = run
        self._max_batch = max_batch_size if batchable else 1
        self._max_delay = max_queue_delay_s
        self._max_queue = max_queue
        self._on_depth = on_depth
        self._on_batch = on_batch
        self._cost = cost
        self.max_cost = max_cost
        self._queue: collections.deque[_Item] = collections.deque()
        self._waiter: asyncio.Future[bool] | None = None
        self._executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix="ort")
        self._free = asyncio.Semaphore(instances)  # instances not running a batch
        self._running: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._last_batch = 1
        self.arriving = 0  # requests being read and parsed, not yet queued

    def fits(self, request: InferRequest) -> int | None:
        """None when ``request`` fits the memory budget of a run on its own, else its estimated cost."""
        cost = self._cost(request)
        return cost if self.max_cost and cost > self.max_cost else None

    @property
    def depth(self) -> int:
        """Requests waiting in the queue."""
        return len(self._queue)

    def start(self) -> None:
        """Start the scheduler task on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._schedule(), name="batcher")

    async def stop(self) -> None:
        """Stop the scheduler once the queue is empty and every running batch is done, then the workers."""
        while self._queue or self._running:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def submit(
        self, request: InferRequest, timeout_s: float
    ) -> tuple[dict[str, np.ndarray], BatchStats]:
        """Queue a request and wait for its outputs.

        Raises:
            QueueFull: the queue is at its bound.
            QueueTimeout: no result within ``timeout_s``.
            ModelRunError: the model rejected this request's values.
        """
        if len(self._queue) >= self._max_queue:
            raise QueueFull(f"queue is full ({self._max_queue} requests waiting)")
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        cost = self._cost(request) if self.max_cost else 0
        item = _Item(request, loop.create_future(), now, now + timeout_s, request.signature(), cost)
        self._queue.append(item)
        self._on_depth(len(self._queue))
        self._wake()
        # A timer, not asyncio.wait_for: no task and no shield per request. Expired, the item is skipped if
        # still queued; a running batch still completes, and its result for this request is discarded.
        timer = loop.call_later(timeout_s, _expire, item.future, timeout_s)
        try:
            result = await item.future
        except asyncio.CancelledError:
            # The caller went away (a gRPC client's deadline or cancellation): awaiting the future directly
            # cancelled it too, so a queued item is skipped without a run.
            item.future.cancel()
            raise
        finally:
            timer.cancel()
        return result, item.stats

    def _take(self, batch: list[_Item], rows: int, signature: object) -> int:
        """Move queued items compatible with ``signature`` into ``batch``; return the row count."""
        kept: collections.deque[_Item] = collections.deque()
        now = time.perf_counter()
        spent = sum(item.cost for item in batch)
        while self._queue:
            item = self._queue.popleft()
            if item.future.done() or now > item.deadline:
                if not item.future.done():
                    item.future.set_exception(QueueTimeout("request timed out in the queue"))
                continue
            if (
                rows + item.request.batch_size <= self._max_batch
                and item.signature == signature
                and (not batch or spent + item.cost <= self.max_cost or not self.max_cost)
            ):
                batch.append(item)
                rows += item.request.batch_size
                spent += item.cost
            else:
                kept.append(item)
        self._queue = kept
        return rows

    def _wake(self) -> None:
        """Wake the scheduler if it sleeps (a request was queued)."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(True)

    async def _sleep(self, seconds: float | None) -> bool:
        """Sleep until a request is queued (True) or ``seconds`` pass (False); a future and a timer, not
        ``asyncio.wait_for`` on an event, which costs a task each time."""
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = None if seconds is None else loop.call_later(seconds, _settle, waiter)
        try:
            return await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                await self._sleep(None)
            # A batch is formed only when an instance can run it: requests arriving meanwhile join it.
            await self._free.acquire()
            if not self._queue:  # every queued request timed out or went away while all instances ran
                self._free.release()
                continue
            first = self._queue[0]
            signature = first.signature
            batch: list[_Item] = []
            rows = self._take(batch, 0, signature)
            if not batch:
                self._free.release()
                self._on_depth(len(self._queue))
                continue
            deadline = batch[0].enqueued + self._max_delay
            while rows < self._max_batch and (self.arriving > 0 or rows < self._last_batch):
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or not await self._sleep(remaining):
                    break
                rows = self._take(batch, rows, signature)
            self._on_depth(len(self._queue))
            self._last_batch = rows
            running = loop.create_task(self._run_batch(loop, batch, rows))
            self._running.add(running)
            running.add_done_callback(self._running.discard)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Item], rows: int) -> None:
        try:
            await self._execute(loop, batch, rows)
        finally:
            self._free.release()

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Item], rows: int) -> None:
        started = time.perf_counter()
        requests = [item.request for item in batch]
        try:
            # Stacking copies megabytes for image batches: done in the worker, off the event loop.
            outputs = await loop.run_in_executor(self._executor, lambda: self._run(stack(requests)))
        except ModelRunError as exc:
            if len(batch) > 1:
                # One request's values broke the run: rerun each alone so only it fails.
                for item in batch:
                    await self._execute(loop, [item], item.request.batch_size)
                return
            self._finish(batch, started, rows, error=exc)
            return
        except Exception as exc:  # an internal fault: every waiter gets it, the server keeps going
            log.exception("model run failed")
            self._finish(batch, started, rows, error=exc)
            return
        self._finish(batch, started, rows, outputs=outputs)

    def _finish(
        self,
        batch: list[_Item],
        started: float,
        rows: int,
        outputs: dict[str, np.ndarray] | None = None,
        error: BaseException | None = None,
    ) -> None:
        compute = time.perf_counter() - started
        self._on_batch(rows, compute)
        start = 0
        for item in batch:
            n = item.request.batch_size
            item.stats.queue_seconds = started - item.enqueued
            item.stats.compute_seconds = compute
            item.stats.batch_size = rows
            if item.future.done():
                start += n
                continue
            if error is not None:
                item.future.set_exception(error)
            elif outputs is not None:
                item.future.set_result(
                    outputs if len(batch) == 1 else {k: v[start : start + n] for k, v in outputs.items()}
                )
            start += n
