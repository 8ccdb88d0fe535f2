"""Tests for ipc.shm: segment names, the manifest, and the stale-segment sweep."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import posix_ipc
import pytest

from ipc import shm
from ipc.ring import Ring

SHM_DIR = Path("/dev/shm")


def _instance() -> str:
    # "test..." keeps real segments under the suite-wide /dev/shm/asrd-test* leftover check.
    return f"test{uuid.uuid4().hex[:12]}"


def _dead_pid() -> int:
    """A pid that cannot belong to a live process: above the kernel's pid_max."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


@pytest.fixture
def instance() -> Iterator[str]:
    inst = _instance()
    yield inst
    leftovers = shm.list_segments(inst)
    for name in leftovers:
        posix_ipc.unlink_shared_memory(name)
    assert not leftovers, f"test left segments behind: {leftovers}"


def _touch(d: Path, *names: str) -> None:
    for n in names:
        (d / n.lstrip("/")).write_bytes(b"")


# ----------------------------------------------------------------------------- naming


def test_segment_name() -> None:
    assert shm.PREFIX == "asrd"
    assert shm.segment_name("default", 1234, "audio", 0) == "/asrd-default-1234-audio0"
    assert shm.segment_name("a_B9", 7, "heartbeat", 12) == "/asrd-a_B9-7-heartbeat12"
    assert shm.parse_segment("/asrd-default-1234-result3", "default") == 1234
    assert shm.parse_segment("asrd-default-1234-result3", "default") == 1234
    assert shm.parse_segment("/asrd-other-1234-result3", "default") is None
    for bad in ("", "has-dash", "sl/ash", "x" * 33, "dot."):
        with pytest.raises(ValueError, match="instance"):
            shm.segment_name(bad, 1, "audio", 0)
    for args in (("default", 0, "audio", 0), ("default", 1, "audio", -1)):
        with pytest.raises(ValueError):
            shm.segment_name(*args)
    with pytest.raises(ValueError, match="role"):
        shm.segment_name("default", 1, "Audio-0", 0)


# ----------------------------------------------------------------------------- manifest


def test_manifest_round_trip(tmp_path: Path) -> None:
    m = shm.Manifest(tmp_path / "run", "default", pid=4242)
    assert m.names() == []
    assert not m.path.exists()
    m.add("/asrd-default-4242-audio0")
    m.add("/asrd-default-4242-result0")
    m.add("/asrd-default-4242-audio0")  # duplicates ignored
    assert m.path == tmp_path / "run" / "shm-default.json"
    data = json.loads(m.path.read_text())
    assert data["pid"] == 4242 and data["instance"] == "default"
    assert data["segments"] == ["/asrd-default-4242-audio0", "/asrd-default-4242-result0"]
    assert shm.read_manifest(m.path) == (4242, m.names())
    # The same supervisor re-creating its Manifest keeps the list.
    again = shm.Manifest(tmp_path / "run", "default", pid=4242)
    assert again.names() == m.names()
    # Another pid starts afresh (that file is the sweep's business).
    assert shm.Manifest(tmp_path / "run", "default", pid=1).names() == []
    m.remove("/asrd-default-4242-audio0")
    m.remove("/asrd-default-4242-nothing0")
    assert shm.read_manifest(m.path) == (4242, ["/asrd-default-4242-result0"])
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["shm-default.json"]  # no temp files


def test_manifest_unlink_all_real_segments(tmp_path: Path, instance: str) -> None:
    m = shm.Manifest(tmp_path, instance)
    names = [shm.segment_name(instance, os.getpid(), "audio", i) for i in range(2)]
    for n in names:
        Ring.create(n, 4096).close()
        m.add(n)
    gone = shm.segment_name(instance, os.getpid(), "result", 0)
    m.add(gone)  # listed but never created (or already unlinked): ignored
    assert shm.list_segments(instance) == sorted(names)
    assert m.unlink_all() == names
    assert shm.list_segments(instance) == []
    assert not m.path.exists()
    assert m.unlink_all() == []  # idempotent


def test_read_manifest_rejects_garbage(tmp_path: Path) -> None:
    p = tmp_path / "shm-x.json"
    assert shm.read_manifest(p) is None
    for text in ("{", "[]", '{"pid": "1", "segments": []}', '{"pid": 1}'):
        p.write_text(text)
        assert shm.read_manifest(p) is None


# ----------------------------------------------------------------------------- sweep


