"""Smoke tests of the benchmarks: arguments, statistics, report writing, the echo floor, and a
short load run against the in-test daemon stand-in (in-process and with --procs)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from bench import echo, load
from tests.test_client import FakeDaemon, write_wav


@pytest.fixture
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeDaemon]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="asrd-b") as d:
        daemon = FakeDaemon(Path(d) / "asrd.sock").start()
        yield daemon
        daemon.stop()


def test_summarize() -> None:
    s = load.summarize([x / 1000 for x in range(1, 101)], 1000)  # 1..100 ms
    assert s["count"] == 100
    assert s["p50"] == pytest.approx(50.5)
    assert s["p99"] == pytest.approx(99.01)
    assert s["max"] == 100.0
    assert s["mean"] == pytest.approx(50.5)
    empty = load.summarize([])
    assert empty["count"] == 0 and empty["p50"] is None and empty["max"] is None


def test_echo_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 11)]
    assert echo.percentile(values, 50) == 5.0
    assert echo.percentile(values, 99) == 10.0
    assert echo.percentile(values, 0) == 1.0
    assert echo.percentile([], 50) != echo.percentile([], 50)  # NaN


def test_arguments() -> None:
    args = load.build_parser().parse_args([])
    assert (args.streams, args.connections, args.duration, args.chunk_ms) == (10, 1, 10.0, 100)
    assert args.mode == "restart" and args.procs == 1 and not args.no_vad
    args = load.build_parser().parse_args(
        ["--streams", "500", "--connections", "50", "--wav", "a.wav", "--wav", "b.wav"]
    )
    assert args.wav == ["a.wav", "b.wav"] and args.streams == 500
    with pytest.raises(SystemExit):
        load.build_parser().parse_args(["--streams", "0"])
    with pytest.raises(SystemExit):
        load.build_parser().parse_args(["--duration", "-1"])


def test_plan_spreads_streams() -> None:
    plans = load.plan_streams(6, 4, 2, 100, None)
    assert [p.connection for p in plans] == [0, 1, 2, 3, 0, 1]
    assert [p.wav for p in plans] == [0, 1, 0, 1, 0, 1]
    assert [round(p.offset_s, 4) for p in plans] == [0, 0.0167, 0.0333, 0.05, 0.0667, 0.0833]
    assert load.plan_streams(2, 1, 1, 100, 10.0)[1].offset_s == 5.0


def test_process_titles() -> None:
    assert load._is_asrd("asrd: ingress lane 0")
    assert load._is_asrd("asrd run --config x.toml")
    assert load._is_asrd("/venv/bin/python /venv/bin/asrd run")
    assert load._is_asrd("/usr/bin/python3 -m daemon.cli run --config c.toml")
    assert not load._is_asrd("python -m bench.load")
    assert not load._is_asrd("asrdx run")
    assert load._role("asrd: infer lane 3") == "infer"
    assert load._role("python -m daemon.cli run") == "supervisor"


def test_echo_floor() -> None:
    r = echo.measure(count=300, warmup=20)
    assert r["count"] == 300 and r["msg_bytes"] == 3200
    assert 0 < r["min_us"] <= r["p50_us"] <= r["p99_us"] <= r["max_us"]


def _run(fake: FakeDaemon, tmp_path: Path, extra: list[str]) -> dict[str, Any]:
    wav = write_wav(tmp_path / "tone.wav", 0.3, 16000)  # 3 chunks: streams restart often
    out = tmp_path / "report.json"
    rc = load.main(
        [
            "--socket", str(fake.path),
            "--wav", str(wav),
            "--streams", "4",
            "--connections", "2",
            "--duration", "0.8",
            "--no-vad",
            "--no-floor",
            "--drain-timeout", "5",
            "--json", str(out),
            *extra,
        ]
    )  # fmt: skip
    assert rc == 0
    report: dict[str, Any] = msgspec.json.decode(out.read_bytes())
    return report


def test_load_run_in_process(
    fake: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _run(fake, tmp_path, ["--daemon-pid", str(os.getpid())])
    r = report["results"]
    assert r["errors"] == {}
    # The stand-in answers every chunk with a Partial carrying its seq.
    assert r["chunks_sent"] >= 4 * 7
    assert r["partials_matched"] == r["chunks_sent"] == r["chunk_rtt_ms"]["count"]
    assert r["generator_lateness_ms"]["count"] == r["chunks_sent"]
    assert r["streams_started"] > 4  # files of 3 chunks: streams were restarted
    assert r["streams_closed"] == r["streams_started"] and r["streams_unclosed"] == 0
    assert r["finals"] == r["final_after_finish_ms"]["count"] == r["streams_started"]
    assert r["chunk_rtt_ms"]["p50"] > 0
    assert r["daemon_processes_found"] == 1 and r["daemon_cpu_us_per_chunk"] > 0
    assert report["daemon"]["welcome"]["server"] == "fake-asrd"
    assert {"cpu_model", "cpus_logical", "kernel", "python", "packages"} <= set(report["machine"])
    assert report["config"]["connections"] == 2
    text = capsys.readouterr().out
    assert "chunk round trip (ms)" in text and "generator lateness (ms)" in text
    assert "errors: none" in text


def test_load_run_with_procs(fake: FakeDaemon, tmp_path: Path) -> None:
    report = _run(fake, tmp_path, ["--procs", "2", "--mode", "loop"])
    r = report["results"]
    assert report["config"]["procs"] == 2
    assert r["errors"] == {}
    assert r["streams_started"] == 4  # loop mode: one stream each, to the end
    assert r["finals"] == 4
    assert r["partials_matched"] == r["chunks_sent"] >= 4 * 7
    hellos = [m.client for m in fake.received if type(m).__name__ == "Hello"]
    assert sorted(hellos) == ["bench.load/0", "bench.load/1"]


def test_report_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load, "RESULTS_DIR", tmp_path / "results")
    path = load.write_report({"x": 1}, None)
    assert path.parent == tmp_path / "results"
    assert path.name.startswith("load-") and path.suffix == ".json"
    assert msgspec.json.decode(path.read_bytes()) == {"x": 1}
