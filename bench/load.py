"""Load generator for a running asrd: N real-time streams over M connections.

Each stream plays a WAV file in real time (``--chunk-ms`` chunks on a fixed schedule, starts
staggered over ``--ramp``) for ``--duration`` seconds; when its file ends the stream finishes
and a new one starts on the next chunk slot (``--mode restart``), or the file simply repeats on
the same stream (``--mode loop``). Measured, all on the monotonic clock:

- chunk round trip: an ``Audio`` chunk sent -> the first ``Partial`` whose ``seq`` is that
  chunk's or later (with ``interim_ms = 0`` and ``--no-vad`` every chunk gets one, or is covered
  by a later one when the recognizer fed several chunks at once: those count as ``coalesced``,
  with their own, longer, wait; with VAD on, chunks of silence get no partial and are skipped);
- final latency: ``Speech(end)`` received -> ``Final`` received (VAD cut), and ``Finish``
  sent -> ``Final`` received (end of a file);
- daemon CPU per chunk: CPU time of the asrd processes over the run / chunks sent;
- generator lateness: how late each chunk left against its schedule (if this grows, the
  generator is the bottleneck: add ``--procs``);
- errors by code, chunks sent, partials and finals received;
- the raw Unix-socket echo floor (``bench.echo``) on the same machine in the same run.

A table goes to stdout and everything to a JSON file with the machine's facts.

    python -m bench.load --socket /run/asrd/asrd.sock --streams 500 --connections 50 \\
        --duration 60 --no-vad --procs 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import multiprocessing
import os
import platform
import queue
import sys
import threading
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import psutil

from daemon.asrctl import load_wav
from daemon.errors import ClientError
from ipc.client import (
    STREAM_ENDING_CODES,
    AsyncClient,
    ControlClient,
    default_socket_path,
)
from ipc.protocol import Closed, Error, Final, Partial, Speech, Started, VadOverrides

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"


# --- statistics -------------------------------------------------------------------------------


def summarize(values: Any, scale: float = 1.0) -> dict[str, Any]:
    """count, mean, p50/p90/p99/p99.9 and max of ``values`` (times ``scale``), rounded."""
    a = np.asarray(values, dtype=np.float64) * scale
    if a.size == 0:
        return {
            "count": 0,
            "mean": None,
            "p50": None,
            "p90": None,
            "p99": None,
            "p999": None,
            "max": None,
        }
    p50, p90, p99, p999 = np.percentile(a, [50, 90, 99, 99.9])
    return {
        "count": int(a.size),
        "mean": round(float(a.mean()), 3),
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "p999": round(float(p999), 3),
        "max": round(float(a.max()), 3),
    }


# --- the generator (runs in this process or in --procs worker processes) ----------------------


@dataclass
class StreamPlan:
    index: int
    connection: int
    wav: int  # index into the loaded files
    offset_s: float  # start offset from t0


@dataclass
class GenConfig:
    socket: str
    chunk_ms: int
    duration_s: float
    vad: bool
    mode: str  # "restart" | "loop"
    drain_timeout_s: float
    wavs: list[str]
    connections: list[int]  # connection indexes this generator owns
    streams: list[StreamPlan]


@dataclass
class GenResult:
    """Raw samples (seconds) and counts from one generator; merged by the parent."""

    rtt: array[float] = field(default_factory=lambda: array("d"))
    final_after_end: array[float] = field(default_factory=lambda: array("d"))
    final_after_finish: array[float] = field(default_factory=lambda: array("d"))
    lateness: array[float] = field(default_factory=lambda: array("d"))
    chunks_sent: int = 0
    audio_s_sent: float = 0.0
    partials: int = 0
    partials_matched: int = 0
    chunks_coalesced: int = 0  # answered by a later chunk's partial
    finals: int = 0
    streams_started: int = 0
    streams_closed: int = 0
    streams_unclosed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    connect_failures: int = 0
    welcome: dict[str, Any] | None = None
    cpu_s: float = 0.0  # the generator's own CPU time
    wall_s: float = 0.0

    def merge(self, other: GenResult) -> None:
        for name in ("rtt", "final_after_end", "final_after_finish", "lateness"):
            getattr(self, name).extend(getattr(other, name))
        for name in (
            "chunks_sent",
            "audio_s_sent",
            "partials",
            "partials_matched",
            "chunks_coalesced",
            "finals",
            "streams_started",
            "streams_closed",
            "streams_unclosed",
            "connect_failures",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors.update(other.errors)
        self.welcome = self.welcome or other.welcome
        self.cpu_s += other.cpu_s
        self.wall_s = max(self.wall_s, other.wall_s)


class _Stream:
    """Receive-side state of one stream incarnation."""

    __slots__ = ("closed", "ended", "finish_t", "id", "sent", "started", "utt_end")

    def __init__(self, sid: str) -> None:
        self.id = sid
        self.sent: deque[tuple[int, float]] = deque()  # (seq, send time) awaiting a partial
        self.finish_t = 0.0
        self.utt_end: dict[int, float] = {}  # utterance -> when its end became known
        self.closed = asyncio.Event()
        self.started = False
        self.ended = False  # by an Error, or Closed


class _Conn:
    def __init__(self, client: AsyncClient, res: GenResult, count_covered: bool) -> None:
        self.client = client
        self.res = res
        self.count_covered = count_covered  # VAD off: every chunk is fed to the recognizer
        self.streams: dict[str, _Stream] = {}
        self.alive = True
        self.closing = False  # we are closing it: the end of the connection is expected

    async def read(self) -> None:
        """Dispatch everything the daemon sends, timed at the socket read that brought it."""
        res = self.res
        client = self.client
        count_covered = self.count_covered
        try:
            async for msg in client:
                t = client.last_rx
                st = self.streams.get(getattr(msg, "stream", None) or "")
                tp = type(msg)
                if tp is Partial:
                    res.partials += 1
                    if st is None:
                        continue
                    seq = msg.seq  # type: ignore[union-attr]
                    sent = st.sent
                    while sent and sent[0][0] < seq:
                        sent_t = sent.popleft()[1]  # covered by this partial
                        if count_covered:  # VAD off: it was fed and answered with this one
                            res.rtt.append(t - sent_t)
                            res.chunks_coalesced += 1
                    if sent and sent[0][0] == seq:
                        res.rtt.append(t - sent.popleft()[1])
                        res.partials_matched += 1
                elif tp is Final:
                    res.finals += 1
                    if st is None:
                        continue
                    utt = msg.utterance  # type: ignore[union-attr]
                    end = st.utt_end.pop(utt, None)
                    if end is not None:
                        res.final_after_end.append(t - end)
                    elif st.finish_t:
                        res.final_after_finish.append(t - st.finish_t)
                elif tp is Speech:
                    if st is not None and msg.event == "end":  # type: ignore[union-attr]
                        if msg.reason == "finish" and st.finish_t:  # type: ignore[union-attr]
                            continue  # measured from our Finish instead
                        st.utt_end[msg.utterance] = t  # type: ignore[union-attr]
                elif tp is Closed:
                    res.streams_closed += 1
                    if st is not None:
                        st.ended = True
                        st.closed.set()
                        del self.streams[st.id]
                elif tp is Error:
                    assert isinstance(msg, Error)
                    res.errors[msg.code] += 1
                    # A refused start, or a code that ends the stream: nothing more comes.
                    if st is not None and (not st.started or msg.code in STREAM_ENDING_CODES):
                        st.ended = True
                        st.closed.set()
                        del self.streams[st.id]
                elif tp is Started and st is not None:
                    st.started = True
            if not self.closing:
                res.errors["connection_closed"] += 1
        except ClientError as exc:
            res.errors[exc.code] += 1
        finally:
            self.alive = False
            for st in self.streams.values():
                st.ended = True
                st.closed.set()


def _chunks(pcm: bytes, rate: int, chunk_ms: int) -> list[bytes]:
    step = max(2, rate * chunk_ms // 1000 * 2)
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


async def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _run_stream(
    conn: _Conn,
    plan: StreamPlan,
    audio: tuple[list[bytes], int],
    cfg: GenConfig,
    t0: float,
    end_at: float,
) -> None:
    chunks, rate = audio
    res = conn.res
    client = conn.client
    chunk_s = cfg.chunk_ms / 1000
    vad = None if cfg.vad else VadOverrides(enabled=False)
    next_t = t0 + plan.offset_s
    generation = 0
    closing: list[_Stream] = []
    while next_t < end_at and conn.alive:
        st = _Stream(f"s{plan.index}.{generation}")
        generation += 1
        conn.streams[st.id] = st
        await _sleep_until(next_t)
        try:
            await client.start(st.id, rate, interim=True, vad=vad)
        except ClientError:
            break
        res.streams_started += 1
        i = 0
        while next_t < end_at and not st.ended:
            chunk = chunks[i % len(chunks)]
            await _sleep_until(next_t)
            now = time.monotonic()
            res.lateness.append(now - next_t)
            st.sent.append((i, now))
            try:
                await client.send_audio(st.id, chunk, seq=i)
            except ClientError:
                return
            res.chunks_sent += 1
            res.audio_s_sent += len(chunk) / 2 / rate
            next_t += chunk_s
            i += 1
            if i % len(chunks) == 0 and cfg.mode == "restart":
                break
        if st.ended:
            next_t += chunk_s  # refused or failed: wait a slot rather than retry at once
        else:
            st.finish_t = time.monotonic()
            try:
                await client.finish(st.id)
            except ClientError:
                return
            closing.append(st)  # its final and Closed come while the next one streams
        # Finished streams closed long ago need no tracking.
        closing = [s for s in closing if not s.closed.is_set()]
    deadline = max(time.monotonic(), end_at) + cfg.drain_timeout_s
    for st in closing:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(st.closed.wait(), max(0.0, deadline - time.monotonic()))
        if not st.closed.is_set():
            res.streams_unclosed += 1


async def _connect_all(cfg: GenConfig, res: GenResult) -> dict[int, _Conn]:
    async def one(i: int) -> tuple[int, _Conn | None]:
        try:
            client = await AsyncClient.connect(cfg.socket, client_name=f"bench.load/{i}")
        except ClientError as exc:
            res.errors[exc.code] += 1
            res.connect_failures += 1
            return i, None
        if res.welcome is None and client.welcome is not None:
            res.welcome = msgspec.to_builtins(client.welcome)
        return i, _Conn(client, res, not cfg.vad)

    pairs = await asyncio.gather(*(one(i) for i in cfg.connections))
    return {i: c for i, c in pairs if c is not None}


async def generate(cfg: GenConfig, start_gate: Any = None) -> GenResult:
    """Connect, wait for the common start time (``start_gate()`` returns it), run, drain."""
    res = GenResult()
    audios = []
    for path in cfg.wavs:
        wav = load_wav(path)
        audios.append((_chunks(wav.pcm, wav.sample_rate, cfg.chunk_ms), wav.sample_rate))
    conns = await _connect_all(cfg, res)
    t0 = (
        await asyncio.get_running_loop().run_in_executor(None, start_gate)
        if start_gate is not None
        else time.monotonic() + 0.05
    )
    cpu0 = time.process_time()
    end_at = t0 + cfg.duration_s
    readers = [asyncio.create_task(c.read()) for c in conns.values()]
    streams = [
        asyncio.create_task(_run_stream(conns[p.connection], p, audios[p.wav], cfg, t0, end_at))
        for p in cfg.streams
        if p.connection in conns
    ]
    await asyncio.gather(*streams)
    res.wall_s = time.monotonic() - t0
    for c in conns.values():
        c.closing = True
        await c.client.close()
    for r in readers:
        r.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    res.cpu_s = time.process_time() - cpu0
    return res


def start_gate(ready: Any, start: Any) -> Callable[[], float]:
    """A generator process's gate: once connected, say so on ``ready``, then wait for the start
    time (the same monotonic instant for every process) on ``start``."""

    def gate() -> float:
        ready.put(os.getpid())
        t0: float = start.get()
        return t0

    return gate


def _child(cfg: GenConfig, ready: Any, start: Any, out: Any) -> None:
    """``--procs`` worker: connect, report ready, wait for the start time, run, send results."""
    out.put(asyncio.run(generate(cfg, start_gate(ready, start))))


# --- daemon CPU -------------------------------------------------------------------------------


def _title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return ""


def _is_asrd(title: str) -> bool:
    if title.startswith(("asrd:", "asrd run")):
        return True
    # `asrd run` through its console script, or `python -m daemon.cli run`.
    words = title.split()
    return "run" in words and any(os.path.basename(w) == "asrd" or w == "daemon.cli" for w in words)


def find_daemon_processes(daemon_pid: int | None) -> list[psutil.Process]:
    """The supervisor and its workers (``asrd: <role> lane <n>``)."""
    if daemon_pid is not None:
        root = psutil.Process(daemon_pid)
        found = [root]
        for child in root.children(recursive=True):
            if _title(child).startswith("asrd"):
                found.append(child)
        return found
    found = []
    for p in psutil.process_iter():
        if p.pid != os.getpid() and _is_asrd(_title(p)):
            found.append(p)
    # A supervisor started some other way is still the parent of its workers.
    pids = {p.pid for p in found}
    for p in list(found):
        with contextlib.suppress(psutil.Error):
            parent = p.parent()
            if parent is not None and parent.pid not in pids and _title(p).startswith("asrd:"):
                found.append(parent)
                pids.add(parent.pid)
    return found


class CpuMeter:
    """CPU seconds used by the daemon's processes between ``start()`` and ``stop()``.

    Processes are re-discovered every ``interval`` so respawned workers are counted; a process
    that exits keeps the last figure sampled for it.
    """

    def __init__(self, daemon_pid: int | None, interval: float = 0.5) -> None:
        self.daemon_pid = daemon_pid
        self.interval = interval
        self.base: dict[tuple[int, float], float] = {}
        self.last: dict[tuple[int, float], float] = {}
        self.titles: dict[tuple[int, float], str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)

    def _sample(self, baseline: bool) -> None:
        try:
            procs = find_daemon_processes(self.daemon_pid)
        except psutil.Error:
            return
        for p in procs:
            try:
                with p.oneshot():
                    key = (p.pid, p.create_time())
                    t = p.cpu_times()
                    title = _title(p)
            except psutil.Error:
                continue
            used = t.user + t.system
            if key not in self.base:
                # Present at the start: count from now. Appeared later: all of its time.
                self.base[key] = used if baseline else 0.0
            self.last[key] = used
            self.titles[key] = title

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample(False)

    def start(self) -> None:
        self._sample(True)
        self._thread.start()

    def stop(self) -> dict[str, float]:
        """CPU seconds by process title (and ``"total"``)."""
        self._stop.set()
        self._thread.join(5.0)
        self._sample(False)
        by_title: dict[str, float] = {}
        for key, used in self.last.items():
            title = self.titles[key]
            by_title[title] = by_title.get(title, 0.0) + used - self.base[key]
        out = {k: round(v, 4) for k, v in sorted(by_title.items())}
        out["total"] = round(sum(by_title.values()), 4)
        return out


def _role(title: str) -> str:
    words = title.split()
    if title.startswith("asrd:") and len(words) >= 2:
        return words[1]  # "ingress", "infer"
    return "supervisor"


# --- machine facts ----------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "cpu model")):
                model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for pkg in ("asrd", "msgspec", "numpy", "psutil", "soxr", "webrtcvad-wheels", "pocketsphinx"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "hostname": platform.node(),
        "cpu_model": model,
        "cpus_logical": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_bytes": psutil.virtual_memory().total,
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
    }


# --- orchestration ----------------------------------------------------------------------------


def default_wavs() -> list[str]:
    for folder in (REPO / "samples", REPO.parent / "shared" / "speech"):
        found = sorted(str(p) for p in folder.glob("*.wav"))
        if found:
            return found
    return []


def wavs_at(rate: int) -> list[str]:
    """The files among :func:`default_wavs` at ``rate`` Hz (for runs that must not resample)."""
    out = []
    for path in default_wavs():
        with contextlib.suppress(Exception):
            if load_wav(path).sample_rate == rate:
                out.append(path)
    return out


def plan_streams(
    streams: int, connections: int, wavs: int, chunk_ms: int, ramp_s: float | None
) -> list[StreamPlan]:
    """Stream i on connection i % M, file i % W, started at i/N of the ramp.

    The default ramp is one chunk period: sends are then spread evenly over time instead of
    arriving in bursts, as independent real sources would.
    """
    ramp = chunk_ms / 1000 if ramp_s is None else ramp_s
    return [
        StreamPlan(index=i, connection=i % connections, wav=i % wavs, offset_s=ramp * i / streams)
        for i in range(streams)
    ]


def _get(q: Any, children: list[Any], timeout: float) -> Any:
    """``q.get()``, but give up if a generator process died or the time is up."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(queue.Empty):
            return q.get(timeout=0.5)
        failed = [c.exitcode for c in children if c.exitcode not in (None, 0)]
        if failed:
            raise SystemExit(f"bench.load: a generator process failed (exit {failed[0]})")
        if time.monotonic() > deadline:
            raise SystemExit("bench.load: generator processes did not answer in time")


