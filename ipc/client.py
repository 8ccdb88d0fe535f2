"""Client library for asrd: a blocking :class:`Client`, an asyncio :class:`AsyncClient` and a
:class:`ControlClient` for the control socket.

The wire protocol is described in ``docs/protocol.md``. Both clients speak it the same way:

- one :class:`~ipc.framing.FrameWriter` and one :class:`~ipc.framing.FrameReader` per connection;
- ``Hello`` is sent on connect and ``Welcome`` awaited; its ``limits.max_frame_bytes`` bounds
  every frame sent afterwards (audio above it is split into several ``Audio`` messages);
- ``Audio.seq`` is numbered per stream from 0 when the caller does not give it;
- messages the caller did not ask for (other streams, pongs) are kept, in order, for the next
  ``recv()``; frames of a message type this version does not know are skipped (a newer daemon
  may send more types, see "Versioning" in the protocol document);
- ``unknown_stream`` errors for a stream the daemon has already ended (audio that was in flight
  when it sent the ``Error`` or ``Closed``) are dropped until that id is ``Started`` again.

Errors are :class:`~daemon.errors.ClientError`; an ``Error`` message from the daemon is raised
as :class:`DaemonError` (a ``ClientError`` carrying the message). Codes raised by the client
itself, never sent on the wire, are ``no_daemon``, ``permission_denied``, ``connection_closed``,
``timeout`` and ``protocol_violation``.

One thread (or task) receives per connection; sending from several threads is safe on the
blocking client (a lock keeps frames whole), and from several tasks on the async one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from typing import Final as TFinal

import msgspec

from daemon.config import Config
from daemon.errors import ClientError, ConnectionClosed
from ipc.async_socket import AsyncSocket, connect_unix
from ipc.control import ControlError, ControlReply, Status, StatusRequest
from ipc.framing import BadFrame, FrameReader, FrameTooLarge, FrameWriter
from ipc.protocol import (
    PROTOCOL_VERSION,
    Audio,
    Cancel,
    Closed,
    Error,
    ErrorCode,
    Final,
    Finish,
    Hello,
    Limits,
    Ping,
    Pong,
    ServerMessage,
    Start,
    Started,
    VadOverrides,
    Welcome,
)

__all__ = [
    "STREAM_ENDING_CODES",
    "AsyncClient",
    "Client",
    "ClientError",
    "ConnectionClosed",
    "ControlClient",
    "DaemonError",
    "default_control_socket_path",
    "default_socket_path",
    "transcribe",
]

# Client-side error codes (never on the wire; wire codes are in ipc.protocol.ErrorCode).
NO_DAEMON: TFinal = "no_daemon"
PERMISSION_DENIED: TFinal = "permission_denied"
CONNECTION_CLOSED: TFinal = "connection_closed"
TIMEOUT: TFinal = "timeout"
PROTOCOL_VIOLATION: TFinal = "protocol_violation"

# Daemon frames are results, far below this; the cap only guards against a garbage length
# prefix making us buffer without bound.
READ_LIMIT = 64 * 1024 * 1024
RECV_BYTES = 256 * 1024
ENDED_MEMORY = 10_000  # ended stream ids remembered to drop late unknown_stream errors

#: Codes of an ``Error`` after which the daemon sends nothing more for an open stream (no
#: ``Closed``). Other codes about an open stream concern one message (the chunk was dropped, or
#: audio arrived during shutdown) and the stream goes on to its ``Closed``. Any ``Error`` for a
#: stream before its ``Started`` means the ``Start`` was refused.
STREAM_ENDING_CODES = frozenset(
    {
        ErrorCode.WORKER_RESTARTED,
        ErrorCode.INTERNAL,
    }
)

PcmLike = bytes | bytearray | memoryview
EventCallback = Callable[[ServerMessage], None]


class DaemonError(ClientError):
    """The daemon sent an ``Error``; ``error`` is the message (``retry_after_ms`` included).

    From ``transcribe()``, ``finals`` holds the results the stream produced before it failed.
    """

    def __init__(self, error: Error, finals: list[Final] | None = None) -> None:
        super().__init__(error.code, error.message, error.stream)
        self.error = error
        self.retry_after_ms = error.retry_after_ms
        self.finals: list[Final] = finals or []


def default_socket_path() -> Path:
    """``$ASRD_SOCKET``, else the socket of the default configuration."""
    env = os.environ.get("ASRD_SOCKET")
    return Path(env) if env else Config().socket_path()


def default_control_socket_path() -> Path:
    """``$ASRD_CONTROL_SOCKET``, else the control socket of the default configuration."""
    env = os.environ.get("ASRD_CONTROL_SOCKET")
    return Path(env) if env else Config().control_socket_path()


def _connect_error(path: str, exc: OSError, what: str = "asrd") -> ClientError:
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
        # A socket file with nobody behind it (refused) is a daemon that died uncleanly.
        return ClientError(NO_DAEMON, f"no {what} listening on {path}: start it with `asrd run`")
    if isinstance(exc, PermissionError):
        return ClientError(
            PERMISSION_DENIED,
            f"permission denied on {path}: the socket's group (socket_mode) must include you",
        )
    if isinstance(exc, TimeoutError):
        return ClientError(TIMEOUT, f"timed out connecting to {path}")
    return ClientError(NO_DAEMON, f"cannot connect to {what} on {path}: {exc}")


def _audio_overhead(stream: str) -> int:
    """Largest encoded size of an ``Audio`` message for ``stream`` minus its PCM bytes."""
    empty = len(msgspec.msgpack.encode(Audio(stream=stream, seq=0, pcm=b"")))
    # seq 0 is a 1-byte fixint (an int64 takes 9); an empty bin is 2 bytes (bin32 header is 5).
    return empty - 1 + 9 - 2 + 5


def _check_welcome(msg: ServerMessage | BadFrame | None, path: str) -> Welcome:
    if isinstance(msg, Welcome):
        if msg.protocol != PROTOCOL_VERSION:
            raise ClientError(
                ErrorCode.UNSUPPORTED_PROTOCOL,
                f"asrd on {path} speaks protocol {msg.protocol}, this client {PROTOCOL_VERSION}",
            )
        return msg
    if isinstance(msg, Error):
        raise DaemonError(msg)
    raise ClientError(PROTOCOL_VIOLATION, f"expected Welcome from {path}, got {msg!r}")


class _Framing:
    """State shared by both clients: frame codec, limits, per-stream sequence numbers."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._writer = FrameWriter()
        self._reader: FrameReader[ServerMessage] = FrameReader(ServerMessage, READ_LIMIT)
        self._pending: deque[ServerMessage] = deque()
        self._seq: dict[str, int] = {}
        self._overhead: dict[str, int] = {}
        # Streams the daemon ended (Closed, or an Error), oldest first.
        self._ended: dict[str, None] = {}
        self.welcome: Welcome | None = None
        self.max_frame_bytes = 0
        #: ``time.monotonic()`` of the latest socket read: when the newest message arrived.
        self.last_rx = 0.0

    @property
    def limits(self) -> Limits:
        assert self.welcome is not None
        return self.welcome.limits

    def _set_welcome(self, welcome: Welcome) -> None:
        self.welcome = welcome
        self.max_frame_bytes = welcome.limits.max_frame_bytes

    def _next_frame(self) -> ServerMessage | None:
        """The next complete message already buffered, if any."""
        while True:
            try:
                item = next(self._reader, None)
            except FrameTooLarge as exc:
                msg = f"asrd sent an oversized frame: {exc}"
                raise ClientError(PROTOCOL_VIOLATION, msg) from None
            if item is None:
                return None
            if isinstance(item, BadFrame):
                if item.code == ErrorCode.UNKNOWN_MESSAGE:
                    continue  # a message type from a newer protocol revision: ignore it
                raise ClientError(PROTOCOL_VIOLATION, f"undecodable frame from asrd: {item}")
            ended = item.stream if isinstance(item, Closed | Error) else None
            if isinstance(item, Started):
                # Errors about audio sent before this Start all came before it.
                self._ended.pop(item.stream, None)
            elif isinstance(item, Error) and item.code == ErrorCode.UNKNOWN_STREAM:
                if item.stream in self._ended:
                    # Audio that was in flight when the daemon ended the stream: noise.
                    continue
            elif ended is not None:
                # Any stream error may have ended (or refused) the stream; if it did not, no
                # unknown_stream can follow for it while it is open anyway.
                self._ended[ended] = None
                if len(self._ended) > ENDED_MEMORY:
                    del self._ended[next(iter(self._ended))]
            return item

    def _audio_frames(self, stream: str, pcm: PcmLike, seq: int | None) -> int:
        """Append the ``Audio`` frames for ``pcm`` to the writer; return the last seq used."""
        if seq is None:
            seq = self._seq.get(stream, -1) + 1
        overhead = self._overhead.get(stream)
        if overhead is None:
            overhead = self._overhead[stream] = _audio_overhead(stream)
        # Whole samples per piece, so no piece has an odd byte count.
        piece = (self.max_frame_bytes - overhead) & ~1
        if piece <= 0:
            raise ClientError(PROTOCOL_VIOLATION, f"stream id {stream!r} leaves no room for audio")
        data = pcm if isinstance(pcm, bytes) else bytes(pcm)
        n = len(data)
        if n <= piece:
            self._writer.append(Audio(stream=stream, seq=seq, pcm=data))
        else:
            for off in range(0, n, piece):
                self._writer.append(Audio(stream=stream, seq=seq, pcm=data[off : off + piece]))
                seq += 1
            seq -= 1
        self._seq[stream] = seq
        return seq

    def _start_msg(
        self, stream: str, sample_rate: int, interim: bool, vad: VadOverrides | None
    ) -> Start:
        # A new incarnation of an id numbers its audio from 0 again.
        self._seq[stream] = -1
        return Start(stream=stream, sample_rate=sample_rate, interim=interim, vad=vad)

    def last_seq(self, stream: str) -> int:
        """The seq of the latest ``Audio`` sent on ``stream`` (-1 before any)."""
        return self._seq.get(stream, -1)


