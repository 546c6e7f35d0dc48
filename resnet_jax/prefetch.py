"""Device prefetch: the next global batches already on the devices when the step asks.

Without it the loop is `next(host iterator)` -> copy to the devices -> step, so every hiccup of
the input pipeline (a slow JPEG, a Grain worker's turn) is accelerator idle time. A background
thread takes host batches, starts their transfer (`sharding.global_batch`: asynchronous on
accelerators) and keeps up to `size` of them queued; the step then finds its batch waiting.

The data stream is a pure function of the step (resnet_jax.pipelines), so batches prefetched
past the point where a run stops are simply dropped: resuming and determinism do not depend on
prefetch.
An error of the input pipeline (a damaged image) is raised by `next()` where the step would have
met it, as the same exception.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class DevicePrefetcher:
    """Iterates over `to_device(batch)` for the batches of `host_batches`, `size` ahead.

    `close()` stops the thread and closes `host_batches` (Grain's iterators hold worker
    processes); the trainer registers it with the run's closers.
    """

    def __init__(self, host_batches: Iterator, to_device: Callable[[Any], Any], size: int):
        if size < 1:
            raise ValueError(f'prefetch size={size!r}; expected >= 1 (0: do not prefetch)')
        self._host = host_batches
        self._to_device = to_device
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name='device-prefetch', daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for batch in self._host:
                if not self._put(self._to_device(batch)):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer, raised where it would have been
            if not self._stop.is_set():
                self._put(_Failure(e))

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # stays exhausted
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.error
        return item

    def close(self, timeout: float = 30.0) -> None:
        """Stops the thread and closes the host iterator; safe to call twice."""
        self._stop.set()
        while True:  # a thread blocked on a full queue sees the stop within 50 ms
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        close = getattr(self._host, 'close', None)
        try:
            if close is not None:
                close()  # unblocks a thread waiting in Grain's next()
        except ValueError:  # a generator inside next() on the thread: close it once it left
            self._thread.join(timeout)
            close()
        self._thread.join(timeout)


def prefetch_to_device(
    host_batches: Iterator, to_device: Callable[[Any], Any], size: int
) -> Iterator:
    """`size` batches ahead on the devices, or (size 0) each moved when asked for."""
    if size == 0:
        return _OnDemand(host_batches, to_device)
    return DevicePrefetcher(host_batches, to_device, size)


class _OnDemand:
    """The loop as it is without prefetch: the transfer of each batch when the step needs it."""

    def __init__(self, host_batches: Iterator, to_device: Callable[[Any], Any]):
        self._host = host_batches
        self._to_device = to_device

    def __iter__(self) -> _OnDemand:
        return self

    def __next__(self) -> Any:
        return self._to_device(next(self._host))

    def close(self) -> None:
        close = getattr(self._host, 'close', None)
        if close is not None:
            close()
