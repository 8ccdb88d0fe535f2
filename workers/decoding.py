"""Pipelined decoding: each stream's recognizer calls in order, different streams' at once.

For a backend that decodes streams in parallel without the GIL (the embedded backend), an infer
pass that feeds every stream and waits for the slowest (``Backend.feed_many``) leaves threads
idle while the slowest stream finishes, and a chunk that arrives during a pass waits for the
whole pass, then for its own decode. Here every stream has a queue of jobs that ``threads``
decoding threads take in the order the streams became ready, one job of a stream at a time: a
stream's chunk starts as soon as a thread is free and the stream's previous job is done. Audio
that arrives while its stream is busy joins the stream's queued feed (:meth:`Jobs.submit`), so a
stream that fell behind catches up in one call.

Threading model: the owner (the infer worker's loop) calls ``submit``, ``discard``, ``collect``,
``oldest_start`` and ``close``; the decoding threads run ``run(job)`` and append each finished
job to a list under one lock, then count it on an eventfd the owner polls (``fileno``). The
owner never waits for a job: results reach it only through ``collect``.

Liveness: ``oldest_start`` is when the longest-running job started. The infer worker's heartbeat
is never newer than that, so one stuck recognizer call makes the worker's heartbeat stale (and
the supervisor replaces it), as when calls ran on the loop's own thread.

Limits: ``close`` waits at most ``timeout`` for running jobs (the threads are daemon threads, so
a stuck call cannot keep the process alive); queued jobs are dropped.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

FEED = "feed"  # chunks of audio (the job runner may add a partial)
PARTIAL = "partial"  # the hypothesis now
END = "end"  # the final transcript
CANCEL = "cancel"  # drop the utterance

T = TypeVar("T")


@dataclass(slots=True, eq=False)
class Job(Generic[T]):
    kind: str
    target: T  # what the job is about (the infer worker's utterance)
    chunks: list[bytes] = field(default_factory=list)
    seq: int = -1  # the last chunk's audio seq


@dataclass(slots=True, eq=False)
class Finished(Generic[T]):
    job: Job[T]
    result: Any
    error: Exception | None
    seconds: float  # the job's wall time on its thread


class Jobs(Generic[T]):
    """Per-stream job queues served by ``threads`` decoding threads."""

    def __init__(
        self,
        run: Callable[[Job[T]], Any],
        threads: int,
        name: str = "asrd-decode",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._run = run
        self._clock = clock
        self._cond = threading.Condition()
        self._queues: dict[int, deque[Job[T]]] = {}  # streams with queued or running jobs
        self._ready: deque[int] = deque()  # streams with a queued job and none running
        self._running: dict[int, float] = {}  # stream -> when its running job started
        self._done: list[Finished[T]] = []
        self._closing = False
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def fileno(self) -> int:
        """Readable when finished jobs wait in ``collect``."""
        return self._fd

    def submit(self, stream: int, job: Job[T]) -> None:
        """Queue ``job`` behind ``stream``'s others; a feed joins a queued feed of its target."""
        with self._cond:
            queue = self._queues.get(stream)
            if queue is None:
                queue = self._queues[stream] = deque()
            elif job.kind == FEED and queue:
                last = queue[-1]
                if last.kind == FEED and last.target is job.target:
                    last.chunks += job.chunks
                    last.seq = job.seq
                    return
            queue.append(job)
            if len(queue) == 1 and stream not in self._running:
                self._ready.append(stream)
                self._cond.notify()

    def discard(self, stream: int, target: T) -> int:
        """Drop ``target``'s queued jobs (not a running one); how many were dropped."""
        with self._cond:
            queue = self._queues.get(stream)
            if not queue:
                return 0
            kept = deque(j for j in queue if j.target is not target)
            dropped = len(queue) - len(kept)
            if dropped:
                queue.clear()
                queue.extend(kept)
                if not kept and stream not in self._running:
                    del self._queues[stream]
                    self._ready.remove(stream)
            return dropped

    def collect(self) -> list[Finished[T]]:
        """Jobs finished since the last call, in the order they finished."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._fd)
        with self._cond:
            done, self._done = self._done, []
        return done

    def oldest_start(self) -> float | None:
        """When the longest-running job started; None when none runs."""
        with self._cond:
            return min(self._running.values(), default=None)

    def close(self, timeout: float = 5.0) -> bool:
        """Stop the threads; False when a call was still running at the timeout."""
        with self._cond:
            self._closing = True
            self._ready.clear()
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            # A thread still in a call may yet write the eventfd: keep it open then.
            stopped = not any(t.is_alive() for t in self._threads)
            if self._fd >= 0 and stopped:
                os.close(self._fd)
                self._fd = -1
        return stopped

    def _serve(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._ready and not self._closing:
                    cond.wait()
                if self._closing:
                    return
                stream = self._ready.popleft()
                job = self._queues[stream].popleft()
                self._running[stream] = self._clock()
            t0 = time.perf_counter()
            result: Any = None
            error: Exception | None = None
            try:
                result = self._run(job)
            except Exception as exc:
                error = exc
            finished = Finished(job, result, error, time.perf_counter() - t0)
            with cond:
                del self._running[stream]
                self._done.append(finished)
                queue = self._queues[stream]
                if queue:
                    if not self._closing:
                        self._ready.append(stream)
                        cond.notify()
                else:
                    del self._queues[stream]
                fd = self._fd
            if fd >= 0:
                os.eventfd_write(fd, 1)