def _chunk_bytes(sample_rate: int, chunk_ms: int) -> int:
    return max(2, sample_rate * chunk_ms // 1000 * 2)


class _StreamCollector:
    """The receive side of ``transcribe()`` for one stream: routes, collects and ends."""

    def __init__(self, stream: str, on_event: EventCallback | None) -> None:
        self.stream = stream
        self.on_event = on_event
        self.finals: list[Final] = []
        self.started = False
        self.closed = False
        self.error: Error | None = None  # the first non-fatal error of the stream
        self.other: list[ServerMessage] = []

    def handle(self, msg: ServerMessage) -> None:
        if getattr(msg, "stream", None) != self.stream:
            if isinstance(msg, Error) and msg.stream is None:
                raise DaemonError(msg, self.finals)  # about the connection, so this stream too
            self.other.append(msg)  # someone else's: handed back to recv() afterwards
            return
        if not self.started and not isinstance(msg, Started | Error):
            return  # anything for this id before Started belongs to an earlier stream
        if self.on_event:
            self.on_event(msg)
        if isinstance(msg, Started):
            self.started = True
        elif isinstance(msg, Final):
            self.finals.append(msg)
        elif isinstance(msg, Closed):
            self.closed = True
            if self.error is not None:
                raise DaemonError(self.error, self.finals)
        elif isinstance(msg, Error):
            if not self.started or msg.code in STREAM_ENDING_CODES:
                raise DaemonError(msg, self.finals)
            # The stream goes on to its Closed (e.g. audio refused during shutdown): keep the
            # results that still come, then report the error.
            if self.error is None:
                self.error = msg


class Client(_Framing):
    """Blocking client for one connection. Create it with :meth:`connect`."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        super().__init__(path)
        self._eof = False
        self._sock = sock
        self._send_lock = threading.Lock()
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)

    # --- connection -------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        client_name: str = "",
        timeout: float = 10.0,
    ) -> Client:
        """Connect, send ``Hello`` and wait (up to ``timeout`` s) for ``Welcome``."""
        spath = os.fspath(path) if path is not None else str(default_socket_path())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(spath)
        except OSError as exc:
            sock.close()
            raise _connect_error(spath, exc) from None
        # Blocking sends: a send timeout could cut a frame in half. Receives poll with deadlines.
        sock.settimeout(None)
        client = cls(sock, spath)
        try:
            client._send(Hello(protocol=PROTOCOL_VERSION, client=client_name))
            msg = client.recv(timeout)
            if msg is None:
                raise ClientError(TIMEOUT, f"no Welcome from {spath} within {timeout} s")
            client._set_welcome(_check_welcome(msg, spath))
        except BaseException:
            client.close()
            raise
        return client

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    # --- sending ----------------------------------------------------------------------------

    def _flush(self) -> None:
        # Caller holds the lock.
        data = self._writer.take()
        try:
            self._sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ConnectionClosed(f"asrd closed the connection: {exc.strerror}") from None

    def _send(self, msg: Any) -> None:
        with self._send_lock:
            self._writer.append(msg)
            self._flush()

    def start(
        self,
        stream: str,
        sample_rate: int = 16000,
        *,
        interim: bool = True,
        vad: VadOverrides | None = None,
        wait: bool = False,
        timeout: float | None = 10.0,
    ) -> Started | None:
        """Send ``Start``; with ``wait`` block until ``Started`` (an ``Error`` raises)."""
        self._send(self._start_msg(stream, sample_rate, interim, vad))
        if not wait:
            return None

        def match(m: ServerMessage) -> bool:
            return isinstance(m, Started | Error) and m.stream == stream

        msg = self.wait_for(match, timeout)
        if msg is None:
            raise ClientError(TIMEOUT, f"no Started for stream {stream!r} within {timeout} s")
        if isinstance(msg, Error):
            raise DaemonError(msg)
        assert isinstance(msg, Started)
        return msg

    def send_audio(self, stream: str, pcm: PcmLike, seq: int | None = None) -> int:
        """Send PCM (s16le mono) on ``stream``; returns the seq of the last ``Audio`` sent.

        ``seq`` defaults to one more than the stream's previous. Audio larger than one frame
        goes out as several consecutive ``Audio`` messages (consecutive seqs). Empty ``pcm``
        sends nothing.
        """
        if not len(pcm):
            return self.last_seq(stream)
        with self._send_lock:
            last = self._audio_frames(stream, pcm, seq)
            self._flush()
        return last

    def finish(self, stream: str) -> None:
        self._send(Finish(stream=stream))

    def cancel(self, stream: str) -> None:
        self._send(Cancel(stream=stream))

    def ping(self, id: int = 0, *, wait: bool = True, timeout: float | None = 10.0) -> float:
        """Send ``Ping``; with ``wait`` return the round trip in seconds once ``Pong`` is back."""
        t0 = time.perf_counter()
        self._send(Ping(id=id))
        if not wait:
            return 0.0
        msg = self.wait_for(lambda m: isinstance(m, Pong) and m.id == id, timeout)
        if msg is None:
            raise ClientError(TIMEOUT, f"no Pong within {timeout} s")
        return time.perf_counter() - t0

    # --- receiving --------------------------------------------------------------------------

    def recv(self, timeout: float | None = None) -> ServerMessage | None:
        """The next message; ``None`` if none arrived within ``timeout`` seconds.

        Raises :class:`ConnectionClosed` once the daemon has closed the connection and every
        message it sent before has been returned.
        """
        if self._pending:
            return self._pending.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            msg = self._next_frame()
            if msg is not None:
                return msg
            if self._eof:
                raise ConnectionClosed()
            if deadline is None:
                wait_ms = -1
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                wait_ms = max(1, int(left * 1000 + 0.999))
            if not self._poll.poll(wait_ms):
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            try:
                # Straight into the reader's buffer: no copy per read.
                n = self._sock.recv_into(self._reader.get_buffer(RECV_BYTES))
            except ConnectionResetError:
                n = 0
            self.last_rx = time.monotonic()
            if n:
                self._reader.buffer_updated(n)
            else:
                self._eof = True

    def wait_for(
        self, pred: Callable[[ServerMessage], bool], timeout: float | None = None
    ) -> ServerMessage | None:
        """Receive until ``pred`` matches; other messages stay queued, in order, for ``recv``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        stash: list[ServerMessage] = []
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                msg = self.recv(left)
                if msg is None:
                    return None
                if pred(msg):
                    return msg
                stash.append(msg)
        finally:
            self._pending.extendleft(reversed(stash))

    def __iter__(self) -> Iterator[ServerMessage]:
        """Every incoming message until the daemon closes the connection."""
        while True:
            try:
                msg = self.recv()
            except ConnectionClosed:
                return
            if msg is not None:
                yield msg

    # --- whole streams ----------------------------------------------------------------------

    def transcribe(
        self,
        pcm: PcmLike,
        sample_rate: int = 16000,
        *,
        stream: str = "s",
        chunk_ms: int = 100,
        realtime: bool = False,
        interim: bool = True,
        vad: VadOverrides | None = None,
        on_event: EventCallback | None = None,
        timeout: float | None = None,
    ) -> list[Final]:
        """Run one stream from ``Start`` to ``Closed`` and return its ``Final`` results.

        Audio goes out in ``chunk_ms`` chunks from a sender thread (paced in real time with
        ``realtime``) while this thread receives, so a long input cannot deadlock against full
        socket buffers. ``on_event`` sees every message of the stream. An ``Error`` for the
        stream (or for the connection) raises :class:`DaemonError` (at once when it ends the stream,
        else once the stream is closed; ``finals`` has what came before). ``timeout`` bounds the
        wait for any message of the stream once all audio is sent (``None``: no bound).
        """
        if len(pcm) % 2:
            raise ClientError(ErrorCode.ODD_BYTE_COUNT, "PCM s16le needs an even byte count")
        data = pcm if isinstance(pcm, bytes) else bytes(pcm)
        step = _chunk_bytes(sample_rate, chunk_ms)
        stop = threading.Event()
        sent = threading.Event()
        failure: list[BaseException] = []
        self.start(stream, sample_rate, interim=interim, vad=vad)

        def sender() -> None:
            try:
                t0 = time.monotonic()
                for i, off in enumerate(range(0, len(data), step)):
                    if realtime:
                        delay = t0 + i * chunk_ms / 1000 - time.monotonic()
                        if delay > 0 and stop.wait(delay):
                            return
                    if stop.is_set():
                        return
                    self.send_audio(stream, data[off : off + step])
                self.finish(stream)
            except BaseException as exc:
                failure.append(exc)
            finally:
                sent.set()

        thread = threading.Thread(target=sender, name=f"asrd-send-{stream}", daemon=True)
        collector = _StreamCollector(stream, on_event)
        thread.start()
        try:
            last_activity = time.monotonic()
            while not collector.closed:
                if failure:
                    raise failure[0]
                if not sent.is_set():
                    # Wake up now and then to notice a sender failure.
                    wait: float | None = 0.25
                elif timeout is None:
                    wait = None
                else:
                    wait = last_activity + timeout - time.monotonic()
                    if wait <= 0:
                        raise ClientError(
                            TIMEOUT, f"stream {stream!r}: nothing from asrd for {timeout} s"
                        )
                msg = self.recv(wait)
                if msg is None:
                    continue
                if getattr(msg, "stream", None) == stream:
                    last_activity = time.monotonic()
                collector.handle(msg)
        finally:
            stop.set()
            thread.join(5.0)
            self._pending.extendleft(reversed(collector.other))
        return collector.finals


def transcribe(
    pcm: PcmLike,
    sample_rate: int = 16000,
    *,
    path: str | os.PathLike[str] | None = None,
    client_name: str = "transcribe",
    **kwargs: Any,
) -> list[Final]:
    """Connect, run :meth:`Client.transcribe` once and close."""
    with Client.connect(path, client_name=client_name) as client:
        return client.transcribe(pcm, sample_rate, **kwargs)


class AsyncClient(_Framing):
    """asyncio client for one connection. Create it with ``await AsyncClient.connect()``."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        """Take over a connected socket (``connect`` makes one and says hello)."""
        super().__init__(path)
        self._conn = AsyncSocket(sock, self._reader)

    @classmethod
    async def connect(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        client_name: str = "",
        timeout: float = 10.0,
    ) -> AsyncClient:
        """Connect, send ``Hello`` and wait (up to ``timeout`` s) for ``Welcome``."""
        spath = os.fspath(path) if path is not None else str(default_socket_path())
        try:
            async with asyncio.timeout(timeout):
                sock = await connect_unix(spath)
        except OSError as exc:
            raise _connect_error(spath, exc) from None
        client = cls(sock, spath)
        try:
            await client._send(Hello(protocol=PROTOCOL_VERSION, client=client_name))
            msg = await client.recv(timeout)
            if msg is None:
                raise ClientError(TIMEOUT, f"no Welcome from {spath} within {timeout} s")
            client._set_welcome(_check_welcome(msg, spath))
        except BaseException:
            await client.close()
            raise
        return client

    async def close(self) -> None:
        """Send what is still buffered (for at most 10 s), then close the connection."""
        await self._conn.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- sending ----------------------------------------------------------------------------

    async def _flush(self) -> None:
        # write() is synchronous, so frames from concurrent tasks never interleave.
        self._conn.write(self._writer.take())
        await self._conn.drain()

    async def _send(self, msg: Any) -> None:
        self._writer.append(msg)
        await self._flush()

    async def start(
        self,
        stream: str,
        sample_rate: int = 16000,
        *,
        interim: bool = True,
        vad: VadOverrides | None = None,
        wait: bool = False,
        timeout: float | None = 10.0,
    ) -> Started | None:
        """Send ``Start``; with ``wait`` wait for ``Started`` (an ``Error`` raises)."""
        await self._send(self._start_msg(stream, sample_rate, interim, vad))
        if not wait:
            return None

        def match(m: ServerMessage) -> bool:
            return isinstance(m, Started | Error) and m.stream == stream

        msg = await self.wait_for(match, timeout)
        if msg is None:
            raise ClientError(TIMEOUT, f"no Started for stream {stream!r} within {timeout} s")
        if isinstance(msg, Error):
            raise DaemonError(msg)
        assert isinstance(msg, Started)
        return msg

    async def send_audio(self, stream: str, pcm: PcmLike, seq: int | None = None) -> int:
        """Send PCM on ``stream``; returns the last seq used (see :meth:`Client.send_audio`)."""
        if not len(pcm):
            return self.last_seq(stream)
        last = self._audio_frames(stream, pcm, seq)
        await self._flush()
        return last

    async def finish(self, stream: str) -> None:
        await self._send(Finish(stream=stream))

    async def cancel(self, stream: str) -> None:
        await self._send(Cancel(stream=stream))

    async def ping(self, id: int = 0, *, wait: bool = True, timeout: float | None = 10.0) -> float:
        """Send ``Ping``; with ``wait`` return the round trip in seconds once ``Pong`` is back."""
        t0 = time.perf_counter()
        await self._send(Ping(id=id))
        if not wait:
            return 0.0
        msg = await self.wait_for(lambda m: isinstance(m, Pong) and m.id == id, timeout)
        if msg is None:
            raise ClientError(TIMEOUT, f"no Pong within {timeout} s")
        return time.perf_counter() - t0

    # --- receiving --------------------------------------------------------------------------

    async def recv(self, timeout: float | None = None) -> ServerMessage | None:
        """The next message; ``None`` on timeout; :class:`ConnectionClosed` after the last."""
        if self._pending:
            return self._pending.popleft()
        conn = self._conn
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            msg = self._next_frame()
            if msg is not None:
                self.last_rx = conn.last_rx
                return msg
            if conn.eof:
                raise ConnectionClosed()
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return None
            if not await conn.wait_readable(left):
                return None

    async def wait_for(
        self, pred: Callable[[ServerMessage], bool], timeout: float | None = None
    ) -> ServerMessage | None:
        """Receive until ``pred`` matches; other messages stay queued, in order, for ``recv``."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        stash: list[ServerMessage] = []
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - loop.time())
                msg = await self.recv(left)
                if msg is None:
                    return None
                if pred(msg):
                    return msg
                stash.append(msg)
        finally:
            self._pending.extendleft(reversed(stash))

    def __aiter__(self) -> AsyncIterator[ServerMessage]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[ServerMessage]:
        while True:
            try:
                msg = await self.recv()
            except ConnectionClosed:
                return
            if msg is not None:
                yield msg

    # --- whole streams ----------------------------------------------------------------------

    async def transcribe(
        self,
        pcm: PcmLike,
        sample_rate: int = 16000,
        *,
        stream: str = "s",
        chunk_ms: int = 100,
        realtime: bool = False,
        interim: bool = True,
        vad: VadOverrides | None = None,
        on_event: EventCallback | None = None,
        timeout: float | None = None,
    ) -> list[Final]:
        """Run one stream from ``Start`` to ``Closed``; see :meth:`Client.transcribe`."""
        if len(pcm) % 2:
            raise ClientError(ErrorCode.ODD_BYTE_COUNT, "PCM s16le needs an even byte count")
        data = pcm if isinstance(pcm, bytes) else bytes(pcm)
        step = _chunk_bytes(sample_rate, chunk_ms)
        loop = asyncio.get_running_loop()
        await self.start(stream, sample_rate, interim=interim, vad=vad)

        async def sender() -> None:
            t0 = loop.time()
            for i, off in enumerate(range(0, len(data), step)):
                if realtime:
                    delay = t0 + i * chunk_ms / 1000 - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await self.send_audio(stream, data[off : off + step])
            await self.finish(stream)

        task = asyncio.create_task(sender(), name=f"asrd-send-{stream}")
        collector = _StreamCollector(stream, on_event)
        try:
            last_activity = loop.time()
            while not collector.closed:
                if task.done() and task.exception() is not None:
                    await task  # re-raise the sender's failure
                if not task.done():
                    wait: float | None = 0.25
                elif timeout is None:
                    wait = None
                else:
                    wait = last_activity + timeout - loop.time()
                    if wait <= 0:
                        raise ClientError(
                            TIMEOUT, f"stream {stream!r}: nothing from asrd for {timeout} s"
                        )
                msg = await self.recv(wait)
                if msg is None:
                    continue
                if getattr(msg, "stream", None) == stream:
                    last_activity = loop.time()
                collector.handle(msg)
        finally:
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await task
            self._pending.extendleft(reversed(collector.other))
        return collector.finals


