"""An asyncio byte stream over a non-blocking socket that keeps reading after a write failed.

asyncio's transports close the whole connection on the first failed write: once a send hits a
connection the daemon has closed (EPIPE), whatever the daemon sent before closing (typically the
``Error`` that says why) is dropped, and a ``StreamReader`` raises the stored error before the
bytes it had buffered. :class:`AsyncSocket` treats the two directions apart: a failed write
closes the writing side only, and reading goes on until the daemon's end of file, so the client
receives every message the daemon sent.

Threading model: one event loop (asyncio's or uvloop); every method is called from it.

Reading: a reader callback reads into the caller's :class:`~ipc.framing.FrameReader` as bytes
arrive, and stops (``pause``) once ``READ_HIGH`` unparsed bytes are buffered, until the caller
waits for more. A reset counts as the end of the stream.

Writing: ``write`` sends at once what the socket takes and buffers the rest, flushed by a writer
callback; ``drain`` waits while more than ``WRITE_HIGH`` bytes are buffered. Cancelling a wait
loses no data: bytes move only in the callbacks.

Closing: ``close`` flushes what is buffered for at most ``linger_s`` seconds, then closes;
``abort`` closes at once (with unread bytes in the receive queue, Linux resets the connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

from daemon.errors import ConnectionClosed
from ipc.framing import FrameReader

READ_HIGH = 256 * 1024  # unparsed bytes at which reading pauses until the caller catches up
WRITE_HIGH = 64 * 1024  # buffered bytes above which drain() waits
WRITE_LOW = 16 * 1024  # ... until the buffer is down to this


async def connect_unix(path: str) -> socket.socket:
    """A non-blocking Unix stream socket connected to ``path`` (OSError if it cannot be)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, path)
    except BaseException:
        sock.close()
        raise
    return sock


class AsyncSocket:
    """One connected, non-blocking stream socket driven by the running event loop."""

    def __init__(self, sock: socket.socket, frames: FrameReader[Any]) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._frames = frames
        self._loop = asyncio.get_running_loop()
        self._out = bytearray()
        self._write_error: str | None = None  # why the writing side is closed
        self._reading = False
        self._writing = False
        self._read_waiters: list[asyncio.Future[None]] = []
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.closed = False
        #: Nothing more will arrive: end of file, a reset, or our own close.
        self.eof = False
        #: ``time.monotonic()`` of the latest read that brought bytes.
        self.last_rx = 0.0
        self._resume()

    def fileno(self) -> int:
        return self._fd

    # --- reading ------------------------------------------------------------------------------

    def _resume(self) -> None:
        if not self._reading and not self.eof:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def pause_reading(self) -> None:
        """Stop reading: what the peer sends stays in the socket until the next wait."""
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _on_readable(self) -> None:
        try:
            n = self._sock.recv_into(self._frames.get_buffer())
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0  # reset by the peer: what arrived before stays buffered
        if n:
            self._frames.buffer_updated(n)
            self.last_rx = time.monotonic()
            if self._frames.pending() >= READ_HIGH:
                self.pause_reading()
        else:
            self.pause_reading()
            self.eof = True
        self._wake_readers()

    def _wake_readers(self) -> None:
        waiters, self._read_waiters = self._read_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def wait_readable(self, timeout: float | None) -> bool:
        """Until more bytes are buffered or the stream ended; ``False`` on timeout."""
        if self.eof:
            return True
        self._resume()
        waiter = self._loop.create_future()
        self._read_waiters.append(waiter)
        try:
            if timeout is None:
                await waiter
            else:
                async with asyncio.timeout(timeout):
                    await waiter
        except TimeoutError:
            return False
        finally:
            if waiter in self._read_waiters:  # timed out or cancelled: nothing to wake
                self._read_waiters.remove(waiter)
        return True

    # --- writing ------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` (buffering what the socket does not take now), in order.

        Raises :class:`~daemon.errors.ConnectionClosed` once the writing side
        is closed (by a failed send, or by us)."""
        if self._write_error is not None:
            raise ConnectionClosed(self._write_error)
        if not data:
            return
        if self._out:
            self._out += data
            return
        try:
            n = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self._fail_write(exc)
            raise ConnectionClosed(self._write_error or "") from None
        if n < len(data):
            self._out += memoryview(data)[n:]
            self._loop.add_writer(self._fd, self._on_writable)
            self._writing = True

    def _on_writable(self) -> None:
        try:
            n = self._sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail_write(exc)
            return
        del self._out[:n]
        if not self._out:
            self._stop_writing()
        if len(self._out) <= WRITE_LOW:
            self._wake_drain(None)

    def _stop_writing(self) -> None:
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def _fail_write(self, exc: OSError) -> None:
        self._write_error = f"asrd closed the connection: {exc}"
        self._out.clear()
        self._stop_writing()
        self._wake_drain(ConnectionClosed(self._write_error))

    def _wake_drain(self, exc: BaseException | None) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                if exc is None:
                    w.set_result(None)
                else:
                    w.set_exception(exc)

    async def drain(self) -> None:
        """Until at most ``WRITE_HIGH`` bytes wait to be sent; raises like :meth:`write`."""
        if self._write_error is not None:
            raise ConnectionClosed(self._write_error)
        if len(self._out) > WRITE_HIGH:
            await self._written()

    async def _written(self) -> None:
        """Until the buffer is down to ``WRITE_LOW`` bytes; raises if the write failed."""
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._drain_waiters:  # cancelled: nothing to wake
                self._drain_waiters.remove(waiter)

    async def _flush(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError, ConnectionClosed):
            async with asyncio.timeout(timeout):
                while self._out:
                    await self._written()

    async def write_eof(self, timeout: float = 10.0) -> None:
        """Send what is buffered (for at most ``timeout`` s), then shut the sending side."""
        await self._flush(timeout)
        self._write_error = self._write_error or "the client shut the sending side"
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    # --- closing ------------------------------------------------------------------------------

    async def close(self, linger_s: float = 10.0) -> None:
        """Send what is buffered (for at most ``linger_s`` s), then close the socket."""
        if self.closed:
            return
        self.pause_reading()
        try:
            await self._flush(linger_s)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close now, dropping unsent bytes."""
        if self.closed:
            return
        self.closed = self.eof = True
        self.pause_reading()
        self._stop_writing()
        self._out.clear()
        self._write_error = self._write_error or "the client closed this connection"
        self._wake_drain(ConnectionClosed(self._write_error))
        self._wake_readers()
        self._sock.close()
