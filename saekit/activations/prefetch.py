"""Reading the next shuffle buffer while training consumes this one.

A background thread reads each buffer's rows from disk in order, into host memory that is pinned
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
from typing import Callable, Sequence

import numpy as np
import torch


class ReadAhead:
    """The buffers that `reads` return (each a [rows, d] array), in order, on `device`; `take` hands out
    the next, after the rows carried over. With `background` False they are read when taken (the
    order and content are the same; nothing overlaps). Use as a context manager: leaving it stops the
    thread."""

    def __init__(self, reads: Sequence[Callable[[], np.ndarray]], device: torch.device, spare_rows: int,
                 background: bool = True):
        self.device, self.spare = torch.device(device), spare_rows
        self._cuda = self.device.type == "cuda"
        self._reads, self._taken = list(reads), 0
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._side = torch.cuda.Stream(self.device) if self._cuda else None
        self._pending: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        self._thread = threading.Thread(target=self._work, daemon=True) if background else None
        if self._thread is not None:
            self._thread.start()

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc) -> None:
        if self._pending is not None and self._pending[1] is not None:
            self._pending[1].synchronize()  # left early: a copy in flight must not land in memory freed meanwhile
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():  # free a put that waits for room
                try:
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread.join()

    def _host(self, read: Callable[[], np.ndarray]) -> torch.Tensor:
        rows = torch.from_numpy(read())
        return rows.pin_memory() if self._cuda else rows

    def _work(self) -> None:
        try:
            for read in self._reads:
                item: torch.Tensor | BaseException = self._host(read)
                if not self._put(item):
                    return
        except BaseException as err:  # handed to the training thread, which raises it
            self._put(err)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _next_host(self) -> torch.Tensor:
        if self._thread is None:
            return self._host(self._reads[self._taken])
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def _start_next(self) -> None:
        """Start moving the next buffer to the device."""
        host = self._next_host()
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
        if self._taken < len(self._reads):
            self._start_next()
        return rows[self.spare - n:]
