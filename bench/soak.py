"""Soak test: mixed load on a real asrd for a long time, with bad clients and worker kills.

What it does (``python -m bench.soak --duration 1800``):

- starts its own daemon (``asrd run``, 2 lanes, the ``null`` backend with ``interim_ms = 0``
  by default, ``--backend embedded`` for real recognition) unless ``--socket`` is given;
- calibrates: every ``samples/*.wav`` once with VAD on and once with VAD off, at full speed,
  giving the exact finals (utterance, text, start_ms, end_ms) each file must produce;
- keeps ``--streams`` streams going: each plays a whole file in real time (100 ms chunks),
  finishes, waits for its ``Closed``, and the next one starts. Streams share connections (a
  connection carries 1 to 12 streams, then is closed and replaced), 20 % run with VAD off and
  10 % without partials;
- makes ``--bad-share`` of the stream starts bad clients, the seven cases in turn: ``vanish``
  (socket closed mid-utterance, no Finish), ``malformed`` (a frame whose body is not msgpack),
  ``oversized`` (a length prefix above ``max_frame_bytes``), ``wrong_rate`` (Start at
  44.1 kHz), ``odd_bytes`` (Audio with an odd byte count), ``unknown_stream`` (Audio for a
  stream never started) and ``bad_seq`` (Audio repeating the previous seq). Each must get its
  documented error (``docs/protocol.md`` section 9; none for ``vanish``). Except where the case
  ends the connection, a *witness* stream runs on the same connection, and the bad chunks
  target it where they concern a stream: its finals must still be exactly the calibrated ones;
- SIGKILLs a random worker (ingress or infer of a random lane, found by its process title
  ``asrd: <role> lane <n>``) every ``--kill-every`` seconds, and waits for its replacement;
- samples every ``--sample-every`` seconds the RSS and open file descriptors of the
  supervisor and of each worker (keyed by role and lane: a killed worker's replacement is a
  new pid under the same key), the instance's ``/dev/shm`` segments and the daemon's status
  counters, and prints a progress line;
- at the end lets every stream finish, checks the daemon is idle (no streams, connections or
  utterances left in it), stops it with SIGTERM (must exit 0) and checks that none of its
  shared-memory segments remain.

Accounting, for every good stream (and witness): an utterance is *accepted* when its
``Speech(start)`` arrives. It must end in a ``Final`` or an explicit ``Error``. A
``worker_restarted`` error (the stream's lane lost its infer worker) and a connection dropped
because its lane's ingress worker was killed *explain* the utterances in flight (counted apart,
with the kill that explains them). **Lost** = accepted utterances that got neither a final nor an
explanation before the stream's ``Closed``, its end, or a generous timeout, plus utterances the
``Closed`` stats count that were never announced. It must be 0. Every final is also compared
with the calibration (with the null backend the text encodes the byte count the recognizer was
fed, so a mismatch means audio went to the wrong stream or got lost): cross-talk.

A table goes to stdout and everything (samples, kills, errors by code for good and bad clients,
per-process resource summaries, machine facts) to ``bench/results/soak-<timestamp>.json``. Exit
status 1 if an utterance was lost, a final did not match (null backend), a bad-client case did
not get its error, a planned kill was not done or its worker not replaced, the control socket
did not answer, the daemon was not idle at the end, did not exit 0 or left shared memory, or
anything else went wrong (the report's ``problems``: a stream with no end, a disconnect no kill
explains, ``worker_restarted`` with no kill...).

    python -m bench.soak --duration 1800              # the 30-minute soak
    python -m bench.soak --smoke                      # ~20 s, a few streams, one kill
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import os
import random
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import psutil

from bench.load import (
    REPO,
    RESULTS_DIR,
    _pos_float,
    _pos_int,
    default_wavs,
    machine_facts,
    write_report,
)
from daemon.asrctl import load_wav
from daemon.errors import ClientError
from daemon.launcher import DaemonProcess
from ipc.client import (
    STREAM_ENDING_CODES,
    AsyncClient,
    ControlClient,
    default_control_socket_path,
)
from ipc.protocol import (
    Closed,
    Error,
    ErrorCode,
    Final,
    Partial,
    ServerMessage,
    Speech,
    Started,
    VadOverrides,
)

CHUNK_MS = 100
NO_VAD = VadOverrides(enabled=False)
BAD_CASES: tuple[str, ...] = (
    "vanish",
    "malformed",
    "oversized",
    "wrong_rate",
    "odd_bytes",
    "unknown_stream",
    "bad_seq",
)
#: The error each bad-client case must draw (docs/protocol.md section 9); None: none is sent.
EXPECTED_ERROR: dict[str, str | None] = {
    "vanish": None,
    "malformed": ErrorCode.MALFORMED_FRAME,
    "oversized": ErrorCode.FRAME_TOO_LARGE,
    "wrong_rate": ErrorCode.UNSUPPORTED_SAMPLE_RATE,
    "odd_bytes": ErrorCode.ODD_BYTE_COUNT,
    "unknown_stream": ErrorCode.UNKNOWN_STREAM,
    "bad_seq": ErrorCode.BAD_SEQUENCE,
}
INJECT_AT = 8  # chunk index (0.8 s in: mid-utterance for every sample) where bad input goes
KILL_WINDOW_S = 15.0  # a kill explains a failure on its lane this long after it
ROLES = ("ingress", "infer")
NULL_FINAL = re.compile(r"utterance of (\d+) ms")
NULL_PARTIAL = re.compile(r"chunks=(\d+) bytes=(\d+)")
DETAIL_CAP = 50


# --- small helpers ----------------------------------------------------------------------------


def _now() -> float:
    return time.monotonic()


async def _sleep_until(t: float) -> None:
    delay = t - _now()
    if delay > 0:
        await asyncio.sleep(delay)


def _chunks(pcm: bytes, rate: int) -> list[bytes]:
    step = rate * CHUNK_MS // 1000 * 2
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


def process_key(title: str) -> tuple[str, int] | None:
    """``("ingress", 0)`` for the title ``asrd: ingress lane 0``; None for anything else."""
    parts = title.split()
    if len(parts) >= 4 and parts[0] == "asrd:" and parts[2] == "lane" and parts[3].isdigit():
        return parts[1], int(parts[3])
    return None


def worker_pids(supervisor_pid: int) -> dict[tuple[str, int], int]:
    """(role, lane) -> pid of the supervisor's workers, from their process titles."""
    out: dict[tuple[str, int], int] = {}
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(supervisor_pid).children():
            try:
                key = process_key(" ".join(child.cmdline()))
            except psutil.Error:
                continue
            if key is not None:
                out[key] = child.pid
    return out


def shm_segments(instance: str, supervisor_pid: int | None = None) -> list[str]:
    """The instance's segments in /dev/shm (of one supervisor when its pid is given)."""
    prefix = f"asrd-{instance}-" + (f"{supervisor_pid}-" if supervisor_pid else "")
    try:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))
    except OSError:
        return []


def proc_usage(pid: int) -> dict[str, Any] | None:
    """pid, RSS (bytes), open fds and CPU seconds (user + system) of one process."""
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            cpu = p.cpu_times()
            return {
                "pid": pid,
                "rss": p.memory_info().rss,
                "fds": p.num_fds(),
                "cpu_s": round(cpu.user + cpu.system, 2),
            }
    except psutil.Error:
        return None


def series_summary(points: list[tuple[float, int]], warmup_s: float) -> dict[str, Any]:
    """first, median, last, max of a (t, value) series, and growth from the first point at or
    after ``warmup_s`` to the last (a leak shows as steady growth)."""
    if not points:
        return {"first": None, "median": None, "last": None, "max": None, "warm": None}
    values = [v for _, v in points]
    warm = next((v for t, v in points if t >= warmup_s), values[-1])
    return {
        "first": values[0],
        "median": int(statistics.median(values)),
        "last": values[-1],
        "max": max(values),
        "warm": warm,
        "growth": values[-1] - warm,
    }


