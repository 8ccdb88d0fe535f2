"""The benchmark suite (``python -m bench``): the listing, a ``--smoke`` run of every registered
benchmark (each must write a JSON report with the machine's facts, its key figures and the
floor they are read against), ``--record`` into a history file, and ``bench.compare``'s exit
statuses on synthetic reports. No absolute time is asserted anywhere.

The smoke runs of ``triton`` and ``soak`` are tested in tests/test_bench_triton.py and
tests/test_bench_soak.py; here they are only checked to be registered.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from bench import compare, suite
from bench.load import REPO

EXPECTED = {
    "floor",
    "latency",
    "capacity",
    "memory",
    "triton",
    "ring",
    "codec",
    "hotpath",
    "io_backend",
    "soak",
    "accuracy",
    "profile",
}
# Seconds each takes here (2 vCPUs, busy): floor 7, latency 17, capacity 28 (two daemons),
# memory 10, accuracy 8, io_backend 3, ring 1, codec 2, hotpath 1, profile 10.
SMOKE_RUNS = [
    pytest.param(b.name, marks=pytest.mark.timeout(240))
    for b in suite.REGISTRY.values()
    if b.own_smoke_test is None
]


def test_list_from_the_command_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--list"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    names = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert names == EXPECTED
    assert all(len(line.split(None, 1)) == 2 for line in out.splitlines())  # a description each


def test_registry() -> None:
    assert set(suite.REGISTRY) == EXPECTED
    for name in ("triton", "soak"):
        own = suite.REGISTRY[name].own_smoke_test
        assert own is not None and (REPO / own).is_file()
    assert suite.main(["no-such-benchmark"]) == 2
    assert suite.REGISTRY["floor"].available() is None


def test_suite_arguments() -> None:
    rest, smoke, record, path = suite.split_suite_args(
        ["--count", "5", "--smoke", "--json", "x.json", "--record", "--cpu=1"]
    )
    assert rest == ["--count", "5", "--cpu=1"] and smoke and record and path == Path("x.json")
    rest, smoke, record, path = suite.split_suite_args(["--json=y.json"])
    assert rest == [] and not smoke and not record and path == Path("y.json")


@pytest.mark.parametrize("name", SMOKE_RUNS)
def test_smoke_run(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / f"{name}.json"
    history = tmp_path / "history.jsonl"
    rc = suite.run(name, ["--smoke", "--json", str(out), "--record"], history=history)
    printed = capsys.readouterr().out
    assert rc == 0, printed
    report: dict[str, Any] = msgspec.json.decode(out.read_bytes())

    machine = report["machine"]
    assert {"cpu_model", "cpus_logical", "cpus_usable", "kernel", "python", "packages"} <= set(
        machine
    )
    assert machine["packages"]["msgspec"]
    assert report["suite"]["name"] == name and report["suite"]["smoke"] is True
    assert report["smoke"] is True

    metrics, floor = report["metrics"], report["floor"]
    assert metrics, "no key figures"
    for key, m in metrics.items():
        assert set(m) == {"value", "unit", "better", "floor"}, key
        assert m["better"] in ("lower", "higher")
        assert m["value"] is None or isinstance(m["value"], int | float), key
        if m["floor"] is not None:
            assert isinstance(floor.get(m["floor"]), int | float), (key, m["floor"])
    assert any(m["value"] is not None for m in metrics.values())
    assert "report:" in printed  # a table was printed, then where the JSON went

    lines = history.read_text().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert line["benchmark"] == name and line["smoke"] is True and line["rc"] == 0
    assert set(line["metrics"]) == set(metrics) and line["floor"] == floor
    assert "commit" in line and line["timestamp"]

    # Every report compares with itself: nothing regressed.
    assert compare.main([str(out), str(out)]) == 0

    if name == "capacity":  # pocketsphinx alone, beside the embedded backend's steps
        (embedded,) = [r for r in report["results"] if r["backend"] == "embedded"]
        recognizer = embedded["recognizer_floor"]
        assert [r["streams"] for r in recognizer["steps"]] == [1]
        assert recognizer["steps"][0]["chunks"] > 0 and recognizer["single_stream_rtf"] > 0
        assert "pocketsphinx alone" in printed

    if name == "profile":  # every worker was sampled, and its raw stacks were kept
        roles = report["profiles"]
        # 200 streams on 20 connections load both lanes: their workers were sampled busy.
        assert any(r.startswith("ingress") and p["samples"] for r, p in roles.items()), roles
        assert any(r.startswith("infer") and p["samples"] for r, p in roles.items()), roles
        assert all((Path(report["raw_stacks"]) / f"{r}.txt").is_file() for r in roles)


def test_floor_reads_the_pipeline_against_the_echo(tmp_path: Path) -> None:
    """The floor benchmark reads the pipeline against the echo it measured in the same run."""
    out = tmp_path / "floor.json"
    assert suite.run("floor", ["--smoke", "--no-pinned", "--json", str(out)]) == 0
    report = msgspec.json.decode(out.read_bytes())
    assert set(report["metrics"]) == {"pipeline_unpinned_p50_us", "pipeline_unpinned_p99_us"}
    r = report["results"]["pipeline_unpinned"]
    assert r["count"] == 300 and 0 < r["min_us"] <= r["p50_us"] <= r["p99_us"] <= r["max_us"]
    assert "pipeline_pinned" not in report["results"]


# --- compare ----------------------------------------------------------------------------------


def _report(
    path: Path,
    floor_us: float = 100.0,
    rtt_ms: float = 1.0,
    capacity: float = 100,
    rss_kib: float = 50.0,
    benchmark: str = "latency",
) -> Path:
    report = {
        "benchmark": benchmark,
        "floor": {"pipeline_unpinned_p50_us": floor_us},
        "metrics": {
            "rtt_p50_ms@1": suite.metric(rtt_ms, "ms", "pipeline_unpinned_p50_us"),
            "capacity_streams": suite.metric(
                capacity, "streams", "pipeline_unpinned_p50_us", "higher"
            ),
            "rss_per_stream_kib": suite.metric(rss_kib, "KiB", None),
        },
    }
    path.write_text(json.dumps(report))
    return path


def test_compare_within_threshold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = _report(tmp_path / "old.json")
    assert compare.main([str(old), str(_report(tmp_path / "a.json", rtt_ms=1.2))]) == 0
    # A machine twice as slow (floor 200 us) at twice the latency and half the capacity: the
    # same code, so the ratios to the floor did not move.
    slow = _report(tmp_path / "b.json", floor_us=200, rtt_ms=2.0, capacity=50)
    assert compare.main([str(old), str(slow)]) == 0
    out = capsys.readouterr().out
    assert "rtt_p50_ms@1" in out and "verdict" in out and "REGRESSION" not in out
    better = _report(tmp_path / "c.json", rtt_ms=0.5, capacity=300)
    assert compare.main([str(old), str(better)]) == 0
    assert "better" in capsys.readouterr().out


def test_compare_regressions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = _report(tmp_path / "old.json")
    slower = _report(tmp_path / "slower.json", rtt_ms=1.5)  # same floor, 1.5x the latency
    assert compare.main([str(old), str(slower)]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert compare.main([str(old), str(slower), "--threshold", "1.6"]) == 0
    assert compare.main([str(old), str(slower), "--threshold-for", "rtt*=1.6"]) == 0
    assert compare.main([str(old), str(slower), "--metric", "capacity*"]) == 0
    # Lower capacity at the same floor is a regression; so is memory growth (compared raw).
    assert compare.main([str(old), str(_report(tmp_path / "c.json", capacity=70))]) == 1
    assert compare.main([str(old), str(_report(tmp_path / "m.json", rss_kib=80))]) == 1
    # The same latency on a machine whose floor got twice as fast: asrd got relatively slower.
    faster_floor = _report(tmp_path / "f.json", floor_us=50, capacity=200)
    assert compare.main([str(old), str(faster_floor)]) == 1
    assert compare.main([str(old), str(faster_floor), "--raw", "--metric", "rtt*"]) == 0


def test_compare_bad_input(tmp_path: Path) -> None:
    old = _report(tmp_path / "old.json")
    missing = tmp_path / "missing.json"
    assert compare.main([str(old), str(missing)]) == 2
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    assert compare.main([str(old), str(garbage)]) == 2
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    assert compare.main([str(listing), str(old)]) == 2
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmark": "latency", "metrics": {}}))
    assert compare.main([str(old), str(empty)]) == 2
    other = _report(tmp_path / "other.json", benchmark="capacity")
    assert compare.main([str(old), str(other)]) == 2
    assert compare.main([str(old), str(other), "--allow-different"]) == 0
    no_floor = tmp_path / "no_floor.json"
    data = json.loads(old.read_text())
    data["floor"] = {}
    no_floor.write_text(json.dumps(data))
    assert compare.main([str(old), str(no_floor), "--metric", "rtt*"]) == 2  # nothing comparable
    assert compare.main([str(old), str(old), "--metric", "nothing*"]) == 2
    assert compare.main([str(old), str(old), "--threshold", "0.9"]) == 2
    assert compare.main([str(old)]) == 2


def test_key_figures_of_reports_written_before_the_suite() -> None:
    ring = {"benchmark": "ring_micro", "results_ns": {"push_pop_64_ns": 500.0}}
    metrics, floor = suite.key_figures(ring)
    assert metrics["push_pop_64_ns"]["value"] == 500.0 and floor == {}
    triton = {
        "floor": [
            {
                "transport": "grpc/none",
                "streams": 1,
                "paced": True,
                "latency_ms": {"p50": 2.0, "p99": 4.0},
            }
        ],
        "daemon": [{"transport": "grpc/none", "streams": 1, "chunk_rtt_ms": {"p50": 3, "p99": 8}}],
        "sweep": [],
    }
    metrics, floor = suite.key_figures(triton, Path("triton-20261126-131037.json"))
    assert floor["grpc/none.x1.latency_p50_us"] == 2000.0
    m = metrics["daemon.grpc/none.x1.rtt_p50_ms"]
    assert compare.normalise(m, floor, raw=False) == (1.5, "")


def test_profile_parses_py_spy_stacks() -> None:
    from bench import profile

    raw = (
        "<module> (/x/workers/infer.py:9);run (/x/workers/infer.py:100);"
        "poll (/x/ipc/ring.py:5) 6\n"
        "<module> (/x/workers/infer.py:9);run (/x/workers/infer.py:101) 4\n"
        "garbage line\n"
    )
    top = profile.top_frames(profile.parse_raw(raw))
    assert top["samples"] == 10
    assert top["self"][0] == {"frame": "poll (ipc/ring.py)", "samples": 6, "share": 0.6}
    assert top["self"][1]["frame"] == "run (workers/infer.py)"  # lines 100 and 101 merged
    assert top["total"][0]["samples"] == 10 and top["total"][0]["share"] == 1.0
