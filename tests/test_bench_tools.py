"""The suite's own tools against a real daemon: ``bench.fleet`` (every chunk answered, streams
closed, figures in the shape the suite reads), ``bench.closed_loop`` and ``bench.ab`` (two
commits in their own worktrees, the daemon proven to run each tree's code). No time is
asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import closed_loop, fleet
from bench.load import REPO
from bench.memory import daemon_config
from daemon.launcher import DaemonProcess


@pytest.mark.timeout(10)
def test_a_chunk_answered_by_a_later_partial_counts_with_its_own_wait() -> None:
    from bench.load import GenResult
    from ipc import protocol as p

    st = fleet._Stream("s", [])
    conn = fleet._Conn.__new__(fleet._Conn)
    conn.streams = {"s": st}
    res = GenResult()
    st.sent.extend([(0, 1.0), (1, 1.1), (2, 1.2), (3, 1.3)])
    fleet._on_message(conn, p.Partial(stream="s", utterance=0, text="", seq=0), 1.05, res)
    # Chunks 1 and 2 were fed with chunk 3 and answered by its partial.
    fleet._on_message(conn, p.Partial(stream="s", utterance=0, text="", seq=3), 1.5, res)
    assert (res.partials_matched, res.chunks_coalesced) == (2, 2)
    assert [round(x, 3) for x in res.rtt] == [0.05, 0.4, 0.3, 0.2]
    assert not st.sent


@pytest.mark.timeout(120)
def test_fleet_and_closed_loop_against_the_daemon(tmp_path: Path) -> None:
    with DaemonProcess(daemon_config("null", 2), log_path=tmp_path / "asrd.log") as daemon:
        row = fleet.run_fleet(
            str(daemon.socket_path), 25, 1.0, per_connection=10, procs=2, daemon_pid=daemon.pid
        )
        one = closed_loop.measure(str(daemon.socket_path), 50, warmup=5)
    # 25 streams on 3 connections (10, 10, 5), 10 chunks each in 1 s: all sent, all answered
    # (but a last chunk overtaken by its Finish), every stream started and closed.
    assert row["connections"] == 3 and row["procs"] == 2
    assert row["streams_started"] == 25 and row["streams_unclosed"] == 0
    assert row["errors"] == {} and row["connect_failures"] == 0
    assert row["chunks_sent"] >= 25 * 9
    assert row["partials_matched"] + row["chunks_coalesced"] >= row["chunks_sent"] - 25
    assert row["chunk_rtt_ms"]["count"] == row["partials_matched"] + row["chunks_coalesced"]
    assert row["daemon_cpu_us_per_chunk"] and row["generator_cpu_us_per_chunk"]
    assert set(row["daemon_cpu_us_per_chunk_by_role"]) >= {"ingress", "infer"}
    assert one["count"] == 50 and one["lane"] in (0, 1)
    assert 0 < one["p50_us"] <= one["p99_us"] <= one["max_us"]


@pytest.mark.timeout(300)
def test_ab_measures_two_commits(tmp_path: Path) -> None:
    out = tmp_path / "ab.json"
    args = ["HEAD", "HEAD", "--rounds", "1", "--streams", "10", "--duration", "1"]
    args += ["--count", "30", "--lanes", "1", "--json", str(out)]
    args += ["--after-extra", '[placement]\\npinning = "off"']
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ab", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert len(report["runs"]["before"]) == len(report["runs"]["after"]) == 1
    for side in ("before", "after"):
        run = report["runs"][side][0]
        assert run["errors"] == {} and run["partials_matched"] > 0
    assert set(report["summary"]) == {
        "one_p50_us",
        "one_p99_us",
        "load_p50_ms",
        "load_p99_ms",
        "cpu_us_per_chunk",
    }
    assert "ratio" in proc.stdout
    worktrees = subprocess.run(
        ["git", "worktree", "list"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert str(tmp_path) not in worktrees and "asrd-ab-" not in worktrees  # removed again
