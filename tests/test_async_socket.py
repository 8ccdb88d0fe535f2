"""AsyncSocket over a real socketpair, on asyncio's loop and on uvloop: a failed write closes
only the writing side, every byte the peer sent before closing is still read, waits can be
cancelled without losing bytes, and both directions apply backpressure."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop

from daemon.errors import ConnectionClosed
from ipc import async_socket
from ipc.async_socket import AsyncSocket
from ipc.framing import FrameReader, FrameWriter
from ipc.protocol import Pong, ServerMessage

pytestmark = pytest.mark.timeout(30)
Run = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    if request.param == "uvloop":
        return uvloop.run  # type: ignore[no-any-return]
    return asyncio.run


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def frames() -> FrameReader[ServerMessage]:
    return FrameReader(ServerMessage, 1 << 20, initial_bytes=4096)  # a read takes >= 4 KiB


def pongs(*ids: int) -> bytes:
    w = FrameWriter()
    for i in ids:
        w.append(Pong(id=i))
    return bytes(w.take())


async def read_all(conn: AsyncSocket, reader: FrameReader[ServerMessage]) -> list[object]:
    got: list[object] = []
    while True:
        got.extend(reader)
        if conn.eof:
            return got
        assert await conn.wait_readable(5.0)


def test_a_failed_write_keeps_what_the_peer_sent_before_closing(
    run: Run, pair: tuple[socket.socket, socket.socket]
) -> None:
    ours, peer = pair
    peer.sendall(pongs(1, 2))
    peer.close()  # the peer said its last and went away; we have read nothing yet

    async def main() -> list[object]:
        reader = frames()
        conn = AsyncSocket(ours, reader)
        conn.pause_reading()  # a busy client: nothing read before it sends
        with pytest.raises(ConnectionClosed, match="Broken pipe"):
            conn.write(b"x" * 10)
        with pytest.raises(ConnectionClosed):
            conn.write(b"more")  # the writing side stays closed
        with pytest.raises(ConnectionClosed):
            await conn.drain()
        got = await read_all(conn, reader)
        await conn.close()
        return got

    assert run(main()) == [Pong(id=1), Pong(id=2)]


def test_a_cancelled_wait_loses_no_bytes(
    run: Run, pair: tuple[socket.socket, socket.socket]
) -> None:
    ours, peer = pair

    async def main() -> list[object]:
        reader = frames()
        conn = AsyncSocket(ours, reader)
        assert not await conn.wait_readable(0.01)  # nothing yet: a timeout, not an error
        waiting = asyncio.ensure_future(conn.wait_readable(None))
        await asyncio.sleep(0)
        waiting.cancel()
        peer.sendall(pongs(7))
        peer.close()
        got = await read_all(conn, reader)
        await conn.close()
        return got

    assert run(main()) == [Pong(id=7)]


def test_reading_pauses_when_the_caller_falls_behind_and_resumes_when_it_waits(
    run: Run, pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, peer = pair
    monkeypatch.setattr(async_socket, "READ_HIGH", 1000)
    burst = pongs(*range(2000))  # several reads' worth, and within the socket's buffer

    async def main() -> list[object]:
        reader = frames()
        conn = AsyncSocket(ours, reader)
        peer.sendall(burst)
        peer.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while reader.pending() < 1000:  # read in the background up to the mark...
            assert loop.time() < deadline
            await asyncio.sleep(0.005)
        for _ in range(20):
            await asyncio.sleep(0.005)
        # ... and no further while nobody waits: the rest stays in the socket.
        assert 1000 <= reader.pending() < len(burst)
        assert not conn.eof
        got = await read_all(conn, reader)
        await conn.close()
        return got

    assert run(main()) == [Pong(id=i) for i in range(2000)]


def test_drain_waits_for_a_slow_peer_and_close_flushes(
    run: Run, pair: tuple[socket.socket, socket.socket]
) -> None:
    ours, peer = pair
    big = bytes(range(256)) * 4096  # 1 MiB: far more than the socket buffers hold
    received = bytearray()

    async def main() -> None:
        conn = AsyncSocket(ours, frames())
        loop = asyncio.get_running_loop()

        def consume() -> None:
            try:
                data = peer.recv(65536)
            except BlockingIOError:
                return
            if data:
                received.extend(data)
            else:
                loop.remove_reader(peer.fileno())

        conn.write(big)
        drained = asyncio.ensure_future(conn.drain())
        await asyncio.sleep(0.05)
        assert not drained.done()  # nobody reads the other end yet
        peer.setblocking(False)
        loop.add_reader(peer.fileno(), consume)
        await asyncio.wait_for(drained, 10)
        conn.write(b"end")
        await conn.close()
        assert conn.closed
        with pytest.raises(ConnectionClosed, match="the client closed this connection"):
            conn.write(b"after")
        deadline = loop.time() + 10
        while len(received) < len(big) + 3:
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        loop.remove_reader(peer.fileno())

    run(main())
    assert received == big + b"end"


def test_close_gives_up_on_a_peer_that_never_reads(
    run: Run, pair: tuple[socket.socket, socket.socket]
) -> None:
    ours, _peer = pair

    async def main() -> None:
        conn = AsyncSocket(ours, frames())
        conn.write(b"x" * (4 << 20))
        await conn.close(linger_s=0.05)
        assert conn.closed and conn.eof

    run(main())
    assert ours.fileno() == -1
