"""Shared machinery of the fault tests: a paced multi-connection load with exact accounting,
per-stream checks of what the client received, and the daemon's resource figures.

Accounting: every stream runs with VAD off, so it is exactly one utterance from its first audio
to ``Finish``, and with the null backend (``interim_ms = 0``) whose results describe the audio
it was given: a partial ``"chunks=C bytes=B"`` after each processed chunk (its ``seq`` names the
last chunk covered) and a final ``"utterance of N ms"``. Each stream of a load sends chunks of its
own size, so a partial whose byte count is not exactly ``(seq + 1) * chunk_bytes``, or a final of
another length, means audio was lost, duplicated or mixed up between streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import psutil

from daemon.launcher import DaemonProcess
from ipc import protocol as p
from ipc.client import AsyncClient, Client, ConnectionClosed
from tests.daemon_fixtures import status, wait_until, worker_pids
from tests.test_daemon import tone

NO_VAD = p.VadOverrides(enabled=False)
BYTES_PER_MS = 32  # 16 kHz s16le mono
MiB = 1024 * 1024
TONE = tone(1.0)  # the null backend counts bytes; any PCM will do


def config(lanes: int = 2) -> str:
    """The null backend with a partial per chunk; fast respawns so a killed worker is back in a
    fraction of a second; a heartbeat timeout far above any scheduling hiccup of a shared CI
    machine (a false "stuck worker" kill would be a fault the test did not inject)."""
    return f"""
lanes = {lanes}
heartbeat_timeout_s = 10.0
[backend]
kind = "null"
interim_ms = 0
[restart]
backoff_initial_s = 0.05
backoff_max_s = 0.5
"""


def instance_of(daemon: DaemonProcess) -> str:
    return daemon.config_path.read_text().split('"')[3]


M = TypeVar("M")
_PARTIAL = re.compile(r"chunks=(\d+) bytes=(\d+)")


# --- one stream -----------------------------------------------------------------------------------


@dataclass(eq=False)
class StreamRun:
    """One stream of a load: what it sends and everything the daemon sent about it."""

    name: str
    chunks: int
    chunk_ms: int  # each stream of a load has its own chunk size
    lane: int = -1
    msgs: list[p.ServerMessage] = field(default_factory=list)
    sent: int = 0  # chunks written to the socket

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_ms * BYTES_PER_MS

    @property
    def total_ms(self) -> int:
        return self.chunks * self.chunk_ms

    def pcm(self) -> bytes:
        return TONE[: self.chunk_bytes]

    @property
    def ended(self) -> bool:
        """The daemon ended the stream: ``Closed``, or an ``Error`` that ends a stream."""
        return any(
            isinstance(m, p.Closed)
            or (isinstance(m, p.Error) and m.code in ("worker_restarted", "internal"))
            for m in self.msgs
        )

    def covered(self, seq: int) -> bool:
        """A partial covering chunk ``seq`` came back: the chunk reached the recognizer."""
        return any(isinstance(m, p.Partial) and m.seq >= seq for m in self.msgs)

    def of(self, kind: type[M]) -> list[M]:
        return [m for m in self.msgs if isinstance(m, kind)]


def check_partials(s: StreamRun) -> None:
    """Every partial describes exactly this stream's audio up to the chunk it names."""
    last = -1
    for m in s.of(p.Partial):
        assert m.utterance == 1, (s.name, m)
        assert m.seq >= last, (s.name, "partial seq went back", m)
        last = m.seq
        found = _PARTIAL.fullmatch(m.text)
        assert found, (s.name, m)
        assert int(found.group(2)) == (m.seq + 1) * s.chunk_bytes, (
            f"{s.name}: partial {m.text!r} for seq {m.seq}, but its chunks are "
            f"{s.chunk_bytes} bytes: audio lost or mixed with another stream's"
        )


