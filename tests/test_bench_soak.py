"""The soak test (bench/soak.py): its helpers, and a ``--smoke`` run against a real daemon that
must lose no utterance, kill a worker, exercise every bad-client case, stop cleanly and leave
no shared memory behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from bench import soak


def test_process_titles() -> None:
    assert soak.process_key("asrd: ingress lane 0") == ("ingress", 0)
    assert soak.process_key("asrd: infer lane 12") == ("infer", 12)
    assert soak.process_key("python -m daemon.cli run") is None
    assert soak.process_key("asrd: infer lane x") is None


def test_series_summary_and_slope() -> None:
    points = [(float(t), 100 + 2 * t) for t in range(0, 61, 10)]  # +2 per second
    s = soak.series_summary(points, warmup_s=20)
    assert (s["first"], s["last"], s["max"], s["warm"]) == (100, 220, 220, 140)
    assert s["growth"] == 80 and s["median"] == 160
    assert soak.slope_per_min(points) == pytest.approx(120.0)
    assert soak.slope_per_min(points[:2]) is None
    assert soak.series_summary([], 10)["first"] is None


def test_arguments() -> None:
    args = soak.build_parser().parse_args([])
    cfg = soak.config_from_args(args)
    assert (cfg.duration_s, cfg.streams, cfg.kill_every_s, cfg.bad_share) == (1800, 20, 60, 0.05)
    assert cfg.backend == "null" and cfg.sample_every_s == 10 and cfg.warmup_s == 120
    assert cfg.wavs and all(w.endswith(".wav") for w in cfg.wavs)
    smoke = soak.config_from_args(soak.build_parser().parse_args(["--smoke"]))
    assert smoke.duration_s == 20 and smoke.kill_every_s > 0 and smoke.smoke
    with pytest.raises(SystemExit):
        soak.build_parser().parse_args(["--bad-share", "2"])


@pytest.mark.timeout(180)
def test_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    rc = soak.main(["--smoke", "--json", str(out), "--seed", "7"])
    report: dict[str, Any] = msgspec.json.decode(out.read_bytes())
    acc, daemon = report["accounting"], report["daemon"]
    assert acc["utterances_lost"] == 0, acc["lost_detail"]
    assert acc["utterances_accepted"] > 0 and acc["finals"] > 0
    assert acc["mismatched_finals"] == 0, acc["mismatch_examples"]
    assert acc["ordering_violations"] == 0, acc["ordering_examples"]
    assert len(report["kills"]) >= 1
    assert all("serving_after_s" in k for k in report["kills"]), report["kills"]
    for case, result in report["bad_cases"].items():
        assert result["ok"] >= 1 and result["failed"] == 0, (case, report["bad_case_failures"])
    assert set(report["bad_cases"]) == set(soak.BAD_CASES)
    assert daemon["exit_code"] == 0
    assert daemon["shm_left"] == [] and not daemon["socket_left"]
    assert daemon["idle_at_end"]["ok"], daemon["idle_at_end"]
    assert report["errors"]["good"].keys() <= {"worker_restarted"}, report["errors"]
    # Every process was sampled: the supervisor and both workers of both lanes.
    assert {"supervisor", "ingress/0", "ingress/1", "infer/0", "infer/1"} <= set(
        report["resources"]
    )
    assert all(s["shm_segments"] > 0 for s in report["samples"])
    assert report["ok"] and rc == 0, report["checks"]
