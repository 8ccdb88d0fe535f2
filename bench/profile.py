"""Where the daemon's CPU goes under load: py-spy samples of every asrd process.

``python -m bench profile`` starts asrd (``--backend``, default ``null``; ``interim_ms = 0``,
VAD off, so every chunk takes the whole path: ingress, audio ring, infer, result ring,
ingress), loads it with ``--streams`` real-time streams through ``bench.load``, and after
``--warmup`` seconds records each daemon process (supervisor, every ingress and infer worker)
with ``py-spy record --format raw`` for ``--seconds``. py-spy leaves out samples where a thread
sleeps in a system call, so the counts are CPU-busy time.

The table, per role: busy samples, then the top functions by *self* samples (the frame on top
of the stack: where the CPU actually was) and by *total* samples (on the stack at all: what the
time was spent for). Frames are ``function (file)``, lines merged. The report
(``bench/results/profile-<timestamp>.json``) keeps the tables, the load's figures (round trip,
daemon CPU per chunk) and, beside it, the raw stacks of each process (``profile-<timestamp>/``,
one ``ROLE.txt`` per process: ``frame;frame;... count`` lines, for ``flamegraph.pl`` or
speedscope).

py-spy attaches with ptrace: it needs root or CAP_SYS_PTRACE (or ``kernel.yama.ptrace_scope``
0 for processes of the same user). Sampling pauses each process briefly (``--rate`` times a
second), so the load's figures under profiling read a little worse than without it.

    python -m bench profile [--streams 500] [--seconds 10] [--rate 100] [--backend null]
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from bench.floor import cpu_reference, metric
from bench.load import RESULTS_DIR, add_generator_argument, machine_facts, write_report

_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")


def py_spy() -> str | None:
    """The py-spy executable: beside this Python first (a venv), then on PATH."""
    here = Path(sys.executable).with_name("py-spy")
    if here.exists():
        return str(here)
    return shutil.which("py-spy")


def short_frame(frame: str) -> str:
    """``fn (/long/path/to/mod.py:123)`` -> ``fn (to/mod.py)``: lines merged, path trimmed."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    parts = Path(m.group("file")).parts
    return f"{m.group('fn')} ({'/'.join(parts[-2:])})"


def parse_raw(text: str) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) output: one ``frame;frame;... count`` line per distinct stack,
    outermost frame first."""
    stacks = []
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        frames = [short_frame(f) for f in m.group(1).split(";") if f.strip()]
        # py-spy may prefix the stack with the process or thread name.
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if frames:
            stacks.append((frames, int(m.group(2))))
    return stacks


def top_frames(stacks: list[tuple[list[str], int]], n: int = 15) -> dict[str, Any]:
    """Samples in all, and the top ``n`` functions by self and by total samples, with shares."""
    total = sum(c for _, c in stacks)
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for frames, count in stacks:
        self_c[frames[-1]] += count
        for f in set(frames):
            incl[f] += count

    def rows(c: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"frame": f, "samples": k, "share": round(k / total, 4) if total else 0.0}
            for f, k in c.most_common(n)
        ]

    return {"samples": total, "self": rows(self_c), "total": rows(incl)}


def _role(p: psutil.Process) -> str:
    from bench.memory import _role as role

    return role(p).replace("/", "-")


def record(
    pids: dict[str, int], seconds: float, rate: int, outdir: Path
) -> dict[str, dict[str, Any]]:
    """py-spy every process at once for ``seconds``; the raw stacks go to ``outdir/ROLE.txt``."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed: pip install py-spy (it is in .[test])")
    outdir.mkdir(parents=True, exist_ok=True)
    procs = {}
    for role, pid in pids.items():
        cmd = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
        cmd += ["--rate", str(rate), "--format", "raw", "--output", str(outdir / f"{role}.txt")]
        procs[role] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out: dict[str, dict[str, Any]] = {}
    for role, proc in procs.items():
        text, _ = proc.communicate(timeout=seconds + 60)
        path = outdir / f"{role}.txt"
        if proc.returncode != 0 or not path.exists():
            msg = text.decode(errors="replace").strip().splitlines()
            raise RuntimeError(
                f"py-spy failed on {role} (pid {pids[role]}): {msg[-1] if msg else proc.returncode}"
                " (it needs root or CAP_SYS_PTRACE)"
            )
        out[role] = top_frames(parse_raw(path.read_text(errors="replace")))
    return out