def check_exact(s: StreamRun) -> None:
    """The stream was served in full: ``Started``, speech start at 0, consistent partials,
    speech end, exactly one final over exactly its audio, ``Closed(finished)``; no error."""
    msgs = s.msgs
    assert msgs and isinstance(msgs[0], p.Started), (s.name, msgs[:3])
    assert not s.of(p.Error), (s.name, s.of(p.Error))
    speech = [(m.event, m.at_ms, m.utterance, m.reason) for m in s.of(p.Speech)]
    assert speech == [("start", 0, 1, ""), ("end", s.total_ms, 1, "finish")], (s.name, speech)
    check_partials(s)
    finals = s.of(p.Final)
    text = f"utterance of {s.total_ms} ms"
    assert len(finals) == 1, (s.name, finals)
    f = finals[0]
    assert (f.utterance, f.text, f.start_ms, f.end_ms) == (1, text, 0, s.total_ms), (s.name, f)
    assert f.words == [p.Word(text, 0, s.total_ms, 1.0)], (s.name, f.words)
    closed = msgs[-1]
    assert isinstance(closed, p.Closed) and closed.reason == "finished", (s.name, closed)
    assert (closed.stats.audio_ms, closed.stats.chunks) == (s.total_ms, s.chunks), (s.name, closed)
    assert len(s.of(p.Closed)) == 1


def check_worker_restarted(s: StreamRun) -> None:
    """The stream's utterance was lost with its infer worker: its last message is
    ``Error(worker_restarted)``, with no final and no ``Closed``; what came before is sound."""
    assert s.msgs and isinstance(s.msgs[0], p.Started), (s.name, s.msgs[:3])
    last = s.msgs[-1]
    assert isinstance(last, p.Error) and last.code == "worker_restarted", (s.name, last)
    assert last.stream == s.name
    assert [m for m in s.of(p.Error)] == [last], (s.name, s.of(p.Error))
    assert not s.of(p.Final) and not s.of(p.Closed), (s.name, s.msgs[-3:])
    check_partials(s)


def check_cut_off(s: StreamRun) -> None:
    """The stream's connection dropped: no final, no ``Closed``, no error, only sound partials."""
    assert s.msgs and isinstance(s.msgs[0], p.Started), (s.name, s.msgs[:3])
    bad = [m for m in s.msgs if isinstance(m, p.Final | p.Closed | p.Error)]
    assert not bad, (s.name, bad)
    check_partials(s)


# --- a load of many streams -----------------------------------------------------------------------


@dataclass(eq=False)
class Conn:
    index: int
    client: AsyncClient
    streams: list[StreamRun]
    reader: asyncio.Task[None] | None = None
    eof_at: float = 0.0  # time.monotonic() when the daemon closed the connection
    other: list[p.ServerMessage] = field(default_factory=list)  # pongs, connection errors
    retired: list[StreamRun] = field(default_factory=list)  # earlier incarnations of streams

    def renew(self) -> list[StreamRun]:
        """New incarnations of this connection's (ended) streams, same names and sizes; the
        old ones, with what they received, move to :attr:`retired`."""
        self.retired.extend(self.streams)
        self.streams = [StreamRun(s.name, s.chunks, s.chunk_ms) for s in self.streams]
        return self.streams

    @property
    def eof(self) -> bool:
        return self.eof_at > 0

    @property
    def lane(self) -> int:
        lanes = {s.lane for s in self.streams}
        assert len(lanes) == 1, f"connection {self.index} has streams on lanes {lanes}"
        return lanes.pop()


