"""epoll against io_uring for the control plane: one request/response workload, four servers.

Every server speaks asrd's framing (4-byte big-endian length + one msgpack message, decoded
with :class:`~ipc.framing.FrameReader`, replies encoded with :class:`~ipc.framing.FrameWriter`)
on a Unix stream socket, and answers each request with the same message (an echo, so reply and
request are the same size). The servers differ only in their I/O path:

- ``asyncio``: an ``asyncio.BufferedProtocol`` on the default (epoll) loop, as the ingress
  worker reads its clients;
- ``selectors``: a ``selectors`` (epoll) loop with ``recv`` + blocking ``sendall``, exactly as
  the supervisor's control socket does today;
- ``uring``: :class:`ipc.uring.UringControlServer` in a loop of its own
  (``io_uring_wait_cqe_timeout`` with a 0.1 s tick);
- ``uring-selector``: the same server driven as the supervisor would drive it: its eventfd in a
  ``selectors`` loop, ``process()`` when it is readable.

Each server runs in its own process; the clients run in this one (``--clients`` connections,
each with one request outstanding: a closed loop). Measured per cell (backend x message size x
clients): round-trip latency (request written -> whole reply read; p50, p99), round trips per
second, and the server's CPU time per message (on-CPU nanoseconds of all its threads, from
``/proc/PID/task/*/schedstat``, so io_uring's kernel-side work and any io-wq threads count). The
cells are repeated ``--repeats`` times in rotating backend order, so drift hits every backend
alike. A table goes to stdout and everything, with the machine's facts, to
``bench/results/io_backend-<timestamp>.json``.

    python -m bench.io_backend [--count 5000] [--repeats 3] [--clients 1 16] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import psutil

from bench.load import machine_facts, summarize, write_report
from ipc.framing import BadFrame, FrameReader, FrameTooLarge, FrameWriter

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
BACKENDS = ("asyncio", "selectors", "uring", "uring-selector")
URING_BACKENDS = ("uring", "uring-selector")
SIZES = {"small": 72, "audio": 3200}  # payload bytes: ~100-byte frames; 100 ms of 16 kHz s16le
MAX_FRAME = 1 << 20
TICK_S = 0.1
READY = "ready"


class Echo(msgspec.Struct, tag="echo"):
    seq: int
    payload: bytes


class EchoError(msgspec.Struct, tag="echo_error"):
    message: str


def handle(msg: Echo | BadFrame) -> Echo | EchoError:
    """The one handler every server calls: the request back, or an error for a bad frame."""
    if isinstance(msg, BadFrame):
        return EchoError(message=msg.message)
    return msg


def too_large(exc: FrameTooLarge) -> EchoError:
    return EchoError(message=str(exc))


# --- servers (each in its own process) ----------------------------------------------------------


def _listen(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(64)
    return sock


def _ready(extra: str = "") -> None:
    sys.stdout.write(f"{READY} {os.getpid()} {extra}\n")
    sys.stdout.flush()


class _Stop:
    def __init__(self) -> None:
        self.flag = False
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, signum: int, frame: object) -> None:
        self.flag = True

    def __call__(self) -> bool:
        return self.flag


def serve_asyncio(path: str) -> None:
    class Conn(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.reader: FrameReader[Echo] = FrameReader(Echo, MAX_FRAME)
            self.writer = FrameWriter()
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport

        def get_buffer(self, sizehint: int) -> memoryview:
            return self.reader.get_buffer(sizehint)

        def buffer_updated(self, nbytes: int) -> None:
            self.reader.buffer_updated(nbytes)
            assert self.transport is not None
            try:
                for msg in self.reader:
                    self.writer.append(handle(msg))
            except FrameTooLarge as exc:
                self.writer.append(too_large(exc))
                self.transport.write(self.writer.take())
                self.transport.close()
                return
            if len(self.writer):
                self.transport.write(self.writer.take())

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop: asyncio.Future[None] = loop.create_future()

        def _stop() -> None:
            if not stop.done():
                stop.set_result(None)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _stop)
        server = await loop.create_unix_server(Conn, sock=_listen(path))
        _ready(type(getattr(loop, "_selector", None)).__name__)
        await stop
        server.close()

    asyncio.run(main())


def serve_selectors(path: str) -> None:
    """The supervisor's control-socket code (``on_control_accept`` / ``on_control_data``)."""
    lsock = _listen(path)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    conns: dict[socket.socket, FrameReader[Echo]] = {}
    stop = _Stop()
    _ready(type(sel).__name__)

    def close(conn: socket.socket) -> None:
        conns.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(conn)
        conn.close()

    while not stop():
        for key, _ in sel.select(TICK_S):
            if key.data is None:
                try:
                    conn, _ = lsock.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                conns[conn] = FrameReader(Echo, MAX_FRAME)
                sel.register(conn, selectors.EVENT_READ, "conn")
                continue
            conn = key.fileobj  # type: ignore[assignment]
            reader: FrameReader[Echo] | None = conns[conn]
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                close(conn)
                continue
            assert reader is not None
            reader.feed(data)
            writer = FrameWriter()
            try:
                for msg in reader:
                    writer.append(handle(msg))
            except FrameTooLarge as exc:
                writer.append(too_large(exc))
                reader = None
            if len(writer):
                conn.setblocking(True)
                conn.settimeout(2.0)
                try:
                    conn.sendall(writer.take())
                except OSError:
                    close(conn)
                    continue
                conn.setblocking(False)
            if reader is None:
                close(conn)
    for conn in list(conns):
        close(conn)
    sel.close()
    lsock.close()


