"""The benchmark suite: a registry of asrd's benchmarks, the daemon runs, reports and history.

``python -m bench --list`` lists the benchmarks; ``python -m bench NAME [args...]`` runs one
(its own arguments pass through; ``python -m bench NAME --help`` shows them). Suite options,
anywhere after NAME:

- ``--smoke``: a tiny run that proves the benchmark works (CI runs each one once like this;
  nothing is asserted on absolute times);
- ``--json PATH``: the report file (default ``bench/results/NAME-<timestamp>.json``);
- ``--record``: append one line to ``bench/history.jsonl`` (timestamp, git commit, benchmark,
  key figures, floor).

Every report is JSON with the machine's facts (``bench.load.machine_facts``: CPU model, cores,
kernel, Python, package versions), and two sections ``bench.compare`` reads:

- ``floor``: reference figures measured *in the same run*, in µs (``bench.floor``: the
  reference pipeline and the raw echo, pinned and unpinned, and a CPU reference);
- ``metrics``: ``{name: {"value", "unit", "better": "lower"|"higher", "floor": key|None}}``,
  each key figure with the floor figure it is to be read against.

Benchmarks defined here (the others live in their own modules and are wrapped):

- ``latency``: chunk round trip (Audio sent -> its Partial) through asrd started here with the
  ``null`` backend (``interim_ms = 0``, VAD off, default lanes). First one stream measured
  exactly as the floor is (``bench.closed_loop``: the floor's blocking client, one chunk in
  flight), back to back and at real time (a chunk per 100 ms), each beside the floor pipeline
  run the same way; then a load generator (``--generator``: ``bench.fleet`` by default, or
  ``bench.load``) at 1, 100, 500 and 1,000 real-time streams (10 streams per connection);
- ``capacity``: per backend (``null``, ``embedded``), the number of real-time streams is
  stepped up (x1.5 for null, +1 for embedded) until the chunk round trip's p99 passes 20 ms or
  anything goes wrong (errors, failed connections, streams left open, nothing answered), then
  bisected between the last step that held and the first that did not; the capacity is the
  largest number that held. A failed step restarts the daemon, so a backlog cannot leak into
  the next one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from bench.floor import metric as metric  # re-exported: the shape of a report's metrics
from bench.load import REPO, RESULTS_DIR, add_generator_argument, machine_facts, write_report

HISTORY = REPO / "bench" / "history.jsonl"
SMOKE = "--smoke"
RECORD = "--record"

Runner = Callable[[list[str], bool, Path], int]


# --- registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    name: str
    summary: str
    runner: str  # "module:function", imported only when the benchmark runs
    module: str  # the module that must exist for the benchmark to be available
    own_smoke_test: str | None = None  # where its smoke run is tested, if not in the suite's

    def available(self) -> str | None:
        """None when it can run here, else why not."""
        path = REPO / Path(*self.module.split("."))
        if not path.with_suffix(".py").exists():
            return f"{self.module} is not present"
        return None

    def load(self) -> Runner:
        mod, _, fn = self.runner.partition(":")
        run: Runner = getattr(importlib.import_module(mod), fn)
        return run


REGISTRY: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "floor",
            "reference pipeline (client, UDS, ingress, shm ring, worker) and raw UDS echo, "
            "pinned and unpinned",
            "bench.suite:run_floor",
            "bench.floor",
        ),
        Benchmark(
            "latency",
            "chunk round trip through asrd (null backend) at 1, 100, 500, 1000 real-time streams",
            "bench.suite:run_latency",
            "bench.suite",
        ),
        Benchmark(
            "capacity",
            "most real-time streams with chunk p99 under 20 ms and no errors (null, embedded)",
            "bench.suite:run_capacity",
            "bench.suite",
        ),
        Benchmark(
            "memory",
            "daemon RSS idle, per connection, per idle and per active stream",
            "bench.suite:run_memory",
            "bench.memory",
        ),
        Benchmark(
            "triton",
            "Triton backend transport: shm vs none, gRPC vs HTTP, direct floor vs through asrd",
            "bench.suite:run_triton",
            "bench.triton",
            own_smoke_test="tests/test_bench_triton.py",
        ),
        Benchmark(
            "ring",
            "shm ring hot path micro-benchmark (push/pop, batches, atomics), ns per op",
            "bench.suite:run_ring",
            "bench.ring_micro",
        ),
        Benchmark(
            "hotpath",
            "the daemon's Python work per chunk, in process: ingress read, infer, results",
            "bench.suite:run_hotpath",
            "bench.hotpath",
        ),
        Benchmark(
            "codec",
            "per-chunk codec micro-benchmark: msgspec Audio, FrameWriter/Reader, copy, webrtcvad",
            "bench.suite:run_codec",
            "bench.codec_micro",
        ),
        Benchmark(
            "io_backend",
            "control-plane request/response: asyncio, selectors, io_uring servers",
            "bench.suite:run_io_backend",
            "bench.io_backend",
        ),
        Benchmark(
            "soak",
            "long run with worker kills and bad clients: no utterance lost, no growth",
            "bench.suite:run_soak",
            "bench.soak",
            own_smoke_test="tests/test_bench_soak.py",
        ),
        Benchmark(
            "profile",
            "py-spy profile of every asrd process under real-time load: top frames per role",
            "bench.suite:run_profile",
            "bench.profile",
        ),
        Benchmark(
            "accuracy",
            "word error rate of the embedded recognizer under its decoding settings",
            "bench.suite:run_accuracy",
            "bench.accuracy",
        ),
    )
}


def default_path(name: str) -> Path:
    return RESULTS_DIR / f"{name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"


def read_report(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.json.decode(path.read_bytes())
    return data


# --- the suite's own daemon runs: latency and capacity ----------------------------------------


def _procs_for(streams: int, procs: int | None) -> int:
    """Generator processes: given, or one per 250 streams (at most one per usable CPU)."""
    if procs:
        return procs
    return max(1, min(len(os.sched_getaffinity(0)), math.ceil(streams / 250)))


def load_step(
    daemon: Any,
    streams: int,
    duration: float,
    *,
    per_connection: int,
    procs: int | None,
    drain_timeout: float,
    generator: str = "fleet",
) -> dict[str, Any]:
    """One run of a load generator against ``daemon``: VAD off, files looped.

    ``fleet`` (``bench.fleet``): each connection sends one chunk of each of its streams per
    period in one write, as a gateway does, from one lean loop per process; ``asyncio``
    (``bench.load``): a task and a timer per stream, starts staggered over the period, as
    independent clients would; it costs the generator more CPU per chunk than the daemon
    spends, so from about 500 streams it measures itself as much as asrd.
    """
    if generator == "fleet":
        from bench.fleet import run_fleet

        return run_fleet(
            str(daemon.socket_path),
            streams,
            duration,
            per_connection=per_connection,
            procs=procs or 1,
            daemon_pid=daemon.pid,
            drain_timeout=drain_timeout,
        )
    from bench import load

    connections = max(1, math.ceil(streams / max(1, per_connection)))
    args = load.build_parser().parse_args(
        [
            "--socket", str(daemon.socket_path),
            "--control-socket", str(daemon.control_path),
            "--streams", str(streams),
            "--connections", str(connections),
            "--duration", str(duration),
            "--no-vad",
            "--mode", "loop",
            "--procs", str(_procs_for(streams, procs)),
            "--daemon-pid", str(daemon.pid),
            "--drain-timeout", str(drain_timeout),
            "--no-floor",
        ]
    )  # fmt: skip
    report = load.run_load(args)
    r = report["results"]
    return {
        "generator": "asyncio",
        "streams": streams,
        "connections": connections,
        "procs": report["config"]["procs"],
        "duration_s": duration,
        "chunk_rtt_ms": r["chunk_rtt_ms"],
        "generator_lateness_ms": r["generator_lateness_ms"],
        "final_after_finish_ms": r["final_after_finish_ms"],
        "chunks_sent": r["chunks_sent"],
        "partials_matched": r["partials_matched"],
        "chunks_coalesced": r["chunks_coalesced"],
        "streams_started": r["streams_started"],
        "streams_unclosed": r["streams_unclosed"],
        "connect_failures": r["connect_failures"],
        "errors": r["errors"],
        "daemon_cpu_us_per_chunk": r["daemon_cpu_us_per_chunk"],
        "daemon_cpu_us_per_chunk_by_role": r["daemon_cpu_us_per_chunk_by_role"],
        "wall_s": r["wall_s"],
    }


def _fmt(v: float | None, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def step_table(rows: list[dict[str, Any]], verdicts: bool = False) -> str:
    head = (
        f"{'streams':>8}{'conns':>7}{'procs':>6}{'chunks':>9}{'rtt p50':>9}{'p99':>9}"
        f"{'max':>9}{'late p50':>9}{'p99':>8}{'CPU us/chunk':>13}{'gen':>6}  errors"
    )
    lines = [head + ("  verdict" if verdicts else "")]
    for r in rows:
        rtt, late = r["chunk_rtt_ms"], r["generator_lateness_ms"]
        errs = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "none"
        line = (
            f"{r['streams']:>8}{r['connections']:>7}{r['procs']:>6}{r['chunks_sent']:>9}"
            f"{_fmt(rtt['p50']):>9}{_fmt(rtt['p99']):>9}{_fmt(rtt['max']):>9}"
            f"{_fmt(late['p50']):>9}{_fmt(late['p99']):>8}"
            f"{_fmt(r['daemon_cpu_us_per_chunk'], 0):>13}"
            f"{_fmt(r.get('generator_cpu_us_per_chunk'), 0):>6}  {errs}"
        )
        if verdicts:
            line += "  " + ("held" if r["held"] else f"FAILED: {r['why']}")
        lines.append(line)
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    return {**machine_facts(), "loadavg": [round(x, 2) for x in os.getloadavg()]}


def _streams_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"need integers separated by commas: {text}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"need positive integers: {text}")
    return out


def _daemon_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--per-connection", type=int, default=10, help="streams per connection (10)")
    add_generator_argument(p)
    p.add_argument(
        "--procs",
        type=int,
        default=None,
        help="generator processes (default: fleet 1; asyncio 1 per 250 streams)",
    )
    p.add_argument("--lanes", type=int, default=None, help="daemon lanes (default: auto)")
    p.add_argument("--drain-timeout", type=float, default=10.0, help="final wait, s (10)")
    p.add_argument(
        "--floor-count", type=int, default=2000, help="floor round trips before the runs (2000)"
    )
    p.add_argument("--log-dir", type=Path, default=None, help="keep the daemon logs here")
    p.add_argument("--json", metavar="PATH", help="report path")
    p.add_argument(SMOKE, action="store_true", help="tiny run (tests)")
    return p


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def latency_main(argv: list[str] | None = None) -> int:
    p = _daemon_parser(
        "python -m bench latency",
        "Chunk round trip through asrd (null backend, interim_ms = 0, VAD off) at N streams.",
    )
    p.add_argument(
        "--streams", type=_streams_list, default=[1, 100, 500, 1000], help="(1,100,500,1000)"
    )
    p.add_argument("--duration", type=float, default=20.0, help="seconds per stream count (20)")
    p.add_argument(
        "--one-stream-rounds",
        type=int,
        default=3,
        help="floor / asrd back-to-back alternations, medians reported (3)",
    )
    p.add_argument(
        "--paced-count",
        type=int,
        default=150,
        help="one-stream round trips at real time, floor and asrd each (150: 15 s each)",
    )
    args = p.parse_args(argv)
    if args.one_stream_rounds < 1 or args.paced_count < 1:
        p.error("--one-stream-rounds and --paced-count must be at least 1 (each row needs them)")
    if args.smoke:
        args.streams, args.duration, args.floor_count, args.drain_timeout = [1, 10], 2.0, 300, 5.0
        args.paced_count, args.one_stream_rounds = 10, 1
    from bench import closed_loop
    from bench.floor import PACE_S, floor_table, measure_floor, measure_pipeline
    from bench.memory import daemon_config
    from daemon.launcher import DaemonProcess

    started = dt.datetime.now(dt.UTC)
    print("[bench latency] floor", file=sys.stderr, flush=True)
    floor = measure_floor(args.floor_count, paced=args.paced_count)
    one: dict[str, Any] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="asrd-bl-") as tmp:
        logdir = args.log_dir or Path(tmp)
        logdir.mkdir(parents=True, exist_ok=True)
        log = logdir / "asrd-latency.log"
        try:
            with DaemonProcess(daemon_config("null", args.lanes), log_path=log) as daemon:
                print("[bench latency] 1 stream, closed loop", file=sys.stderr, flush=True)
                sock = str(daemon.socket_path)
                # Floor and asrd back to back, alternated: separate starts of the same pipeline
                # differ by up to 2x on this kind of machine, so each ratio is of medians.
                rounds: dict[str, list[dict[str, Any]]] = {"floor": [], "asrd": []}
                for _ in range(args.one_stream_rounds):
                    rounds["floor"].append(measure_pipeline(args.floor_count))
                    rounds["asrd"].append(closed_loop.measure(sock, args.floor_count))
                one["back_to_back"] = _median_run(rounds["asrd"])
                one["floor_back_to_back"] = _median_run(rounds["floor"])
                one["rounds"] = rounds
                floor["figures"]["pipeline_alternated_p50_us"] = one["floor_back_to_back"]["p50_us"]
                floor["figures"]["pipeline_alternated_p99_us"] = one["floor_back_to_back"]["p99_us"]
                one["paced"] = closed_loop.measure(sock, args.paced_count, warmup=5, pace_s=PACE_S)
                for n in args.streams:
                    print(f"[bench latency] {n} streams", file=sys.stderr, flush=True)
                    rows.append(
                        load_step(
                            daemon,
                            n,
                            args.duration,
                            per_connection=args.per_connection,
                            procs=args.procs,
                            drain_timeout=args.drain_timeout,
                            generator=args.generator,
                        )
                    )
                    time.sleep(0.5 if args.smoke else 2.0)  # let the daemon settle
        except (TimeoutError, RuntimeError) as exc:
            print(f"bench latency: the daemon failed: {exc}\n{_log_tail(log)}", file=sys.stderr)
            return 1
    metrics: dict[str, Any] = {
        "one_stream_p50_us": metric(
            one["back_to_back"]["p50_us"], "us", "pipeline_alternated_p50_us"
        ),
        "one_stream_p99_us": metric(
            one["back_to_back"]["p99_us"], "us", "pipeline_alternated_p99_us"
        ),
        "one_stream_paced_p50_us": metric(one["paced"]["p50_us"], "us", "pipeline_paced_p50_us"),
        "one_stream_paced_p99_us": metric(one["paced"]["p99_us"], "us", "pipeline_paced_p99_us"),
    }
    for r in rows:
        n = r["streams"]
        rtt = r["chunk_rtt_ms"]
        metrics[f"rtt_p50_ms@{n}"] = metric(rtt["p50"], "ms", "pipeline_unpinned_p50_us")
        metrics[f"rtt_p99_ms@{n}"] = metric(rtt["p99"], "ms", "pipeline_unpinned_p99_us")
        metrics[f"daemon_cpu_us_per_chunk@{n}"] = metric(
            r["daemon_cpu_us_per_chunk"], "us", "python_call_us"
        )
    report = {
        "benchmark": "latency",
        "started_at": started.isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "config": {
            "backend": "null",
            "interim_ms": 0,
            "vad": False,
            "streams": args.streams,
            "duration_s": args.duration,
            "per_connection": args.per_connection,
            "generator": args.generator,
            "procs": args.procs,
            "lanes": args.lanes,
            "floor_count": args.floor_count,
            "paced_count": args.paced_count,
        },
        "machine": _machine(),
        "floor_detail": floor["detail"],
        "floor": floor["figures"],
        "one_stream": one,
        "results": rows,
        "metrics": metrics,
    }
    out = write_report(report, Path(args.json or default_path("latency")))
    print(
        "asrd chunk round trip, null backend, interim_ms = 0, VAD off, 100 ms chunks, "
        f"{args.duration:g} s per row (times in ms)"
    )
    print(step_table(rows))
    print()
    print(one_stream_table(one, floor["figures"]))
    print()
    print(floor_table(floor))
    print(f"report: {out}")
    failed = [r for r in rows if r["connect_failures"] or not r["partials_matched"]]
    return 1 if failed else 0


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median p50 and p99 over runs of ``closed_loop.measure`` / ``measure_pipeline``."""
    return {
        "runs": len(runs),
        "p50_us": round(statistics.median(r["p50_us"] for r in runs), 3),
        "p99_us": round(statistics.median(r["p99_us"] for r in runs), 3),
    }