def daemon_pids(pid: int) -> dict[str, int]:
    root = psutil.Process(pid)
    return {_role(p): p.pid for p in [root, *root.children(recursive=True)]}


def table(profiles: dict[str, dict[str, Any]], n: int) -> str:
    lines = []
    for role in sorted(profiles):
        prof = profiles[role]
        lines.append(f"{role}: {prof['samples']} busy samples")
        for kind in ("self", "total"):
            lines.append(f"  top by {kind}:")
            for r in prof[kind][:n]:
                lines.append(f"    {100 * r['share']:5.1f}%  {r['frame']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench profile",
        description="py-spy profile of every asrd process under real-time load.",
    )
    p.add_argument("--backend", choices=("null", "embedded"), default="null", help="(null)")
    p.add_argument("--streams", type=int, default=500, help="real-time streams (500)")
    p.add_argument("--per-connection", type=int, default=10, help="streams per connection (10)")
    p.add_argument("--seconds", type=float, default=10.0, help="sampling time (10)")
    p.add_argument("--warmup", type=float, default=3.0, help="load before sampling, s (3)")
    p.add_argument("--rate", type=int, default=100, help="samples per second (100)")
    p.add_argument("--top", type=int, default=12, help="frames per table (12)")
    p.add_argument("--lanes", type=int, default=None, help="daemon lanes (default: auto)")
    add_generator_argument(p)
    p.add_argument("--json", metavar="PATH", help="report path")
    p.add_argument("--smoke", action="store_true", help="tiny run (tests)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        # Enough load that every worker shows up in 2 s of samples (the daemon spends about
        # 0.1 ms of CPU per chunk: 10 streams would leave a worker with one sample or none).
        args.streams, args.seconds, args.warmup, args.rate = 200, 2.0, 0.5, 250
    if py_spy() is None:
        print("bench profile: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    from bench.memory import daemon_config
    from bench.suite import load_step
    from daemon.launcher import DaemonProcess

    started = dt.datetime.now(dt.UTC)
    path = Path(
        args.json or RESULTS_DIR / f"profile-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    )
    rawdir = path.with_suffix("")
    load: dict[str, Any] = {}
    failure: list[BaseException] = []
    with tempfile.TemporaryDirectory(prefix="asrd-bp-") as tmp:
        log = Path(tmp) / "asrd.log"
        with DaemonProcess(daemon_config(args.backend, args.lanes), log_path=log) as daemon:

            def run_load() -> None:
                try:
                    load.update(
                        load_step(
                            daemon,
                            args.streams,
                            args.warmup + args.seconds + 1.0,
                            per_connection=args.per_connection,
                            procs=None,
                            drain_timeout=10.0,
                            generator=args.generator,
                        )
                    )
                except BaseException as exc:  # reported below, after the daemon stops
                    failure.append(exc)

            loader = threading.Thread(target=run_load, name="load")
            loader.start()
            time.sleep(args.warmup + 1.0)  # connecting and ramping up, then the warm-up
            print(
                f"[bench profile] sampling {args.seconds:g} s at {args.rate}/s",
                file=sys.stderr,
                flush=True,
            )
            try:
                profiles = record(daemon_pids(daemon.pid), args.seconds, args.rate, rawdir)
            finally:
                loader.join()
    if failure:
        print(f"bench profile: the load failed: {failure[0]}", file=sys.stderr)
        return 1
    metrics = {
        "daemon_cpu_us_per_chunk": metric(
            load.get("daemon_cpu_us_per_chunk"), "us", "python_call_us"
        ),
    }
    report = {
        "benchmark": "profile",
        "started_at": started.isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "config": {
            "backend": args.backend,
            "streams": args.streams,
            "per_connection": args.per_connection,
            "seconds": args.seconds,
            "rate": args.rate,
            "lanes": args.lanes,
        },
        "machine": machine_facts(),
        "load": load,
        "profiles": profiles,
        "raw_stacks": str(rawdir),
        "floor": cpu_reference(0.05 if args.smoke else 0.2),
        "metrics": metrics,
    }
    out = write_report(report, path)
    rtt = load.get("chunk_rtt_ms", {})
    print(
        f"asrd under {args.streams} real-time streams ({args.backend} backend): chunk round trip "
        f"p50 {rtt.get('p50')} ms, p99 {rtt.get('p99')} ms, daemon CPU per chunk "
        f"{load.get('daemon_cpu_us_per_chunk')} us"
    )
    print(table(profiles, args.top))
    print(f"report: {out}\nraw stacks: {rawdir}")
    return 0
