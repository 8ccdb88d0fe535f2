"""Placement plans (daemon/placement.py) on the fake platform trees, and pinning for real.

The unit tests probe the fixture trees of tests/platform_trees/ (daemon/platform.py) and check
the plan each profile gives: lanes, CPUs, NUMA nodes, what ``auto`` chose and why, and the
errors for an ``on`` that cannot work. The real-process test starts ``asrd run`` with pinning on
and reads each worker's affinity back with ``os.sched_getaffinity(pid)``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from daemon.config import Config, parse_config
from daemon.errors import BootError, ConfigError
from daemon.placement import plan, usable_cpus
from daemon.platform import Platform, probe
from tests.daemon_fixtures import start_daemon as start_daemon
from tests.daemon_fixtures import status, worker_pids
from tests.test_daemon import Start

pytestmark = pytest.mark.timeout(60)
TREES = Path(__file__).resolve().parent / "platform_trees"


def tree(name: str, affinity: set[int] | None = None) -> Platform:
    return probe(TREES / name, affinity=affinity)


def cfg(text: str = "") -> Config:
    return parse_config(text, source="test")


def test_bare_metal_two_nodes_one_lane_per_core_spread_over_nodes() -> None:
    p = tree("two_node_bare_metal")
    result = plan(cfg(), p)
    assert result.profile == "bare-metal" and "no hypervisor" in result.profile_reason
    assert result.pinning and result.numa
    cores = {min(g) for g in p.cpus.smt_siblings}
    assert len(result.lanes) == len(cores)  # one lane per physical core
    # Lanes alternate between the nodes, each pinned to one CPU of its own node and core.
    node_cpus = {n.id: set(n.cpus) for n in p.numa_nodes}
    for lane in result.lanes:
        assert len(lane.cpus) == 1 and lane.node == lane.lane % 2
        assert lane.cpus[0] in node_cpus[lane.node]
    used = [lane.cpus[0] for lane in result.lanes]
    core_of = {c: min(g) for g in p.cpus.smt_siblings for c in g}
    assert len({core_of[c] for c in used}) == len(used)  # no two lanes on one core
    assert not [w for w in result.warnings if "SMT" in w]


def test_more_lanes_than_cores_warns_about_split_siblings() -> None:
    p = tree("two_node_bare_metal")
    cores = len({min(g) for g in p.cpus.smt_siblings})
    result = plan(cfg(f"lanes = {cores + 2}"), p)
    assert result.pinning
    assert [w for w in result.warnings if "SMT siblings split across lanes" in w]


def test_more_lanes_than_cpus_turns_auto_pinning_off_and_says_why() -> None:
    p = tree("two_node_bare_metal")
    n = len(usable_cpus(p))
    result = plan(cfg(f"lanes = {n + 1}"), p)
    assert not result.pinning and "share CPUs" in result.pinning_reason
    assert all(lane.cpus == [] for lane in result.lanes)


@pytest.mark.parametrize(
    ("name", "vendor"),
    [("ec2_vm", "aws"), ("gce_vm", "gcp"), ("azure_vm", "azure"), ("firecracker", "firecracker")],
)
def test_cloud_vms_get_the_cloud_profile(name: str, vendor: str) -> None:
    p = tree(name)
    result = plan(cfg(), p)
    assert result.profile == "cloud" and vendor in result.profile_reason
    assert not result.pinning and not result.numa
    assert len(result.lanes) == len(usable_cpus(p))  # lanes by CPU count
    assert all(lane.cpus == [] for lane in result.lanes)
    assert any("pinning off" in w for w in result.warnings)


def test_profile_and_pinning_overrides() -> None:
    p = tree("ec2_vm")
    forced = plan(cfg('[placement]\nprofile = "bare-metal"'), p)
    assert forced.profile == "bare-metal" and forced.pinning
    pinned = plan(cfg('[placement]\npinning = "on"'), p)
    assert pinned.profile == "cloud" and pinned.pinning
    assert [lane.cpus for lane in pinned.lanes] == [[c] for c in usable_cpus(p)]
    off = plan(cfg('[placement]\npinning = "off"'), tree("two_node_bare_metal"))
    assert not off.pinning and not off.numa and off.numa_reason == "no pinning"


def test_container_with_a_narrow_cpuset_uses_only_its_cpus() -> None:
    p = tree("container_narrow_cpuset", affinity={2, 3})
    result = plan(cfg('[placement]\npinning = "on"'), p)
    assert sorted(c for lane in result.lanes for c in lane.cpus) == [2, 3]


def test_isolated_and_offline_cpus_are_left_out() -> None:
    p = tree("offline_isolated")
    cpus = usable_cpus(p)
    assert not set(cpus) & set(p.cpus.isolated)
    assert not set(cpus) & set(p.cpus.offline)
    result = plan(cfg('[placement]\npinning = "on"'), p)
    assert {c for lane in result.lanes for c in lane.cpus} <= set(cpus)


def test_numa_on_with_one_node_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        plan(cfg('[placement]\npinning = "on"\nnuma = "on"'), tree("ec2_vm"))
    assert "placement.numa = 'on'" in str(info.value) and "1 NUMA node" in str(info.value)


def test_numa_on_without_pinning_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="needs pinning"):
        plan(cfg('[placement]\npinning = "off"\nnuma = "on"'), tree("two_node_bare_metal"))


def test_io_uring_requested_where_disabled_is_a_config_error() -> None:
    p = tree("io_uring_disabled")
    with pytest.raises(ConfigError) as info:
        plan(cfg('[io]\nbackend = "io_uring"'), p)
    assert "io.backend = 'io_uring'" in str(info.value)
    assert "disabled by sysctl" in str(info.value)
    auto = plan(cfg(), p)
    assert auto.io_backend == "epoll" and "disabled by sysctl" in auto.io_reason


def test_client_loop_is_uvloop_where_installed_and_uvloop_is_refused_where_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import daemon.placement as placement

    p = tree("two_node_bare_metal")
    monkeypatch.setattr(placement, "uvloop_available", lambda: True)
    assert plan(cfg(), p).client_loop == "uvloop"
    forced = plan(cfg('[io]\nclient_loop = "asyncio"'), p)
    assert (forced.client_loop, forced.client_loop_reason) == (
        "asyncio",
        "io.client_loop = 'asyncio'",
    )
    monkeypatch.setattr(placement, "uvloop_available", lambda: False)
    auto = plan(cfg(), p)
    assert auto.client_loop == "asyncio" and "not installed" in auto.client_loop_reason
    with pytest.raises(ConfigError, match=re.escape("io.client_loop = 'uvloop': uvloop is not")):
        plan(cfg('[io]\nclient_loop = "uvloop"'), p)


def test_pinning_on_where_not_linux_is_a_config_error() -> None:
    p = msgspec.structs.replace(
        tree("two_node_bare_metal"), supported=False, unsupported_reason="not Linux"
    )
    with pytest.raises(ConfigError, match=re.escape("placement.pinning = 'on': not possible")):
        plan(cfg('[placement]\npinning = "on"'), p)
    assert not plan(cfg(), p).pinning


def test_small_dev_shm_is_a_warning() -> None:
    p = tree("two_node_bare_metal")
    small = msgspec.structs.replace(p, shm=msgspec.structs.replace(p.shm, free_bytes=1 << 20))
    result = plan(cfg("lanes = 2"), small)
    assert [w for w in result.warnings if "needs" in w and "shared memory" in w]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU affinity is Linux-only")
def test_pinned_workers_run_on_their_planned_cpus(start_daemon: Start) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    daemon = start_daemon(
        f'lanes = {len(cpus)}\n[backend]\nkind = "null"\n[placement]\npinning = "on"\n'
    )
    planned = {(w.role, w.lane): w.cpus for lane in status(daemon).lanes for w in lane.workers}
    pids = worker_pids(daemon)
    assert set(pids) == set(planned)
    for (role, lane), pid in pids.items():
        assert planned[(role, lane)] == [cpus[lane]]  # each lane on its own CPU
        assert sorted(os.sched_getaffinity(pid)) == planned[(role, lane)], (role, lane)
    assert daemon.stop() == 0


def test_numa_on_here_exits_78_naming_the_field(tmp_path: Path) -> None:
    if len(probe().numa_nodes) > 1:
        pytest.skip("this machine has several NUMA nodes")
    config = tmp_path / "asrd.toml"
    config.write_text(f'runtime_dir = "{tmp_path}"\n[placement]\npinning = "on"\nnuma = "on"\n')
    done = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 78, done.stderr
    assert "placement.numa = 'on'" in done.stderr


def test_supervisor_refuses_to_boot_where_unsupported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import daemon.supervisor as supervisor_module

    unsupported = msgspec.structs.replace(
        probe(TREES / "two_node_bare_metal"),
        supported=False,
        unsupported_reason="asrd needs Linux: eventfd, POSIX shm in /dev/shm",
    )
    monkeypatch.setattr(supervisor_module, "probe", lambda: unsupported)
    sup = supervisor_module.Supervisor(cfg(f'runtime_dir = "{tmp_path}"'))
    with pytest.raises(BootError, match="asrd cannot run here: asrd needs Linux"):
        sup.boot()
    assert list(tmp_path.iterdir()) == []  # refused before creating anything