def one_stream_table(one: dict[str, Any], floor: dict[str, float]) -> str:
    """The closed-loop rows against the floor pipeline measured the same way."""
    lines = [
        f"{'1 stream, closed loop (us)':34}{'p50':>9}{'p99':>9}{'floor p50':>11}{'p99':>9}"
        f"{'ratio p50':>11}{'p99':>7}"
    ]
    for key, label, fkey in (
        ("back_to_back", "back to back (medians)", "pipeline_alternated"),
        ("paced", "a chunk per 100 ms", "pipeline_paced"),
    ):
        r = one[key]
        f50, f99 = floor.get(f"{fkey}_p50_us"), floor.get(f"{fkey}_p99_us")
        r50 = r["p50_us"] / f50 if f50 else None
        r99 = r["p99_us"] / f99 if f99 else None
        lines.append(
            f"{label:34}{r['p50_us']:>9.1f}{r['p99_us']:>9.1f}{_fmt(f50, 1):>11}"
            f"{_fmt(f99, 1):>9}{_fmt(r50):>11}{_fmt(r99):>7}"
        )
    return "\n".join(lines)


@dataclass
class _Stepper:
    """Step counts up until one fails, then bisect between the last good and the first bad."""

    start: int
    factor: float
    limit: int
    refine: int

    def first(self) -> int:
        return min(self.start, self.limit)

    def grow(self, n: int) -> int:
        return min(self.limit, max(n + 1, math.ceil(n * self.factor)))


