"""A small io_uring event core, and the control-socket server built on it (``io.backend =
"io_uring"``).

:class:`UringLoop` submits ``accept``, ``recv`` (into a caller's preallocated buffer), ``send``,
``close`` and ``cancel`` on socket fds and dispatches each completion to the callback given with
its submission, ``callback(res, flags)``, where ``res`` is the kernel's result (``-errno`` on
failure) and ``flags`` the CQE flags. :class:`UringControlServer` serves a listening Unix socket
with it: accept, receive length-prefixed msgspec frames (:class:`~ipc.framing.FrameReader`), call
the handler once per request, send the replies (:class:`~ipc.framing.FrameWriter`), read on until
EOF, close.

Integration with a ``selectors`` loop (the supervisor's): an eventfd is registered with the ring
(``io_uring_register_eventfd``), so :meth:`UringLoop.fileno` is readable whenever completions
are pending. Register that fd for ``EVENT_READ`` and call :meth:`UringLoop.process` (or
:meth:`UringControlServer.process`) when it is readable; ``process`` never blocks. A loop of its
own can call :meth:`UringLoop.wait` with a timeout instead.

Binding: the ``liburing`` package from PyPI. Both of its generations are supported: the Zig
wrapper (2026.x: ``Ring``, ``Cqe``) and the Cython one (2024.5.3: ``io_uring``,
``io_uring_cqe``, built from its sdist). The 2026.x wheels are compiled for CPUs with AVX-512:
on a CPU without it, the first ``Ring()`` kills the process with SIGILL, which no ``except`` can
catch. So before a ring is made in this process, a child process makes one and runs a no-op
through it (once per process, about 0.2 s); if the child dies (SIGILL; SIGSYS under a seccomp
filter that kills) or fails, construction raises :class:`UringUnavailable` (a
:class:`~daemon.errors.BootError`) that says why. Importing this module never fails and never
touches the binding.

Threading model: one thread. A :class:`UringLoop` and everything submitted through it belong to
the thread that created it; nothing here is thread-safe, and callbacks run inside
:meth:`UringLoop.process` / :meth:`UringLoop.wait` on that thread. Submissions made inside
callbacks are batched: ``process`` submits them with one ``io_uring_enter`` once the ready
completions are dispatched, ``wait`` with the next call (submit and wait in one
``io_uring_enter``); submissions made elsewhere are submitted at once. ``wait`` blocks inside the
binding, which need not release the GIL: use it only where nothing else has to run meanwhile
(a benchmark, a thread of its own); a ``selectors`` loop uses ``process``, which never blocks.

Errors: a completion's error is its callback's business (``res < 0``). The server treats any
error on a connection (ECONNRESET, EPIPE from a peer that closed, a client that vanished
mid-frame) as the end of that connection only: it cancels what is still in flight on it and
closes the fd. A frame above ``max_frame_bytes`` gets ``on_too_large``'s reply (if given), then
the connection is closed, because the stream cannot be resynchronised. An exception in the
server's handler is logged and closes that connection; one in any other callback is logged;
neither escapes ``process`` or ``wait``. A submission queue that stays full, or a ring used
after ``close``, raises ``RuntimeError`` (a bug, not a client's doing).

Limits: one ``recv`` in flight per connection, into a fixed buffer (``recv_bytes``, 64 KiB); one
``send`` in flight per connection, replies queued behind it (a short send is continued); a
connection whose replies queued or in flight pass ``max_pending_bytes`` (1 MiB) stops being
answered and read until they drain, so a client that writes requests and never reads cannot
grow the server's memory. The accept is multishot with the 2026.x binding (Linux 5.19+; an
``EINVAL`` falls back) and single-shot, re-armed, with 2024.5.3. Buffers handed to the kernel
are kept alive until their completion arrives; :meth:`UringLoop.close` cancels everything in
flight and waits for the cancellations (``close_timeout_s``) before it unmaps the ring; buffers
of operations that still have not completed then are kept for the life of the process rather
than freed under the kernel. Default ring setup flags (no SQPOLL, DEFER_TASKRUN, registered
buffers or fixed files): with DEFER_TASKRUN completions are only posted inside
``io_uring_enter``, which a selectors loop on the eventfd does not call, and at control-plane
rates none of them would pay. Cost: on CPython the per-completion Python dispatch outweighs the
system calls io_uring saves; ``bench/io_backend.py`` measures this path against asyncio's and
the supervisor's epoll paths.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from daemon.errors import BootError
from ipc.framing import BadFrame, FrameReader, FrameTooLarge, FrameWriter

log = logging.getLogger("asrd.uring")

T = TypeVar("T")
Completion = Callable[[int, int], None]
"""``callback(res, flags)``: ``res`` is the operation's result, ``-errno`` on failure."""

