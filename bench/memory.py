"""Memory of a running asrd: the daemon idle, per connection, per idle and per active stream.

For each backend (``--backend``, default ``null``; ``embedded`` loads pocketsphinx), a daemon
is started here (``daemon.launcher.DaemonProcess``: default lanes, ``interim_ms = 0``, VAD off)
and its processes (the supervisor and every ``asrd: <role> lane <n>`` worker) are measured in
four phases, each after a short settling pause, as the median of a few samples:

1. **idle**: started, nothing connected;
2. **connections**: ``M`` client connections open (Hello/Welcome), no stream;
3. **idle streams**: ``N`` streams started over those connections (Start/Started), no audio;
4. **active streams**: the same ``N`` streams each sending 100 ms chunks of a sample WAV in
   real time (one Audio per stream every 100 ms, starts spread over one period) for
   ``--active`` seconds, sampled every 0.5 s after the first second.

Per process: RSS, PSS and USS from ``/proc/PID/smaps`` (psutil), and the resident pages of the
rings' shared-memory segments (``/dev/shm/...``). The rings fill with traffic whatever the
number of streams (they are fixed-size buffers, touched page by page as records go round),
so the per-stream figures use RSS *without* the ring pages:

- per connection = (connections - idle) / M;
- per idle stream = (idle streams - connections) / N;
- per active stream = (active streams - connections) / N (an active stream's whole cost);

each in KiB, from RSS minus the ring pages and, beside it, from USS (pages private to one
process; a stricter figure: it leaves out shared pages such as the rings and the libraries).
Python never hands freed memory back quickly, so the phases run in this order on one daemon,
each on top of the previous one. Prints a table and writes ``bench/results/memory-<ts>.json``.

    python -m bench memory [--backend null --backend embedded] [--streams 200] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.floor import metric
from bench.load import RESULTS_DIR, default_wavs, machine_facts, write_report
from daemon.asrctl import load_wav
from daemon.launcher import DaemonProcess
from ipc.client import AsyncClient
from ipc.protocol import VadOverrides

CHUNK_MS = 100
KIB = 1024


def daemon_config(backend: str, lanes: int | None = None, threads: int | None = None) -> str:
    """asrd configuration of the suite's daemon runs: ``backend``, a Partial per chunk, no
    VAD (every chunk goes to the recognizer), warnings only in the log; ``threads``: the
    embedded backend's decoding threads per lane (default: its own)."""
    return (
        'log_level = "warning"\n'
        + (f"lanes = {lanes}\n" if lanes else "")
        + f'[backend]\nkind = "{backend}"\ninterim_ms = 0\n'
        + (f"[backend.embedded]\nthreads = {threads}\n" if threads is not None else "")
        + "[vad]\nenabled = false\n"
    )


def _role(p: psutil.Process) -> str:
    try:
        title = " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return "gone"
    words = title.split()
    if title.startswith("asrd:") and len(words) >= 4 and words[2] == "lane":
        return f"{words[1]}/{words[3]}"
    return "supervisor"


def _shm_rss(p: psutil.Process) -> int:
    total = 0
    with contextlib.suppress(psutil.Error):
        for m in p.memory_maps(grouped=True):
            if m.path.startswith("/dev/shm/"):
                total += m.rss
    return total


