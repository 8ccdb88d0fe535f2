"""``asrd doctor``: the probe, the plan ``auto`` would choose, and the warnings, on the fake
platform trees and for real on this machine (text and ``--json``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from daemon.config import Config, parse_config
from daemon.doctor import diagnose, format_report
from daemon.platform import probe

pytestmark = pytest.mark.timeout(60)
TREES = Path(__file__).resolve().parent / "platform_trees"


def test_bare_metal_report_shows_nodes_lanes_and_reasons() -> None:
    report = diagnose(Config(), probe(TREES / "two_node_bare_metal"))
    assert report.error is None and report.plan is not None
    text = format_report(report, Config())
    assert "numa node 0" in text and "numa node 1" in text
    assert "plan: bare-metal profile (no hypervisor detected)" in text
    assert "pinning on bare-metal profile" in " ".join(text.split())
    for lane in report.plan.lanes:
        assert f"lane {lane.lane} " in text and f"node {lane.node}" in text


@pytest.mark.parametrize(
    ("tree", "config", "needle"),
    [
        ("ec2_vm", "", "cloud VM detected (aws): pinning off"),
        ("io_uring_disabled", "", "io_uring is disabled by sysctl"),
        ("two_node_bare_metal", "lanes = 12", "SMT siblings split across lanes"),
    ],
)
def test_warnings(tree: str, config: str, needle: str) -> None:
    report = diagnose(parse_config(config), probe(TREES / tree))
    assert [w for w in report.warnings if needle in w], report.warnings


def test_small_dev_shm_warning() -> None:
    p = probe(TREES / "two_node_bare_metal")
    p = msgspec.structs.replace(p, shm=msgspec.structs.replace(p.shm, free_bytes=4 << 20))
    report = diagnose(Config(), p)
    assert [w for w in report.warnings if "/dev/shm" in w and "needs" in w]


def test_a_config_that_cannot_start_is_reported_not_raised() -> None:
    report = diagnose(parse_config('[placement]\nnuma = "on"'), probe(TREES / "ec2_vm"))
    assert report.plan is None and report.error and "placement.numa = 'on'" in report.error
    assert "cannot start here" in format_report(report, Config())


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_doctor_on_this_machine_text_and_json(tmp_path: Path) -> None:
    done = _doctor()
    assert done.returncode == 0, done.stderr
    assert "platform (Linux)" in done.stdout and "plan: " in done.stdout
    done = _doctor("--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["error"] is None
    assert report["platform"]["io_uring"]["state"] in {
        "usable",
        "disabled by sysctl",
        "blocked (seccomp/EPERM)",
        "kernel too old",
        "unknown",
    }
    assert len(report["plan"]["lanes"]) >= 1
    bad = tmp_path / "bad.toml"
    bad.write_text('[io]\nbackend = "io_uring"\n[placement]\nnuma = "on"\n')
    done = _doctor("--config", str(bad))
    assert done.returncode == 78
    assert "placement.numa = 'on'" in done.stdout