DEFAULT_ENTRIES = 64
IORING_CQE_F_MORE = 1 << 1  # more completions will follow for this submission (multishot)
_MAX_USER_DATA = (1 << 63) - 1
_CANARY_TIMEOUT_S = 30.0
# No core file from a child that dies of SIGILL/SIGSYS on purpose.
_CANARY_CODE = (
    "import resource; resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); "
    "import ipc.uring as u; u._canary()"
)
_ROOT = Path(__file__).resolve().parent.parent

# Buffers of operations the kernel still held when their ring was torn down (see close()).
_ORPHANS: list[object] = []
# Result of the out-of-process check, per binding: None = usable, else the reason it is not.
_CHECKED: dict[str, str | None] = {}


class UringUnavailable(BootError):
    """io_uring cannot be used here: no binding, a binding this CPU cannot run, or no kernel
    support (the message says which and what to do)."""


# --- the binding ------------------------------------------------------------------------------


def _import_liburing() -> Any:
    """The ``liburing`` module as ``Any`` (its stubs do not parse under mypy)."""
    return importlib.import_module("liburing")


class _Binding(Protocol):
    """The dozen liburing calls the loop needs, over one initialised ring.

    Two implementations, one per generation of the ``liburing`` package. ``harvest`` appends
    ``(user_data, res, flags)`` for every completion ready now and marks them seen.
    """

    name: str
    ring_fd: int
    multishot_accept: bool

    def get_sqe(self) -> Any: ...
    def set_user_data(self, sqe: Any, user_data: int) -> None: ...
    def prep_nop(self, sqe: Any) -> None: ...
    def prep_accept(self, sqe: Any, fd: int, multishot: bool) -> None: ...
    def prep_recv(self, sqe: Any, fd: int, buf: bytearray) -> None: ...
    def prep_send(self, sqe: Any, fd: int, data: bytes) -> None: ...
    def prep_close(self, sqe: Any, fd: int) -> None: ...
    def prep_cancel(self, sqe: Any, user_data: int) -> None: ...
    def submit(self) -> int: ...
    def submit_and_wait(self, timeout: float) -> None: ...
    def sq_ready(self) -> int: ...
    def cq_ready(self) -> int: ...
    def harvest(self, out: list[tuple[int, int, int]]) -> None: ...
    def register_eventfd(self, fd: int) -> None: ...
    def exit(self) -> None: ...


class _BindingBase:
    """What both liburing bindings spell the same way; each subclass sets ``lu``, ``ring``,
    ``cqe`` and the calls that differ."""

    lu: Any
    ring: Any
    _timespecs: dict[float, Any]

    def set_user_data(self, sqe: Any, user_data: int) -> None:
        sqe.user_data = user_data

    def prep_nop(self, sqe: Any) -> None:
        self.lu.io_uring_prep_nop(sqe)

    def prep_close(self, sqe: Any, fd: int) -> None:
        self.lu.io_uring_prep_close(sqe, fd)

    def prep_cancel(self, sqe: Any, user_data: int) -> None:
        self.lu.io_uring_prep_cancel64(sqe, user_data, 0)

    def submit(self) -> int:
        return int(self.lu.io_uring_submit(self.ring))

    def cq_ready(self) -> int:
        return int(self.lu.io_uring_cq_ready(self.ring))

    def sq_ready(self) -> int:
        return int(self.lu.io_uring_sq_ready(self.ring))

    def register_eventfd(self, fd: int) -> None:
        self.lu.io_uring_register_eventfd(self.ring, fd)

    def exit(self) -> None:
        self.lu.io_uring_queue_exit(self.ring)

    def _timespec(self, timeout: float) -> Any:
        ts = self._timespecs.get(timeout)
        if ts is None:
            ts = self._timespecs[timeout] = self.lu.timespec(timeout)
        return ts