def _held(row: dict[str, Any], target_ms: float) -> tuple[bool, str]:
    rtt = row["chunk_rtt_ms"]
    if row["connect_failures"]:
        return False, f"{row['connect_failures']} connections failed"
    if row["errors"]:
        return False, "errors: " + ", ".join(f"{k} {v}" for k, v in sorted(row["errors"].items()))
    if not row["partials_matched"]:
        return False, "no chunk was answered"
    if row["streams_unclosed"]:
        return False, f"{row['streams_unclosed']} streams never closed"
    if rtt["p99"] is None or rtt["p99"] > target_ms:
        why = f"p99 {rtt['p99']} ms > {target_ms:g} ms"
        late = row["generator_lateness_ms"]["p99"]
        if late is not None and late > target_ms:
            why += f" (the load generator itself was late: p99 {late} ms)"
        return False, why
    return True, ""


def capacity_of(
    backend: str, stepper: _Stepper, args: argparse.Namespace, logdir: Path
) -> dict[str, Any]:
    from bench.memory import daemon_config
    from daemon.launcher import DaemonProcess

    steps: list[dict[str, Any]] = []
    target = args.target_p99_ms
    if backend == "embedded" and args.embedded_target_p99_ms is not None:
        target = args.embedded_target_p99_ms
    config = daemon_config(
        backend, args.lanes, args.embedded_threads if backend == "embedded" else None
    )
    daemon: DaemonProcess | None = None
    starts = 0

    def step(n: int) -> bool:
        nonlocal daemon, starts
        if daemon is None:
            starts += 1
            log = logdir / f"asrd-capacity-{backend}-{starts}.log"
            daemon = DaemonProcess(config, log_path=log)
            daemon.__enter__()
        print(f"[bench capacity] {backend}: {n} streams", file=sys.stderr, flush=True)
        row = load_step(
            daemon,
            n,
            args.duration,
            per_connection=args.per_connection,
            procs=args.procs,
            drain_timeout=args.drain_timeout,
            generator=args.generator,
        )
        row["held"], row["why"] = _held(row, target)
        steps.append(row)
        if not row["held"]:  # a backlog or a broken daemon must not leak into the next step
            daemon.__exit__(None, None, None)
            daemon = None
        else:
            time.sleep(0.5 if args.smoke else 2.0)
        return bool(row["held"])

    good, bad = 0, None
    try:
        n = stepper.first()
        while True:
            if step(n):
                good = n
                if n >= stepper.limit:
                    break
                n = stepper.grow(n)
            else:
                bad = n
                break
        for _ in range(stepper.refine):
            if bad is None or bad - good <= 1:
                break
            mid = (good + bad) // 2
            if step(mid):
                good = mid
            else:
                bad = mid
    finally:
        if daemon is not None:
            daemon.__exit__(None, None, None)
    return {
        "backend": backend,
        "capacity_streams": good,
        "first_failed_streams": bad,
        "limit_reached": bad is None,
        "target_p99_ms": target,
        "lanes": args.lanes or "auto",
        "embedded_threads": args.embedded_threads if backend == "embedded" else None,
        "steps": steps,
    }