def slope_per_min(points: list[tuple[float, int]]) -> float | None:
    """Least-squares slope of a (t s, value) series, per minute."""
    if len(points) < 3:
        return None
    ts = [t for t, _ in points]
    vs = [float(v) for _, v in points]
    mt, mv = statistics.fmean(ts), statistics.fmean(vs)
    den = sum((t - mt) ** 2 for t in ts)
    if den == 0:
        return None
    return 60.0 * sum((t - mt) * (v - mv) for t, v in zip(ts, vs, strict=True)) / den


class NotifyDrain:
    """Reads the daemon's sd_notify datagrams for as long as it runs, as systemd does.

    ``DaemonProcess`` reads its ``NOTIFY_SOCKET`` only while waiting for a message (READY),
    and the supervisor sends ``STATUS=`` every 5 s. Before commit e601e48 that ``sendto()``
    blocked once the socket's queue was full (``net.unix.max_dgram_qlen``, often 10), about a
    minute after READY, and the supervisor's single-threaded loop stopped there: no control
    replies, no reaping, no respawns (found by this soak). The supervisor now drops what it
    cannot send; draining keeps the datagrams flowing as under systemd, on any version.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.count = 0
        self.last = ""
        self.other: list[str] = []  # anything but STATUS= lines, for the report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-drain", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.sock], [], [], 0.2)
                if not ready:
                    continue
                data = self.sock.recv(65536, socket.MSG_DONTWAIT).decode(errors="replace")
            except (BlockingIOError, InterruptedError):
                continue
            except (OSError, ValueError):
                return
            self.count += 1
            self.last = data
            if not data.startswith("STATUS=") and len(self.other) < 50:
                self.other.append(data)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


# --- clients ----------------------------------------------------------------------------------


class SoakClient(AsyncClient):
    """AsyncClient that can also send raw bytes and drop the connection without a goodbye."""

    async def send_raw(self, data: bytes) -> None:
        self._conn.write(data)
        await self._conn.drain()

    def abort(self) -> None:
        self._conn.abort()


@dataclass
class Calib:
    """What one (file, VAD on/off) must produce: finals by utterance number."""

    finals: dict[int, tuple[str, int, int]]
    utterances: int
    audio_ms: int


@dataclass
class Utt:
    number: int
    started_at: float
    state: str = "open"  # "open" | "final" | "error"
    last_partial_bytes: int = -1


@dataclass(eq=False)
class Tracker:
    """Receive-side state of one stream (good, witness, or a bad client's own stream)."""

    sid: str
    kind: str  # "good" | "witness" | "bad"
    conn: Conn
    wav: int
    vad: bool
    t_start: float
    started: bool = False
    lane: int | None = None
    ended: bool = False
    end_reason: str = ""
    closed_stats: dict[str, int] | None = None
    utts: dict[int, Utt] = field(default_factory=dict)
    finals: list[Final] = field(default_factory=list)
    errors: list[Error] = field(default_factory=list)
    trace: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def note(self, text: str) -> None:
        self.trace.append(f"{_now() - self.conn.soak.t0:.3f} {text}")


class Conn:
    """One client connection and the streams on it."""

    def __init__(self, soak: Soak, client: SoakClient, kind: str, cid: int, quota: int) -> None:
        self.soak = soak
        self.client = client
        self.kind = kind  # "good" | "bad"
        self.cid = cid
        self.quota = quota  # streams it may still carry
        self.active = 0
        self.trackers: dict[str, Tracker] = {}
        self.ended_ids: set[str] = set()
        self.lane: int | None = None
        self.closing = False
        self.dead = False
        self.errors: list[tuple[float, Error]] = []
        self.eof = asyncio.Event()
        self.reader = asyncio.create_task(self.read(), name=f"conn-{cid}")

    async def read(self) -> None:
        soak = self.soak
        try:
            async for msg in self.client:
                soak.on_message(self, msg)
        except ClientError as exc:
            soak.count_error(self.kind, f"client:{exc.code}")
        except Exception as exc:  # a bug here must not end the soak silently
            soak.problem(f"reader of connection {self.cid} failed: {exc!r}")
        finally:
            self.dead = True
            self.eof.set()
            soak.on_disconnect(self)

    async def close(self) -> None:
        self.closing = True
        with contextlib.suppress(Exception):
            await self.client.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.reader, 5.0)


# --- the soak ---------------------------------------------------------------------------------


@dataclass
class SoakConfig:
    duration_s: float
    streams: int
    kill_every_s: float
    bad_share: float
    sample_every_s: float
    warmup_s: float
    finish_timeout_s: float
    seed: int
    backend: str
    wavs: list[str]
    socket: str | None
    control_socket: str | None
    log_path: str | None
    smoke: bool