class _ZigBinding(_BindingBase):
    """liburing 2026.x (Zig): ``Ring``, ``Cqe``; a negative ``cqe.res`` raises OSError."""

    def __init__(self, lu: Any, entries: int) -> None:
        self.lu = lu
        self.name = f"liburing {getattr(lu, '__version__', '?')} (zig)"
        self.ring = lu.Ring()
        lu.io_uring_queue_init(entries, self.ring)
        self.cqe = lu.Cqe()
        self.ring_fd = int(self.ring.ring_fd)
        self.multishot_accept = True
        self._timespecs = {}

    def get_sqe(self) -> Any:
        return self.lu.io_uring_get_sqe(self.ring)

    def prep_accept(self, sqe: Any, fd: int, multishot: bool) -> None:
        if multishot:
            self.lu.io_uring_prep_multishot_accept(sqe, fd, None, socket.SOCK_CLOEXEC)
        else:
            self.lu.io_uring_prep_accept(sqe, fd, None, socket.SOCK_CLOEXEC)

    def prep_recv(self, sqe: Any, fd: int, buf: bytearray) -> None:
        self.lu.io_uring_prep_recv(sqe, fd, buf, 0)

    def prep_send(self, sqe: Any, fd: int, data: bytes) -> None:
        self.lu.io_uring_prep_send(sqe, fd, data, socket.MSG_NOSIGNAL)

    def harvest(self, out: list[tuple[int, int, int]]) -> None:
        lu, cqe = self.lu, self.cqe
        it = lu.io_uring_cqe_iter_init(self.ring)
        n = 0
        while lu.io_uring_cqe_iter_next(it, cqe):
            entry = cqe[0]
            try:
                res = int(entry.res)
            except OSError as exc:  # the binding raises for res < 0
                res = -(exc.errno or errno.EIO)
            out.append((int(entry.user_data), res, int(entry.flags)))
            n += 1
        if n:
            lu.io_uring_cq_advance(self.ring, n)

    def submit_and_wait(self, timeout: float) -> None:
        try:
            self.lu.io_uring_submit_and_wait_timeout(
                self.ring, self.cqe, 1, self._timespec(timeout)
            )
        except OSError as exc:
            if exc.errno not in (errno.ETIME, errno.EINTR, errno.EAGAIN):
                raise


class _CythonBinding(_BindingBase):
    """liburing 2024.5.3 (Cython): ``io_uring``, ``io_uring_cqe``; results are plain ints."""

    def __init__(self, lu: Any, entries: int) -> None:
        self.lu = lu
        self.name = f"liburing {getattr(lu, '__version__', '?')} (cython)"
        self.ring = lu.io_uring()
        lu.io_uring_queue_init(entries, self.ring, 0)
        self.cqe = lu.io_uring_cqe()
        self.ring_fd = int(self.ring.ring_fd)
        # Its io_uring_prep_multishot_accept dereferences the address argument even when it is
        # None, so accepts are single-shot and re-armed here.
        self.multishot_accept = False
        self._timespecs = {}
        self._nosig = lu.sigset()

    def get_sqe(self) -> Any:
        sqe = self.lu.io_uring_get_sqe(self.ring)
        return sqe if sqe else None

    def prep_accept(self, sqe: Any, fd: int, multishot: bool) -> None:
        self.lu.io_uring_prep_accept(sqe, fd, None, socket.SOCK_CLOEXEC)

    def prep_recv(self, sqe: Any, fd: int, buf: bytearray) -> None:
        self.lu.io_uring_prep_recv(sqe, fd, buf, len(buf), 0)

    def prep_send(self, sqe: Any, fd: int, data: bytes) -> None:
        self.lu.io_uring_prep_send(sqe, fd, data, len(data), socket.MSG_NOSIGNAL)

    def harvest(self, out: list[tuple[int, int, int]]) -> None:
        lu, ring, cqe = self.lu, self.ring, self.cqe
        for _ in range(lu.io_uring_cq_ready(ring)):
            if lu.io_uring_peek_cqe(ring, cqe) != 0:
                break
            out.append((int(cqe.user_data), int(cqe.res), int(cqe.flags)))
            lu.io_uring_cqe_seen(ring, cqe)

    def submit_and_wait(self, timeout: float) -> None:
        try:
            # An explicit (empty) sigset: this binding dereferences the argument even if None.
            self.lu.io_uring_submit_and_wait_timeout(
                self.ring, self.cqe, 1, self._timespec(timeout), self._nosig
            )
        except OSError as exc:
            if exc.errno not in (errno.ETIME, errno.EINTR, errno.EAGAIN):
                raise


def _binding_class(lu: Any) -> Callable[[Any, int], _Binding]:
    if hasattr(lu, "Ring") and hasattr(lu, "Cqe"):
        return _ZigBinding
    if hasattr(lu, "io_uring") and hasattr(lu, "io_uring_cqe"):
        return _CythonBinding
    raise UringUnavailable(
        f"liburing {getattr(lu, '__version__', '?')} has neither the 2026.x API (Ring, Cqe) nor "
        'the 2024.5.3 one (io_uring, io_uring_cqe); io.backend = "io_uring" needs one of them'
    )


