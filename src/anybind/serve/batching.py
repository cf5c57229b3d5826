"""Micro-batching: concurrent requests' model calls gathered into one batch.

    batcher = MicroBatcher(run_batch, max_batch=32, max_wait_ms=2)
    rows = await batcher.submit("text", ["a red bird"])        # in a request handler

One model call on 16 queries costs far less than 16 calls on one: the encoder's fixed cost per call
(Python dispatch, a forward over a batch of one, thread hand-offs) is paid once. The batcher keeps
one queue of pending requests. A worker takes the oldest request, waits until that request is
`max_wait_ms` old for more requests of the same kind (modality), and runs up to `max_batch` items in
one call of `run_batch(kind, items)` in the threadpool. While a call runs, new requests queue up, so
under load batches fill without waiting; a lone request waits at most `max_wait_ms`.

Each request gets its own rows back. Errors stay per request: when a batch fails, each of its
requests is run alone, so one bad item fails only the request that sent it.

Numbers: an item's embedding computed in a batch can differ from the one computed alone in the last
bits (other batch shapes, other padding lengths; about 1e-7 relative). `max_batch=1` turns batching
off for byte-identical answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import AnybindError

#: the defaults of `anybind serve --max-batch / --batch-wait-ms`
DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT_MS = 32, 2.0


@dataclass
class _Pending:
    kind: str
    items: list
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Gathers concurrent `submit(kind, items)` calls into batched calls of `run_batch(kind, items)`.

    `run_batch` returns one row per item (anything sliceable along its first axis: a tensor, an
    array, a list); it runs in the threadpool, one call at a time. `on_batch(kind, n_items)` is told
    each batch's size (metrics).
    """

    def __init__(self, run_batch: Callable[[str, list], Any], max_batch: int = DEFAULT_MAX_BATCH,
                 max_wait_ms: float = DEFAULT_MAX_WAIT_MS, on_batch: Callable[[str, int], None] | None = None):
        if int(max_batch) < 1:
            raise AnybindError(f"the largest batch must be at least 1 (--max-batch), not {max_batch}")
        if not 0 <= float(max_wait_ms) <= 1000:
            raise AnybindError(f"the batch wait must be from 0 to 1000 ms (--batch-wait-ms), not {max_wait_ms}")
        self.run_batch, self.on_batch = run_batch, on_batch
        self.max_batch, self.max_wait = int(max_batch), float(max_wait_ms) / 1000
        self._pending: list[_Pending] = []
        #: per kind: [batches run, items encoded, seconds in model calls] (for /health and benchmarks)
        self.stats: dict[str, list] = {}
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, kind: str, items: list) -> Any:
        """The rows of `items` (run in a batch with other requests' items of the same `kind`)."""
        loop = asyncio.get_running_loop()
        # a worker per event loop: a test client may run each request in a loop of its own
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._pending = [p for p in self._pending if p.future.get_loop() is loop]
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._work())
        request = _Pending(kind, list(items), loop.create_future())
        self._pending.append(request)
        self._wake.set()
        return await request.future

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                await self._gather(self._pending[0])
                batch = self._take(self._pending[0].kind)
                await self._run(batch)

    async def _gather(self, first: _Pending) -> None:
        """Wait until the oldest request is `max_wait` old, or its kind fills a batch."""
        while self._count(first.kind) < self.max_batch:
            left = first.arrived + self.max_wait - time.monotonic()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:  # noqa: UP041 - a distinct class before Python 3.11
                return
            self._wake.clear()

    def _count(self, kind: str) -> int:
        return sum(len(p.items) for p in self._pending if p.kind == kind)

    def _take(self, kind: str) -> list[_Pending]:
        """The oldest requests of `kind` whose items fit in one batch (the first always goes)."""
        batch, n = [], 0
        for p in self._pending:
            if p.kind == kind and (not batch or n + len(p.items) <= self.max_batch):
                batch.append(p)
                n += len(p.items)
        self._pending = [p for p in self._pending if p not in batch]
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        from starlette.concurrency import run_in_threadpool

        live = [p for p in batch if not p.future.done()]  # a client that went away was cancelled
        if not live:
            return
        kind, items = live[0].kind, [x for p in live for x in p.items]
        t0 = time.perf_counter()
        try:
            rows = await run_in_threadpool(self.run_batch, kind, items)
        except Exception as e:  # noqa: BLE001 - one request's bad item: find whose, alone
            if len(live) == 1:
                _settle(live[0], error=e)
            else:
                for p in live:
                    await self._run([p])
            return
        tally = self.stats.setdefault(kind, [0, 0, 0.0])
        tally[0], tally[1], tally[2] = tally[0] + 1, tally[1] + len(items), tally[2] + time.perf_counter() - t0
        if self.on_batch is not None:
            self.on_batch(kind, len(items))
        start = 0
        for p in live:
            _settle(p, rows[start:start + len(p.items)])
            start += len(p.items)


def _settle(p: _Pending, rows: Any = None, error: BaseException | None = None) -> None:
    if p.future.done():
        return
    if error is not None:
        p.future.set_exception(error)
    else:
        p.future.set_result(rows)


__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_MAX_WAIT_MS", "MicroBatcher"]