class Soak:
    def __init__(self, cfg: SoakConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.t0 = _now()
        self.load_start = 0.0
        self.load_end = 0.0
        self.socket = ""
        self.control = ""
        self.supervisor_pid = 0
        self.instance = ""
        self.audio: list[tuple[list[bytes], int, str]] = []  # chunks, rate, name
        self.calib: dict[tuple[int, bool], Calib] = {}
        self.max_frame_bytes = 1 << 20
        self.conn_ids = itertools.count()
        self.stream_ids = itertools.count()
        self.pool: list[Conn] = []
        self.all_conns: list[Conn] = []
        self.bad_cycle = itertools.cycle(BAD_CASES)
        # results
        self.c: Counter[str] = Counter()
        self.errors_good: Counter[str] = Counter()
        self.errors_bad: Counter[str] = Counter()
        self.explained: Counter[str] = Counter()  # by what: "infer_kill", "ingress_kill"
        self.lost_detail: list[dict[str, Any]] = []
        self.mismatches: list[dict[str, Any]] = []
        self.violations: list[str] = []
        self.problems: list[str] = []
        self.bad_results: dict[str, Counter[str]] = {c: Counter() for c in BAD_CASES}
        self.bad_failures: list[dict[str, Any]] = []
        self.kills: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.lateness_max = 0.0

    # --- bookkeeping ---------------------------------------------------------------------------
    def t(self) -> float:
        return round(_now() - self.t0, 3)

    def problem(self, text: str) -> None:
        if len(self.problems) < 200:
            self.problems.append(f"{self.t():.1f} s: {text}")

    def violation(self, tr: Tracker, text: str) -> None:
        self.c["ordering_violations"] += 1
        if len(self.violations) < DETAIL_CAP:
            self.violations.append(f"{self.t():.1f} s {tr.sid}: {text}")

    def count_error(self, kind: str, code: str) -> None:
        (self.errors_bad if kind == "bad" else self.errors_good)[code] += 1

    def recent_kill(self, role: str, lane: int | None, at: float) -> dict[str, Any] | None:
        """The latest kill of ``role`` on ``lane`` (None: any lane) in the window before ``at``."""
        for k in reversed(self.kills):
            if k["role"] != role or (lane is not None and k["lane"] != lane):
                continue
            if 0 <= at - k["mono"] <= KILL_WINDOW_S:
                found: dict[str, Any] = k
                return found
        return None

    # --- messages ------------------------------------------------------------------------------
    def on_message(self, conn: Conn, msg: ServerMessage) -> None:
        sid = getattr(msg, "stream", None)
        if isinstance(msg, Error):
            conn.errors.append((_now(), msg))
            self.count_error(conn.kind, msg.code)
        if sid is None:
            return
        tr = conn.trackers.get(sid)
        if tr is None:
            if sid in conn.ended_ids and not (
                isinstance(msg, Error) and msg.code == ErrorCode.UNKNOWN_STREAM
            ):
                self.c["ordering_violations"] += 1
                if len(self.violations) < DETAIL_CAP:
                    self.violations.append(f"{self.t():.1f} s {sid}: {msg!r} after its end")
            return
        tp = type(msg)
        if tp is Partial:
            assert isinstance(msg, Partial)
            self.c["partials"] += 1
            self.on_partial(tr, msg)
        elif tp is Final:
            assert isinstance(msg, Final)
            self.on_final(tr, msg)
        elif tp is Speech:
            assert isinstance(msg, Speech)
            tr.note(f"speech {msg.event} {msg.utterance} at {msg.at_ms}")
            if not tr.started:
                self.violation(tr, "speech before started")
            if msg.event == "start":
                if msg.utterance in tr.utts:
                    self.violation(tr, f"second speech start for utterance {msg.utterance}")
                tr.utts[msg.utterance] = Utt(msg.utterance, _now())
                if tr.kind != "bad":
                    self.c["utterances_accepted"] += 1
        elif tp is Started:
            assert isinstance(msg, Started)
            tr.note(f"started lane {msg.lane}")
            tr.started = True
            tr.lane = msg.lane
            if conn.lane is None:
                conn.lane = msg.lane
        elif tp is Closed:
            assert isinstance(msg, Closed)
            tr.note(f"closed {msg.reason} {msg.stats}")
            tr.closed_stats = msgspec.to_builtins(msg.stats)
            self.end_stream(tr, f"closed:{msg.reason}")
        elif tp is Error:
            assert isinstance(msg, Error)
            tr.note(f"error {msg.code} utt {msg.utterance}: {msg.message}")
            tr.errors.append(msg)
            if not tr.started:
                self.end_stream(tr, f"refused:{msg.code}")
            elif msg.code in STREAM_ENDING_CODES:
                self.end_stream(tr, f"error:{msg.code}")
            elif msg.utterance is not None:
                u = tr.utts.get(msg.utterance)
                if u is not None and u.state == "open":
                    u.state = "error"
                    if tr.kind != "bad":
                        self.c["utterance_errors"] += 1

    def on_partial(self, tr: Tracker, msg: Partial) -> None:
        u = tr.utts.get(msg.utterance)
        if u is None or u.state != "open":
            self.violation(tr, f"partial for utterance {msg.utterance} not in progress")
            return
        m = NULL_PARTIAL.fullmatch(msg.text) if self.cfg.backend == "null" else None
        if m is not None:
            nbytes = int(m.group(2))
            if nbytes < u.last_partial_bytes:
                self.c["partial_inconsistencies"] += 1
            u.last_partial_bytes = nbytes

    def on_final(self, tr: Tracker, msg: Final) -> None:
        tr.note(f"final {msg.utterance} {msg.text!r} {msg.start_ms}-{msg.end_ms}")
        u = tr.utts.get(msg.utterance)
        if u is None or u.state != "open":
            self.violation(tr, f"final for utterance {msg.utterance} not in progress")
            return
        if any(f.utterance > msg.utterance for f in tr.finals):
            self.violation(tr, f"final {msg.utterance} after a later one")
        u.state = "final"
        tr.finals.append(msg)
        if tr.kind == "bad":
            return
        self.c["finals"] += 1
        want = self.calib[(tr.wav, tr.vad)].finals.get(msg.utterance)
        got = (msg.text, msg.start_ms, msg.end_ms)
        if want != got:
            self.c["mismatched_finals"] += 1
            if len(self.mismatches) < DETAIL_CAP:
                self.mismatches.append(
                    {
                        "t": self.t(),
                        "stream": tr.sid,
                        "file": self.audio[tr.wav][2],
                        "vad": tr.vad,
                        "utterance": msg.utterance,
                        "got": list(got),
                        "want": list(want) if want else None,
                    }
                )
        m = NULL_FINAL.fullmatch(msg.text) if self.cfg.backend == "null" else None
        if m is not None and u.last_partial_bytes > int(m.group(1)) * 32 + 31:
            self.c["partial_inconsistencies"] += 1

    def on_disconnect(self, conn: Conn) -> None:
        if conn in self.pool:
            self.pool.remove(conn)
        if conn.closing:
            return
        at = _now()
        kill = self.recent_kill("ingress", conn.lane, at)
        if kill is not None:
            self.c["disconnects_by_kill"] += 1
        elif conn.kind == "good":
            self.c["unexpected_disconnects"] += 1
            self.problem(f"connection {conn.cid} (lane {conn.lane}) dropped with no kill")
        for tr in list(conn.trackers.values()):
            tr.note("connection dropped")
            self.end_stream(tr, "disconnect")

    # --- the end of a stream: the accounting -----------------------------------------------------
    def end_stream(self, tr: Tracker, reason: str) -> None:
        if tr.ended:
            return
        tr.ended = True
        tr.end_reason = reason
        conn = tr.conn
        conn.trackers.pop(tr.sid, None)
        conn.ended_ids.add(tr.sid)
        tr.done.set()
        if tr.kind == "bad":
            return
        self.c[f"streams_{reason.split(':')[0]}"] += 1
        if tr.lane is not None:
            self.c[f"streams_on_lane{tr.lane}"] += 1
        if reason == "closed:finished":
            self.c["utterances_completed"] += len(tr.utts)
        at = _now()
        open_utts = [u for u in tr.utts.values() if u.state == "open"]
        explain: str | None = None
        if reason == f"error:{ErrorCode.WORKER_RESTARTED}":
            explain = "infer_kill"
            if self.recent_kill("infer", tr.lane, at) is None:
                self.c["worker_restarted_without_kill"] += 1
                self.problem(f"{tr.sid}: worker_restarted on lane {tr.lane} with no infer kill")
        elif (
            reason == "disconnect"
            and tr.lane is not None
            and self.recent_kill("ingress", tr.lane, at) is not None
        ):
            explain = "ingress_kill"
        elif reason.startswith("error:"):
            explain = "stream_error"  # an explicit error (internal): not lost, but a problem
            self.problem(f"{tr.sid}: stream ended by {reason}")
        if explain is not None:
            self.c["streams_ended_by_" + explain] += 1
        for u in open_utts:
            if explain is not None:
                self.explained[explain] += 1
            else:
                self.lose(tr, u.number, reason)
        if reason.startswith("closed:") and tr.closed_stats is not None:
            counted = tr.closed_stats.get("utterances", 0)
            if counted != len(tr.utts):
                for n in range(len(tr.utts) + 1, counted + 1):
                    self.lose(tr, n, f"counted in Closed.stats ({counted}) but never announced")
            if reason == "closed:finished":
                want = self.calib[(tr.wav, tr.vad)].utterances
                if len(tr.utts) != want and not tr.errors:
                    self.c["utterance_count_mismatches"] += 1
                    self.problem(f"{tr.sid}: {len(tr.utts)} utterances, calibrated {want}")

    def lose(self, tr: Tracker, number: int, why: str) -> None:
        self.c["utterances_lost"] += 1
        if len(self.lost_detail) < DETAIL_CAP:
            self.lost_detail.append(
                {
                    "t": self.t(),
                    "stream": tr.sid,
                    "kind": tr.kind,
                    "connection": tr.conn.cid,
                    "lane": tr.lane,
                    "file": self.audio[tr.wav][2],
                    "vad": tr.vad,
                    "utterance": number,
                    "why": why,
                    "trace": list(tr.trace),
                }
            )

    # --- connections -----------------------------------------------------------------------------
    async def connect(self, kind: str, quota: int) -> Conn:
        client = await SoakClient.connect(self.socket, client_name=f"bench.soak/{kind}")
        assert isinstance(client, SoakClient)
        if client.welcome is not None:
            self.max_frame_bytes = client.welcome.limits.max_frame_bytes
        conn = Conn(self, client, kind, next(self.conn_ids), quota)
        self.all_conns.append(conn)
        self.c[f"connections_{kind}"] += 1
        return conn

    async def acquire(self) -> Conn:
        """A pooled connection with quota left, or a new one (1 in 10 is used once)."""
        target = max(2, self.cfg.streams // 4)
        usable = [c for c in self.pool if c.quota > 0 and not c.dead and not c.closing]
        if len(usable) < target or self.rng.random() < 0.1:
            single = self.rng.random() < 0.1
            conn = await self.connect("good", 1 if single else self.rng.randint(2, 12))
            if not single:
                self.pool.append(conn)
        else:
            conn = self.rng.choice(usable)
        conn.quota -= 1
        conn.active += 1
        return conn

    async def release(self, conn: Conn) -> None:
        conn.active -= 1
        if conn.active == 0 and (conn.quota <= 0 or conn.dead):
            if conn in self.pool:
                self.pool.remove(conn)
            await conn.close()

    # --- one stream --------------------------------------------------------------------------
    def new_tracker(self, conn: Conn, kind: str, wav: int, vad: bool, prefix: str) -> Tracker:
        tr = Tracker(f"{prefix}{next(self.stream_ids)}", kind, conn, wav, vad, _now())
        conn.trackers[tr.sid] = tr
        if kind != "bad":
            self.c["streams_started"] += 1
            self.c[f"streams_{kind}"] += 1
        return tr

    async def play(
        self,
        tr: Tracker,
        *,
        interim: bool = True,
        seq_step: int = 1,
        inject: Any = None,
        stop_after_speech: int | None = None,
    ) -> bool:
        """Start ``tr``'s stream and send its file in real time; ``inject(i, seq)`` runs after
        chunk ``INJECT_AT``. With ``stop_after_speech`` n: stop n chunks after the first
        ``Speech(start)`` without finishing. True if the whole file went out and Finish too."""
        client = tr.conn.client
        chunks, rate, _ = self.audio[tr.wav]
        try:
            await client.start(tr.sid, rate, interim=interim, vad=None if tr.vad else NO_VAD)
            t = _now()
            after_speech = -1
            for i, chunk in enumerate(chunks):
                await _sleep_until(t + i * CHUNK_MS / 1000)
                self.lateness_max = max(self.lateness_max, _now() - (t + i * CHUNK_MS / 1000))
                if tr.ended:
                    return False
                await client.send_audio(tr.sid, chunk, seq=i * seq_step)
                if tr.kind != "bad":
                    self.c["chunks_sent"] += 1
                    self.c["audio_ms_sent"] += len(chunk) * 1000 // (2 * rate)
                if inject is not None and i == INJECT_AT:
                    await inject(i, i * seq_step)
                if stop_after_speech is not None:
                    if after_speech < 0 and tr.utts:
                        after_speech = 0
                    if after_speech >= 0:
                        after_speech += 1
                        if after_speech > stop_after_speech:
                            return False
            if stop_after_speech is not None:
                return False
            await client.finish(tr.sid)
            return True
        except ClientError:
            return False  # the connection went: the reader ends the streams

    async def await_end(self, tr: Tracker) -> None:
        """Wait for the stream's end; past the timeout its open utterances are lost."""
        try:
            await asyncio.wait_for(tr.done.wait(), self.cfg.finish_timeout_s)
        except TimeoutError:
            tr.note(f"no end within {self.cfg.finish_timeout_s:g} s")
            self.problem(f"{tr.sid}: no Closed within {self.cfg.finish_timeout_s:g} s")
            self.end_stream(tr, "timeout")
            with contextlib.suppress(ClientError):
                await tr.conn.client.cancel(tr.sid)

    async def run_good(self) -> None:
        try:
            conn = await self.acquire()
        except ClientError as exc:
            self.count_error("good", f"connect:{exc.code}")
            await asyncio.sleep(0.5)
            return
        try:
            wav = self.rng.randrange(len(self.audio))
            vad = self.rng.random() >= 0.2
            tr = self.new_tracker(conn, "good", wav, vad, "g")
            await self.play(tr, interim=self.rng.random() >= 0.1)
            await self.await_end(tr)
        finally:
            await self.release(conn)

    # --- bad clients -------------------------------------------------------------------------
    async def run_bad(self, case: str) -> str:
        """One bad client; returns "ok", "interrupted" (by a kill) or "failed"."""
        try:
            conn = await self.connect("bad", 1)
        except ClientError as exc:
            self.count_error("bad", f"connect:{exc.code}")
            return "interrupted"
        self.c["bad_clients"] += 1
        want = EXPECTED_ERROR[case]
        why = ""
        try:
            why = await getattr(self, f"_bad_{case}")(conn)
        except ClientError as exc:
            why = f"client error {exc.code}: {exc}"
        finally:
            if not conn.dead:
                await conn.close()
        if not why:
            outcome = "ok"
        elif self.interrupted_by_kill(conn):
            outcome = "interrupted"
        else:
            outcome = "failed"
            if len(self.bad_failures) < DETAIL_CAP:
                self.bad_failures.append(
                    {
                        "t": self.t(),
                        "case": case,
                        "expected": want,
                        "why": why,
                        "errors": [msgspec.to_builtins(e) for _, e in conn.errors],
                    }
                )
        self.bad_results[case][outcome] += 1
        return outcome

    def interrupted_by_kill(self, conn: Conn) -> bool:
        if conn.lane is not None and self.recent_kill("ingress", conn.lane, _now()):
            return True
        return any(e.code == ErrorCode.WORKER_RESTARTED for _, e in conn.errors)

    async def _expect(
        self, conn: Conn, code: str, stream: str | None, timeout: float = 10.0
    ) -> bool:
        deadline = _now() + timeout
        while _now() < deadline:
            if any(e.code == code and e.stream == stream for _, e in conn.errors):
                return True
            if conn.dead:
                return any(e.code == code and e.stream == stream for _, e in conn.errors)
            await asyncio.sleep(0.02)
        return False

    async def _witness(self, conn: Conn, inject: Any, code: str, stream: str | None) -> str:
        """Play a witness stream with ``inject`` at chunk INJECT_AT; the error ``code`` about
        ``stream`` ("@w": the witness) must come, and the witness must end normally."""
        tr = self.new_tracker(conn, "witness", self.rng.randrange(len(self.audio)), True, "w")
        target = tr.sid if stream == "@w" else stream
        injected: list[bool] = []

        async def hook(i: int, seq: int) -> None:
            injected.append(True)
            await inject(tr, seq)

        await self.play(tr, seq_step=2, inject=hook)
        await self.await_end(tr)
        if not injected:
            return "the witness ended before the bad input was sent"
        if not await self._expect(conn, code, target):
            return f"no {code} error"
        if tr.end_reason != "closed:finished":
            return f"the witness stream ended with {tr.end_reason}"
        return ""

    async def _bad_vanish(self, conn: Conn) -> str:
        tr = self.new_tracker(conn, "bad", self._two_utterances(), True, "v")
        await self.play(tr, stop_after_speech=3)
        if not tr.utts:
            return "no speech start before vanishing"
        conn.closing = True
        conn.client.abort()
        return ""

    async def _bad_oversized(self, conn: Conn) -> str:
        tr = self.new_tracker(conn, "bad", self._two_utterances(), True, "o")
        await self.play(tr, stop_after_speech=2)
        if not tr.utts:
            return "no speech start before the oversized frame"
        conn.closing = True  # the daemon closes it: expected
        await conn.client.send_raw((self.max_frame_bytes + 1).to_bytes(4, "big"))
        if not await self._expect(conn, ErrorCode.FRAME_TOO_LARGE, None):
            return "no frame_too_large error"
        try:
            await asyncio.wait_for(conn.eof.wait(), 10.0)
        except TimeoutError:
            return "connection not closed after frame_too_large"
        return ""

    async def _bad_malformed(self, conn: Conn) -> str:
        async def inject(tr: Tracker, seq: int) -> None:
            await conn.client.send_raw(b"\x00\x00\x00\x01\xc1")  # 0xc1: never valid msgpack

        return await self._witness(conn, inject, ErrorCode.MALFORMED_FRAME, None)

    async def _bad_wrong_rate(self, conn: Conn) -> str:
        sid = f"r{next(self.stream_ids)}"

        async def inject(tr: Tracker, seq: int) -> None:
            await conn.client.start(sid, 44100)

        return await self._witness(conn, inject, ErrorCode.UNSUPPORTED_SAMPLE_RATE, sid)

    async def _bad_odd_bytes(self, conn: Conn) -> str:
        async def inject(tr: Tracker, seq: int) -> None:
            await conn.client.send_audio(tr.sid, b"\x01" * 3201, seq=seq + 1)

        return await self._witness(conn, inject, ErrorCode.ODD_BYTE_COUNT, "@w")

    async def _bad_unknown_stream(self, conn: Conn) -> str:
        sid = f"u{next(self.stream_ids)}"

        async def inject(tr: Tracker, seq: int) -> None:
            await conn.client.send_audio(sid, b"\x00" * 3200, seq=0)

        return await self._witness(conn, inject, ErrorCode.UNKNOWN_STREAM, sid)

    async def _bad_bad_seq(self, conn: Conn) -> str:
        async def inject(tr: Tracker, seq: int) -> None:
            await conn.client.send_audio(tr.sid, b"\x00" * 3200, seq=seq)  # repeats the seq

        return await self._witness(conn, inject, ErrorCode.BAD_SEQUENCE, "@w")

    def _two_utterances(self) -> int:
        names = [name for _, _, name in self.audio]
        return names.index("two_utterances.wav") if "two_utterances.wav" in names else 0

    # --- load ----------------------------------------------------------------------------------
    async def slot(self, k: int) -> None:
        await asyncio.sleep(k * 3.5 / self.cfg.streams)  # spread the starts over a stream length
        while _now() < self.load_end:
            if self.rng.random() < self.cfg.bad_share:
                await self.run_bad(next(self.bad_cycle))
            else:
                await self.run_good()

    async def cover_bad_cases(self) -> None:
        """Run each bad case that has not succeeded yet (up to 3 tries each)."""
        for _ in range(3):
            missing = [c for c in BAD_CASES if not self.bad_results[c]["ok"]]
            if not missing:
                return
            await asyncio.gather(*(self.run_bad(c) for c in missing))

    # --- calibration ---------------------------------------------------------------------------
    async def calibrate(self) -> None:
        client = await SoakClient.connect(self.socket, client_name="bench.soak/calibrate")
        try:
            for w, (chunks, rate, name) in enumerate(self.audio):
                for vad in (True, False):
                    events: list[ServerMessage] = []
                    finals = await client.transcribe(
                        b"".join(chunks),
                        rate,
                        stream=f"cal{w}{int(vad)}",
                        chunk_ms=CHUNK_MS,
                        vad=None if vad else NO_VAD,
                        on_event=events.append,
                        timeout=30.0,
                    )
                    closed = next(e for e in events if isinstance(e, Closed))
                    self.calib[(w, vad)] = Calib(
                        finals={f.utterance: (f.text, f.start_ms, f.end_ms) for f in finals},
                        utterances=closed.stats.utterances,
                        audio_ms=closed.stats.audio_ms,
                    )
                    if len(finals) != closed.stats.utterances:
                        raise SystemExit(f"bench.soak: calibration of {name} gave {events}")
        finally:
            await client.close()

    # --- kills ---------------------------------------------------------------------------------
    def workers_running(self) -> bool:
        try:
            st = ControlClient.status(self.control, timeout=5.0)
        except ClientError:
            return False
        return all(w.state == "running" for lane in st.lanes for w in lane.workers)

    async def wait_workers_running(self, timeout: float) -> bool:
        deadline = _now() + timeout
        while _now() < deadline:
            if await asyncio.to_thread(self.workers_running):
                return True
            await asyncio.sleep(0.2)
        return False

    def kill_times(self) -> list[float]:
        """When the kills are due, in seconds after the load starts."""
        if self.cfg.kill_every_s <= 0:
            return []
        t = min(self.cfg.kill_every_s, max(5.0, self.cfg.duration_s / 3))
        out = []
        while t < self.cfg.duration_s - 2.0:
            out.append(t)
            t += self.cfg.kill_every_s
        return out

    async def killer(self) -> None:
        for offset in self.kill_times():
            await _sleep_until(self.load_start + offset)
            if not await self.wait_workers_running(30.0):
                self.problem("workers not all running 30 s after a kill was due: kill skipped")
                continue
            pids = await asyncio.to_thread(worker_pids, self.supervisor_pid)
            if not pids:
                self.problem("no worker processes found to kill: kill skipped")
                continue
            role, lane = self.rng.choice(sorted(pids))
            pid = pids[(role, lane)]
            at = _now()
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                self.problem(f"{role} lane {lane} (pid {pid}) was gone: kill skipped")
                continue
            kill: dict[str, Any] = {"t": self.t(), "mono": at, "role": role, "lane": lane}
            kill["pid"] = pid
            self.kills.append(kill)
            print(f"soak {self.t():7.1f} s  SIGKILL {role} lane {lane} (pid {pid})", flush=True)
            while _now() - at < 60.0:
                await asyncio.sleep(0.1)
                new = (await asyncio.to_thread(worker_pids, self.supervisor_pid)).get((role, lane))
                if new is not None and new != pid:
                    kill["new_pid"] = new
                    break
            if await self.wait_workers_running(60.0):
                kill["serving_after_s"] = round(_now() - at, 3)
            else:
                self.problem(f"{role} lane {lane} not serving 60 s after its kill")

    # --- sampling ------------------------------------------------------------------------------
    def sample(self) -> dict[str, Any]:
        procs: dict[str, Any] = {}
        sup = proc_usage(self.supervisor_pid)
        if sup is not None:
            procs["supervisor"] = sup
        for (role, lane), pid in sorted(worker_pids(self.supervisor_pid).items()):
            u = proc_usage(pid)
            if u is not None:
                procs[f"{role}/{lane}"] = u
        me = proc_usage(os.getpid())
        if me is not None:
            procs["soak_client"] = me
        out: dict[str, Any] = {
            "t": self.t(),
            "procs": procs,
            "shm_segments": len(shm_segments(self.instance, self.supervisor_pid)),
        }
        try:
            st = ControlClient.status(self.control, timeout=5.0)
        except ClientError as exc:
            out["status_error"] = f"{exc.code}: {exc}"
            self.c["status_failures"] += 1
            self.problem(f"control socket: {exc}")
        else:
            keep = (
                "ingress.connections",
                "ingress.streams",
                "ingress.streams_total",
                "ingress.utterances",
                "ingress.finals",
                "ingress.errors_sent",
                "ingress.bad_frames",
                "ingress.pending_records",
                "infer.active_utterances",
                "infer.waiting_utterances",
                "infer.dropped_records",
            )
            out["status"] = {
                "state": st.state,
                "totals": {k: st.totals[k] for k in keep if k in st.totals},
                "workers": {
                    f"{w.role}/{w.lane}": {"pid": w.pid, "state": w.state, "restarts": w.restarts}
                    for lane in st.lanes
                    for w in lane.workers
                },
                "failed_lanes": [lane.lane for lane in st.lanes if lane.failed],
            }
        return out

    async def take_sample(self) -> dict[str, Any]:
        s = await asyncio.to_thread(self.sample)
        self.all_conns = [c for c in self.all_conns if not c.dead]
        s["client"] = {
            "connections": len(self.all_conns),
            "streams_started": self.c["streams_started"],
            "bad_clients": self.c["bad_clients"],
            "utterances_accepted": self.c["utterances_accepted"],
            "utterances_lost": self.c["utterances_lost"],
        }
        self.samples.append(s)
        return s

    async def sampler(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            s = await self.take_sample()
            print(self.progress_line(s), flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.cfg.sample_every_s)

    def progress_line(self, s: dict[str, Any]) -> str:
        c = self.c
        mib = {k: v["rss"] / 2**20 for k, v in s["procs"].items()}
        fds = {k: v["fds"] for k, v in s["procs"].items()}
        keys = [k for k in sorted(s["procs"]) if k != "soak_client"]
        rss = " ".join(f"{k.replace('supervisor', 'sup')} {mib[k]:.1f}" for k in keys)
        fd = " ".join(f"{fds[k]}" for k in keys)
        return (
            f"soak {s['t']:7.1f}/{self.cfg.duration_s:g} s  streams {c['streams_started']} "
            f"(+{c['bad_clients']} bad)  utts {c['utterances_accepted']}  finals {c['finals']}  "
            f"lost {c['utterances_lost']}  explained {sum(self.explained.values())}  "
            f"kills {len(self.kills)}  errors good {sum(self.errors_good.values())} "
            f"bad {sum(self.errors_bad.values())}  | RSS MiB {rss} | fds {fd} | "
            f"shm {s['shm_segments']}"
        )

    # --- the end -------------------------------------------------------------------------------
    async def idle_check(self) -> dict[str, Any]:
        """After every client has gone the daemon must hold nothing: poll up to 15 s."""
        want = (
            "ingress.connections",
            "ingress.streams",
            "infer.active_utterances",
            "infer.waiting_utterances",
        )
        deadline = _now() + 15.0
        totals: dict[str, int] = {}
        while True:
            try:
                st = await asyncio.to_thread(ControlClient.status, self.control, timeout=5.0)
                totals = {k: st.totals.get(k, 0) for k in want}
            except ClientError as exc:
                return {"ok": False, "error": str(exc)}
            if not any(totals.values()) or _now() > deadline:
                return {"ok": not any(totals.values()), **totals}
            await asyncio.sleep(0.3)

    async def run(self) -> dict[str, Any]:
        self.t0 = _now()
        await self.calibrate()
        stop_sampling = asyncio.Event()
        sampler = asyncio.create_task(self.sampler(stop_sampling))
        self.load_start = _now()
        self.load_end = self.load_start + self.cfg.duration_s
        killer = asyncio.create_task(self.killer())
        await asyncio.gather(*(self.slot(k) for k in range(self.cfg.streams)))
        load_wall = _now() - self.load_start
        await killer
        await self.wait_workers_running(60.0)
        await self.cover_bad_cases()
        for conn in list(self.pool):
            await conn.close()
        self.pool.clear()
        idle = await self.idle_check()
        stop_sampling.set()
        await sampler
        # The supervisor closes a control connection on its next tick (0.1 s): let the idle
        # check's connections go before the last fd count.
        await asyncio.sleep(1.0)
        await self.take_sample()
        return {"load_wall_s": round(load_wall, 1), "idle": idle}


# --- the daemon -------------------------------------------------------------------------------


def daemon_config(backend: str, instance: str) -> str:
    text = f'instance = "{instance}"\nlanes = 2\nlog_level = "info"\n'
    text += f'[backend]\nkind = "{backend}"\n'
    if backend == "null":
        text += "interim_ms = 0\n"
    return text


def source_facts() -> dict[str, Any]:
    """The git commit of the tree and the files that differ from it (workers respawned after a
    kill load the files as they are then: edits during a run would mix versions)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "HEAD").strip() or None,
        "modified": [line[3:] for line in git("status", "--porcelain").splitlines()],
    }


def log_summary(path: Path) -> dict[str, Any]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"path": str(path), "lines": 0}
    levels: Counter[str] = Counter()
    notable: list[str] = []
    for line in lines:
        for level in ("WARNING", "ERROR", "CRITICAL"):
            if f" {level} " in line:
                levels[level] += 1
                if len(notable) < 80:
                    notable.append(line)
        if "Traceback" in line:
            levels["Traceback"] += 1
    return {"path": str(path), "lines": len(lines), "levels": dict(levels), "notable": notable}


def resources(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """Per role/lane: RSS and fds over time (first, median, last, max, growth after warm-up)
    and the pids seen; and for the longest-lived pid under that key (a killed worker's
    replacement starts a new life), its growth and RSS slope after its own warm-up, and its
    CPU use."""
    keys = sorted({k for s in samples for k in s["procs"]})
    out: dict[str, Any] = {}
    for key in keys:
        pts = [(s["t"], s["procs"][key]) for s in samples if key in s["procs"]]
        lives: dict[int, list[tuple[float, dict[str, Any]]]] = {}
        for t, u in pts:
            lives.setdefault(u["pid"], []).append((t, u))
        pid, life = max(lives.items(), key=lambda kv: kv[1][-1][0] - kv[1][0][0])
        t_first, t_last = life[0][0], life[-1][0]
        warm = [(t, u) for t, u in life if t >= t_first + warmup_s] or life[-1:]
        cpu = life[-1][1].get("cpu_s", 0.0) - life[0][1].get("cpu_s", 0.0)
        slope = slope_per_min([(t, u["rss"]) for t, u in warm])
        out[key] = {
            "rss": series_summary([(t, u["rss"]) for t, u in pts], warmup_s),
            "fds": series_summary([(t, u["fds"]) for t, u in pts], warmup_s),
            "pids": len(lives),
            "longest_life": {
                "pid": pid,
                "span_s": round(t_last - t_first, 1),
                "rss_first": life[0][1]["rss"],
                "rss_warm": warm[0][1]["rss"],
                "rss_last": life[-1][1]["rss"],
                "rss_growth_after_warmup": life[-1][1]["rss"] - warm[0][1]["rss"],
                "rss_slope_kib_per_min_after_warmup": (
                    round(slope / 1024, 1) if slope is not None else None
                ),
                "fds_warm": warm[0][1]["fds"],
                "fds_last": life[-1][1]["fds"],
                "cpu_percent": round(100 * cpu / (t_last - t_first), 1)
                if t_last > t_first
                else None,
            },
        }
    return out


async def _run(soak: Soak) -> dict[str, Any]:
    return await soak.run()


def run_soak(cfg: SoakConfig) -> dict[str, Any]:
    soak = Soak(cfg)
    for path in cfg.wavs:
        wav = load_wav(path)
        soak.audio.append((_chunks(wav.pcm, wav.sample_rate), wav.sample_rate, Path(path).name))
    started = dt.datetime.now(dt.UTC)
    daemon: DaemonProcess | None = None
    drain: NotifyDrain | None = None
    tmp: tempfile.TemporaryDirectory[str] | None = None
    exit_code: int | None = None
    shm_left: list[str] = []
    socket_left = False
    log_info: dict[str, Any] | None = None
    try:
        if cfg.socket is None:
            instance = f"soak{os.getpid()}"
            tmp = tempfile.TemporaryDirectory(prefix="asrd-soak-")
            runtime = Path(tmp.name)
            log_path = Path(cfg.log_path) if cfg.log_path else runtime / "asrd.log"
            daemon = DaemonProcess(
                daemon_config(cfg.backend, instance), runtime_dir=runtime, log_path=log_path
            )
            daemon.start(120.0)
            assert daemon.notify is not None
            drain = NotifyDrain(daemon.notify)
            soak.socket = str(daemon.socket_path)
            soak.control = str(daemon.control_path)
        else:
            soak.socket = cfg.socket
            soak.control = cfg.control_socket or str(default_control_socket_path())
        st = ControlClient.status(soak.control)
        soak.supervisor_pid = st.pid
        soak.instance = st.instance
        daemon_facts = {
            "pid": st.pid,
            "instance": st.instance,
            "version": st.version,
            "backend": st.backend,
            "lanes": len(st.lanes),
            "own": daemon is not None,
        }
        print(
            f"soak: asrd {st.version} pid {st.pid}, {len(st.lanes)} lanes, {st.backend} "
            f"backend; {cfg.streams} streams for {cfg.duration_s:g} s, a kill every "
            f"{cfg.kill_every_s:g} s, {100 * cfg.bad_share:g} % bad clients",
            flush=True,
        )
        outcome = asyncio.run(_run(soak))
        restarts = {}
        with contextlib.suppress(ClientError):
            final_status = ControlClient.status(soak.control)
            workers = [w for lane in final_status.lanes for w in lane.workers]
            restarts = {f"{w.role}/{w.lane}": w.restarts for w in workers}
        if daemon is not None:
            if drain is not None:
                drain.stop()
            exit_code = daemon.stop(60.0)
            shm_left = shm_segments(soak.instance)
            socket_left = daemon.socket_path.exists()
            if daemon.log_path is not None:
                log_info = log_summary(daemon.log_path)
        if drain is not None:
            daemon_facts["notify_messages"] = drain.count
            daemon_facts["notify_other"] = drain.other
    finally:
        if drain is not None:
            drain.stop()
        if daemon is not None:
            daemon.kill_session()
        if tmp is not None:
            tmp.cleanup()
    return build_report(
        soak,
        cfg,
        started,
        daemon_facts,
        outcome,
        restarts=restarts,
        exit_code=exit_code,
        shm_left=shm_left,
        socket_left=socket_left,
        log_info=log_info,
    )


def build_report(
    soak: Soak,
    cfg: SoakConfig,
    started: dt.datetime,
    daemon_facts: dict[str, Any],
    outcome: dict[str, Any],
    *,
    restarts: dict[str, int],
    exit_code: int | None,
    shm_left: list[str],
    socket_left: bool,
    log_info: dict[str, Any] | None,
) -> dict[str, Any]:
    c = soak.c
    bad_cases: dict[str, dict[str, Any]] = {
        case: {
            "expected_error": EXPECTED_ERROR[case],
            "runs": sum(r.values()),
            "ok": r["ok"],
            "interrupted": r["interrupted"],
            "failed": r["failed"],
        }
        for case, r in soak.bad_results.items()
    }
    checks = {
        "no_utterance_lost": c["utterances_lost"] == 0,
        "finals_match_calibration": c["mismatched_finals"] == 0 or cfg.backend != "null",
        "every_bad_case_got_its_error": all(
            v["ok"] > 0 and v["failed"] == 0 for v in bad_cases.values()
        ),
        "every_planned_kill_done": len(soak.kills) == len(soak.kill_times())
        and all("serving_after_s" in k for k in soak.kills),
        "control_socket_answered": c["status_failures"] == 0,
        "daemon_idle_at_end": bool(outcome["idle"].get("ok")),
        "daemon_exit_0": exit_code == 0 if daemon_facts["own"] else True,
        "no_shm_left": not shm_left,
        "no_socket_left": not socket_left,
        "no_other_problems": not soak.problems,
    }
    accounting = {
        "utterances_accepted": c["utterances_accepted"],
        "finals": c["finals"],
        "utterance_errors": c["utterance_errors"],
        "utterances_lost": c["utterances_lost"],
        "explained": dict(soak.explained),
        "explained_total": sum(soak.explained.values()),
        "lost_detail": soak.lost_detail,
        "mismatched_finals": c["mismatched_finals"],
        "mismatch_examples": soak.mismatches,
        "partial_inconsistencies": c["partial_inconsistencies"],
        "ordering_violations": c["ordering_violations"],
        "ordering_examples": soak.violations,
        "utterance_count_mismatches": c["utterance_count_mismatches"],
        "worker_restarted_without_kill": c["worker_restarted_without_kill"],
        "unexpected_disconnects": c["unexpected_disconnects"],
        "disconnects_by_kill": c["disconnects_by_kill"],
    }
    streams = {k[len("streams_") :]: v for k, v in sorted(c.items()) if k.startswith("streams_")}
    return {
        "started_at": started.isoformat(timespec="seconds"),
        "config": {
            "duration_s": cfg.duration_s,
            "streams": cfg.streams,
            "kill_every_s": cfg.kill_every_s,
            "bad_share": cfg.bad_share,
            "sample_every_s": cfg.sample_every_s,
            "warmup_s": cfg.warmup_s,
            "finish_timeout_s": cfg.finish_timeout_s,
            "seed": cfg.seed,
            "backend": cfg.backend,
            "chunk_ms": CHUNK_MS,
            "wavs": cfg.wavs,
            "smoke": cfg.smoke,
        },
        "machine": machine_facts(),
        "source": source_facts(),
        "daemon": {
            **daemon_facts,
            "exit_code": exit_code,
            "shm_left": shm_left,
            "socket_left": socket_left,
            "idle_at_end": outcome["idle"],
            "restarts": restarts,
            "log": log_info,
        },
        "load": {
            "wall_s": outcome["load_wall_s"],
            "streams": streams,
            "bad_clients": c["bad_clients"],
            "connections_good": c["connections_good"],
            "connections_bad": c["connections_bad"],
            "chunks_sent": c["chunks_sent"],
            "audio_s_sent": round(c["audio_ms_sent"] / 1000, 1),
            "utterances_completed": c["utterances_completed"],
            "partials": c["partials"],
            "client_lateness_max_ms": round(soak.lateness_max * 1000, 1),
        },
        "calibration": {
            f"{soak.audio[w][2]} vad={'on' if vad else 'off'}": {
                "utterances": cal.utterances,
                "finals": {str(k): list(v) for k, v in cal.finals.items()},
            }
            for (w, vad), cal in sorted(soak.calib.items())
        },
        "accounting": accounting,
        "errors": {
            "good": dict(sorted(soak.errors_good.items())),
            "bad": dict(sorted(soak.errors_bad.items())),
        },
        "bad_cases": bad_cases,
        "bad_case_failures": soak.bad_failures,
        "kills": [{k: v for k, v in kill.items() if k != "mono"} for kill in soak.kills],
        "resources": resources(soak.samples, cfg.warmup_s),
        "shm_segments": series_summary(
            [(s["t"], s["shm_segments"]) for s in soak.samples], cfg.warmup_s
        ),
        "problems": soak.problems,
        "checks": checks,
        "ok": all(checks.values()),
        "samples": soak.samples,
    }


# --- report -----------------------------------------------------------------------------------


def _mib(v: int | None) -> str:
    return "-" if v is None else f"{v / 2**20:.1f}"


def _num(v: int | None) -> str:
    return "-" if v is None else str(v)


def format_report(r: dict[str, Any]) -> str:
    cfg, load, acc, d = r["config"], r["load"], r["accounting"], r["daemon"]
    s = load["streams"]
    lines = [
        f"asrd soak: {cfg['duration_s']:g} s ({load['wall_s']:g} s wall), {cfg['streams']} "
        f"streams, {d['backend']} backend, {d['lanes']} lanes, a kill every "
        f"{cfg['kill_every_s']:g} s, {100 * cfg['bad_share']:g} % bad clients",
        "",
        f"streams: {s.get('started', 0)} started ({s.get('good', 0)} good, "
        f"{s.get('witness', 0)} witnesses), {s.get('closed', 0)} closed, ended by a kill "
        f"{s.get('ended_by_infer_kill', 0)} (infer) + {s.get('ended_by_ingress_kill', 0)} "
        f"(ingress), timed out {s.get('timed_out', 0)}; bad clients {load['bad_clients']}; "
        f"connections {load['connections_good']} good + {load['connections_bad']} bad",
        f"audio: {load['chunks_sent']} chunks ({load['audio_s_sent']:g} s); utterances "
        f"accepted {acc['utterances_accepted']}, completed {load['utterances_completed']}, "
        f"finals {acc['finals']}, partials {load['partials']}",
        f"utterances LOST: {acc['utterances_lost']}   explained by kills: "
        + (", ".join(f"{k} {v}" for k, v in sorted(acc["explained"].items())) or "none")
        + f"   utterance errors: {acc['utterance_errors']}",
        f"finals not matching the calibration: {acc['mismatched_finals']}; partial "
        f"inconsistencies {acc['partial_inconsistencies']}; ordering violations "
        f"{acc['ordering_violations']}; unexpected disconnects {acc['unexpected_disconnects']}",
        "errors (good clients): "
        + (", ".join(f"{k} {v}" for k, v in r["errors"]["good"].items()) or "none"),
        "errors (bad clients):  "
        + (", ".join(f"{k} {v}" for k, v in r["errors"]["bad"].items()) or "none"),
        "bad cases: "
        + ", ".join(
            f"{k} {v['ok']}/{v['runs']}" + (f" (FAILED {v['failed']})" if v["failed"] else "")
            for k, v in r["bad_cases"].items()
        ),
        f"kills: {len(r['kills'])}: "
        + ", ".join(
            f"{k['role']}/{k['lane']}@{k['t']:.0f}s ({k.get('serving_after_s', '?')} s)"
            for k in r["kills"]
        ),
        "",
        f"{'process':<12}{'pids':>5}  {'RSS MiB first':>13}{'median':>8}{'last':>8}{'max':>8}"
        f"{'growth':>8}  {'fds first':>9}{'median':>7}{'last':>6}{'max':>6}{'growth':>7}  "
        f"{'longest life: s':>15}{'RSS growth':>11}{'KiB/min':>9}{'CPU %':>7}",
    ]
    for key, v in r["resources"].items():
        rss, fds, life = v["rss"], v["fds"], v["longest_life"]
        slope = life["rss_slope_kib_per_min_after_warmup"]
        lines.append(
            f"{key:<12}{v['pids']:>5}  {_mib(rss['first']):>13}{_mib(rss['median']):>8}"
            f"{_mib(rss['last']):>8}{_mib(rss['max']):>8}{_mib(rss.get('growth')):>8}  "
            f"{_num(fds['first']):>9}{_num(fds['median']):>7}{_num(fds['last']):>6}"
            f"{_num(fds['max']):>6}{_num(fds.get('growth')):>7}  "
            f"{life['span_s']:>15.0f}{_mib(life['rss_growth_after_warmup']):>11}"
            f"{'-' if slope is None else f'{slope:.0f}':>9}"
            f"{'-' if life['cpu_percent'] is None else life['cpu_percent']:>7}"
        )
    shm = r["shm_segments"]
    lines += [
        f"(growth: from the first sample after {cfg['warmup_s']:g} s of warm-up to the last; "
        "a killed worker's replacement restarts the series, so the longest life of each key "
        "is also shown: its RSS growth and slope after its own warm-up, and its CPU use)",
        f"/dev/shm segments: first {shm['first']}, max {shm['max']}, last {shm['last']}; "
        f"left after exit: {len(d['shm_left'])}",
        f"daemon: idle at the end {d['idle_at_end']}, exit code {d['exit_code']}, restarts "
        f"{d['restarts']}",
        "checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in r["checks"].items()),
    ]
    if r["problems"]:
        lines.append(f"problems ({len(r['problems'])}):")
        lines += [f"  {p}" for p in r["problems"][:20]]
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------


def _share(text: str) -> float:
    v = float(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1: {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.soak",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(__doc__ or "").split("\n\n")[0],
        epilog=(
            "examples:\n"
            "  python -m bench.soak --duration 1800        # 30 minutes, null backend\n"
            "  python -m bench.soak --smoke                # ~20 s check of the soak itself\n"
            "  python -m bench.soak --backend embedded --streams 4 --duration 600"
        ),
    )
    p.add_argument("--duration", type=_pos_float, default=1800.0, metavar="S", help="(1800)")
    p.add_argument("--streams", type=_pos_int, default=20, metavar="N", help="streams (20)")
    p.add_argument("--backend", choices=("null", "embedded"), default="null", help="(null)")
    p.add_argument(
        "--kill-every",
        type=float,
        default=60.0,
        metavar="S",
        help="SIGKILL a random worker every S seconds; 0: never (60)",
    )
    p.add_argument("--bad-share", type=_share, default=0.05, metavar="F", help="bad clients (0.05)")
    p.add_argument(
        "--sample-every", type=_pos_float, default=10.0, metavar="S", help="sampling (10)"
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        metavar="S",
        help="growth is measured from the first sample after S s (min(120, duration/5))",
    )
    p.add_argument(
        "--finish-timeout",
        type=_pos_float,
        default=30.0,
        metavar="S",
        help="after Finish, wait S s for Closed before counting a stream's utterances lost (30)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    p.add_argument(
        "--wav",
        action="append",
        metavar="FILE",
        help="WAV to play (repeatable; default samples/*.wav)",
    )
    p.add_argument("--socket", metavar="PATH", help="use a running daemon instead of starting one")
    p.add_argument("--control-socket", metavar="PATH", help="its control socket")
    p.add_argument("--log", metavar="PATH", help="keep the daemon's log here")
    p.add_argument(
        "--json", metavar="PATH", help="report file (default bench/results/soak-<timestamp>.json)"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a ~20 s run with 6 streams, one kill and every bad case: checks the soak itself",
    )
    return p


def config_from_args(args: argparse.Namespace) -> SoakConfig:
    duration, streams, kill_every = args.duration, args.streams, args.kill_every
    sample_every, bad_share = args.sample_every, args.bad_share
    if args.smoke:
        duration, streams, kill_every, sample_every = 20.0, 6, 12.0, 2.0
        bad_share = max(bad_share, 0.2)
    warmup = args.warmup if args.warmup is not None else min(120.0, duration / 5)
    wavs = args.wav or default_wavs()
    if not wavs:
        raise SystemExit("bench.soak: no WAV files: give --wav FILE (samples/*.wav not found)")
    return SoakConfig(
        duration_s=duration,
        streams=streams,
        kill_every_s=kill_every,
        bad_share=bad_share,
        sample_every_s=sample_every,
        warmup_s=warmup,
        finish_timeout_s=args.finish_timeout,
        seed=args.seed if args.seed is not None else int(time.time()),
        backend=args.backend,
        wavs=wavs,
        socket=args.socket,
        control_socket=args.control_socket,
        log_path=args.log,
        smoke=args.smoke,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    report = run_soak(cfg)
    path = args.json
    if path is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = RESULTS_DIR / f"soak-{stamp}.json"
    out = write_report(report, path)
    print(format_report(report))
    print(f"report: {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
