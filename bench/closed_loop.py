"""One stream, one chunk in flight: the daemon's round trip measured the way the floor is.

The client is the floor's client (``bench.floor``): a blocking Unix socket, frames encoded with
:class:`~ipc.framing.FrameWriter` and decoded with one msgspec decoder, no event loop. It opens
one stream and sends 3200-byte ``Audio`` chunks, each after the ``Partial`` of the one before
(a daemon with ``interim_ms = 0`` answers every chunk with a Partial naming its seq, or with the
Final when the chunk reaches ``max_utterance_s`` and ends the utterance), so what is
timed is exactly client -> ingress -> infer -> ingress -> client, with nothing of a load
generator's scheduling in it. ``pace_s`` > 0 waits that long between chunks (real time is
0.1 s), so every chunk finds the daemon's processes asleep.

Used by ``python -m bench latency`` for its 1-stream rows and by ``python -m bench profile``.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import msgspec

from bench.echo import recv_exactly
from bench.load import summarize
from ipc import protocol as p
from ipc.framing import PREFIX, FrameWriter

CHUNK_BYTES = 3200


class _Conn:
    def __init__(self, path: str, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.writer = FrameWriter()
        self.decoder: msgspec.msgpack.Decoder[p.ServerMessage] = msgspec.msgpack.Decoder(
            p.ServerMessage
        )
        self.head = memoryview(bytearray(PREFIX))
        self.body = bytearray(1 << 16)

    def send(self, msg: Any) -> None:
        self.sock.sendall(self.writer.encode(msg))

    def recv(self) -> p.ServerMessage:
        if not recv_exactly(self.sock, self.head):
            raise RuntimeError("closed loop: the daemon closed the connection")
        n = int.from_bytes(self.head, "big")
        if n > len(self.body):
            self.body = bytearray(n)
        view = memoryview(self.body)[:n]
        if not recv_exactly(self.sock, view):
            raise RuntimeError("closed loop: the daemon closed the connection")
        try:
            return self.decoder.decode(view)
        finally:
            view.release()

    def expect(self, kind: type[Any]) -> Any:
        msg = self.recv()
        if isinstance(msg, p.Error):
            raise RuntimeError(f"closed loop: the daemon answered {msg.code}: {msg.message}")
        if not isinstance(msg, kind):
            raise RuntimeError(f"closed loop: expected {kind.__name__}, got {msg!r}")
        return msg


def measure(
    socket_path: str,
    count: int = 5000,
    warmup: int = 200,
    pace_s: float = 0.0,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """``count`` timed chunk round trips (Audio sent -> its Partial received), in µs."""
    conn = _Conn(socket_path, timeout)
    samples: list[float] = []
    try:
        conn.send(p.Hello(protocol=p.PROTOCOL_VERSION))
        conn.expect(p.Welcome)
        conn.send(p.Start(stream="cl", sample_rate=16000))
        lane = conn.expect(p.Started).lane
        pcm = os.urandom(CHUNK_BYTES)
        perf = time.perf_counter_ns
        for seq in range(warmup + count):
            if pace_s:
                time.sleep(pace_s)
            t0 = perf()
            conn.send(p.Audio(stream="cl", seq=seq, pcm=pcm))
            while True:
                msg = conn.recv()
                if (type(msg) is p.Partial and msg.seq == seq) or type(msg) is p.Final:
                    break  # a chunk that reaches max_utterance_s is answered by the Final
                if isinstance(msg, p.Error):
                    raise RuntimeError(f"closed loop: {msg.code}: {msg.message}")
            t1 = perf()
            if seq >= warmup:
                samples.append((t1 - t0) / 1000)
        conn.send(p.Finish(stream="cl"))
        while not isinstance(conn.recv(), p.Closed):
            pass
    finally:
        conn.sock.close()
    s = summarize(samples)
    return {
        "count": count,
        "pace_s": pace_s,
        "lane": lane,
        "p50_us": s["p50"],
        "p90_us": s["p90"],
        "p99_us": s["p99"],
        "max_us": s["max"],
        "mean_us": s["mean"],
    }