def _canary() -> None:
    """Run in a child process by :func:`check_binding`: one ring, one no-op, clean exit."""
    lu = _import_liburing()
    b = _binding_class(lu)(lu, 4)
    try:
        sqe = b.get_sqe()
        b.prep_nop(sqe)
        b.set_user_data(sqe, 1)
        b.submit()
        out: list[tuple[int, int, int]] = []
        deadline = time.monotonic() + 5.0
        while not out and time.monotonic() < deadline:
            b.submit_and_wait(0.5)
            b.harvest(out)
        if out != [(1, 0, 0)]:
            raise SystemExit(f"no-op completion was {out!r}, expected [(1, 0, 0)]")
    finally:
        b.exit()
    print(b.name)


def _cpu_has(flag: str) -> bool | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return flag in line.split(":", 1)[1].split()
    return None


def check_binding() -> str | None:
    """None when liburing can make a ring in this process; otherwise the reason it cannot.

    The first call runs :func:`_canary` in a child process, because a binding compiled for
    instructions this CPU lacks (or a seccomp filter that kills on ``io_uring_setup``) would kill
    the caller outright. The answer is cached for the life of the process.
    """
    try:
        lu = _import_liburing()
    except Exception as exc:
        return (
            f"the liburing package is not importable ({type(exc).__name__}: {exc}); "
            'install it (pip install liburing) or keep io.backend = "epoll"'
        )
    key = f"{getattr(lu, '__file__', '?')}:{getattr(lu, '__version__', '?')}"
    if key in _CHECKED:
        return _CHECKED[key]
    version = getattr(lu, "__version__", "?")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CANARY_CODE],
            capture_output=True,
            text=True,
            timeout=_CANARY_TIMEOUT_S,
            env=env,
            cwd=str(_ROOT),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason: str | None = f"the io_uring check in a child process failed: {exc}"
    else:
        if proc.returncode == 0:
            reason = None
        elif proc.returncode == -signal.SIGILL:
            avx512 = _cpu_has("avx512f")
            cpu = {True: "has", False: "lacks", None: "may lack"}[avx512]
            reason = (
                f"liburing {version}'s native module uses instructions this CPU does not have "
                f"(SIGILL making a ring; this CPU {cpu} AVX-512, which the 2026.x wheels are "
                "built for). Install liburing==2024.5.3 (builds from source with the local "
                'compiler) or keep io.backend = "epoll"'
            )
        elif proc.returncode == -signal.SIGSYS:
            reason = (
                "io_uring_setup(2) is blocked by a seccomp filter that kills the caller (SIGSYS): "
                "allow io_uring_setup, io_uring_enter and io_uring_register, or keep "
                'io.backend = "epoll"'
            )
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            reason = f"making an io_uring ring failed (exit {proc.returncode}): " + " | ".join(tail)
    _CHECKED[key] = reason
    return reason


def _setup_error(exc: OSError) -> str:
    code = exc.errno or 0
    name = errno.errorcode.get(code, str(code))
    if code == errno.EPERM:
        why = "io_uring is disabled (kernel.io_uring_disabled) or blocked by seccomp/LSM policy"
    elif code == errno.ENOSYS:
        why = "the kernel has no io_uring (older than 5.1, or built without CONFIG_IO_URING)"
    elif code == errno.ENOMEM:
        why = "RLIMIT_MEMLOCK is too small for the ring (kernels before 5.12): raise LimitMEMLOCK="
    else:
        why = str(exc)
    return f"io_uring_setup failed with {name}: {why}; `asrd doctor` shows the probe's view"


# --- the event core ---------------------------------------------------------------------------