def serve_uring(path: str, via_selector: bool) -> None:
    from ipc.uring import UringControlServer

    server: UringControlServer[Echo] = UringControlServer(
        _listen(path), Echo, handle, on_too_large=too_large, max_frame_bytes=MAX_FRAME
    )
    stop = _Stop()
    _ready(server.loop.binding.replace(" ", "_"))
    try:
        if not via_selector:
            server.serve_forever(TICK_S, stop)
            return
        sel = selectors.DefaultSelector()
        sel.register(server.fileno(), selectors.EVENT_READ, "uring")
        while not stop():
            for _key, _ in sel.select(TICK_S):
                server.process()
        sel.close()
    finally:
        server.close()


def serve(backend: str, path: str) -> None:
    if backend == "asyncio":
        serve_asyncio(path)
    elif backend == "selectors":
        serve_selectors(path)
    elif backend in URING_BACKENDS:
        serve_uring(path, via_selector=backend == "uring-selector")
    else:
        raise SystemExit(f"unknown backend {backend!r}")


# --- clients (this process) ---------------------------------------------------------------------


class Server:
    """One server process, started for the whole run."""

    def __init__(self, backend: str, tmp: str) -> None:
        self.backend = backend
        self.path = os.path.join(tmp, f"{backend}.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.io_backend", "--serve", backend, "--socket", self.path],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(REPO),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if not line or line[0] != READY:
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"{backend} server did not start: {err.strip()[-500:]}")
        self.pid = int(line[1])
        self.detail = line[2] if len(line) > 2 else ""

    def cpu_ns(self) -> int:
        """On-CPU time of all the server's threads, in nanoseconds."""
        total = 0
        try:
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                with (
                    contextlib.suppress(OSError),
                    open(f"/proc/{self.pid}/task/{tid}/schedstat") as f,
                ):
                    total += int(f.read().split()[0])
            return total
        except OSError:
            t = psutil.Process(self.pid).cpu_times()
            return int((t.user + t.system) * 1e9)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _frame(payload_bytes: int) -> bytes:
    return FrameWriter().encode(Echo(seq=1, payload=os.urandom(payload_bytes)))


def _run_one(path: str, frame: bytes, count: int, warmup: int) -> list[int]:
    """One connection, blocking: ``count`` timed round trips after ``warmup`` untimed ones."""
    samples: list[int] = []
    back = bytearray(len(frame))
    view = memoryview(back)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        for i in range(warmup + count):
            t0 = time.perf_counter_ns()
            sock.sendall(frame)
            got = 0
            while got < len(frame):
                n = sock.recv_into(view[got:])
                if n == 0:
                    raise RuntimeError("server closed the connection")
                got += n
            t1 = time.perf_counter_ns()
            if i >= warmup:
                samples.append(t1 - t0)
        if back != frame:
            raise RuntimeError("echo returned different bytes")
    return samples