class Load:
    """``connections`` asyncio connections with ``per_conn`` streams each, VAD off, audio paced
    at one chunk per stream every ``period_s`` (stream ``i`` sends ``chunk_ms + i`` ms chunks).

    One task per connection reads everything the daemon sends and files it under its stream;
    one task per connection sends. Use inside ``asyncio.run``.
    """

    def __init__(
        self,
        path: Path,
        *,
        connections: int,
        per_conn: int,
        chunks: int,
        chunk_ms: int = 40,
        period_s: float = 0.04,
        prefix: str = "c",
    ) -> None:
        self.path = path
        self.period_s = period_s
        self.changed = asyncio.Event()
        self.conns: list[Conn] = []
        self._plan = [
            [
                StreamRun(f"{prefix}{ci}s{si}", chunks, chunk_ms + ci * per_conn + si)
                for si in range(per_conn)
            ]
            for ci in range(connections)
        ]

    @property
    def streams(self) -> list[StreamRun]:
        return [s for c in self.conns for s in c.streams]

    def on_lane(self, lane: int) -> list[Conn]:
        return [c for c in self.conns if c.lane == lane]

    async def open(self, timeout: float = 30.0) -> None:
        """Connect one by one, each connection's streams ``Started`` before the next connects,
        so the lanes' published loads are current and connections spread over the lanes."""
        for ci, streams in enumerate(self._plan):
            client = await AsyncClient.connect(self.path, client_name=f"faults/{ci}")
            conn = Conn(ci, client, streams)
            conn.reader = asyncio.create_task(self._read(conn), name=f"read-{ci}")
            self.conns.append(conn)
            for s in streams:
                await client.start(s.name, vad=NO_VAD)
            await self.until(
                lambda st=streams: all(s.lane >= 0 for s in st),  # type: ignore[misc]
                timeout,
                f"Started on connection {ci}",
            )

    async def _read(self, conn: Conn) -> None:
        try:
            while True:
                msg = await conn.client.recv()
                if msg is None:
                    continue
                name = getattr(msg, "stream", None)
                s = next((s for s in conn.streams if s.name == name), None)
                if s is None:
                    conn.other.append(msg)
                else:
                    s.msgs.append(msg)
                    if isinstance(msg, p.Started):
                        s.lane = msg.lane
                self.changed.set()
        except ConnectionClosed:
            conn.eof_at = time.monotonic()
        finally:
            self.changed.set()

    async def until(self, pred: Callable[[], object], timeout: float, what: str) -> None:
        """Wait (bounded) until ``pred()`` holds, re-checking whenever a message arrives."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for c in self.conns:
                if c.reader is not None and c.reader.done() and not c.reader.cancelled():
                    exc = c.reader.exception()
                    if exc is not None:
                        raise exc
            if pred():
                return
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.5))

    async def send(
        self, lo: int, hi: int, *, finish: bool, conns: Iterable[Conn] | None = None
    ) -> None:
        """Chunks ``lo``..``hi - 1`` of every stream, paced, then ``Finish`` if asked. A
        connection the daemon closed stops sending (like a real client); so does a stream the
        daemon ended."""
        await asyncio.gather(*(self._send(c, lo, hi, finish) for c in conns or self.conns))

    async def _send(self, conn: Conn, lo: int, hi: int, finish: bool) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            for k in range(lo, hi):
                delay = t0 + (k - lo) * self.period_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                for s in conn.streams:
                    if conn.eof:
                        return
                    if not s.ended:
                        await conn.client.send_audio(s.name, s.pcm(), seq=k)
                        s.sent = k + 1
            if finish:
                for s in conn.streams:
                    if not s.ended and not conn.eof:
                        await conn.client.finish(s.name)
        except ConnectionClosed:
            pass  # the reader sees the EOF too

    async def close(self) -> None:
        for c in self.conns:
            if c.reader is not None:
                c.reader.cancel()
                with contextlib.suppress(BaseException):
                    await c.reader
            with contextlib.suppress(Exception):
                await c.client.close()


# --- the daemon's side ----------------------------------------------------------------------------


class LanesSeen:
    """An ``on_event`` callback that keeps the lane of each ``Started``."""

    def __init__(self) -> None:
        self.lanes: list[int] = []

    def __call__(self, msg: p.ServerMessage) -> None:
        if isinstance(msg, p.Started):
            self.lanes.append(msg.lane)


def serve_every_lane(daemon: DaemonProcess, lanes: int = 2, *, tag: str = "probe") -> set[int]:
    """Open connections (kept open, so the balancer sends the next one elsewhere) until a stream
    has been served exactly on every lane; at most ``lanes + 2`` connections."""
    seen: set[int] = set()
    clients: list[Client] = []
    try:
        for i in range(lanes + 2):
            c = Client.connect(daemon.socket_path, timeout=30)
            clients.append(c)
            ms = 300 + 10 * i
            lane = LanesSeen()
            finals = c.transcribe(
                TONE[: ms * BYTES_PER_MS],
                stream=f"{tag}{i}",
                vad=NO_VAD,
                timeout=30,
                on_event=lane,
            )
            assert [(f.text, f.start_ms, f.end_ms) for f in finals] == [
                (f"utterance of {ms} ms", 0, ms)
            ], finals
            seen.update(lane.lanes)
            if len(seen) == lanes:
                return seen
    finally:
        for c in clients:
            c.close()
    raise AssertionError(f"{lanes + 2} new connections were all served by lanes {seen}")


def workers(daemon: DaemonProcess) -> dict[tuple[str, int], dict[str, object]]:
    """(role, lane) -> pid, state, restarts and counters, from the control socket."""
    out: dict[tuple[str, int], dict[str, object]] = {}
    for lane in status(daemon).lanes:
        for w in lane.workers:
            out[(w.role, w.lane)] = {
                "pid": w.pid,
                "state": w.state,
                "restarts": w.restarts,
                **w.counters,
            }
    return out


def idle(daemon: DaemonProcess) -> bool:
    """Every worker running, no connection or stream left in any ingress, no utterance held by
    any infer worker (counters as published with the workers' heartbeats)."""
    for (role, _lane), w in workers(daemon).items():
        if w["state"] != "running":
            return False
        if role == "ingress" and (w["connections"] or w["streams"] or w["pending_records"]):
            return False
        if role == "infer" and (w["active_utterances"] or w["waiting_utterances"]):
            return False
    return True


def wait_idle(daemon: DaemonProcess, timeout: float = 20.0) -> None:
    try:
        wait_until(lambda: idle(daemon), timeout, "every stream and utterance to be freed")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {workers(daemon)}") from None


@dataclass(frozen=True)
class Usage:
    fds: int
    rss: int


def usage(pid: int) -> Usage:
    proc = psutil.Process(pid)
    return Usage(proc.num_fds(), proc.memory_info().rss)


def baseline(daemon: DaemonProcess, window_s: float = 1.0) -> dict[tuple[str, int], Usage]:
    """fds and RSS of the supervisor (key ``("supervisor", -1)``) and of each worker while the
    daemon is idle: the lowest fd count seen over ``window_s`` (sampled every 20 ms), because
    an idle process only ever has descriptors above its baseline for a moment (the supervisor
    closes a control connection, e.g. of the status request just made, at its next tick);
    RSS as last sampled."""
    pids = {("supervisor", -1): daemon.pid, **worker_pids(daemon)}
    out = {key: usage(pid) for key, pid in pids.items()}
    deadline = time.monotonic() + window_s
    while time.monotonic() < deadline:
        time.sleep(0.02)
        for key, pid in pids.items():
            u = usage(pid)
            out[key] = Usage(min(out[key].fds, u.fds), u.rss)
    return out


def check_fds_back(
    daemon: DaemonProcess, base: dict[tuple[str, int], Usage], timeout: float = 15.0
) -> dict[tuple[str, int], Usage]:
    """Every process's fd count returns to exactly its baseline (a replaced worker's to its
    predecessor's: the same spec opens the same descriptors). Exact, because a descriptor is
    freed when its connection, control request or child is dealt with, and nothing else opens
    one in an idle daemon; the wait covers a control connection being closed."""

    def now() -> dict[tuple[str, int], Usage]:
        out = {("supervisor", -1): usage(daemon.pid)}
        pids = worker_pids(daemon)
        for key in base:
            if key[0] != "supervisor":
                out[key] = usage(pids[key])
        return out

    last: dict[tuple[str, int], Usage] = {}

    def same() -> bool:
        nonlocal last
        last = now()
        return all(last[k].fds == base[k].fds for k in base)

    try:
        wait_until(same, timeout, "fd counts to return to baseline")
    except AssertionError as exc:
        diff = {k: (base[k].fds, last[k].fds) for k in base if last[k].fds != base[k].fds}
        raise AssertionError(f"{exc}: (baseline, now) {diff}") from None
    return last


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for a reaper counts as exited)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def log_text(daemon: DaemonProcess) -> str:
    path = daemon.log_path or daemon.runtime_dir / "asrd.log"
    return path.read_text()