def capacity_main(argv: list[str] | None = None) -> int:
    p = _daemon_parser(
        "python -m bench capacity",
        "Most real-time streams asrd sustains with chunk p99 under a target and no errors.",
    )
    p.add_argument(
        "--backend",
        action="append",
        choices=("null", "embedded"),
        help="backend (repeatable; default null and embedded)",
    )
    p.add_argument("--target-p99-ms", type=float, default=20.0, help="p99 limit (20 ms)")
    p.add_argument(
        "--embedded-target-p99-ms",
        type=float,
        default=None,
        help="p99 limit for the embedded backend (default: --target-p99-ms)",
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per step (10)")
    p.add_argument("--null-start", type=int, default=50, help="first step, null (50)")
    p.add_argument("--null-factor", type=float, default=1.5, help="growth per step, null (1.5)")
    p.add_argument("--null-max", type=int, default=4000, help="highest step, null (4000)")
    p.add_argument("--embedded-start", type=int, default=1, help="first step, embedded (1)")
    p.add_argument("--embedded-max", type=int, default=32, help="highest step, embedded (32)")
    p.add_argument(
        "--embedded-threads",
        type=int,
        default=None,
        help="backend.embedded.threads, decoding threads per lane (default: the daemon's)",
    )
    p.add_argument("--refine", type=int, default=3, help="bisection steps after a failure (3)")
    args = p.parse_args(argv)
    backends = args.backend or ["null", "embedded"]
    steppers = {
        "null": _Stepper(args.null_start, args.null_factor, args.null_max, args.refine),
        "embedded": _Stepper(args.embedded_start, 1.0, args.embedded_max, args.refine),
    }
    if args.smoke:
        args.duration, args.floor_count, args.drain_timeout = 1.5, 300, 5.0
        steppers = {"null": _Stepper(1, 4.0, 4, 0), "embedded": _Stepper(1, 1.0, 1, 0)}
    from bench.floor import floor_table, measure_floor

    started = dt.datetime.now(dt.UTC)
    print("[bench capacity] floor", file=sys.stderr, flush=True)
    floor = measure_floor(args.floor_count)
    results = []
    with tempfile.TemporaryDirectory(prefix="asrd-bc-") as tmp:
        logdir = args.log_dir or Path(tmp)
        logdir.mkdir(parents=True, exist_ok=True)
        for backend in backends:
            try:
                results.append(capacity_of(backend, steppers[backend], args, logdir))
            except (TimeoutError, RuntimeError) as exc:
                print(f"bench capacity: {backend}: the daemon failed: {exc}", file=sys.stderr)
                results.append({"backend": backend, "error": str(exc), "steps": []})
    for r in results:
        if r["backend"] == "embedded" and not r.get("error"):  # under the same p99 target
            from bench import recognizer_floor

            print("[bench capacity] pocketsphinx alone", file=sys.stderr, flush=True)
            r["recognizer_floor"] = recognizer_floor.sweep(
                2, 1 if args.smoke else args.embedded_max, args.duration, r["target_p99_ms"]
            )
    metrics = {
        f"{r['backend']}.capacity_streams": metric(
            r.get("capacity_streams"), "streams", "pipeline_unpinned_p50_us", "higher"
        )
        for r in results
    }
    report = {
        "benchmark": "capacity",
        "started_at": started.isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "config": {
            "backends": backends,
            "target_p99_ms": args.target_p99_ms,
            "duration_s": args.duration,
            "per_connection": args.per_connection,
            "generator": args.generator,
            "procs": args.procs,
            "lanes": args.lanes,
            "steppers": {b: vars(s) for b, s in steppers.items() if b in backends},
            "interim_ms": 0,
            "vad": False,
        },
        "machine": _machine(),
        "floor_detail": floor["detail"],
        "floor": floor["figures"],
        "results": results,
        "metrics": metrics,
    }
    out = write_report(report, Path(args.json or default_path("capacity")))
    for r in results:
        print(f"{r['backend']} backend: chunk round trip per step (ms)")
        if r.get("error"):
            print(f"  daemon failed: {r['error']}")
            continue
        print(step_table(r["steps"], verdicts=True))
        more = " (the highest step tried: at least this many)" if r["limit_reached"] else ""
        print(
            f"capacity: {r['capacity_streams']} real-time streams with p99 <= "
            f"{r['target_p99_ms']:g} ms and no errors{more}\n"
        )
        if r.get("recognizer_floor"):
            from bench.recognizer_floor import table

            print(table(r["recognizer_floor"]) + "\n")
    print(floor_table(floor))
    print(f"report: {out}")
    return 1 if any(r.get("error") for r in results) else 0


# --- runners: how the suite runs each benchmark -----------------------------------------------


def _with_smoke(argv: list[str], smoke: bool, path: Path) -> list[str]:
    return [*argv, *([SMOKE] if smoke else []), "--json", str(path)]


def run_floor(argv: list[str], smoke: bool, path: Path) -> int:
    from bench import floor

    return floor.main(_with_smoke(argv, smoke, path))


def run_latency(argv: list[str], smoke: bool, path: Path) -> int:
    return latency_main(_with_smoke(argv, smoke, path))


def run_capacity(argv: list[str], smoke: bool, path: Path) -> int:
    return capacity_main(_with_smoke(argv, smoke, path))


def run_memory(argv: list[str], smoke: bool, path: Path) -> int:
    from bench import memory

    return memory.main(_with_smoke(argv, smoke, path))


def run_profile(argv: list[str], smoke: bool, path: Path) -> int:
    from bench import profile

    return profile.main(_with_smoke(argv, smoke, path))


def run_hotpath(argv: list[str], smoke: bool, path: Path) -> int:
    from bench import hotpath

    return hotpath.main(_with_smoke(argv, smoke, path))


def run_codec(argv: list[str], smoke: bool, path: Path) -> int:
    from bench import codec_micro

    return codec_micro.main(_with_smoke(argv, smoke, path))


def _augment(path: Path, extra: dict[str, Any]) -> None:
    """Add the suite's sections to a report a wrapped module wrote."""
    if not path.exists():
        return
    report = read_report(path)
    report.update(extra)
    write_report(report, path)


def run_ring(argv: list[str], smoke: bool, path: Path) -> int:
    from bench import ring_micro
    from bench.floor import cpu_reference

    ref = cpu_reference(0.05 if smoke else 0.2)
    rc = ring_micro.main([*argv, *(["--seconds", "0.02"] if smoke else []), "--json", str(path)])
    if path.exists():
        report = read_report(path)
        results = report.get("results_ns", {})
        _augment(
            path,
            {
                "machine": _machine(),
                "smoke": smoke,
                "floor": ref,
                "metrics": extract_ring(report)[0] if results else {},
            },
        )
        print(f"report: {path}")
    return rc


def run_io_backend(argv: list[str], smoke: bool, path: Path) -> int:
    from bench import io_backend
    from bench.floor import cpu_reference, measure_echo

    count = 200 if smoke else 2000
    echo_floor = measure_echo(count)
    floor = {
        "echo_unpinned_p50_us": echo_floor["p50_us"],
        "echo_unpinned_p99_us": echo_floor["p99_us"],
        **cpu_reference(0.05 if smoke else 0.2),
    }
    rc = io_backend.main(_with_smoke(argv, smoke, path))
    if path.exists():
        report = read_report(path)
        _augment(path, {"smoke": smoke, "floor": floor, "metrics": extract_io_backend(report)[0]})
    return rc


def run_triton(argv: list[str], smoke: bool, path: Path) -> int:
    from bench import triton

    rc = triton.main(_with_smoke(argv, smoke, path))
    if path.exists():
        report = read_report(path)
        metrics, floor = extract_triton(report)
        _augment(path, {"smoke": smoke, "floor": floor, "metrics": metrics})
    return rc


def run_soak(argv: list[str], smoke: bool, path: Path) -> int:
    soak = importlib.import_module("bench.soak")
    rc: int = soak.main(_with_smoke(argv, smoke, path))
    if path.exists():
        report = read_report(path)
        _augment(path, {"smoke": smoke, "floor": {}, "metrics": extract_soak(report)[0]})
    return rc


def run_accuracy(argv: list[str], smoke: bool, path: Path) -> int:
    from bench import accuracy
    from bench.floor import cpu_reference

    ref = cpu_reference(0.05 if smoke else 0.2)
    rc = accuracy_smoke(path) if smoke else accuracy.main([*argv, "--json", str(path)])
    if path.exists():
        report = read_report(path)
        _augment(path, {"smoke": smoke, "floor": ref, "metrics": extract_accuracy(report)[0]})
    return rc


def accuracy_smoke(path: Path) -> int:
    """``bench.accuracy`` on the shipped samples only, with the daemon's default setting."""
    from bench import accuracy

    samples = sorted(
        (p for p in accuracy.SAMPLES_DIR.glob("*.wav") if p.with_suffix(".txt").is_file()),
        key=lambda p: p.stat().st_size,
    )[:1]  # the shortest sample: a few seconds of decoding
    items = accuracy.load_corpus("samples", samples)
    setting = next(s for s in accuracy.SETTINGS if s.is_daemon_default)
    t0 = time.monotonic()
    run = accuracy.run_setting(setting, items)
    ms = run["end_ms"]
    row = {
        "cmn": setting.cmn,
        "fwdflat": setting.fwdflat,
        "mode": setting.mode,
        "daemon_default": True,
        "librivox": {"wer": None, "errors": 0, "words": 0},
        "samples": accuracy.score(items, run["files"], "samples"),
        "end_utt_ms": {"median": sorted(ms)[len(ms) // 2], "max": max(ms), "count": len(ms)},
        "files": run["files"],
    }
    report = {
        "benchmark": "accuracy",
        "smoke": True,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_facts(),
        "corpora": {
            "samples": {"dir": str(accuracy.SAMPLES_DIR), "files": [p.name for p in samples]}
        },
        "elapsed_s": round(time.monotonic() - t0, 1),
        "results": [row],
    }
    out = write_report(report, path)
    s = row["samples"]
    print(f"{'setting':<38} {'samples WER':>12} {'exact':>7} {'end_utt ms med':>14}")
    print(
        f"{setting.label:<38} {100 * (s['wer'] or 0):10.1f} % "
        f"{s['exact_utterances']:>3}/{s['utterances']:<3} {row['end_utt_ms']['median']:>14.1f}"
    )
    print(f"report: {out}")
    return 0


# --- key figures of reports that do not carry them (wrapped modules, older files) -------------


Extracted = tuple[dict[str, Any], dict[str, float]]


def extract_ring(report: dict[str, Any]) -> Extracted:
    res = report.get("results_ns") or {}
    metrics = {
        k: metric(v, "ns", "python_call_us")
        for k, v in res.items()
        if k != "loop_overhead_ns" and isinstance(v, int | float)
    }
    return metrics, {}


def extract_io_backend(report: dict[str, Any]) -> Extracted:
    metrics: dict[str, Any] = {}
    for c in report.get("cells", []):
        name = f"{c['backend']}.{c['size']}.c{c['clients']}"
        lat = c.get("latency_us") or {}
        metrics[f"{name}.p50_us"] = metric(lat.get("p50"), "us", "echo_unpinned_p50_us")
        metrics[f"{name}.p99_us"] = metric(lat.get("p99"), "us", "echo_unpinned_p99_us")
        metrics[f"{name}.server_cpu_us_per_msg"] = metric(
            c.get("server_cpu_us_per_msg"), "us", "python_call_us"
        )
    return metrics, {}


def extract_triton(report: dict[str, Any]) -> Extracted:
    """Through asrd against the direct-call floor of the same transport and stream count."""
    floor: dict[str, float] = {}
    for r in report.get("floor", []):
        if not r.get("paced") or not r.get("latency_ms", {}).get("p50"):
            continue
        key = f"{r['transport']}.x{r['streams']}"
        floor[f"{key}.latency_p50_us"] = r["latency_ms"]["p50"] * 1000
        floor[f"{key}.latency_p99_us"] = r["latency_ms"]["p99"] * 1000
    metrics: dict[str, Any] = {}
    for r in report.get("daemon", []):
        rtt = r.get("chunk_rtt_ms") or {}
        key = f"{r['transport']}.x{r['streams']}"
        metrics[f"daemon.{key}.rtt_p50_ms"] = metric(rtt.get("p50"), "ms", f"{key}.latency_p50_us")
        metrics[f"daemon.{key}.rtt_p99_ms"] = metric(rtt.get("p99"), "ms", f"{key}.latency_p99_us")
    return metrics, floor


def extract_soak(report: dict[str, Any]) -> Extracted:
    metrics: dict[str, Any] = {}
    acc = report.get("accounting") or {}
    if "utterances_lost" in acc:
        metrics["utterances_lost"] = metric(acc["utterances_lost"], "count", None)
    for key, res in (report.get("resources") or {}).items():
        life = res.get("longest_life") or {}
        if life.get("rss_slope_kib_per_min_after_warmup") is not None:
            metrics[f"{key}.rss_slope_kib_per_min"] = metric(
                life["rss_slope_kib_per_min_after_warmup"], "KiB/min", None
            )
    return metrics, {}


def extract_accuracy(report: dict[str, Any]) -> Extracted:
    metrics: dict[str, Any] = {}
    for row in report.get("results", []):
        if not row.get("daemon_default"):
            continue
        for corpus in ("librivox", "samples"):
            wer = (row.get(corpus) or {}).get("wer")
            if wer is not None:
                metrics[f"{corpus}.wer"] = metric(wer, "fraction", None)
        med = (row.get("end_utt_ms") or {}).get("median")
        if med is not None:
            metrics["end_utt_ms_median"] = metric(med, "ms", "python_call_us")
    return metrics, {}


EXTRACTORS: dict[str, Callable[[dict[str, Any]], Extracted]] = {
    "ring": extract_ring,
    "ring_micro": extract_ring,
    "io_backend": extract_io_backend,
    "triton": extract_triton,
    "soak": extract_soak,
    "accuracy": extract_accuracy,
}


def benchmark_of(report: dict[str, Any], path: Path | None = None) -> str | None:
    """The suite name of a report: its ``suite`` block, its ``benchmark``, or its file name."""
    suite = report.get("suite")
    if isinstance(suite, dict) and isinstance(suite.get("name"), str):
        return str(suite["name"])
    name = report.get("benchmark")
    if isinstance(name, str):
        return "ring" if name == "ring_micro" else name
    if path is not None:
        stem = path.name.split("-", 1)[0]
        if stem in REGISTRY or stem in EXTRACTORS:
            return "ring" if stem == "ring_micro" else stem
    return None


def key_figures(report: dict[str, Any], path: Path | None = None) -> Extracted:
    """``(metrics, floor)`` of a report: its own sections, else extracted from its body."""
    metrics = report.get("metrics")
    floor = report.get("floor")
    if isinstance(metrics, dict) and metrics:
        return metrics, floor if isinstance(floor, dict) else {}
    name = benchmark_of(report, path)
    if name in EXTRACTORS:
        m, f = EXTRACTORS[name](report)
        if not f and isinstance(floor, dict):
            f = floor
        return m, f
    return {}, floor if isinstance(floor, dict) else {}


# --- history ----------------------------------------------------------------------------------


def git_commit() -> tuple[str | None, bool | None]:
    """(HEAD commit, whether the tree differs from it, untracked files included); (None,
    None) outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return head.stdout.strip(), dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def history_line(name: str, report: dict[str, Any], path: Path, rc: int) -> dict[str, Any]:
    metrics, floor = key_figures(report, path)
    commit, dirty = git_commit()
    m = report.get("machine") or {}
    try:
        shown = str(path.resolve().relative_to(REPO))
    except ValueError:
        shown = str(path)
    return {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "dirty": dirty,
        "benchmark": name,
        "smoke": bool(report.get("smoke")),
        "rc": rc,
        "report": shown,
        "machine": {
            k: m.get(k) for k in ("hostname", "cpu_model", "cpus_usable", "kernel", "python")
        },
        "metrics": {k: v.get("value") for k, v in metrics.items() if isinstance(v, dict)},
        "floor": floor,
    }


def append_history(line: dict[str, Any], history: Path = HISTORY) -> None:
    history.parent.mkdir(parents=True, exist_ok=True)
    with history.open("a", encoding="utf-8") as f:
        f.write(json.dumps(line, sort_keys=False) + "\n")


# --- command line -----------------------------------------------------------------------------


def list_text() -> str:
    width = max(map(len, REGISTRY))
    lines = []
    for b in REGISTRY.values():
        why = b.available()
        lines.append(f"{b.name:<{width}}  {b.summary}" + (f"  [unavailable: {why}]" if why else ""))
    return "\n".join(lines)


USAGE = """usage: python -m bench --list
       python -m bench NAME [--smoke] [--record] [--json PATH] [benchmark arguments...]
       python -m bench NAME --help     (the benchmark's own arguments)
       python -m bench.compare OLD.json NEW.json [--threshold 1.25]"""


def split_suite_args(argv: list[str]) -> tuple[list[str], bool, bool, Path | None]:
    """Take ``--smoke``, ``--record`` and ``--json PATH`` out of ``argv``."""
    rest: list[str] = []
    smoke = record = False
    path: Path | None = None
    it = iter(argv)
    for a in it:
        if a == SMOKE:
            smoke = True
        elif a == RECORD:
            record = True
        elif a == "--json":
            value = next(it, None)
            if value is None:
                raise SystemExit("bench: --json needs a path")
            path = Path(value)
        elif a.startswith("--json="):
            path = Path(a.split("=", 1)[1])
        else:
            rest.append(a)
    return rest, smoke, record, path


def run(name: str, argv: list[str], *, history: Path = HISTORY) -> int:
    """Run benchmark ``name`` with ``argv`` (suite options included); its exit status."""
    bench = REGISTRY[name]
    why = bench.available()
    if why:
        print(f"bench: {name} is unavailable: {why}", file=sys.stderr)
        return 2
    rest, smoke, record, path = split_suite_args(argv)
    path = path or default_path(name)
    if path.exists():
        path.unlink()  # a stale file must not pass for this run's report
    t0 = time.monotonic()
    rc = bench.load()(rest, smoke, path)
    if not path.exists():
        print(f"bench: {name} wrote no report (exit {rc})", file=sys.stderr)
        return rc or 1
    report = read_report(path)
    metrics, floor = key_figures(report, path)
    report.setdefault("machine", machine_facts())
    report["metrics"], report["floor"] = metrics, floor
    report["suite"] = {
        "name": name,
        "argv": argv,
        "smoke": smoke,
        "rc": rc,
        "elapsed_s": round(time.monotonic() - t0, 1),
    }
    write_report(report, path)
    if record:
        append_history(history_line(name, report, path, rc), history)
        print(f"history: {history}")
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print("\nbenchmarks:\n" + list_text())
        print(
            "\nsuite options: --smoke (a tiny run: does it work?), --record (append a line to "
            "bench/history.jsonl),\n--json PATH (report file; default bench/results/"
            "NAME-<timestamp>.json); anything else goes to the benchmark."
        )
        return 0 if argv else 2
    if argv[0] == "--list":
        print(list_text())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in REGISTRY:
        print(f"bench: no benchmark {name!r}; python -m bench --list", file=sys.stderr)
        return 2
    return run(name, rest)
