"""The latency floor: asrd's own transport primitives in a minimal three-process pipeline.

What is measured is the round trip of one 3200-byte chunk (100 ms of 16 kHz s16le audio)
through the same building blocks asrd uses, with none of the daemon's logic around them::

    client ──UDS, msgpack frame──► ingress ──shm ring──► worker
           ◄──UDS, msgpack frame──  (epoll)  ◄──shm ring──  (echo)

- the **client** (this process) encodes an ``ipc.protocol.Audio`` frame with
  :class:`~ipc.framing.FrameWriter`, sends it on a blocking Unix stream socket and waits for the
  whole reply frame, which it decodes with msgspec; one chunk in flight (a closed loop);
- the **ingress** process serves the socket from an ``epoll`` loop: it reads into a
  :class:`~ipc.framing.FrameReader` (``get_buffer``/``buffer_updated``, as the daemon's
  ``BufferedProtocol`` does), pushes each Audio's PCM as an ``AUDIO`` record into the audio
  :class:`~ipc.ring.Ring` and wakes the worker through an :class:`~ipc.wakeup.Wakeup`
  (eventfd) only when its sleep flag is up; when the result ring's eventfd fires it drains the
  ring, encodes each record back into an Audio frame and writes it to its client;
- the **worker** process echoes each record from the audio ring into the result ring, sleeping
  in ``poll`` with the ring's sleep flag up when there is nothing to do, exactly like the
  infer worker's loop.

Two measurements of it, each ``--count`` timed round trips after ``--warmup`` untimed ones:
all three processes *pinned* to one core (``--cpu``, default the last usable one) and
*unpinned* (the scheduler places them). Beside them, the raw Unix-socket echo
(``bench.echo``: two processes, no framing library, no rings), pinned and unpinned: the floor
under the floor. A micro reference of the CPU (``cpu_reference``: one trivial Python function
call) is kept too, as the floor of the single-process micro-benchmarks.

Every figure is in microseconds. ``measure_floor`` is what the other benchmarks call to carry
their own floor (``latency``, ``capacity``); ``python -m bench floor`` runs it alone, prints a
table and writes ``bench/results/floor-<timestamp>.json`` with the machine's facts.

    python -m bench floor [--count 10000] [--cpu N] [--smoke]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from bench import echo
from bench.echo import recv_exactly
from bench.load import REPO, RESULTS_DIR, machine_facts, summarize, write_report
from daemon.placement import running_on
from ipc import records as rec
from ipc.framing import PREFIX, FrameReader, FrameWriter
from ipc.protocol import Audio
from ipc.ring import Ring
from ipc.wakeup import Wakeup

CHUNK_BYTES = 3200
RING_BYTES = 1 << 20
STOP = 0x7F  # record kind: the client went away, the worker exits
READY = b"ready\n"
FULL_COUNT = 10000
QUICK_COUNT = 2000  # what latency / capacity measure before their own runs
SMOKE_COUNT = 300
PACE_S = 0.1  # real time for 100 ms chunks


# --- the two server processes -----------------------------------------------------------------


def _parent_gone(ppid: int) -> bool:
    return os.getppid() != ppid


def serve_worker(audio_name: str, result_name: str, fds: list[int]) -> None:
    """Echo every record of the audio ring into the result ring until a STOP record."""
    ppid = os.getppid()
    audio = Ring.attach(audio_name)
    results = Ring.attach(result_name)
    audio_data = Wakeup.from_fds(fds[0], fds[1])
    result_data = Wakeup.from_fds(fds[2], fds[3])
    poller = select.poll()
    poller.register(audio_data.fileno(), select.POLLIN)
    sys.stdout.buffer.write(READY)
    sys.stdout.flush()
    try:
        while True:
            records = audio.pop_many(64)
            if not records:
                if audio.prepare_sleep():
                    woken = poller.poll(1000)
                    audio.end_sleep()
                    if woken:
                        audio_data.drain()
                    elif _parent_gone(ppid):
                        return
                continue
            for r in records:
                if r.kind == STOP:
                    return
                while not results.try_push(r.kind, r.key, r.seq, r.payload):
                    # One chunk in flight never fills a 1 MiB ring; stay correct anyway.
                    result_data.signal()
                    time.sleep(0.0001)
            if results.consumer_sleeping():
                result_data.signal()
    finally:
        audio.close()
        results.close()


class _Conn:
    __slots__ = ("key", "reader", "sock", "stream")

    def __init__(self, sock: socket.socket, key: int) -> None:
        self.sock = sock
        self.key = key
        self.stream = ""
        self.reader: FrameReader[Audio] = FrameReader(Audio, 1 << 20)


def serve_ingress(path: str, audio_name: str, result_name: str, fds: list[int]) -> None:
    """Serve clients on ``path`` from an epoll loop; exit when the last client leaves."""
    ppid = os.getppid()
    audio = Ring.attach(audio_name)
    results = Ring.attach(result_name)
    audio_data = Wakeup.from_fds(fds[0], fds[1])
    result_data = Wakeup.from_fds(fds[2], fds[3])
    writer = FrameWriter()
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(8)
    ep = select.epoll()
    ep.register(lsock.fileno(), select.EPOLLIN)
    ep.register(result_data.fileno(), select.EPOLLIN)
    conns: dict[int, _Conn] = {}  # by fd
    by_key: dict[int, _Conn] = {}
    next_key = 1
    served = False
    # As in the ingress worker: the result ring's sleep flag is up whenever we are not
    # draining it, so the worker must wake us; it goes down while we drain.
    results.prepare_sleep()
    sys.stdout.buffer.write(READY)
    sys.stdout.flush()

    def on_results() -> None:
        results.end_sleep()
        result_data.drain()
        while True:
            batch = results.pop_many(256)
            if not batch:
                if results.prepare_sleep():
                    break
                continue
            for r in batch:
                conn = by_key.get(r.key)
                if conn is None:
                    continue
                writer.append(Audio(stream=conn.stream, seq=r.seq, pcm=r.payload))
                conn.sock.sendall(writer.take())

    def on_client(conn: _Conn) -> bool:
        view = conn.reader.get_buffer()
        n = conn.sock.recv_into(view)
        view.release()
        if n == 0:
            return False
        conn.reader.buffer_updated(n)
        pushed = False
        for msg in conn.reader:
            if type(msg) is not Audio:
                continue  # a BadFrame: the client is ours, this does not happen
            conn.stream = msg.stream
            while not audio.try_push(rec.AUDIO, conn.key, msg.seq, msg.pcm):
                audio_data.signal()
                time.sleep(0.0001)
            pushed = True
        if pushed and audio.consumer_sleeping():
            audio_data.signal()
        return True

    try:
        while True:
            events = ep.poll(1.0)
            if not events and _parent_gone(ppid):
                break
            for fd, _ in events:
                if fd == lsock.fileno():
                    sock, _ = lsock.accept()
                    conn = _Conn(sock, next_key)
                    next_key += 1
                    conns[sock.fileno()] = conn
                    by_key[conn.key] = conn
                    ep.register(sock.fileno(), select.EPOLLIN)
                    served = True
                elif fd == result_data.fileno():
                    on_results()
                else:
                    conn = conns[fd]
                    if not on_client(conn):
                        ep.unregister(fd)
                        del conns[fd]
                        del by_key[conn.key]
                        conn.sock.close()
            if served and not conns:
                break
    finally:
        while not audio.try_push(STOP, 0, 0, b""):
            time.sleep(0.001)
        audio_data.signal()
        lsock.close()
        ep.close()
        audio.close()
        results.close()


# --- the client -------------------------------------------------------------------------------


def _spawn(args: list[str], fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.floor", *args],
        stdout=subprocess.PIPE,
        pass_fds=fds,
        cwd=str(REPO),
    )


def _wait_ready(proc: subprocess.Popen[bytes], what: str) -> None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60.0)
    if not ready or proc.stdout.readline() != READY:
        raise RuntimeError(f"floor pipeline: the {what} process did not start")


def measure_pipeline(
    count: int = FULL_COUNT,
    warmup: int = 200,
    cpus: set[int] | None = None,
    pace_s: float = 0.0,
) -> dict[str, Any]:
    """``count`` timed chunk round trips through client -> ingress -> worker -> ingress ->
    client; all three processes on ``cpus`` when given; ``pace_s`` of sleep before each chunk
    (0.1 = real time, so every chunk finds the processes asleep). Times in microseconds."""
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    audio = Ring.create(f"/asrd-floor-{tag}-a", RING_BYTES)
    results = Ring.create(f"/asrd-floor-{tag}-r", RING_BYTES)
    audio_data, result_data = Wakeup(), Wakeup()
    fds = (*audio_data.fds(), *result_data.fds())
    fd_arg = ",".join(map(str, fds))
    procs: list[subprocess.Popen[bytes]] = []
    samples: list[float] = []
    try:
        with tempfile.TemporaryDirectory(prefix="asrd-floor-") as tmp, running_on(cpus):
            path = os.path.join(tmp, "ingress.sock")
            rings = ["--audio", audio.name, "--results", results.name, "--fds", fd_arg]
            procs.append(_spawn(["--serve", "worker", *rings], fds))
            procs.append(_spawn(["--serve", "ingress", "--socket", path, *rings], fds))
            _wait_ready(procs[0], "worker")
            _wait_ready(procs[1], "ingress")
            writer = FrameWriter()
            decoder = msgspec.msgpack.Decoder(Audio)
            pcm = os.urandom(CHUNK_BYTES)
            head = memoryview(bytearray(PREFIX))
            body = bytearray(1 << 16)
            perf = time.perf_counter_ns
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(path)
                for seq in range(warmup + count):
                    if pace_s:
                        time.sleep(pace_s)
                    t0 = perf()
                    sock.sendall(writer.encode(Audio(stream="floor", seq=seq, pcm=pcm)))
                    if not recv_exactly(sock, head):
                        raise RuntimeError("floor pipeline: the ingress process went away")
                    n = int.from_bytes(head, "big")
                    view = memoryview(body)[:n]
                    if not recv_exactly(sock, view):
                        raise RuntimeError("floor pipeline: the ingress process went away")
                    reply = decoder.decode(view)
                    t1 = perf()
                    view.release()
                    if reply.seq != seq or reply.pcm != pcm:
                        raise RuntimeError(f"floor pipeline: chunk {seq} came back wrong")
                    if seq >= warmup:
                        samples.append((t1 - t0) / 1000)
            for p in procs:
                p.wait(10)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
            if p.stdout is not None:
                p.stdout.close()
        for ring in (audio, results):
            ring.close()
            ring.unlink()
        audio_data.close()
        result_data.close()
    s = summarize(samples)
    return {
        "count": count,
        "pace_s": pace_s,
        "msg_bytes": CHUNK_BYTES,
        "p50_us": s["p50"],
        "p90_us": s["p90"],
        "p99_us": s["p99"],
        "min_us": round(min(samples), 3),
        "max_us": s["max"],
        "mean_us": s["mean"],
    }


def measure_echo(count: int, cpus: set[int] | None = None) -> dict[str, Any]:
    """``bench.echo`` (raw Unix-socket echo, 3200 bytes), its two processes on ``cpus``."""
    with running_on(cpus):
        return echo.measure(count, CHUNK_BYTES, warmup=min(200, max(10, count // 10)))


def cpu_reference(seconds: float = 0.2) -> dict[str, float]:
    """Best time of one call of a trivial Python function, in µs: how fast this machine runs
    Python right now (the floor of the single-process micro-benchmarks)."""

    def nothing(x: int) -> int:
        return x

    def run(n: int) -> None:
        f = nothing
        for i in range(n):
            f(i)

    def empty(n: int) -> None:
        for _ in range(n):
            pass

    def best(fn: Callable[[int], None]) -> float:
        n = 10_000  # about 0.5 ms a batch: a batch that was not preempted is likely
        out = float("inf")
        end = time.perf_counter() + seconds
        while True:
            t0 = time.perf_counter_ns()
            fn(n)
            out = min(out, (time.perf_counter_ns() - t0) / n)
            if time.perf_counter() >= end:
                return out

    loop = best(empty)
    call = best(run)
    return {
        "python_call_us": round(max(call - loop, 0.001) / 1000, 5),
        "python_loop_us": round(loop / 1000, 5),
    }


def default_cpu() -> int:
    return max(os.sched_getaffinity(0))


def measure_floor(
    count: int = QUICK_COUNT, cpu: int | None = None, *, pinned: bool = True, paced: int = 0
) -> dict[str, Any]:
    """The pipeline and the echo, unpinned and (``pinned``) on one core; with ``paced`` > 0,
    also that many pipeline round trips one per 100 ms (real time: each finds the processes
    asleep); plus the CPU reference. Returns ``{"figures": {flat key: µs}, "detail": {...}}``."""
    cpu = default_cpu() if cpu is None else cpu
    detail: dict[str, Any] = {"count": count, "cpu": cpu if pinned else None}
    detail["echo_unpinned"] = measure_echo(count)
    detail["pipeline_unpinned"] = measure_pipeline(count)
    if pinned:
        detail["echo_pinned"] = measure_echo(count, {cpu})
        detail["pipeline_pinned"] = measure_pipeline(count, cpus={cpu})
    if paced:
        detail["pipeline_paced"] = measure_pipeline(paced, warmup=5, pace_s=PACE_S)
    detail["cpu_reference"] = cpu_reference(0.05 if count <= SMOKE_COUNT else 0.2)
    figures: dict[str, float] = {}
    parts = ("pipeline_unpinned", "pipeline_pinned", "pipeline_paced", "echo_unpinned")
    for part in (*parts, "echo_pinned"):
        if part in detail:
            figures[f"{part}_p50_us"] = detail[part]["p50_us"]
            figures[f"{part}_p99_us"] = detail[part]["p99_us"]
    figures.update(detail["cpu_reference"])
    return {"figures": figures, "detail": detail}


# --- report -----------------------------------------------------------------------------------


def metric(
    value: float | None, unit: str, floor: str | None, better: str = "lower"
) -> dict[str, Any]:
    """One entry of a report's ``metrics`` (the shape ``bench.compare`` reads)."""
    return {"value": value, "unit": unit, "better": better, "floor": floor}


