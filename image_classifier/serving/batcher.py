"""Micro-batching: requests that arrive together share one model call.

Handlers decode their images in the event loop's thread pool, then `submit` the arrays here. One
worker thread takes whatever is queued (up to `max_batch` images, waiting at most `max_wait_ms` for
more after the first), runs the model once with all the cores, and hands each caller its rows.
Under load this turns 16 one-image requests into one 16-image call; alone, a request waits for
nothing but its own inference.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

import numpy as np


class MicroBatcher:
    def __init__(self, predict, max_batch: int = 32, max_wait_ms: float = 2.0):
        self.predict = predict
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self._queue: queue.Queue = queue.Queue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._work, name="micro-batcher", daemon=True)
        self.batches = 0
        self.images = 0
        self._thread.start()

    def submit(self, arrays: np.ndarray) -> Future:
        """arrays: (n, C, H, W); the future resolves to the (n, K) probabilities."""
        if self._stopped.is_set():
            raise RuntimeError("the model worker has stopped")
        future: Future = Future()
        self._queue.put((arrays, future))
        return future

    def pending(self) -> int:
        return self._queue.qsize()

    def _take(self) -> list:
        first = self._queue.get()
        if first is None:
            return []
        items, n = [first], len(first[0])
        deadline = time.perf_counter() + self.max_wait
        while n < self.max_batch:
            timeout = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:  # stop after this batch
                self._queue.put(None)
                break
            items.append(item)
            n += len(item[0])
        return items

    def _work(self) -> None:
        while not self._stopped.is_set():
            items = self._take()
            if not items:
                break
            try:
                batch = np.concatenate([a for a, _ in items]) if len(items) > 1 else items[0][0]
                probs = self.predict(batch)
            except Exception as e:  # the callers report it; the worker keeps serving
                for _, f in items:
                    f.set_exception(e)
                continue
            self.batches += 1
            self.images += len(batch)
            start = 0
            for arrays, f in items:
                f.set_result(probs[start : start + len(arrays)])
                start += len(arrays)

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop the worker."""
        self._queue.put(None)
        self._thread.join(timeout)
        self._stopped.set()