def sample_memory(pid: int) -> dict[str, Any]:
    """One sample of the daemon rooted at ``pid``: bytes per process and in total."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    per: dict[str, dict[str, int]] = {}
    for p in procs:
        try:
            full = p.memory_full_info()
        except psutil.Error:
            continue
        shm = _shm_rss(p)
        per[_role(p)] = {
            "rss": full.rss,
            "pss": full.pss,
            "uss": full.uss,
            "ring_rss": shm,
            "rss_no_rings": full.rss - shm,
        }
    total = {k: sum(v[k] for v in per.values()) for k in ("rss", "pss", "uss", "ring_rss")}
    total["rss_no_rings"] = total["rss"] - total["ring_rss"]
    return {"procs": per, "total": total, "processes": len(per)}


def settled(pid: int, samples: int, interval: float) -> dict[str, Any]:
    """Median of ``samples`` samples ``interval`` s apart (per process and in total)."""
    got = []
    for i in range(samples):
        if i:
            time.sleep(interval)
        got.append(sample_memory(pid))
    return _median(got)


def _median(got: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("rss", "pss", "uss", "ring_rss", "rss_no_rings")
    total = {k: int(statistics.median(s["total"][k] for s in got)) for k in keys}
    roles = sorted({r for s in got for r in s["procs"]})
    procs = {
        r: {
            k: int(statistics.median(s["procs"][r][k] for s in got if r in s["procs"]))
            for k in keys
        }
        for r in roles
    }
    return {"procs": procs, "total": total, "processes": len(procs), "samples": len(got)}


# --- the client side --------------------------------------------------------------------------


async def _drain(client: AsyncClient) -> None:
    """Read and drop everything the daemon sends (so it never stops reading us)."""
    with contextlib.suppress(Exception):
        async for _ in client:
            pass


async def run_phases(
    daemon: DaemonProcess,
    streams: int,
    connections: int,
    active_s: float,
    settle_s: float,
    wav: str,
) -> dict[str, Any]:
    pid = daemon.pid
    phases: dict[str, Any] = {}

    async def measure(samples: int = 3) -> dict[str, Any]:
        await asyncio.sleep(settle_s)
        return await asyncio.to_thread(settled, pid, samples, 0.2)

    phases["idle"] = await measure()
    clients = [
        await AsyncClient.connect(daemon.socket_path, client_name=f"bench.memory/{i}")
        for i in range(connections)
    ]
    readers: list[asyncio.Task[None]] = []
    try:
        phases["connections"] = await measure()
        ids = [f"m{i:05d}" for i in range(streams)]
        owner = {sid: clients[i % connections] for i, sid in enumerate(ids)}
        no_vad = VadOverrides(enabled=False)
        for sid in ids:
            await owner[sid].start(sid, 16000, vad=no_vad, wait=True, timeout=30.0)
        phases["idle_streams"] = await measure()

        readers = [asyncio.create_task(_drain(c)) for c in clients]
        audio = load_wav(wav, (16000,))
        step = 16000 * CHUNK_MS // 1000 * 2
        chunks = [audio.pcm[i : i + step] for i in range(0, len(audio.pcm) - step + 1, step)]
        period = CHUNK_MS / 1000
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.05
        end = t0 + active_s
        sent = 0

        async def play(k: int, sid: str) -> None:
            nonlocal sent
            client = owner[sid]
            tick = 0
            start = t0 + period * k / streams
            while True:
                at = start + tick * period
                if at >= end:
                    return
                await asyncio.sleep(max(0.0, at - loop.time()))
                await client.send_audio(sid, chunks[tick % len(chunks)])
                sent += 1
                tick += 1

        async def sampler() -> list[dict[str, Any]]:
            got = []
            await asyncio.sleep(min(1.0, active_s / 2))
            while loop.time() < end - 0.1:
                got.append(await asyncio.to_thread(sample_memory, pid))
                await asyncio.sleep(0.5)
            return got or [await asyncio.to_thread(sample_memory, pid)]

        players = [asyncio.create_task(play(k, sid)) for k, sid in enumerate(ids)]
        got = await sampler()
        await asyncio.gather(*players)
        active = _median(got)
        active["chunks_sent"] = sent
        phases["active_streams"] = active
    finally:
        for c in clients:
            await c.close()
        for r in readers:
            r.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    return phases


def per_stream(phases: dict[str, Any], streams: int, connections: int) -> dict[str, float]:
    """KiB per connection, idle stream and active stream, from RSS without the ring pages
    (``rss``) and from USS (``uss``)."""
    out: dict[str, float] = {}
    for src, key in (("rss", "rss_no_rings"), ("uss", "uss")):
        t = {name: phases[name]["total"][key] for name in phases}
        out[f"{src}_per_connection_kib"] = round(
            (t["connections"] - t["idle"]) / connections / KIB, 1
        )
        out[f"{src}_per_idle_stream_kib"] = round(
            (t["idle_streams"] - t["connections"]) / streams / KIB, 1
        )
        out[f"{src}_per_active_stream_kib"] = round(
            (t["active_streams"] - t["connections"]) / streams / KIB, 1
        )
    out["rss_idle_mib"] = round(phases["idle"]["total"]["rss"] / KIB / KIB, 1)
    out["uss_idle_mib"] = round(phases["idle"]["total"]["uss"] / KIB / KIB, 1)
    return out


def run_backend(
    backend: str,
    streams: int,
    connections: int,
    active_s: float,
    settle_s: float,
    lanes: int | None,
    wav: str,
    workdir: Path,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "backend": backend,
        "streams": streams,
        "connections": connections,
        "active_s": active_s,
    }
    log = workdir / f"asrd-memory-{backend}.log"
    with DaemonProcess(daemon_config(backend, lanes), log_path=log) as daemon:
        phases = asyncio.run(run_phases(daemon, streams, connections, active_s, settle_s, wav))
    row["phases"] = phases
    row["per_stream"] = per_stream(phases, streams, connections)
    return row


# --- report -----------------------------------------------------------------------------------


def _mib(v: int) -> str:
    return f"{v / KIB / KIB:.1f}"


def format_table(report: dict[str, Any]) -> str:
    lines = []
    for row in report["results"]:
        lines.append(
            f"{row['backend']} backend: {row['streams']} streams over {row['connections']} "
            f"connections, active {row['active_s']:g} s (MiB, all daemon processes)"
        )
        lines.append(
            f"  {'phase':<16}{'RSS':>9}{'ring pages':>12}{'RSS-rings':>11}{'PSS':>9}{'USS':>9}"
        )
        for name, ph in row["phases"].items():
            t = ph["total"]
            lines.append(
                f"  {name:<16}{_mib(t['rss']):>9}{_mib(t['ring_rss']):>12}"
                f"{_mib(t['rss_no_rings']):>11}{_mib(t['pss']):>9}{_mib(t['uss']):>9}"
            )
        ps = row["per_stream"]
        lines.append(f"  {'KiB per':<16}{'RSS-rings':>11}{'USS':>9}")
        for what in ("connection", "idle_stream", "active_stream"):
            lines.append(
                f"  {what.replace('_', ' '):<16}{ps[f'rss_per_{what}_kib']:>11.1f}"
                f"{ps[f'uss_per_{what}_kib']:>9.1f}"
            )
        lines.append("")
    m = report["machine"]
    lines.append(
        f"machine: {m['cpu_model']}, {m['cpus_usable']}/{m['cpus_logical']} CPUs, "
        f"kernel {m['kernel']}, Python {m['python']}"
    )
    return "\n".join(lines)


def build_report(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for row in rows:
        b = row["backend"]
        for key, value in row["per_stream"].items():
            unit = "MiB" if key.endswith("_mib") else "KiB"
            metrics[f"{b}.{key}"] = metric(value, unit, None)
    return {
        "benchmark": "memory",
        "started_at": args.started.isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "config": {
            "backends": args.backend,
            "streams": args.streams,
            "embedded_streams": args.embedded_streams,
            "active_s": args.active,
            "settle_s": args.settle,
            "lanes": args.lanes,
            "wav": args.wav,
        },
        "machine": machine_facts(),
        "results": rows,
        "floor": {},  # memory does not scale with the machine's speed: compared raw
        "metrics": metrics,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench memory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument(
        "--backend",
        action="append",
        choices=("null", "embedded"),
        help="backend to measure (repeatable; default null)",
    )
    p.add_argument("--streams", type=int, default=200, help="streams, null backend (200)")
    p.add_argument("--embedded-streams", type=int, default=4, help="streams, embedded backend (4)")
    p.add_argument("--per-connection", type=int, default=10, help="streams per connection (10)")
    p.add_argument("--active", type=float, default=10.0, help="seconds of active streams (10)")
    p.add_argument("--settle", type=float, default=1.0, help="pause before each phase (1)")
    p.add_argument("--lanes", type=int, default=None, help="daemon lanes (default: auto)")
    p.add_argument("--wav", default=None, help="16 kHz WAV to play (default: a sample)")
    p.add_argument("--json", metavar="PATH", help="report path (default bench/results/...)")
    p.add_argument("--smoke", action="store_true", help="4 streams, 1.5 s active (tests)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.backend = args.backend or ["null"]
    if args.smoke:
        args.streams, args.embedded_streams, args.active, args.settle = 4, 2, 1.5, 0.3
    if args.wav is None:
        sixteen = [w for w in default_wavs() if "8k" not in Path(w).name]
        args.wav = sixteen[0] if sixteen else None
    if args.wav is None:
        raise SystemExit("bench.memory: no WAV file: give --wav FILE")
    args.started = dt.datetime.now(dt.UTC)
    rows = []
    with tempfile.TemporaryDirectory(prefix="asrd-bm-") as tmp:
        for backend in args.backend:
            n = args.embedded_streams if backend == "embedded" else args.streams
            m = max(1, math.ceil(n / max(1, args.per_connection)))
            print(f"[bench.memory] {backend}: {n} streams, {m} connections", file=sys.stderr)
            rows.append(
                run_backend(
                    backend, n, m, args.active, args.settle, args.lanes, args.wav, Path(tmp)
                )
            )
    report = build_report(rows, args)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = write_report(report, Path(args.json or RESULTS_DIR / f"memory-{stamp}.json"))
    print(format_table(report))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
