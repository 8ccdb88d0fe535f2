"""``python -m bench.triton --smoke`` against a real Triton server: every part runs and reports.

The module's server (tests/triton_fixtures.py) is passed in by URL, so the benchmark starts no
server of its own; its regions are named with the server's prefix, so the fixture's teardown
also proves that none of them is left in /dev/shm. Speed is never asserted: only that each row
exists, carried traffic and had no errors, and that the figures are consistent with each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
import tritonclient.grpc as grpcclient

from bench import triton as bt
from tests.triton_fixtures import Server
from tests.triton_fixtures import server as server

# Server setup (first time: about 45 s) plus the smoke run (about 40 s on 2 CPUs).
pytestmark = pytest.mark.timeout(900)

TRANSPORTS = {"grpc/system", "grpc/none", "http/system", "http/none"}
STREAMS = (1, 2)


def test_smoke_run_against_a_real_server(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "triton.json"
    prefix = server.shm_prefix + "bench_"
    rc = bt.main(
        [
            "--smoke",
            "--grpc-url", server.url,
            "--http-url", f"127.0.0.1:{server.http_port}",
            "--triton-pid", str(server.pid),
            "--shm-prefix", prefix,
            "--log-dir", str(tmp_path / "logs"),
            "--json", str(out),
        ]
    )  # fmt: skip
    report: dict[str, Any] = msgspec.json.decode(out.read_bytes())
    assert report["failures"] == [] and rc == 0, report["failures"]
    assert not report["server"]["started_here"]
    expected = {(t, n) for t in TRANSPORTS for n in STREAMS}

    # Floor: a real-time row and a capacity row per transport and stream count.
    floor = report["floor"]
    for paced in (True, False):
        rows = [r for r in floor if r["paced"] is paced]
        assert {(r["transport"], r["streams"]) for r in rows} == expected
    for r in floor:
        assert r["errors"] == {}, r
        assert r["chunks"] > 0 and r["chunks_per_s"] > 0
        assert r["finals"] == r["streams"]  # every sequence ended with IS_FINAL
        assert r["call_ms"]["count"] == r["latency_ms"]["count"] == r["chunks"]
        # A chunk's latency (from when it was due) contains its call.
        assert 0 < r["call_ms"]["p50"] <= r["latency_ms"]["p50"]
        assert r["server_cpu_us_per_chunk"] is not None
    # In real time each stream sends about 10 chunks per second (1 s rows).
    for r in (r for r in floor if r["paced"]):
        assert 5 * r["streams"] <= r["chunks"] <= 11 * r["streams"]

    # Through the daemon: each row ran, its chunks came back as Partials, and it stopped cleanly.
    daemon = report["daemon"]
    assert {(r["transport"], r["streams"]) for r in daemon} == expected
    for r in daemon:
        assert r["ok"] and r["error"] is None and r["errors"] == {}, r
        assert 0 < r["chunks_answered"] <= r["chunks_sent"]
        assert r["chunk_rtt_ms"]["count"] == r["chunks_answered"]
        assert r["finals"] == r["streams_started"] == r["streams"]
        assert r["infer_counters"]["decode_us"] > 0 and r["infer_stage_us_per_request"] > 0
        assert r["infer_counters"]["failures"] == 0
        assert r["exit_code"] == 0

    # Size sweep: one row per transport at 1600 samples, every request answered.
    sweep = report["sweep"]
    assert {(r["transport"], r["samples"]) for r in sweep} == {(t, 1600) for t in TRANSPORTS}
    for r in sweep:
        assert r["errors"] == {} and r["requests"] == 20 and r["bytes"] == 3200
        assert 0 < r["call_ms"]["p50"] <= r["call_ms"]["p99"]

    # Ratios pair system with none for each protocol.
    ratios = report["ratios"]
    pairs = {(p["protocol"], p["key"]) for p in ratios["sweep_shm_over_none"]}
    assert pairs == {("grpc", 1600), ("http", 1600)}
    assert len(ratios["daemon_rtt_shm_over_none"]) == 2 * len(STREAMS)
    assert {(o["transport"], o["streams"]) for o in ratios["daemon_over_floor"]} == expected
    assert all(p["p50_ratio"] > 0 for p in ratios["floor_call_shm_over_none"])

    assert {"cpu_model", "cpus_logical", "kernel", "python", "packages"} <= set(report["machine"])
    assert report["machine"]["packages"]["tritonclient"]
    text = capsys.readouterr().out
    for title in ("Floor:", "Through the daemon:", "Tensor-size sweep:", "Shared memory"):
        assert title in text
    assert "FAILED" not in text

    # Nothing of ours stays registered with the server (the daemons' regions included).
    status = grpcclient.InferenceServerClient(server.url).get_system_shared_memory_status(
        as_json=True
    )
    names = [r["name"] for r in status.get("regions", {}).values()] if status else []
    assert not [n for n in names if n.startswith((prefix, "asrd-"))], names
    assert not list(Path("/dev/shm").glob(prefix + "*"))
