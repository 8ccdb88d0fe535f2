"""Raw Unix-socket echo round trip: the floor under any latency asrd can show on this machine.

A server process echoes length-prefixed messages (4-byte big-endian length + body, 3200 bytes by
default: 100 ms of 16 kHz s16le audio) on a Unix stream socket; the client times send -> full
echo received. No framing library, no msgpack, no asyncio: two processes, two system calls each
way, and the scheduler. ``bench.load`` runs it in the same run as its load, so every latency
figure comes with the floor measured on the same machine at the same time.

    python -m bench.echo [--count 5000] [--bytes 3200]
"""

from __future__ import annotations

import argparse
import math
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

MSG_BYTES = 3200
READY = b"ready\n"


def recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from ``sock``; False if the peer closed first."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def serve(path: str) -> None:
    """Echo frames on ``path`` for one connection, then exit (runs in its own process)."""
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    sys.stdout.buffer.write(READY)
    sys.stdout.flush()
    conn, _ = lsock.accept()
    lsock.close()
    head = bytearray(4)
    body = bytearray(1 << 20)
    with conn:
        while recv_exactly(conn, memoryview(head)):
            n = int.from_bytes(head, "big")
            if n > len(body):
                body = bytearray(n)
            view = memoryview(body)[:n]
            if not recv_exactly(conn, view):
                return
            conn.sendall(head + view)


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (no numpy needed here)."""
    if not sorted_values:
        return float("nan")
    rank = math.ceil(p / 100 * len(sorted_values))
    return sorted_values[max(0, min(len(sorted_values), rank) - 1)]


def measure(count: int = 5000, msg_bytes: int = MSG_BYTES, warmup: int = 200) -> dict[str, Any]:
    """Round-trip ``count`` messages through an echo server process; times in microseconds."""
    with tempfile.TemporaryDirectory(prefix="asrd-echo-") as tmp:
        path = os.path.join(tmp, "echo.sock")
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", path],
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 30.0)
            if not ready or proc.stdout.readline() != READY:
                raise RuntimeError("echo server did not start")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            frame = msg_bytes.to_bytes(4, "big") + os.urandom(msg_bytes)
            back = memoryview(bytearray(len(frame)))
            samples: list[float] = []
            with sock:
                for i in range(warmup + count):
                    t0 = time.perf_counter_ns()
                    sock.sendall(frame)
                    if not recv_exactly(sock, back):
                        raise RuntimeError("echo server went away")
                    dt = time.perf_counter_ns() - t0
                    if i >= warmup:
                        samples.append(dt / 1000)
            if back.tobytes() != frame:
                raise RuntimeError("echo returned different bytes")
        finally:
            proc.wait(10)
    samples.sort()
    return {
        "count": count,
        "msg_bytes": msg_bytes,
        "p50_us": round(percentile(samples, 50), 2),
        "p99_us": round(percentile(samples, 99), 2),
        "min_us": round(samples[0], 2),
        "max_us": round(samples[-1], 2),
        "mean_us": round(sum(samples) / len(samples), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.echo",
        description="Unix-socket echo round trip between two processes (the latency floor).",
    )
    parser.add_argument("--count", type=int, default=5000, help="timed round trips (5000)")
    parser.add_argument("--bytes", type=int, default=MSG_BYTES, help="message body (3200)")
    parser.add_argument("--serve", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    r = measure(args.count, args.bytes)
    print(
        f"echo {r['msg_bytes']} B x {r['count']}: p50 {r['p50_us']:.1f} us, "
        f"p99 {r['p99_us']:.1f} us (min {r['min_us']:.1f}, max {r['max_us']:.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
