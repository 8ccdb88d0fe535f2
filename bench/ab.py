"""Before and after: the same measurements of two commits of asrd, interleaved in one run.

Each commit is checked out in its own git worktree (the ``ipc._atomic`` extension built here is
copied in; the daemon's workers are checked to have loaded it from there). The client side is
always this checkout's. Then, ``--rounds`` times, each side in turn starts its own daemon
(``null`` backend, ``interim_ms = 0``, VAD off) and measures:

- one stream, closed loop (``bench.closed_loop``: the floor's client, one chunk in flight),
  back to back: round trip p50 / p99;
- ``--streams`` real-time streams through ``bench.load`` for ``--duration`` s: chunk round trip
  p50 / p99 and daemon CPU per chunk.

Interleaving (A B B A ...) spreads the machine's drift and any order effect over both sides;
the table gives each figure's median over the rounds and the after/before ratio. This is how
each optimisation in docs/performance.md was kept or dropped. Identical commits give ratios
within about 0.85-1.2 for the one-stream and N-stream round trips here (separate daemon starts
differ that much), and within a few per cent for daemon CPU per chunk.

    python -m bench.ab BEFORE AFTER [--rounds 3] [--streams 500] [--duration 10]
    python -m bench.ab HEAD HEAD --after-extra '[placement]\\npinning = "on"'   # a setting
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from bench.load import REPO, add_generator_argument, machine_facts, write_report

SETTLE_S = 2.0
FIGURES = (
    ("one_p50_us", "1 stream p50, us"),
    ("one_p99_us", "1 stream p99, us"),
    ("load_p50_ms", "N streams p50, ms"),
    ("load_p99_ms", "N streams p99, ms"),
    ("cpu_us_per_chunk", "daemon CPU per chunk, us"),
)


def _code_of(pid: int) -> set[str]:
    """Where the daemon's workers loaded ``ipc._atomic`` from: proves which tree runs."""
    import psutil

    found = set()
    for p in psutil.Process(pid).children(recursive=True):
        for m in p.memory_maps(grouped=True):
            if "_atomic" in m.path:
                found.add(str(Path(m.path).resolve().parents[1]))
    return found


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One side, one round: this process (the client, from this checkout) starts a daemon
    whose code comes from ``args.tree``."""
    from bench import closed_loop
    from bench.memory import daemon_config
    from bench.suite import load_step
    from daemon.launcher import DaemonProcess

    tree = Path(args.tree).resolve()
    os.environ["PYTHONPATH"] = str(tree)
    os.chdir(tree)  # `python -m daemon.cli` finds its packages in its working directory first
    with tempfile.TemporaryDirectory(prefix="asrd-ab-") as tmp:
        log = Path(tmp) / "asrd.log"
        config = daemon_config("null", args.lanes) + args.extra.replace("\\n", "\n")
        with DaemonProcess(config, log_path=log) as daemon:
            code = _code_of(daemon.pid)
            if code != {str(tree)}:
                raise RuntimeError(f"the daemon runs code from {code}, not {tree}")
            one = closed_loop.measure(str(daemon.socket_path), args.count)
            row = load_step(
                daemon,
                args.streams,
                args.duration,
                per_connection=10,
                procs=None,
                drain_timeout=10.0,
                generator=args.generator,
            )
    return {
        "one_p50_us": one["p50_us"],
        "one_p99_us": one["p99_us"],
        "load_p50_ms": row["chunk_rtt_ms"]["p50"],
        "load_p99_ms": row["chunk_rtt_ms"]["p99"],
        "cpu_us_per_chunk": row["daemon_cpu_us_per_chunk"],
        "errors": row["errors"],
        "partials_matched": row["partials_matched"],
    }


def _worktree(rev: str, path: Path) -> Path:
    subprocess.run(
        ["git", "worktree", "add", "--detach", "--quiet", str(path), rev], cwd=REPO, check=True
    )
    for so in (REPO / "ipc").glob("_atomic*.so"):
        shutil.copy2(so, path / "ipc" / so.name)
    return path


def _run_side(tree: Path, args: argparse.Namespace, extra: str, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.ab", "--measure", "--tree", str(tree), "--json", str(out)]
    cmd += ["--streams", str(args.streams), "--duration", str(args.duration)]
    cmd += ["--count", str(args.count)] + (["--lanes", str(args.lanes)] if args.lanes else [])
    cmd += ["--extra", extra, "--generator", args.generator]
    subprocess.run(cmd, cwd=REPO, check=True, timeout=args.duration * 4 + 300)
    data: dict[str, Any] = msgspec.json.decode(out.read_bytes())
    return data


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    p.add_argument("before", nargs="?", help="commit before (e.g. HEAD~1)")
    p.add_argument("after", nargs="?", help="commit after (e.g. HEAD)")
    p.add_argument("--rounds", type=int, default=3, help="A/B rounds (3)")
    p.add_argument("--streams", type=int, default=500, help="real-time streams (500)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per side (10)")
    p.add_argument("--count", type=int, default=2000, help="closed-loop round trips (2000)")
    p.add_argument("--lanes", type=int, default=None, help="daemon lanes (default: auto)")
    add_generator_argument(p)
    p.add_argument(
        "--before-extra",
        default="",
        metavar="TOML",
        help="appended to the before side's daemon config (\\n for new lines)",
    )
    p.add_argument("--after-extra", default="", metavar="TOML", help="the same, after side")
    p.add_argument("--json", metavar="PATH", help="report path")
    p.add_argument("--extra", default="", help=argparse.SUPPRESS)
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tree", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.measure:
        Path(args.json).write_bytes(msgspec.json.encode(measure(args)))
        return 0
    if not args.before or not args.after:
        print("bench.ab: give BEFORE and AFTER commits", file=sys.stderr)
        return 2
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="asrd-ab-") as tmp:
        root = Path(tmp)
        trees: dict[str, Path] = {}
        try:
            for side in ("before", "after"):
                trees[side] = _worktree(getattr(args, side), root / side)
            for i in range(args.rounds):
                # ABBA: whichever side runs second in a round is not always the same one.
                order = ("before", "after") if i % 2 == 0 else ("after", "before")
                for side in order:
                    print(f"[bench.ab] round {i + 1}: {side}", file=sys.stderr, flush=True)
                    time.sleep(SETTLE_S)  # the previous daemon's exit and the page cache
                    extra = getattr(args, f"{side}_extra")
                    runs[side].append(
                        _run_side(trees[side], args, extra, root / f"{side}-{i}.json")
                    )
        finally:
            for tree in trees.values():
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False
                )
            subprocess.run(["git", "worktree", "prune"], cwd=REPO, check=False)
    summary = {}
    for key, _ in FIGURES:
        b = statistics.median(r[key] for r in runs["before"])
        a = statistics.median(r[key] for r in runs["after"])
        summary[key] = {"before": b, "after": a, "ratio": round(a / b, 3) if b else None}
    report = {
        "benchmark": "ab",
        "before": args.before,
        "after": args.after,
        "config": {
            k: v for k, v in vars(args).items() if k not in ("measure", "tree", "extra", "json")
        },
        "machine": machine_facts(),
        "runs": runs,
        "summary": summary,
    }
    path = Path(args.json or REPO / "bench" / "results" / "ab-last.json")
    write_report(report, path)
    print(f"{args.before} -> {args.after}, median of {args.rounds} interleaved rounds")
    print(f"{'':28}{'before':>10}{'after':>10}{'ratio':>8}")
    for key, label in FIGURES:
        s = summary[key]
        label = label.replace("N streams", f"{args.streams} streams")
        print(f"{label:28}{s['before']:>10.2f}{s['after']:>10.2f}{s['ratio'] or 0:>8.3f}")
    errs = [r["errors"] for side in runs.values() for r in side if r["errors"]]
    if errs:
        print(f"errors: {errs}")
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