class ControlClient:
    """One-shot requests on the supervisor's control socket."""

    @staticmethod
    def status(path: str | os.PathLike[str] | None = None, *, timeout: float = 5.0) -> Status:
        """Ask for the daemon's :class:`~ipc.control.Status`."""
        spath = os.fspath(path) if path is not None else str(default_control_socket_path())
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(spath)
            except OSError as exc:
                raise _connect_error(spath, exc, "asrd control socket") from None
            try:
                sock.sendall(FrameWriter().encode(StatusRequest()))
                reader: FrameReader[ControlReply] = FrameReader(ControlReply, READ_LIMIT)
                while True:
                    try:
                        item = next(reader, None)
                    except FrameTooLarge as exc:
                        raise ClientError(PROTOCOL_VIOLATION, str(exc)) from None
                    if item is not None:
                        break
                    data = sock.recv(RECV_BYTES)
                    if not data:
                        raise ConnectionClosed("asrd closed the control connection")
                    reader.feed(data)
            except TimeoutError:
                raise ClientError(TIMEOUT, f"no status from {spath} within {timeout} s") from None
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ConnectionClosed(f"asrd closed the control connection: {exc}") from None
        if isinstance(item, BadFrame):
            raise ClientError(PROTOCOL_VIOLATION, f"undecodable control reply: {item}")
        if isinstance(item, ControlError):
            raise ClientError("control_error", item.message)
        return item
