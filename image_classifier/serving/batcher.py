"""Micro-batching: requests that arrive together share one model call.

Handlers decode their images, then `await submit(arrays)`. One asyncio task in the event loop
takes whatever is queued (up to `max_batch` images, waiting at most `max_wait_ms` for more after
the first), runs the model once with all the cores in a worker thread, and hands each caller its
rows. Under load this turns 16 one-image requests into one 16-image call; alone, a request waits
for nothing but its own inference. While the model runs, the loop goes on reading and decoding
the next requests, which form the next batch.

Queue and results stay in the event loop's thread: one thread hand-off per batch, not three per
request. A profile of `serve` under 64 clients (py-spy, CPU C, 2026-12-02) spent more time
waking threads (a thread pool per request, a queue, `call_soon_threadsafe` back) than in ONNX
Runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class MicroBatcher:
    def __init__(self, predict, max_batch: int = 32, max_wait_ms: float = 2.0):
        self.predict = predict
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self._model: ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0
        self.images = 0

    async def submit(self, arrays: np.ndarray) -> np.ndarray:
        """arrays: (n, C, H, W) -> their (n, K) probabilities."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use in this loop (a test client may bring another)
            self._loop, self._queue = loop, asyncio.Queue()
            self._model = self._model or ThreadPoolExecutor(1, thread_name_prefix="model")
            self._task = loop.create_task(self._work(self._queue))
        future = loop.create_future()
        self._queue.put_nowait((arrays, future))
        return await future

    def pending(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def _take(self, q: asyncio.Queue) -> list:
        first = await q.get()
        if first is None:
            return []
        items, n = [first], len(first[0])
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while n < self.max_batch:
            if q.empty():
                timeout = deadline - asyncio.get_running_loop().time()
                if timeout <= 0:
                    break
                try:
                    item = await asyncio.wait_for(q.get(), timeout)
                except TimeoutError:
                    break
            else:
                item = q.get_nowait()
            if item is None:  # stop after this batch
                q.put_nowait(None)
                break
            items.append(item)
            n += len(item[0])
        return items

    async def _work(self, q: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while items := await self._take(q):
            try:
                batch = np.concatenate([a for a, _ in items]) if len(items) > 1 else items[0][0]
                probs = await loop.run_in_executor(self._model, self.predict, batch)
            except Exception as e:  # the callers report it; the worker keeps serving
                for _, f in items:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.batches += 1
            self.images += len(batch)
            start = 0
            for arrays, f in items:
                if not f.done():  # a caller that went away (a closed connection) is skipped
                    f.set_result(probs[start : start + len(arrays)])
                start += len(arrays)

    async def close(self) -> None:
        """Finish what is queued, then stop."""
        if self._task is not None and self._loop is asyncio.get_running_loop():
            self._queue.put_nowait(None)
            await self._task
        if self._model is not None:
            self._model.shutdown(wait=True)
            self._model, self._loop = None, None


@contextlib.contextmanager
def start_up_objects_frozen():
    """Moves every object alive once the model is loaded (the modules of torch, ONNX Runtime,
    FastAPI...) out of the garbage collector's reach (`gc.freeze`) while the service runs, so a
    full collection walks only what requests allocate. Under 64 clients on /predict, the full
    collections over those objects were the p99: 80-86 ms against 35-39 ms frozen, p99 at 64
    clients over p99 at 16: 5.3-8.0x against 2.5-4.2x (CPU B; docs/benchmarks.md). They are put
    back on the way out: frozen, they outlived the interpreter's teardown, and Triton's compiler
    bindings (imported by torch) printed some 30 lines of "nanobind: leaked" at every stop."""
    import gc

    gc.collect()
    gc.freeze()
    try:
        yield gc.get_freeze_count()
    finally:
        gc.unfreeze()
