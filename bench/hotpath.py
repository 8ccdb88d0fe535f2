"""The daemon's per-chunk Python work, in process: CPU per chunk of each stage, no wake-ups.

One lane is built in this process from the real parts (both rings in shared memory, the
``Ingress`` worker with a ``Connection``, the ``InferWorker`` with the null backend) and driven by
hand, one socket read at a time: ``--per-connection`` streams each send a 100 ms chunk in one
read (VAD off, ``interim_ms = 0``: every chunk gets a Partial). Three stages are timed with the
process CPU clock:

- ``ingress_read``: the read's frames decoded and checked, the chunks gathered and pushed to the
  audio ring (one AUDIO_BATCH record);
- ``infer``: the records popped, the audio fed, the partials made and pushed (one PARTIALS);
- ``ingress_results``: the results popped and the client's Partial frames written.

What the daemon costs under load on top of this is waking up: the latency benchmark's CPU per
chunk, read beside this one, is that difference. Prints a table and writes
``bench/results/hotpath-<timestamp>.json``.

    python -m bench hotpath [--rounds 3000] [--repeats 5] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from bench.floor import cpu_reference, metric
from bench.load import RESULTS_DIR, machine_facts, write_report
from daemon.config import Config
from ipc import protocol as p
from ipc.framing import FrameWriter
from ipc.heartbeat import HeartbeatTable
from ipc.ring import Ring
from ipc.wakeup import Wakeup
from workers import ingress as ing
from workers.infer import InferWorker
from workers.spec import LaneFds, WorkerSpec

CHUNK = bytes(range(200)) * 16  # 3,200 bytes: 100 ms of 16 kHz s16le
STAGES = ("ingress_read", "infer", "ingress_results")
FLOOR_KEY = "python_call_us"


class MemoryTransport:
    """What ``Connection`` needs of an asyncio transport; the bytes written are kept."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def get_write_buffer_size(self) -> int:
        return 0


class Lane:
    """One lane's rings and both workers in this process, with one client connection."""

    def __init__(self, ring_bytes: int = 4 << 20) -> None:
        tag = f"/asrd-hotpath-{os.getpid()}-{id(self):x}"
        cfg = msgspec.convert(
            {"backend": {"kind": "null", "interim_ms": 0}, "vad": {"enabled": False}}, Config
        )
        self.rings = [Ring.create(f"{tag}-a", ring_bytes), Ring.create(f"{tag}-r", ring_bytes)]
        self.table = HeartbeatTable.create(f"{tag}-hb", 2)
        self.wakeups = [Wakeup() for _ in range(4)]
        audio_data, audio_space, result_data, result_space = (w.fds() for w in self.wakeups)
        spec = WorkerSpec(
            role="ingress",
            lane=0,
            lanes=1,
            generation=1,
            supervisor_pid=os.getppid(),
            heartbeat=f"{tag}-hb",
            slot=0,
            audio_ring=f"{tag}-a",
            result_ring=f"{tag}-r",
            fds=LaneFds(
                audio_data=audio_data,
                audio_space=audio_space,
                result_data=result_data,
                result_space=result_space,
            ),
            config=cfg,
        )
        self.loop = asyncio.new_event_loop()
        self.ingress = ing.Ingress(spec)
        self.ingress.loop = self.loop
        self.infer = InferWorker(msgspec.structs.replace(spec, role="infer", slot=1))
        self.conn = ing.Connection(self.ingress)
        self.transport = MemoryTransport()
        self.conn.transport = self.transport  # type: ignore[assignment]
        self.ingress.connections.add(self.conn)
        self.client = FrameWriter()
        self._server = msgspec.msgpack.Decoder(p.ServerMessage)

    def frames(self, *msgs: Any) -> bytes:
        for m in msgs:
            self.client.append(m)
        return self.client.take()

    def read(self, data: bytes) -> None:
        """``data`` received (in as many reads as the reader's buffer takes), then the end of the
        ingress's loop iteration."""
        view = memoryview(data)
        while view:
            buf = self.conn.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            self.conn.buffer_updated(n)
            view = view[n:]
        # The loop iteration the reads scheduled their flush for (asyncio's own step, so its
        # cost is counted as the daemon pays it).
        self.loop._run_once()  # type: ignore[attr-defined]

    def send(self, *msgs: Any) -> None:
        self.read(self.frames(*msgs))

    def audio_records(self) -> list[Any]:
        return self.infer.audio.pop_many()

    def infer_pass(self, records: list[Any]) -> None:
        for r in records:
            self.infer.handle(r)
        self.infer.flush_feeds()
        self.infer.emit_partials()

    def deliver(self) -> None:
        """The ingress drains the result ring and writes to the client."""
        self.ingress.drain_results()
        self.ingress.write_dirty()

    def replies(self) -> list[Any]:
        self.deliver()
        out, data = [], bytes(self.transport.data)
        self.transport.data.clear()
        while data:
            n = int.from_bytes(data[:4], "big")
            out.append(self._server.decode(data[4 : 4 + n]))
            data = data[4 + n :]
        return out

    def close(self) -> None:
        self.loop.close()
        for ring in self.rings:
            ring.close()
            ring.unlink()
        self.table.close()
        self.table.unlink()
        for w in self.wakeups:
            w.close()


