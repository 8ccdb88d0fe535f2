"""Micro-benchmark of the shared-memory ring's hot path.

Run: ``python -m bench.ring_micro [--json PATH] [--seconds S]``. Prints, in ns per operation:
push+pop of one record (64, 3200 and 32000-byte payloads, single pop and pop_many batches of
32), push alone, the release/acquire primitives, and a plain memoryview 8-byte store and load
for comparison. Single process, single thread: this measures Python-side cost, not
cross-core latency (tests/test_ring_stress.py covers two processes).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

from ipc.ring import Ring, load_acquire, store_release

SIZES = (64, 3200, 32000)
BATCH = 32


def best_ns(fn: Callable[[int], None], n: int, seconds: float) -> float:
    """Best per-operation time over repeated runs of ``fn(n)`` for about ``seconds``."""
    best = float("inf")
    end = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter_ns()
        fn(n)
        best = min(best, (time.perf_counter_ns() - t0) / n)
        if time.perf_counter() >= end:
            return best


def _push_pop(ring: Ring, payload: bytes, n: int) -> None:
    push, pop = ring.try_push, ring.pop
    for i in range(n):
        push(1, 7, i, payload)
        pop()


def _push_pop_batch(ring: Ring, payload: bytes, n: int) -> None:
    push, pop_many = ring.try_push, ring.pop_many
    for i in range(0, n, BATCH):
        for j in range(BATCH):
            push(1, 7, i + j, payload)
        pop_many()


def _push_only(ring: Ring, payload: bytes, n: int) -> float:
    """ns per push of n records that fit; the ring is emptied afterwards, untimed."""
    push = ring.try_push
    t0 = time.perf_counter_ns()
    for i in range(n):
        push(1, 7, i, payload)
    t = (time.perf_counter_ns() - t0) / n
    ring.pop_many()
    return t


def bench_ring(seconds: float) -> dict[str, float]:
    out: dict[str, float] = {}
    # 4 MiB: a batch of 32 records of 32000 bytes fits, and max_payload (1 MiB) allows them.
    ring = Ring.create(f"/asrd-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}", 4 << 20)
    try:
        for size in SIZES:
            payload = os.urandom(size)
            out[f"push_pop_{size}_ns"] = best_ns(partial(_push_pop, ring, payload), 2000, seconds)
            out[f"push_pop_batch{BATCH}_{size}_ns"] = best_ns(
                partial(_push_pop_batch, ring, payload), BATCH * 64, seconds
            )
            n = min(1000, ring.capacity // (size + 40) - 1)
            best = float("inf")
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                best = min(best, _push_only(ring, payload, n))
            out[f"push_{size}_ns"] = best
            assert ring.stats()["full_events"] == 0, "benchmark overfilled the ring"
    finally:
        ring.close()
        ring.unlink()
    return out


def bench_primitives(seconds: float) -> dict[str, float]:
    mm = mmap.mmap(-1, 4096)
    mv = memoryview(mm)
    words = mv.cast("Q")
    try:

        def acquire(n: int) -> None:
            for _ in range(n):
                load_acquire(mv, 64)

        def release(n: int) -> None:
            for i in range(n):
                store_release(mv, 64, i)

        def mv_store(n: int) -> None:
            for i in range(n):
                words[8] = i

        def mv_load(n: int) -> None:
            for _ in range(n):
                words[8]  # the load is what is measured

        def mv_slice_store(n: int) -> None:
            b = b"\0" * 8
            for _ in range(n):
                mv[64:72] = b

        def empty(n: int) -> None:
            for _ in range(n):
                pass

        loop = best_ns(empty, 100_000, seconds)
        res = {
            "load_acquire_ns": best_ns(acquire, 100_000, seconds),
            "store_release_ns": best_ns(release, 100_000, seconds),
            "memoryview_store_u64_ns": best_ns(mv_store, 100_000, seconds),
            "memoryview_load_u64_ns": best_ns(mv_load, 100_000, seconds),
            "memoryview_slice_store_8_ns": best_ns(mv_slice_store, 100_000, seconds),
        }
        # Report the operation itself, net of the bare loop.
        out = {k: max(0.0, v - loop) for k, v in res.items()}
        out["loop_overhead_ns"] = loop
        return out
    finally:
        words.release()
        mv.release()
        mm.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ring_micro", description=__doc__)
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    ap.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    args = ap.parse_args(argv)

    results: dict[str, float] = {}
    results.update(bench_ring(args.seconds))
    results.update(bench_primitives(args.seconds))
    width = max(map(len, results))
    for k, v in results.items():
        print(f"{k:<{width}}  {v:9.1f}")
    if args.json:
        doc = {
            "benchmark": "ring_micro",
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "results_ns": {k: round(v, 1) for k, v in results.items()},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