def run_load(args: argparse.Namespace) -> dict[str, Any]:
    wavs = args.wav or default_wavs()
    if not wavs:
        raise SystemExit("bench.load: no WAV files: give --wav FILE (samples/*.wav not found)")
    socket_path = str(args.socket or default_socket_path())
    connections = min(args.connections, args.streams)
    plans = plan_streams(args.streams, connections, len(wavs), args.chunk_ms, args.ramp)
    procs = max(1, min(args.procs, connections))

    def cfg_for(part: int) -> GenConfig:
        owned = {c for c in range(connections) if c % procs == part}
        return GenConfig(
            socket=socket_path,
            chunk_ms=args.chunk_ms,
            duration_s=args.duration,
            vad=not args.no_vad,
            mode=args.mode,
            drain_timeout_s=args.drain_timeout,
            wavs=wavs,
            connections=sorted(owned),
            streams=[p for p in plans if p.connection in owned],
        )

    floor = None
    if not args.no_floor:
        from bench.echo import measure

        floor = measure(args.floor_count)

    meter = CpuMeter(args.daemon_pid)
    started = dt.datetime.now(dt.UTC)
    if procs == 1:
        meter.start()
        res = asyncio.run(generate(cfg_for(0)))
        cpu = meter.stop()
    else:
        ctx = multiprocessing.get_context("spawn")
        ready, out = ctx.Queue(), ctx.Queue()
        starts = [ctx.Queue() for _ in range(procs)]
        children = [
            ctx.Process(target=_child, args=(cfg_for(k), ready, starts[k], out), daemon=True)
            for k in range(procs)
        ]
        for c in children:
            c.start()
        for _ in children:
            _get(ready, children, 120.0)  # every generator has connected
        meter.start()
        t0 = time.monotonic() + 0.1  # CLOCK_MONOTONIC is shared by all processes
        for q in starts:
            q.put(t0)
        res = GenResult()
        for _ in children:
            res.merge(_get(out, children, args.duration + args.drain_timeout + 120))
        cpu = meter.stop()
        for c in children:
            c.join(10)

    status = None
    with contextlib.suppress(ClientError, OSError):
        control = args.control_socket
        st = ControlClient.status(control, timeout=2.0)
        status = {"backend": st.backend, "lanes": len(st.lanes), "version": st.version}

    roles: dict[str, float] = {}
    for title, secs in cpu.items():
        if title != "total":
            roles[_role(title)] = roles.get(_role(title), 0.0) + secs
    per_chunk = (
        {r: round(s * 1e6 / res.chunks_sent, 2) for r, s in sorted(roles.items())}
        if res.chunks_sent
        else {}
    )
    total_cpu = cpu.get("total", 0.0)
    return {
        "started_at": started.isoformat(timespec="seconds"),
        "config": {
            "socket": socket_path,
            "streams": args.streams,
            "connections": connections,
            "procs": procs,
            "duration_s": args.duration,
            "chunk_ms": args.chunk_ms,
            "vad": not args.no_vad,
            "mode": args.mode,
            "ramp_s": args.ramp if args.ramp is not None else args.chunk_ms / 1000,
            "wavs": wavs,
            "daemon_pid": args.daemon_pid,
        },
        "machine": machine_facts(),
        "daemon": {"welcome": res.welcome, "status": status},
        "results": {
            "chunk_rtt_ms": summarize(res.rtt, 1000),
            "final_after_speech_end_ms": summarize(res.final_after_end, 1000),
            "final_after_finish_ms": summarize(res.final_after_finish, 1000),
            "generator_lateness_ms": summarize(res.lateness, 1000),
            "chunks_sent": res.chunks_sent,
            "audio_s_sent": round(res.audio_s_sent, 1),
            "partials": res.partials,
            "partials_matched": res.partials_matched,
            "chunks_coalesced": res.chunks_coalesced,
            "finals": res.finals,
            "streams_started": res.streams_started,
            "streams_closed": res.streams_closed,
            "streams_unclosed": res.streams_unclosed,
            "connect_failures": res.connect_failures,
            "errors": dict(res.errors),
            "wall_s": round(res.wall_s, 3),
            "generator_cpu_s": round(res.cpu_s, 3),
            "daemon_cpu_s": cpu,
            "daemon_cpu_us_per_chunk": (
                round(total_cpu * 1e6 / res.chunks_sent, 2) if res.chunks_sent else None
            ),
            "daemon_cpu_us_per_chunk_by_role": per_chunk,
            "daemon_processes_found": len(cpu) - 1,
        },
        "echo_floor": floor,
    }