def floor_table(floor: dict[str, Any]) -> str:
    d = floor["detail"]
    lines = [
        f"{'floor (3200-byte chunk round trip, us)':44}{'count':>7}{'p50':>9}{'p90':>9}"
        f"{'p99':>9}{'max':>10}"
    ]
    labels = {
        "pipeline_pinned": f"pipeline, 3 processes on CPU {d.get('cpu')}",
        "pipeline_unpinned": "pipeline, unpinned",
        "pipeline_paced": "pipeline, unpinned, a chunk per 100 ms",
        "echo_pinned": f"raw UDS echo, 2 processes on CPU {d.get('cpu')}",
        "echo_unpinned": "raw UDS echo, unpinned",
    }
    for key, label in labels.items():
        r = d.get(key)
        if not r:
            continue
        p90 = r.get("p90_us")
        lines.append(
            f"{label:44}{r['count']:>7}{r['p50_us']:>9.1f}"
            f"{'-' if p90 is None else f'{p90:.1f}':>9}{r['p99_us']:>9.1f}{r['max_us']:>10.1f}"
        )
    c = d["cpu_reference"]
    lines.append(
        f"CPU reference: {1000 * c['python_call_us']:.1f} ns per Python call, "
        f"{1000 * c['python_loop_us']:.1f} ns per loop iteration"
    )
    return "\n".join(lines)


