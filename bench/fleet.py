"""A lean load generator: many real-time streams multiplexed per connection, as a gateway does.

``bench.load`` gives every stream its own asyncio task and timer, which is what independent
clients look like, and costs the generator more CPU per chunk than the daemon spends: on a
2-vCPU machine it cannot offer 1,000 real-time streams and leave the daemon a core. This one is
what a media gateway or call-centre bridge looks like: each connection carries
``--per-connection`` streams, and every chunk period it sends one chunk of each of them in one
write (one ``send`` of all their frames). Connections are spread evenly over the period, so the
daemon sees a steady stream of writes rather than bursts.

Per generator process (``--procs``; connections split between them): one thread, one
``selectors`` loop, non-blocking sockets, :class:`~ipc.framing.FrameWriter` /
:class:`~ipc.framing.FrameReader`; no asyncio. Measured on the monotonic clock shared by all
processes:

- chunk round trip: an ``Audio`` chunk sent -> the first ``Partial`` naming its seq or a later
  one (the daemon runs with ``interim_ms = 0`` and the streams ask for VAD off, so every chunk
  is answered: by its own partial, or, when the recognizer fell behind and fed several chunks
  at once, by a later chunk's, counted as ``chunks_coalesced`` with its own, longer, wait);
- final after finish: ``Finish`` sent -> the stream's last ``Final``;
- generator lateness: how late each write left against its schedule, and the generator's own
  CPU per chunk (if lateness grows, the generator is the bottleneck: add ``--procs``);
- daemon CPU per chunk (``bench.load.CpuMeter``), errors by code, chunks answered.

Streams play 16 kHz WAVs (``samples/``) in a loop; ``--wav`` adds others (8 kHz ones cost the
daemon a resampling pass each, about 38 µs per chunk here).

    python -m bench.fleet --socket /run/asrd/asrd.sock --streams 1000 --duration 20
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import selectors
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from bench.load import CpuMeter, GenResult, _role, start_gate, summarize, wavs_at
from daemon.asrctl import load_wav
from ipc import protocol as p
from ipc.client import STREAM_ENDING_CODES
from ipc.framing import FrameReader, FrameWriter

CHUNK_MS = 100


@dataclass
class FleetConfig:
    socket: str
    streams: list[int]  # global stream indexes this process runs
    per_connection: int
    connections_total: int
    duration_s: float
    drain_timeout_s: float
    wavs: list[str]


class _Stream:
    __slots__ = ("chunks", "closed", "finish_t", "id", "sent")

    def __init__(self, sid: str, chunks: list[bytes]) -> None:
        self.id = sid
        self.chunks = chunks
        self.sent: deque[tuple[int, float]] = deque()
        self.finish_t = 0.0
        self.closed = False


class _Conn:
    """One gateway connection: its streams, its schedule and its socket buffers."""

    def __init__(self, index: int, sock: socket.socket, streams: list[_Stream]) -> None:
        self.index = index
        self.sock = sock
        self.streams = {s.id: s for s in streams}
        self.order = streams
        self.reader: FrameReader[p.ServerMessage] = FrameReader(p.ServerMessage, 1 << 24)
        self.writer = FrameWriter()
        self.out = bytearray()
        self.next_t = 0.0
        self.seq = 0
        self.alive = True

    def send(self, data: bytes) -> None:
        if self.out:
            self.out += data
            return
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        if n < len(data):
            self.out += data[n:]

    def pump(self) -> None:
        """Write what an earlier send could not (the daemon was not reading)."""
        if self.out:
            try:
                n = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                return
            del self.out[:n]


def _chunks_of(path: str) -> list[bytes]:
    wav = load_wav(path)
    step = wav.sample_rate * CHUNK_MS // 1000 * 2
    pcm = wav.pcm
    return [pcm[i : i + step] for i in range(0, len(pcm) - step + 1, step)]


def _handshake(conn: _Conn, res: GenResult, deadline: float) -> None:
    """Hello, then Start of every stream (VAD off); wait for Welcome and every Started."""
    w = conn.writer
    w.append(p.Hello(protocol=p.PROTOCOL_VERSION))
    for st in conn.order:
        w.append(p.Start(stream=st.id, sample_rate=16000, vad=p.VadOverrides(enabled=False)))
    conn.sock.sendall(w.take())
    waiting = set(conn.streams)
    while waiting:
        conn.sock.settimeout(max(0.01, deadline - time.monotonic()))
        view = conn.reader.get_buffer()
        n = conn.sock.recv_into(view)
        view.release()
        if n == 0:
            raise ConnectionError("the daemon closed the connection during the handshake")
        conn.reader.buffer_updated(n)
        for msg in conn.reader:
            if type(msg) is p.Started:
                waiting.discard(msg.stream)
                res.streams_started += 1
            elif isinstance(msg, p.Error):
                res.errors[msg.code] += 1
                if msg.stream in waiting:
                    waiting.discard(msg.stream)
                    conn.streams[msg.stream].closed = True
    conn.sock.setblocking(False)


def _on_message(conn: _Conn, msg: Any, t: float, res: GenResult) -> None:
    tp = type(msg)
    if tp is p.Partial:
        st = conn.streams.get(msg.stream)
        if st is None:
            return
        sent, seq = st.sent, msg.seq
        while sent and sent[0][0] < seq:  # fed with a later chunk and answered with it
            res.rtt.append(t - sent.popleft()[1])
            res.chunks_coalesced += 1
        if sent and sent[0][0] == seq:
            res.rtt.append(t - sent.popleft()[1])
            res.partials_matched += 1
    elif tp is p.Final:
        res.finals += 1
        st = conn.streams.get(msg.stream)
        if st is not None and st.finish_t:
            res.final_after_finish.append(t - st.finish_t)
    elif tp is p.Closed:
        st = conn.streams.get(msg.stream)
        if st is not None and not st.closed:
            st.closed = True
            res.streams_closed += 1
    elif tp is p.Error:
        res.errors[msg.code] += 1
        if msg.code in STREAM_ENDING_CODES:
            st = conn.streams.get(msg.stream or "")
            if st is not None:
                st.closed = True


def _read(conn: _Conn, res: GenResult) -> None:
    while True:
        view = conn.reader.get_buffer()
        try:
            n = conn.sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        finally:
            view.release()
        if n == 0:
            conn.alive = False
            res.errors["connection_closed"] += 1
            return
        t = time.monotonic()
        conn.reader.buffer_updated(n)
        for msg in conn.reader:
            _on_message(conn, msg, t, res)


def run_part(cfg: FleetConfig, gate: Any = None) -> GenResult:
    """This process's connections: connect and start, wait for the common start, run, drain."""
    res = GenResult()
    audio = [_chunks_of(w) for w in cfg.wavs]
    by_conn: dict[int, list[int]] = {}
    for i in cfg.streams:
        by_conn.setdefault(i // cfg.per_connection, []).append(i)
    conns: list[_Conn] = []
    deadline = time.monotonic() + 60.0
    for c, indexes in sorted(by_conn.items()):
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(cfg.socket)
            conn = _Conn(c, sock, [_Stream(f"f{i}", audio[i % len(audio)]) for i in indexes])
            _handshake(conn, res, deadline)
        except OSError:
            res.connect_failures += 1
            continue
        conns.append(conn)
    t0 = gate() if gate is not None else time.monotonic() + 0.05
    cpu0 = time.process_time()
    period = CHUNK_MS / 1000
    end_at = t0 + cfg.duration_s
    sel = selectors.DefaultSelector()
    for conn in conns:
        # Spread over the period: connection k of M writes at k/M of it.
        conn.next_t = t0 + period * conn.index / max(1, cfg.connections_total)
        sel.register(conn.sock, selectors.EVENT_READ, conn)
    pending = list(conns)
    while pending:
        now = time.monotonic()
        nxt = min(c.next_t for c in pending)
        for key, _ in sel.select(max(0.0, nxt - now)):
            _read(key.data, res)
        now = time.monotonic()
        for conn in pending:
            if conn.next_t > now or not conn.alive:
                continue
            res.lateness.append(now - conn.next_t)
            seq = conn.seq
            w = conn.writer
            for st in conn.order:
                if st.closed:
                    continue
                w.append(p.Audio(stream=st.id, seq=seq, pcm=st.chunks[seq % len(st.chunks)]))
                st.sent.append((seq, now))
                res.chunks_sent += 1
            conn.send(w.take())
            conn.pump()
            conn.seq += 1
            conn.next_t += period
        pending = [c for c in pending if c.alive and c.next_t < end_at]
    # Finish every stream; wait for the Closed of each.
    for conn in conns:
        if not conn.alive:
            continue
        t = time.monotonic()
        for st in conn.order:
            if not st.closed:
                st.finish_t = t
                conn.writer.append(p.Finish(stream=st.id))
        conn.send(conn.writer.take())
    drain_end = time.monotonic() + cfg.drain_timeout_s
    while time.monotonic() < drain_end:
        if all(st.closed for c in conns if c.alive for st in c.order):
            break
        for conn in conns:
            conn.pump()
        for key, _ in sel.select(0.05):
            _read(key.data, res)
    res.cpu_s = time.process_time() - cpu0
    for conn in conns:
        res.streams_unclosed += sum(1 for st in conn.order if not st.closed)
        with contextlib.suppress(OSError):
            conn.sock.close()
    sel.close()
    return res


def _child(cfg: FleetConfig, ready: Any, start: Any, out: Any) -> None:
    out.put(run_part(cfg, start_gate(ready, start)))


def default_wavs() -> list[str]:
    return wavs_at(16000)


def run_fleet(
    socket_path: str,
    streams: int,
    duration: float,
    *,
    per_connection: int = 10,
    procs: int = 1,
    daemon_pid: int | None = None,
    drain_timeout: float = 10.0,
    wavs: list[str] | None = None,
) -> dict[str, Any]:
    """Run the fleet; returns the figures in ``bench.suite.load_step``'s shape."""
    wavs = wavs or default_wavs()
    connections = -(-streams // per_connection)
    procs = max(1, min(procs, connections))
    parts = [
        FleetConfig(
            socket=socket_path,
            streams=[i for i in range(streams) if (i // per_connection) % procs == k],
            per_connection=per_connection,
            connections_total=connections,
            duration_s=duration,
            drain_timeout_s=drain_timeout,
            wavs=wavs,
        )
        for k in range(procs)
    ]
    ctx = multiprocessing.get_context("spawn")
    ready, out = ctx.Queue(), ctx.Queue()
    starts = [ctx.Queue() for _ in range(procs)]
    children = [
        ctx.Process(target=_child, args=(parts[k], ready, starts[k], out), daemon=True)
        for k in range(procs)
    ]
    for c in children:
        c.start()
    from bench.load import _get

    for _ in children:
        _get(ready, children, 120.0)  # every process has connected and started its streams
    meter = CpuMeter(daemon_pid)
    meter.start()
    t0 = time.monotonic() + 0.1
    for q in starts:
        q.put(t0)
    res = GenResult()
    for _ in children:
        res.merge(_get(out, children, duration + drain_timeout + 120))
    cpu = meter.stop()
    for c in children:
        c.join(10)
    roles: dict[str, float] = {}
    for title, secs in cpu.items():
        if title != "total":
            roles[_role(title)] = roles.get(_role(title), 0.0) + secs
    n = res.chunks_sent
    return {
        "generator": "fleet",
        "streams": streams,
        "connections": connections,
        "procs": procs,
        "duration_s": duration,
        "chunk_rtt_ms": summarize(res.rtt, 1000),
        "generator_lateness_ms": summarize(res.lateness, 1000),
        "final_after_finish_ms": summarize(res.final_after_finish, 1000),
        "chunks_sent": n,
        "partials_matched": res.partials_matched,
        "chunks_coalesced": res.chunks_coalesced,
        "streams_started": res.streams_started,
        "streams_unclosed": res.streams_unclosed,
        "connect_failures": res.connect_failures,
        "errors": dict(res.errors),
        "daemon_cpu_us_per_chunk": round(cpu.get("total", 0.0) * 1e6 / n, 2) if n else None,
        "daemon_cpu_us_per_chunk_by_role": (
            {r: round(s * 1e6 / n, 2) for r, s in sorted(roles.items())} if n else {}
        ),
        "generator_cpu_us_per_chunk": round(res.cpu_s * 1e6 / n, 2) if n else None,
        "wall_s": duration,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n")[0])
    ap.add_argument("--socket", required=True, help="asrd's client socket")
    ap.add_argument("--streams", type=int, default=1000, help="real-time streams (1000)")
    ap.add_argument("--per-connection", type=int, default=10, help="streams per connection (10)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds (20)")
    ap.add_argument("--procs", type=int, default=1, help="generator processes (1)")
    ap.add_argument("--daemon-pid", type=int, default=None, help="for daemon CPU per chunk")
    ap.add_argument("--wav", action="append", help="WAV files (default: 16 kHz samples/)")
    args = ap.parse_args(argv)
    row = run_fleet(
        args.socket,
        args.streams,
        args.duration,
        per_connection=args.per_connection,
        procs=args.procs,
        daemon_pid=args.daemon_pid,
        wavs=args.wav,
    )
    import json

    json.dump(row, sys.stdout, indent=1)
    print()
    return 0 if row["partials_matched"] and not row["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