def _fmt(v: Any, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def format_report(report: dict[str, Any]) -> str:
    c, r = report["config"], report["results"]
    lines = [
        f"asrd load: {c['streams']} streams over {c['connections']} connections "
        f"({c['procs']} generator process{'es' if c['procs'] > 1 else ''}), {c['duration_s']:g} s, "
        f"{c['chunk_ms']} ms chunks, VAD {'on' if c['vad'] else 'off'}, mode {c['mode']}",
        "",
        f"{'':28}{'count':>9}{'p50':>10}{'p90':>10}{'p99':>10}{'p99.9':>10}{'max':>10}",
    ]
    for label, key in (
        ("chunk round trip (ms)", "chunk_rtt_ms"),
        ("final after speech end (ms)", "final_after_speech_end_ms"),
        ("final after finish (ms)", "final_after_finish_ms"),
        ("generator lateness (ms)", "generator_lateness_ms"),
    ):
        s = r[key]
        lines.append(
            f"{label:28}{s['count']:>9}{_fmt(s['p50']):>10}{_fmt(s['p90']):>10}"
            f"{_fmt(s['p99']):>10}{_fmt(s['p999']):>10}{_fmt(s['max']):>10}"
        )
    floor = report.get("echo_floor")
    if floor:
        lines.append(
            f"{'echo floor (us)':28}{floor['count']:>9}{_fmt(floor['p50_us'], 1):>10}"
            f"{'':>10}{_fmt(floor['p99_us'], 1):>10}{'':>10}{_fmt(floor['max_us'], 1):>10}"
        )
    lines += [
        "",
        f"chunks sent {r['chunks_sent']} ({r['audio_s_sent']:g} s of audio), partials "
        f"{r['partials']} ({r['partials_matched']} matched to their chunk, "
        f"{r.get('chunks_coalesced', 0)} chunks answered by a later one), finals {r['finals']}",
        f"streams started {r['streams_started']}, closed {r['streams_closed']}, "
        f"unclosed {r['streams_unclosed']}; connect failures {r['connect_failures']}",
        "errors: " + (", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "none"),
    ]
    if r["daemon_processes_found"]:
        roles = ", ".join(f"{k} {v}" for k, v in r["daemon_cpu_us_per_chunk_by_role"].items())
        lines.append(
            f"daemon CPU: {r['daemon_cpu_s']['total']:.2f} s over "
            f"{r['daemon_processes_found']} processes = "
            f"{_fmt(r['daemon_cpu_us_per_chunk'], 1)} us per chunk ({roles})"
        )
    else:
        lines.append("daemon CPU: no asrd processes found (give --daemon-pid)")
    lines.append(
        f"generator CPU: {r['generator_cpu_s']:.2f} s over {r['wall_s']:.1f} s wall "
        f"({100 * r['generator_cpu_s'] / max(r['wall_s'], 1e-9) / c['procs']:.0f}% of one core "
        "per process)"
    )
    m = report["machine"]
    lines.append(
        f"machine: {m['cpu_model']}, {m['cpus_usable']}/{m['cpus_logical']} CPUs, "
        f"kernel {m['kernel']}, Python {m['python']}"
    )
    return "\n".join(lines)


def add_generator_argument(p: argparse.ArgumentParser) -> None:
    """``--generator``, as every benchmark that loads the daemon spells it."""
    p.add_argument(
        "--generator",
        choices=("fleet", "asyncio"),
        default="fleet",
        help="load generator: fleet (a write per connection per period, as a gateway) or "
        "asyncio (a task per stream, as independent clients) (fleet)",
    )


def write_report(report: dict[str, Any], path: str | Path | None, name: str = "load") -> Path:
    """Write ``report`` as JSON to ``path``, by default ``bench/results/<name>-<time>.json``."""
    if path is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = RESULTS_DIR / f"{name}-{stamp}.json"
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(msgspec.json.format(msgspec.json.encode(report)) + b"\n")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.load",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(__doc__ or "").split("\n\n")[0],
        epilog=(
            "examples:\n"
            "  # transport benchmark: null backend with interim_ms = 0, one partial per chunk\n"
            "  asrd run --config configs/null.toml &\n"
            "  python -m bench.load --streams 500 --connections 50 --duration 60 --no-vad\n"
            "  # real recognition, VAD on, two generator processes\n"
            "  python -m bench.load --streams 8 --duration 120 --procs 2 --json out.json"
        ),
    )
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="daemon socket (default: $ASRD_SOCKET or the default configuration's)",
    )
    p.add_argument(
        "--control-socket",
        metavar="PATH",
        help="control socket, for the daemon's facts in the report",
    )
    p.add_argument("--streams", type=_pos_int, default=10, metavar="N", help="streams (10)")
    p.add_argument(
        "--connections",
        type=_pos_int,
        default=1,
        metavar="M",
        help="connections the streams are spread over (1)",
    )
    p.add_argument(
        "--duration", type=_pos_float, default=10.0, metavar="S", help="seconds of load (10)"
    )
    p.add_argument(
        "--chunk-ms",
        type=_pos_int,
        default=100,
        metavar="MS",
        help="audio per chunk, sent every MS (100)",
    )
    p.add_argument(
        "--wav",
        action="append",
        metavar="FILE",
        help="16-bit WAV to play (repeatable; default samples/*.wav, else ../shared/speech/*.wav)",
    )
    p.add_argument(
        "--no-vad",
        action="store_true",
        help="VadOverrides(enabled=False): each stream is one utterance",
    )
    p.add_argument(
        "--mode",
        choices=("restart", "loop"),
        default="restart",
        help="at the end of its file a stream finishes and a new one starts "
        "(restart, default) or the file repeats on the same stream (loop)",
    )
    p.add_argument(
        "--ramp",
        type=float,
        default=None,
        metavar="S",
        help="spread stream starts over S seconds (default: one chunk period)",
    )
    p.add_argument(
        "--procs",
        type=_pos_int,
        default=1,
        metavar="K",
        help="generator processes; connections are dealt out among them (1)",
    )
    p.add_argument(
        "--daemon-pid",
        type=int,
        metavar="PID",
        help="supervisor pid for CPU accounting (default: find asrd processes)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="wait for the last finals at most S seconds after the run (10)",
    )
    p.add_argument(
        "--json", metavar="PATH", help="report file (default bench/results/load-<timestamp>.json)"
    )
    p.add_argument("--no-floor", action="store_true", help="skip the echo floor measurement")
    p.add_argument(
        "--floor-count",
        type=_pos_int,
        default=5000,
        metavar="N",
        help="echo round trips for the floor (5000)",
    )
    return p


def _pos_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return v


def _pos_float(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be above 0: {text}")
    return v


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = run_load(args)
    path = write_report(report, args.json)
    print(format_report(report))
    print(f"report: {path}")
    errors = report["results"]["errors"]
    return 1 if report["results"]["connect_failures"] or errors.get("connection_closed") else 0


if __name__ == "__main__":
    sys.exit(main())