def measure(per_connection: int, rounds: int) -> dict[str, float]:
    """µs of CPU per chunk of each stage, ``rounds`` reads of ``per_connection`` chunks."""
    lane = Lane()
    try:
        lane.send(p.Hello(protocol=p.PROTOCOL_VERSION))
        lane.send(*[p.Start(stream=f"s{i}", sample_rate=16000) for i in range(per_connection)])
        reads = [
            lane.frames(
                *[p.Audio(stream=f"s{i}", seq=seq, pcm=CHUNK) for i in range(per_connection)]
            )
            for seq in range(1, rounds + 1)
        ]
        spent = dict.fromkeys(STAGES, 0.0)
        clock = time.process_time
        for data in reads:
            t0 = clock()
            lane.read(data)
            t1 = clock()
            lane.infer_pass(lane.audio_records())
            t2 = clock()
            lane.deliver()
            t3 = clock()
            lane.transport.data.clear()
            spent["ingress_read"] += t1 - t0
            spent["infer"] += t2 - t1
            spent["ingress_results"] += t3 - t2
        if lane.infer.counters["partials"] < rounds * per_connection * 0.9:
            raise RuntimeError("the lane did not answer the chunks with partials")
        chunks = rounds * per_connection
        return {k: v / chunks * 1e6 for k, v in spent.items()}
    finally:
        lane.close()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench hotpath", description=__doc__)
    ap.add_argument("--per-connection", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--rounds", type=int, default=3000, help="reads per measurement (3000)")
    ap.add_argument("--repeats", type=int, default=5, help="measurements; the best is kept (5)")
    ap.add_argument("--json", type=Path, help="report path")
    ap.add_argument("--smoke", action="store_true", help="tiny run (tests)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rounds, repeats = (50, 1) if args.smoke else (args.rounds, args.repeats)
    started = dt.datetime.now(dt.UTC)
    ref = cpu_reference(0.05 if args.smoke else 0.2)
    results: dict[str, dict[str, float]] = {}
    for per in args.per_connection:
        runs = [measure(per, max(1, rounds // per)) for _ in range(repeats)]
        best = min(runs, key=lambda r: sum(r.values()))
        results[str(per)] = {**{k: round(v, 3) for k, v in best.items()}}
        results[str(per)]["total"] = round(sum(best.values()), 3)
    report = {
        "benchmark": "hotpath",
        "started_at": started.isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "config": {"rounds": rounds, "repeats": repeats, "chunk_bytes": len(CHUNK)},
        "machine": {**machine_facts(), "loadavg": [round(x, 2) for x in os.getloadavg()]},
        "results_us_per_chunk": results,
        "floor": ref,
        "metrics": {
            f"{per}_per_connection.{stage}_us": metric(value, "us", FLOOR_KEY)
            for per, row in results.items()
            for stage, value in row.items()
        },
    }
    path = args.json or RESULTS_DIR / f"hotpath-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out = write_report(report, Path(path))
    print("daemon Python work per chunk, in process, no wake-ups (us of CPU; best of repeats)")
    print(f"{'streams/read':>12}  " + "  ".join(f"{s:>15}" for s in (*STAGES, "total")))
    for per, row in results.items():
        cells = "  ".join(f"{row[s]:15.2f}" for s in (*STAGES, "total"))
        print(f"{per:>12}  {cells}")
    print(f"floor: one trivial Python call = {1000 * ref[FLOOR_KEY]:.1f} ns (same run)")
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