def _run_many(path: str, frame: bytes, clients: int, count: int, warmup: int) -> list[int]:
    """``clients`` connections on one epoll loop, one request outstanding on each."""
    size = len(frame)
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    state: dict[int, list[int]] = {}  # fd -> [bytes got, sent at ns, done]
    per_conn = max(1, (warmup + count) // clients)
    samples: list[int] = []
    bufs: dict[int, memoryview] = {}
    try:
        for _ in range(clients):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            s.setblocking(False)
            socks.append(s)
            bufs[s.fileno()] = memoryview(bytearray(size))
            sel.register(s, selectors.EVENT_READ)
        for s in socks:
            state[s.fileno()] = [0, time.perf_counter_ns(), 0]
            s.send(frame)
        remaining = clients
        total = 0
        while remaining:
            for key, _ in sel.select(10.0):
                s = key.fileobj  # type: ignore[assignment]
                fd = s.fileno()
                st = state[fd]
                try:
                    n = s.recv_into(bufs[fd][st[0] :])
                except BlockingIOError:
                    continue
                if n == 0:
                    raise RuntimeError("server closed the connection")
                st[0] += n
                if st[0] < size:
                    continue
                now = time.perf_counter_ns()
                total += 1
                if total > warmup:
                    samples.append(now - st[1])
                st[2] += 1
                st[0] = 0
                if st[2] >= per_conn:
                    sel.unregister(s)
                    remaining -= 1
                    continue
                st[1] = time.perf_counter_ns()
                s.send(frame)
    finally:
        sel.close()
        for s in socks:
            s.close()
    return samples


def run_cell(server: Server, frame: bytes, clients: int, count: int, warmup: int) -> dict[str, Any]:
    cpu0 = server.cpu_ns()
    t0 = time.perf_counter_ns()
    if clients == 1:
        samples = _run_one(server.path, frame, count, warmup)
    else:
        samples = _run_many(server.path, frame, clients, count, warmup)
    wall = time.perf_counter_ns() - t0
    cpu = server.cpu_ns() - cpu0
    messages = len(samples) + warmup  # every round trip, timed or not, cost the server
    return {"samples": samples, "wall_ns": wall, "cpu_ns": cpu, "messages": messages}


# --- the run -----------------------------------------------------------------------------------


def uring_status() -> tuple[str | None, dict[str, Any]]:
    """(None or why io_uring cannot be benchmarked here, facts about it)."""
    facts: dict[str, Any] = {}
    try:
        from daemon.platform import probe

        io = probe().io_uring
        facts["probe_state"] = io.state
        facts["probe_detail"] = io.detail
    except Exception as exc:
        facts["probe_state"] = f"probe failed: {exc}"
    from ipc.uring import check_binding

    try:
        import importlib.metadata

        facts["liburing"] = importlib.metadata.version("liburing")
    except Exception:
        facts["liburing"] = None
    reason = check_binding()
    facts["binding_check"] = reason or "ok"
    return reason, facts


def run(
    backends: list[str],
    sizes: dict[str, int],
    clients: list[int],
    count: int,
    warmup: int,
    repeats: int,
    progress: bool = True,
    pin: bool = False,
) -> dict[str, Any]:
    reason, uring_facts = uring_status()
    cpus = sorted(os.sched_getaffinity(0))
    pinned = pin and len(cpus) >= 2
    client_cpus, server_cpus = ({cpus[0]}, {cpus[-1]}) if pinned else (set(cpus), set(cpus))
    skipped = {}
    if reason is not None:
        for b in backends:
            if b in URING_BACKENDS:
                skipped[b] = reason
        backends = [b for b in backends if b not in URING_BACKENDS]
    frames = {name: _frame(n) for name, n in sizes.items()}
    acc: dict[tuple[str, str, int], dict[str, Any]] = {}
    details: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="asrd-iobench-") as tmp:
        servers = {b: Server(b, tmp) for b in backends}
        try:
            if pinned:
                for s in servers.values():
                    os.sched_setaffinity(s.pid, server_cpus)
                os.sched_setaffinity(0, client_cpus)
            details = {b: s.detail for b, s in servers.items()}
            for rep in range(repeats):
                order = backends[rep % len(backends) :] + backends[: rep % len(backends)]
                for size_name, frame in frames.items():
                    for n_clients in clients:
                        for b in order:
                            r = run_cell(servers[b], frame, n_clients, count, warmup)
                            cell = acc.setdefault(
                                (b, size_name, n_clients),
                                {
                                    "samples": [],
                                    "wall_ns": 0,
                                    "cpu_ns": 0,
                                    "messages": 0,
                                    "p50_by_repeat": [],
                                    "cpu_by_repeat": [],
                                },
                            )
                            cell["samples"].extend(r["samples"])
                            cell["p50_by_repeat"].append(
                                round(summarize(r["samples"], 1e-3)["p50"] or 0.0, 1)
                            )
                            cell["cpu_by_repeat"].append(
                                round(r["cpu_ns"] / r["messages"] / 1e3, 2)
                            )
                            for k in ("wall_ns", "cpu_ns", "messages"):
                                cell[k] += r[k]
                            if progress:
                                print(
                                    f"  [{rep + 1}/{repeats}] {b:<15} {size_name:<6} "
                                    f"x{n_clients:<3} done",
                                    file=sys.stderr,
                                )
        finally:
            if pinned:
                os.sched_setaffinity(0, set(cpus))
            for s in servers.values():
                s.stop()
    cells = []
    for (b, size_name, n_clients), cell in acc.items():
        lat = summarize(cell["samples"], 1e-3)  # ns -> us
        cells.append(
            {
                "backend": b,
                "size": size_name,
                "frame_bytes": len(frames[size_name]),
                "clients": n_clients,
                "round_trips": lat["count"],
                "latency_us": lat,
                "round_trips_per_s": round(cell["messages"] / (cell["wall_ns"] / 1e9), 1),
                "server_cpu_us_per_msg": round(cell["cpu_ns"] / cell["messages"] / 1e3, 2),
                "p50_us_by_repeat": cell["p50_by_repeat"],
                "server_cpu_us_per_msg_by_repeat": cell["cpu_by_repeat"],
            }
        )
    facts = machine_facts()
    facts["packages"]["liburing"] = uring_facts.get("liburing")
    return {
        "benchmark": "io_backend",
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": facts,
        "io_uring": uring_facts,
        "config": {
            "backends": backends,
            "skipped": skipped,
            "server_detail": details,
            "sizes_payload_bytes": sizes,
            "clients": clients,
            "count_per_cell_per_repeat": count,
            "warmup": warmup,
            "repeats": repeats,
            "pinned": {"clients": sorted(client_cpus), "servers": sorted(server_cpus)}
            if pinned
            else None,
        },
        "cells": cells,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"{'backend':<15} {'size':>6} {'clients':>7} {'round trips':>11} {'p50 us':>8} "
        f"{'p99 us':>8} {'rt/s':>9} {'server CPU us/msg':>17}  {'(range over repeats)':>20}"
    ]
    for c in report["cells"]:
        lat = c["latency_us"]
        lines.append(
            f"{c['backend']:<15} {c['frame_bytes']:>6} {c['clients']:>7} {c['round_trips']:>11} "
            f"{lat['p50']:>8.1f} {lat['p99']:>8.1f} {c['round_trips_per_s']:>9.0f} "
            f"{c['server_cpu_us_per_msg']:>17.2f}  "
            f"{min(c['server_cpu_us_per_msg_by_repeat']):>9.1f}-"
            f"{max(c['server_cpu_us_per_msg_by_repeat']):<9.1f}"
        )
    for b, why in report["config"]["skipped"].items():
        lines.append(f"{b}: skipped: {why}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.io_backend",
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("--count", type=int, default=5000, help="timed round trips per cell (5000)")
    p.add_argument("--warmup", type=int, default=200, help="untimed round trips per cell (200)")
    p.add_argument("--repeats", type=int, default=3, help="passes over all cells (3)")
    p.add_argument(
        "--clients", type=int, nargs="+", default=[1, 16], help="concurrent connections (1 16)"
    )
    p.add_argument(
        "--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), help="servers to run"
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="pin the servers to the last usable CPU and the clients to the first",
    )
    p.add_argument("--json", metavar="PATH", help="report path (default bench/results/...)")
    p.add_argument("--smoke", action="store_true", help="a few round trips per cell (tests)")
    p.add_argument("--serve", choices=BACKENDS, help=argparse.SUPPRESS)
    p.add_argument("--socket", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.serve:
        serve(args.serve, args.socket)
        return 0
    if args.smoke:
        args.count, args.warmup, args.repeats = 40, 5, 1
        args.clients = [1, 4]
    report = run(
        args.backends,
        SIZES,
        args.clients,
        args.count,
        args.warmup,
        args.repeats,
        progress=not args.smoke,
        pin=args.pin,
    )
    print(format_table(report))
    out = write_report(report, args.json, "io_backend")
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
