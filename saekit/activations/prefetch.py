"""Reading the next shuffle buffer while training consumes this one.

`InBackground` runs any iterator in a thread a bounded number of items ahead (on the fly, the
tokenising and hashing of the training texts: saekit.activations.sources.ModelRows). For the store,
a background thread reads each buffer's rows from disk in order, into host memory that is pinned
where the device is a CUDA GPU (an asynchronous copy needs it), at most one buffer ahead. The main
thread starts the next buffer's copy to the device as soon as the current one is handed out: on a GPU
with `non_blocking` on a side stream, which the training stream waits for by an event (nothing waits
on the host), so the copy overlaps the current buffer's steps. The rows arrive in the same order, so
training sees the same batches with or without it (tests/test_store.py).

On the device at most two buffers are held: the one being trained on and the next. Each has room in
front for the rows the previous buffer carried over, so joining them copies fewer than a batch of
rows instead of the whole buffer.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch


T = TypeVar("T")
_END = object()  # the iterator is exhausted


class _Raised:
    """An exception the background thread met, handed to the consumer to raise as itself."""

    def __init__(self, error: BaseException):
        self.error = error


class InBackground(Generic[T]):
    """The items of `items`, in order, made in a daemon thread at most `ahead` items before they are taken
    (plus the one being made). An exception the thread meets is raised by `next` on the consuming thread,
    the same object with its own message. Use as a context manager, or call close: it stops the thread."""

    def __init__(self, items: Iterable[T], ahead: int = 1):
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._work, args=(iter(items),), daemon=True)
        self._thread.start()

    def __enter__(self) -> "InBackground[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END or isinstance(item, _Raised):
            self._done = True
        if isinstance(item, _Raised):
            raise item.error
        if item is _END:
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # free a put that waits for room
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()

    def _work(self, items: Iterator[T]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
        except BaseException as err:  # handed to the consuming thread, which raises it
            self._put(_Raised(err))
            return
        self._put(_END)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False


class ReadAhead:
    """The buffers that `reads` return (each a [rows, d] array), in order, on `device`; `take` hands out
    the next, after the rows carried over. With `background` False they are read when taken (the
    order and content are the same; nothing overlaps). Use as a context manager: leaving it stops the
    thread."""

    def __init__(self, reads: Sequence[Callable[[], np.ndarray]], device: torch.device, spare_rows: int,
                 background: bool = True):
        self.device, self.spare = torch.device(device), spare_rows
        self._cuda = self.device.type == "cuda"
        self._n_reads, self._taken = len(reads), 0
        self._side = torch.cuda.Stream(self.device) if self._cuda else None
        self._pending: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        hosts = map(self._host, reads)
        self._hosts: Iterator[torch.Tensor] = InBackground(hosts) if background else hosts

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc) -> None:
        if self._pending is not None and self._pending[1] is not None:
            self._pending[1].synchronize()  # left early: a copy in flight must not land in memory freed meanwhile
        if isinstance(self._hosts, InBackground):
            self._hosts.close()

    def _host(self, read: Callable[[], np.ndarray]) -> torch.Tensor:
        rows = torch.from_numpy(read())
        return rows.pin_memory() if self._cuda else rows

    def _start_next(self) -> None:
        """Start moving the next buffer to the device."""
        host = next(self._hosts)
        self._taken += 1
        rows = torch.empty(self.spare + len(host), *host.shape[1:], dtype=host.dtype, device=self.device)
        if not self._cuda:
            rows[self.spare:] = host
            self._pending = rows, None
            return
        # the new buffer's memory may have been a tensor that queued training kernels still read
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):
            rows[self.spare:].copy_(host, non_blocking=True)  # the pinned block is kept until the copy is done
            done = torch.cuda.Event()
            done.record(self._side)
        self._pending = rows, done

    def take(self, carry: torch.Tensor | None) -> torch.Tensor:
        """The next buffer's rows on the device, after `carry` (fewer than `spare_rows`). Drop the previous
        buffer before calling: the one after this starts its copy here, and two are held at most."""
        if self._pending is None:
            self._start_next()
        rows, done = self._pending
        self._pending = None
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)  # the device waits, not the host
        n = 0 if carry is None else len(carry)
        if n:
            rows[self.spare - n:self.spare] = carry
        if self._taken < self._n_reads:
            self._start_next()
        return rows[self.spare - n:]