def test_sweep_fake_dir(tmp_path: Path) -> None:
    shm_dir = tmp_path / "shm"
    shm_dir.mkdir()
    run = tmp_path / "run"
    _touch(
        shm_dir,
        "asrd-main-100-audio0",
        "asrd-main-100-result0",
        "asrd-main-200-audio0",  # live supervisor
        "asrd-main-300-heartbeat0",
        "asrd-other-100-audio0",  # another instance, same dead pid
        "asrd-main2-100-audio0",  # an instance whose name starts with ours
        "asrd-main-abc-audio0",  # not a pid: not ours to judge
        "unrelated-100",
    )
    stale = shm.Manifest(run, "main", pid=100)
    stale.add("/asrd-main-100-audio0")
    stale.add("/asrd-other-100-audio0")  # a corrupt manifest must not reach another instance
    (run / ".shm-main.json.100.tmp").write_text("{")
    (run / ".shm-main.json.200.tmp").write_text("{")
    asked: list[int] = []

    def is_alive(pid: int) -> bool:
        asked.append(pid)
        return pid == 200

    removed = shm.sweep_stale("main", run, shm_dir=shm_dir, is_alive=is_alive)
    assert removed == [
        "/asrd-main-100-audio0",
        "/asrd-main-100-result0",
        "/asrd-main-300-heartbeat0",
    ]
    assert sorted(p.name for p in shm_dir.iterdir()) == [
        "asrd-main-200-audio0",
        "asrd-main-abc-audio0",
        "asrd-main2-100-audio0",
        "asrd-other-100-audio0",
        "unrelated-100",
    ]
    assert not stale.path.exists()
    assert sorted(p.name for p in run.iterdir()) == [".shm-main.json.200.tmp"]
    assert sorted(set(asked)) == [100, 200, 300]
    assert len(asked) == len(set(asked))  # each pid checked once


def test_sweep_keeps_live_manifest(tmp_path: Path) -> None:
    shm_dir = tmp_path / "shm"
    shm_dir.mkdir()
    _touch(shm_dir, "asrd-main-200-audio0")
    live = shm.Manifest(tmp_path, "main", pid=200)
    live.add("/asrd-main-200-audio0")
    assert shm.sweep_stale("main", tmp_path, shm_dir=shm_dir, is_alive=lambda p: True) == []
    assert live.path.exists() and (shm_dir / "asrd-main-200-audio0").exists()
    # Without a runtime dir the manifest is not looked at, segments still are.
    assert shm.sweep_stale("main", shm_dir=shm_dir, is_alive=lambda p: False) == [
        "/asrd-main-200-audio0"
    ]
    assert live.path.exists()


def test_sweep_never_touches_other_instances(tmp_path: Path) -> None:
    shm_dir = tmp_path / "shm"
    shm_dir.mkdir()
    others = [f"asrd-{inst}-{pid}-audio0" for inst in ("a", "a_1", "A", "ab") for pid in (5, 6)]
    _touch(shm_dir, *others)
    assert shm.sweep_stale("b", shm_dir=shm_dir, is_alive=lambda p: False) == []
    assert shm.sweep_stale("a", shm_dir=shm_dir, is_alive=lambda p: False) == [
        "/asrd-a-5-audio0",
        "/asrd-a-6-audio0",
    ]
    assert sorted(p.name for p in shm_dir.iterdir()) == sorted(others[2:])
    assert shm.list_segments(shm_dir=shm_dir) == sorted("/" + n for n in others[2:])
    assert shm.list_segments("ab", shm_dir=shm_dir) == ["/asrd-ab-5-audio0", "/asrd-ab-6-audio0"]
    assert shm.sweep_stale("a", shm_dir=tmp_path / "missing", is_alive=lambda p: False) == []


def test_sweep_real_dev_shm_dead_pid(tmp_path: Path, instance: str) -> None:
    dead = _dead_pid()
    stale = [shm.segment_name(instance, dead, role, 0) for role in ("audio", "result")]
    mine = shm.segment_name(instance, os.getpid(), "audio", 0)
    other_instance = _instance()
    foreign = shm.segment_name(other_instance, dead, "audio", 0)
    made = [*stale, mine, foreign]
    try:
        for n in made:
            Ring.create(n, 4096).close()
        manifest = shm.Manifest(tmp_path, instance, pid=dead)
        for n in stale:
            manifest.add(n)
        # Default liveness check: the dead pid is dead, our own pid always counts as alive.
        removed = shm.sweep_stale(instance, tmp_path)
        assert sorted(removed) == sorted(stale)
        assert shm.list_segments(instance) == [mine]
        assert shm.list_segments(other_instance) == [foreign]
        assert not manifest.path.exists()
    finally:
        for n in made:
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_shared_memory(n)


@pytest.mark.timeout(30)
def test_default_liveness_check() -> None:
    assert shm.is_asrd_alive(os.getpid())  # ourselves, whatever our title
    assert not shm.is_asrd_alive(_dead_pid())
    # A live process that is not asrd (a recycled pid) does not protect segments...
    plain = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", "/srv/asrd/x", "xasrd"], stdin=-1
    )
    # ...one whose command line says asrd does.
    titled = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", "asrd: supervisor"], stdin=-1
    )
    try:
        assert not shm.is_asrd_alive(plain.pid)
        assert shm.is_asrd_alive(titled.pid)
    finally:
        for p in (plain, titled):
            p.communicate(b"", timeout=20)
    assert not shm.is_asrd_alive(titled.pid)  # reaped (or recycled by a non-asrd process)