class UringLoop:
    """One io_uring ring with callback dispatch; see the module docstring for the model."""

    def __init__(
        self, entries: int = DEFAULT_ENTRIES, *, close_timeout_s: float = 2.0, check: bool = True
    ) -> None:
        if sys.platform != "linux":
            raise UringUnavailable('io_uring exists only on Linux; keep io.backend = "epoll"')
        if check:
            reason = check_binding()
            if reason is not None:
                raise UringUnavailable(reason)
        try:
            lu = _import_liburing()
        except Exception as exc:
            raise UringUnavailable(f"the liburing package is not importable: {exc}") from exc
        try:
            self._b: _Binding = _binding_class(lu)(lu, entries)
        except OSError as exc:
            raise UringUnavailable(_setup_error(exc)) from exc
        self._efd = -1
        try:
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._b.register_eventfd(self._efd)
        except OSError as exc:
            if self._efd >= 0:
                os.close(self._efd)
            self._b.exit()
            raise UringUnavailable(f"io_uring_register_eventfd failed: {exc}") from exc
        self.entries = entries
        self.close_timeout_s = close_timeout_s
        self.binding = self._b.name
        self.multishot_accept = self._b.multishot_accept
        # user_data -> (callback, the buffer the kernel may touch until the completion)
        self._ops: dict[int, tuple[Completion | None, object]] = {}
        self._next = 0
        self._unsubmitted = 0
        self._batching = 0
        self._closed = False
        self._out: list[tuple[int, int, int]] = []

    # -- introspection --
    def fileno(self) -> int:
        """The eventfd: readable while completions are pending (register it for EVENT_READ)."""
        return self._efd

    @property
    def ring_fd(self) -> int:
        return self._b.ring_fd

    @property
    def inflight(self) -> int:
        """Operations submitted (or queued) whose final completion has not been processed."""
        return len(self._ops)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- submissions --
    def _sqe(self, callback: Completion | None, keep: object) -> tuple[Any, int]:
        if self._closed:
            raise RuntimeError("UringLoop is closed")
        sqe = self._b.get_sqe()
        if sqe is None:  # submission queue full: hand what is queued to the kernel first
            self._flush()
            sqe = self._b.get_sqe()
            if sqe is None:
                raise RuntimeError("io_uring submission queue stays full")
        self._next = self._next + 1 if self._next < _MAX_USER_DATA else 1
        user_data = self._next
        self._b.set_user_data(sqe, user_data)
        self._ops[user_data] = (callback, keep)
        self._unsubmitted += 1
        return sqe, user_data

    def _queued(self) -> None:
        if not self._batching:
            self._flush()

    def accept(self, fd: int, callback: Completion, *, multishot: bool = True) -> int:
        """Accept on listening socket ``fd``; ``res`` is the new fd (O_CLOEXEC, blocking).

        Multishot (one submission, a completion per connection, ``flags & IORING_CQE_F_MORE``
        while it stays armed) when asked and the binding has it; re-arm when a completion comes
        without ``F_MORE``.
        """
        sqe, ud = self._sqe(callback, None)
        self._b.prep_accept(sqe, fd, multishot and self._b.multishot_accept)
        self._queued()
        return ud

    def recv(self, fd: int, buf: bytearray, callback: Completion) -> int:
        """Receive up to ``len(buf)`` bytes into ``buf``; ``res`` is the count (0: EOF)."""
        sqe, ud = self._sqe(callback, buf)
        self._b.prep_recv(sqe, fd, buf)
        self._queued()
        return ud

    def send(self, fd: int, data: bytes, callback: Completion) -> int:
        """Send ``data`` (MSG_NOSIGNAL); ``res`` is the count sent, which may be short."""
        sqe, ud = self._sqe(callback, data)
        self._b.prep_send(sqe, fd, data)
        self._queued()
        return ud

    def close_fd(self, fd: int, callback: Completion | None = None) -> int:
        """Close ``fd`` through the ring (nothing may be in flight on it)."""
        sqe, ud = self._sqe(callback, None)
        self._b.prep_close(sqe, fd)
        self._queued()
        return ud

    def cancel(self, user_data: int, callback: Completion | None = None) -> int:
        """Cancel the one operation submitted as ``user_data``."""
        sqe, ud = self._sqe(callback, None)
        self._b.prep_cancel(sqe, user_data)
        self._queued()
        return ud

    def submit(self) -> int:
        """Hand queued submissions to the kernel now (``process``/``wait`` do it themselves)."""
        return self._flush()

    def _flush(self) -> int:
        if not self._unsubmitted:
            return 0
        while True:
            try:
                n = self._b.submit()
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                    # EBUSY/EAGAIN: the completion queue is over-full; reap, then retry.
                    if exc.errno != errno.EINTR:
                        self._reap_once()
                    continue
                raise
            self._unsubmitted = max(0, self._unsubmitted - n)
            return n

    # -- completions --
    def _reap_once(self) -> int:
        out = self._out
        out.clear()
        self._b.harvest(out)
        if not out:
            return 0
        batch = list(out)
        out.clear()
        ops = self._ops
        self._batching += 1
        try:
            for user_data, res, flags in batch:
                if flags & IORING_CQE_F_MORE:
                    entry = ops.get(user_data)
                else:
                    entry = ops.pop(user_data, None)
                if entry is None or entry[0] is None:
                    continue
                try:
                    entry[0](res, flags)
                except Exception:
                    log.exception("io_uring completion callback failed (res=%d)", res)
        finally:
            self._batching -= 1
        return len(batch)

    def process(self, max_rounds: int = 8) -> int:
        """Dispatch every completion ready now, submit what the callbacks queued, repeat while
        more are ready (up to ``max_rounds``). Never blocks. Returns the completions handled.

        This is the entry point for a ``selectors`` loop: call it when :meth:`fileno` is
        readable."""
        if self._closed:
            return 0
        total = 0
        for _ in range(max_rounds):
            # Reset the eventfd before looking at the queue: a completion posted after this
            # either shows in cq_ready() below or leaves the fd readable. Resetting it each
            # round also swallows the wake-ups of completions this call reaps itself (a send
            # that completes inside its own submission), so the selector does not wake for them.
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._efd)
            total += self._reap_once()
            self._flush()
            if not self._b.cq_ready():
                break
        return total

    def wait(self, timeout: float | None = None) -> int:
        """Submit what is queued and block until at least one completion is ready or
        ``timeout`` seconds pass (one ``io_uring_enter``), then dispatch what is ready. For a
        loop of its own; what the callbacks submit goes in with the next call. The eventfd is
        left alone, so do not mix this with a selector watching :meth:`fileno` (it would only
        wake spuriously)."""
        if self._closed:
            return 0
        if self._b.cq_ready():
            self._flush()
        else:
            try:
                self._b.submit_and_wait(3600.0 if timeout is None else max(timeout, 1e-6))
            finally:
                self._unsubmitted = self._b.sq_ready()
        return self._reap_once()

    # -- teardown --
    def close(self) -> None:
        """Cancel what is in flight, wait for it (``close_timeout_s``), unmap the ring, close
        the eventfd. Callbacks of operations cancelled here are not called. Idempotent."""
        if self._closed:
            return
        try:
            pending = [ud for ud, (_cb, _k) in self._ops.items()]
            for ud in pending:
                self._ops[ud] = (None, self._ops[ud][1])
            self._batching += 1
            try:
                for ud in pending:
                    self.cancel(ud)
            finally:
                self._batching -= 1
            self._flush()
            deadline = time.monotonic() + self.close_timeout_s
            while self._ops and time.monotonic() < deadline:
                if not self._b.cq_ready():
                    self._b.submit_and_wait(min(0.05, max(deadline - time.monotonic(), 1e-3)))
                self._reap_once()
            if self._ops:
                log.warning(
                    "io_uring: %d operations still in flight after %.1f s; their buffers are kept",
                    len(self._ops),
                    self.close_timeout_s,
                )
                _ORPHANS.extend(keep for _cb, keep in self._ops.values() if keep is not None)
                self._ops.clear()
        finally:
            self._closed = True
            try:
                self._b.exit()
            finally:
                os.close(self._efd)
                self._efd = -1

    def __enter__(self) -> UringLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the control-socket server ----------------------------------------------------------------


