"""One inference thread owns the engine; concurrent requests are micro-batched onto it.

The runtime is not thread-safe (switching tasks moves pointers inside the shared model), so only
this thread touches it. A request waits in a bounded queue; the thread takes the first one, lets
more join for at most ``max_wait`` seconds or until ``max_batch`` images, runs them together and
answers each. Control calls (install, rollback, unload) run on the same thread *between* batches,
so a batch never sees half a swap; whatever can be done beside it (reading, verifying, building a
head) is done by the caller before it queues the call.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from petah.errors import PetahError


class Busy(PetahError):
    """The queue is full: the client should retry shortly (HTTP 503 + Retry-After)."""


@dataclass
class Upload:
    """An image file as it arrived (a request's part, a watched folder's file)."""

    name: str  # the client's file name, for error messages
    data: bytes


@dataclass
class Job:
    images: dict[str, list]  # intensity mode -> the request's images decoded that way
    tasks: tuple[str, ...]
    count: int  # images in the request
    sources: list = field(default_factory=list)  # the uploads, should a swap ask for another decoding
    future: Future = field(default_factory=Future)


class BatchWorker:
    def __init__(self, run_batch: Callable[[list[Job]], None], *, max_batch: int, max_wait_s: float, queue_size: int,
                 on_batch: Callable[[int], None] | None = None, on_pause: Callable[[float], None] | None = None,
                 in_flight: Callable[[], int] | None = None):
        self.run_batch = run_batch  # answers every job of a batch (sets each future)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self.calls: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()
        self.on_batch = on_batch or (lambda n: None)
        self.on_pause = on_pause or (lambda s: None)
        self.in_flight = in_flight or (lambda: self.max_batch)  # requests accepted and not yet answered
        self._stop = threading.Event()
        self._wake = threading.Event()  # a control call arrived: stop waiting for jobs
        self._thread = threading.Thread(target=self._loop, name="petah-inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish every queued job and call, then end the thread."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def depth(self) -> int:
        return self.jobs.qsize()

    # --- the callers' side ---------------------------------------------------------------------
    def submit(self, job: Job) -> Future:
        if self._stop.is_set():
            raise Busy("the station is shutting down")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Busy(f"the inference queue is full ({self.jobs.maxsize} requests waiting)") from None
        return job.future

    def call(self, fn: Callable[[], object]) -> Future:
        """Run ``fn`` on the inference thread between two batches; its result (or error) in the future."""
        if self._stop.is_set():
            raise Busy("the station is shutting down")
        future: Future = Future()
        self.calls.put((fn, future))
        self._wake.set()
        if not self._thread.is_alive() and self._stop.is_set():  # stopped between the check and the put
            self._fail_leftovers()
        return future

    # --- the inference thread ------------------------------------------------------------------
    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self.calls.get_nowait()
            except queue.Empty:
                return
            start = time.perf_counter()
            try:
                future.set_result(fn())
            except BaseException as exc:  # the caller reports it; the thread lives on
                future.set_exception(exc)
            self.on_pause(time.perf_counter() - start)

    def _next_batch(self) -> list[Job]:
        try:
            first = self.jobs.get(timeout=0.05)
        except queue.Empty:
            return []
        batch, images = [first], first.count
        deadline = time.perf_counter() + self.max_wait_s
        while images < self.max_batch and not self._wake.is_set():
            # wait only for requests that exist (being read or decoded): a lone client is not
            # kept waiting --max-wait-ms for company that will not come
            remaining = deadline - time.perf_counter() if self.in_flight() > len(batch) else 0
            try:
                job = self.jobs.get(timeout=remaining) if remaining > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break
            batch.append(job)
            images += job.count
        return batch

    def _loop(self) -> None:
        while True:
            self._wake.clear()
            self._run_calls()
            batch = self._next_batch()
            if batch:
                self.on_batch(sum(job.count for job in batch))
                try:
                    self.run_batch(batch)
                except BaseException as exc:  # an engine failure fails this batch, not the station
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(exc)
            elif self._stop.is_set() and self.jobs.empty():
                self._run_calls()
                self._fail_leftovers()
                return

    def _fail_leftovers(self) -> None:
        """Nothing queued after the thread's last round may wait for it forever."""
        stopped = Busy("the station is shutting down")
        while True:
            try:
                _fn, future = self.calls.get_nowait()
            except queue.Empty:
                break
            if not future.done():
                future.set_exception(stopped)
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if not job.future.done():
                job.future.set_exception(stopped)


__all__ = ["BatchWorker", "Busy", "Job"]
