"""Cross-process wake-ups: an eventfd (or a non-blocking pipe where eventfd is missing).

Threading model: any number of threads or processes may :meth:`Wakeup.signal`; one waiter at
a time should :meth:`Wakeup.wait` / :meth:`Wakeup.drain` (the usual pairing is one ring's
producer signalling its consumer, or the reverse for space). Nothing here blocks except
``wait``. A wake-up is level-triggered and coalescing: many signals before a drain read as one
readable fd.

The race-free waiter loop is *drain, re-check the shared state, then wait*: a signal sent after
the drain keeps the fd readable, so it cannot be lost between the check and the wait::

    while True:
        work = ring.pop_many()
        if work:
            handle(work)
            continue
        data.wait(timeout)
        data.drain()

To hand a Wakeup to a child process, pass :meth:`fds` through ``subprocess.Popen(pass_fds=...)``
(or any fd-passing mechanism) and rebuild it there with :meth:`Wakeup.from_fds`.
"""

from __future__ import annotations

import math
import os
import select

_HAS_EVENTFD = hasattr(os, "eventfd")
_PIPE_DRAIN_CHUNK = 4096


class Wakeup:
    """One wake-up channel; owns its fds (close them with :meth:`close`)."""

    __slots__ = ("_eventfd", "_poll", "_rfd", "_wfd")

    def __init__(self) -> None:
        if _HAS_EVENTFD:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._setup(fd, fd, eventfd=True)
        else:  # pragma: no cover - Linux always has eventfd since 2.6.27
            rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._setup(rfd, wfd, eventfd=False)

    @classmethod
    def from_fds(cls, rfd: int, wfd: int) -> Wakeup:
        """Wrap fds received from a parent (``rfd == wfd`` means an eventfd); takes ownership."""
        self = cls.__new__(cls)
        for fd in {rfd, wfd}:
            os.set_blocking(fd, False)
            # pass_fds made them inheritable; do not leak them further into our own children.
            os.set_inheritable(fd, False)
        self._setup(rfd, wfd, eventfd=rfd == wfd)
        return self

    def _setup(self, rfd: int, wfd: int, *, eventfd: bool) -> None:
        self._rfd = rfd
        self._wfd = wfd
        self._eventfd = eventfd
        # One poll object for the life of the Wakeup: wait() allocates nothing per call.
        self._poll = select.poll()
        self._poll.register(rfd, select.POLLIN)

    def fds(self) -> tuple[int, int]:
        """(read fd, write fd); the same fd twice for an eventfd."""
        return self._rfd, self._wfd

    def fileno(self) -> int:
        """The read fd, for select/poll or ``loop.add_reader``."""
        return self._rfd

    @property
    def closed(self) -> bool:
        return self._rfd < 0

    def signal(self) -> None:
        """Make the read fd readable; never blocks."""
        try:
            if self._eventfd:
                os.eventfd_write(self._wfd, 1)
            else:
                os.write(self._wfd, b"\0")
        except BlockingIOError:
            # A full pipe (or a saturated eventfd counter) is already readable: nothing lost.
            pass

    def drain(self) -> int:
        """Consume pending wake-ups without blocking; returns how many were pending.

        For the pipe fallback the count is the number of bytes read (signals since the last
        drain, up to what the pipe held).
        """
        if self._eventfd:
            try:
                return os.eventfd_read(self._rfd)
            except BlockingIOError:
                return 0
        total = 0
        while True:
            try:
                chunk = os.read(self._rfd, _PIPE_DRAIN_CHUNK)
            except BlockingIOError:
                return total
            if not chunk:  # writer closed: nothing more will come
                return total
            total += len(chunk)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until signalled or ``timeout`` seconds pass (None: forever); does not drain.

        Returns True if a wake-up is pending. EINTR is retried by Python with the remaining
        time (PEP 475).
        """
        if self._rfd < 0:
            # poll() with nothing registered would just sleep out the timeout.
            raise ValueError("wait() on a closed Wakeup")
        # Round up: a 0.4 ms timeout must not turn into a busy poll(0).
        ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
        return bool(self._poll.poll(ms))

    def close(self) -> None:
        """Close the fds; idempotent."""
        rfd, wfd = self._rfd, self._wfd
        if rfd < 0:
            return
        self._rfd = self._wfd = -1
        self._poll.unregister(rfd)
        os.close(rfd)
        if wfd != rfd:
            os.close(wfd)

    def __enter__(self) -> Wakeup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "eventfd" if self._eventfd else "pipe"
        return f"<Wakeup {kind} fds={self._rfd},{self._wfd}>"