class _Conn:
    __slots__ = (
        "buf",
        "closing",
        "eof_after_send",
        "fd",
        "paused",
        "pending",
        "pending_bytes",
        "reader",
        "recv_ud",
        "send_ud",
        "sending",
    )

    def __init__(self, fd: int, recv_bytes: int, reader: FrameReader[Any]) -> None:
        self.fd = fd
        self.buf = bytearray(recv_bytes)
        self.reader = reader
        self.pending: deque[bytes] = deque()  # replies waiting behind the send in flight
        self.pending_bytes = 0
        self.sending: bytes | None = None  # the bytes of the send in flight
        self.recv_ud = 0  # user_data of the recv in flight, 0 if none
        self.send_ud = 0
        self.closing = False
        self.eof_after_send = False
        self.paused = False  # requests left buffered until the output backlog drains

    def backlog(self) -> int:
        """Reply bytes queued or in flight."""
        return self.pending_bytes + (len(self.sending) if self.sending is not None else 0)


class UringControlServer(Generic[T]):
    """Serves length-prefixed msgspec requests on a listening Unix socket through io_uring.

    ``handler(request)`` gets each decoded request (of ``request_type``) or a
    :class:`~ipc.framing.BadFrame`, and returns the reply message (encoded with
    :class:`~ipc.framing.FrameWriter`), or None for no reply. ``on_too_large(exc)`` gives the
    last reply to a client that announced an oversized frame (None: close without one).

    ``sock`` is switched to blocking mode (io_uring does the waiting; a non-blocking fd can make
    its operations fail with EAGAIN) and, with ``close_listener``, closed by :meth:`close`.
    ``loop``: share a :class:`UringLoop` (closed by its owner); by default the server makes one
    with ``entries`` entries and closes it. Construction raises :class:`UringUnavailable`
    where io_uring cannot be used. Accept errors re-arm the accept at once, as the epoll path's
    level-triggered accept retries at once.

    Supervisor integration::

        server = UringControlServer(control_sock, ctl.ControlRequest, handle, on_too_large=...)
        selector.register(server.fileno(), selectors.EVENT_READ, "control-uring")
        ...  # in the loop, when that key is ready:
        server.process()
        ...  # on the way out:
        server.close()
    """

    def __init__(
        self,
        sock: socket.socket,
        request_type: Any,
        handler: Callable[[T | BadFrame], Any],
        *,
        on_too_large: Callable[[FrameTooLarge], Any] | None = None,
        max_frame_bytes: int = 64 * 1024,
        recv_bytes: int = 64 * 1024,
        max_pending_bytes: int = 1 << 20,
        loop: UringLoop | None = None,
        entries: int = DEFAULT_ENTRIES,
        close_listener: bool = True,
    ) -> None:
        self.sock = sock
        self.request_type = request_type
        self.handler = handler
        self.on_too_large = on_too_large
        self.max_frame_bytes = max_frame_bytes
        self.recv_bytes = recv_bytes
        self.max_pending_bytes = max_pending_bytes
        self.close_listener = close_listener
        self._own_loop = loop is None
        self.loop = UringLoop(entries) if loop is None else loop
        self.conns: dict[int, _Conn] = {}
        self._closing_fds: set[int] = set()
        self._writer = FrameWriter()
        self._accept_ud = 0
        self._closed = False
        self.stats = {"accepted": 0, "requests": 0, "replies": 0, "errors": 0, "closed": 0}
        # io_uring honours O_NONBLOCK: on such a socket an operation can complete with -EAGAIN
        # instead of waiting (liburing issue #364). The listener is io_uring's alone from here
        # on, so make it blocking; accepted sockets are made without SOCK_NONBLOCK.
        sock.setblocking(True)
        self._arm_accept(multishot=True)

    # -- the loop's face --
    def fileno(self) -> int:
        """The fd to register for EVENT_READ; call :meth:`process` when it is readable."""
        return self.loop.fileno()

    def process(self) -> int:
        return self.loop.process()

    def wait(self, timeout: float | None = None) -> int:
        return self.loop.wait(timeout)

    def serve_forever(self, tick_s: float = 0.1, stop: Callable[[], bool] | None = None) -> None:
        """A loop of its own (benchmarks, tests): wait with a tick until ``stop()`` says so."""
        while not self._closed and not (stop is not None and stop()):
            self.loop.wait(tick_s)

    # -- accept --
    def _arm_accept(self, multishot: bool) -> None:
        self._multishot = multishot and self.loop.multishot_accept
        self._accept_ud = self.loop.accept(
            self.sock.fileno(), self._on_accept, multishot=self._multishot
        )

    def _on_accept(self, res: int, flags: int) -> None:
        more = bool(flags & IORING_CQE_F_MORE)
        if not more:
            self._accept_ud = 0
        if self._closed:
            if res >= 0:
                os.close(res)
            return
        if res >= 0:
            self.stats["accepted"] += 1
            conn = _Conn(
                res,
                self.recv_bytes,
                FrameReader(self.request_type, self.max_frame_bytes),
            )
            self.conns[res] = conn
            self._arm_recv(conn)
        elif res == -errno.EINVAL and self._multishot:
            log.info("io_uring: multishot accept not supported here; using single-shot")
            self._arm_accept(multishot=False)
            return
        elif res not in (-errno.ECANCELED, -errno.EAGAIN, -errno.ECONNABORTED):
            self.stats["errors"] += 1
            log.debug("io_uring accept failed: %s", os.strerror(-res))
        if not more and res != -errno.ECANCELED:
            self._arm_accept(self._multishot)

    # -- receive --
    def _arm_recv(self, conn: _Conn) -> None:
        conn.recv_ud = self.loop.recv(
            conn.fd, conn.buf, lambda res, flags: self._on_recv(conn, res)
        )

    def _on_recv(self, conn: _Conn, res: int) -> None:
        conn.recv_ud = 0
        if conn.closing:
            self._maybe_release(conn)
            return
        if res == -errno.EAGAIN:  # only where the fd was made non-blocking behind our back
            self._arm_recv(conn)
            return
        if res <= 0:  # EOF, ECONNRESET, ECANCELED, ...
            if res < 0 and res != -errno.ECANCELED:
                self.stats["errors"] += 1
            self._shutdown(conn)
            return
        conn.reader.feed(memoryview(conn.buf)[:res])
        self._serve(conn)

    def _serve(self, conn: _Conn) -> None:
        """Answer the buffered requests while the reply backlog stays under
        ``max_pending_bytes``, send, then read on (or stay paused until the backlog drains)."""
        writer = self._writer
        try:
            try:
                conn.paused = False
                for msg in conn.reader:
                    self.stats["requests"] += 1
                    reply = self.handler(msg)
                    if reply is not None:
                        writer.append(reply)
                        self.stats["replies"] += 1
                    if len(writer) + conn.backlog() > self.max_pending_bytes:
                        conn.paused = True
                        break
            except FrameTooLarge as exc:
                self.stats["errors"] += 1
                if self.on_too_large is not None:
                    reply = self.on_too_large(exc)
                    if reply is not None:
                        writer.append(reply)
                        self.stats["replies"] += 1
                conn.eof_after_send = True
            if len(writer):
                self._queue_send(conn, writer.take())
        except Exception:
            log.exception("io_uring control server: handler failed; closing the connection")
            self.stats["errors"] += 1
            writer.take()
            self._shutdown(conn)
            return
        if conn.closing:
            return
        if conn.eof_after_send:
            if conn.sending is None:
                self._shutdown(conn)
            return
        if not conn.paused and conn.recv_ud == 0:
            self._arm_recv(conn)

    # -- send --
    def _queue_send(self, conn: _Conn, data: bytes) -> None:
        if conn.sending is None:
            self._start_send(conn, data)
        else:
            conn.pending.append(data)
            conn.pending_bytes += len(data)

    def _start_send(self, conn: _Conn, data: bytes) -> None:
        conn.sending = data
        conn.send_ud = self.loop.send(conn.fd, data, lambda res, flags: self._on_send(conn, res))

    def _on_send(self, conn: _Conn, res: int) -> None:
        conn.send_ud = 0
        data, conn.sending = conn.sending, None
        if conn.closing:
            self._maybe_release(conn)
            return
        if res == -errno.EAGAIN and data is not None:
            self._start_send(conn, data)
            return
        if res < 0 or data is None:  # EPIPE, ECONNRESET: the peer is gone
            if res != -errno.ECANCELED:
                self.stats["errors"] += 1
            self._shutdown(conn)
            return
        if res < len(data):  # a short send: the rest goes next
            self._start_send(conn, data[res:])
            return
        if conn.pending:
            batch = b"".join(conn.pending)
            conn.pending.clear()
            conn.pending_bytes = 0
            self._start_send(conn, batch)
            return
        if conn.eof_after_send:
            self._shutdown(conn)
        elif conn.paused:
            self._serve(conn)  # the backlog drained: answer what is still buffered

    # -- close --
    def _shutdown(self, conn: _Conn) -> None:
        """End a connection: cancel what is in flight on it, then close its fd."""
        if conn.closing:
            return
        conn.closing = True
        self.conns.pop(conn.fd, None)
        self._cancel_io(conn)
        self._maybe_release(conn)

    def _cancel_io(self, conn: _Conn) -> None:
        # By user_data rather than by fd: IORING_ASYNC_CANCEL_FD needs Linux 5.19.
        for ud in (conn.recv_ud, conn.send_ud):
            if ud:
                self.loop.cancel(ud)

    def _maybe_release(self, conn: _Conn) -> None:
        if conn.recv_ud or conn.send_ud or conn.fd < 0:
            return
        fd, conn.fd = conn.fd, -1
        conn.pending.clear()
        self.stats["closed"] += 1
        if self._closed:
            os.close(fd)
            return
        self._closing_fds.add(fd)
        self.loop.close_fd(fd, lambda res, flags: self._closing_fds.discard(fd))

    def close(self) -> None:
        """Stop accepting, end every connection, close the ring (if this server made it), the
        accepted fds and (``close_listener``) the listening socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        loop = self.loop
        conns = list(self.conns.values())
        self.conns.clear()
        try:
            if not loop.closed:
                if self._accept_ud:
                    with contextlib.suppress(Exception):
                        loop.cancel(self._accept_ud)
                for conn in conns:
                    conn.closing = True
                    with contextlib.suppress(Exception):
                        self._cancel_io(conn)
                # Let the cancellations (and ring-side closes) complete before the fds go.
                deadline = time.monotonic() + loop.close_timeout_s
                while time.monotonic() < deadline and (
                    self._accept_ud
                    or self._closing_fds
                    or any(c.recv_ud or c.send_ud for c in conns)
                ):
                    loop.wait(0.05)
        finally:
            if self._own_loop:
                loop.close()
            for conn in conns:
                if conn.fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(conn.fd)
                    conn.fd = -1
            if self.close_listener:
                self.sock.close()

    def __enter__(self) -> UringControlServer[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