def build_report(floor: dict[str, Any], smoke: bool, started: dt.datetime) -> dict[str, Any]:
    f = floor["figures"]
    metrics: dict[str, Any] = {}
    # The pipeline against the raw echo measured beside it: how much asrd's primitives add.
    for part in ("pipeline_pinned", "pipeline_unpinned"):
        mode = part.split("_")[1]
        for q in ("p50", "p99"):
            if f"{part}_{q}_us" in f:
                metrics[f"{part}_{q}_us"] = metric(f[f"{part}_{q}_us"], "us", f"echo_{mode}_{q}_us")
    return {
        "benchmark": "floor",
        "started_at": started.isoformat(timespec="seconds"),
        "smoke": smoke,
        "config": {"count": floor["detail"]["count"], "cpu": floor["detail"]["cpu"]},
        "machine": {**machine_facts(), "loadavg": [round(x, 2) for x in os.getloadavg()]},
        "results": floor["detail"],
        "floor": f,
        "metrics": metrics,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench floor",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("--count", type=int, default=FULL_COUNT, help=f"round trips ({FULL_COUNT})")
    p.add_argument("--cpu", type=int, default=None, help="core for the pinned runs (last usable)")
    p.add_argument("--no-pinned", action="store_true", help="skip the pinned runs")
    p.add_argument("--json", metavar="PATH", help="report path (default bench/results/...)")
    p.add_argument("--smoke", action="store_true", help=f"{SMOKE_COUNT} round trips (tests)")
    p.add_argument("--serve", choices=("ingress", "worker"), help=argparse.SUPPRESS)
    p.add_argument("--socket", help=argparse.SUPPRESS)
    p.add_argument("--audio", help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)
    p.add_argument("--fds", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.serve:
        fds = [int(x) for x in args.fds.split(",")]
        if args.serve == "worker":
            serve_worker(args.audio, args.results, fds)
        else:
            serve_ingress(args.socket, args.audio, args.results, fds)
        return 0
    count = SMOKE_COUNT if args.smoke else args.count
    started = dt.datetime.now(dt.UTC)
    floor = measure_floor(count, args.cpu, pinned=not args.no_pinned)
    report = build_report(floor, args.smoke, started)
    path = args.json or RESULTS_DIR / f"floor-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out = write_report(report, Path(path))
    print(floor_table(floor))
    m = report["machine"]
    print(
        f"machine: {m['cpu_model']}, {m['cpus_usable']}/{m['cpus_logical']} CPUs, kernel "
        f"{m['kernel']}, Python {m['python']}, load average {m['loadavg'][0]}"
    )
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
