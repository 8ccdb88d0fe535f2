"""A real Triton server (scripts/triton_server.py serving configs/triton/) for tests.

The module-scoped ``server`` fixture runs ``setup`` (builds .venv-triton: about 45 s and 410 MB
the first time, a stamp check after) and ``start`` on free loopback ports, and stops the server
at the end of the module. Teardown checks that the server, its backend stubs and every /dev/shm
region with the server's prefix are gone.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "triton_server.py"
_starts = itertools.count()


@dataclass
class Server:
    url: str
    http_port: int
    pid: int
    shm_prefix: str  # the server's Python-backend regions and this test's own regions
    log: Path


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):  # all bound at once, so the ports differ
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _group_alive(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group: the server leads its own."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] not in "ZX" and int(fields[2]) == pgid:
                alive.append(int(entry.name))
    return alive


class ServerControl:
    """A development Triton server on fixed free ports that a test may kill and start again."""

    def __init__(self, tmp: Path, models: str = "asr_streaming,asr_light") -> None:
        self.grpc_port, self.http_port, self.metrics_port = free_ports(3)
        self.prefix = f"asrd_test_triton_{os.getpid()}_{next(_starts)}_"
        self.pidfile, self.log = tmp / "tritonserver.pid", tmp / "tritonserver.log"
        self.models = models
        self.pid: int | None = None
        self.pids: list[int] = []  # every server this control started, for the final check

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def server(self) -> Server:
        assert self.pid is not None
        return Server(self.url, self.http_port, self.pid, self.prefix, self.log)

    def start(self) -> None:
        done = _script(
            "start",
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            f"--pidfile={self.pidfile}",
            f"--log={self.log}",
            f"--shm-prefix={self.prefix}",
            f"--models={self.models}",
            timeout=180,
        )
        assert done.returncode == 0, f"start failed:\n{done.stdout}\n{done.stderr}"
        self.pid = int(self.pidfile.read_text())
        self.pids.append(self.pid)

    def kill9(self) -> None:
        """SIGKILL the server and its backend stubs (a crash), and wait until they are gone."""
        assert self.pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _group_alive(self.pid):
            assert time.monotonic() < deadline, "the killed server is still there"
            time.sleep(0.05)
        self.pidfile.unlink(missing_ok=True)
        self.pid = None
        # What a crashed server leaves in /dev/shm (its stubs' regions) is the operator's to
        # remove, as after any crash; the test's checks are about asrd's own segments.
        for leftover in Path("/dev/shm").glob(self.prefix + "*"):
            leftover.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.pid is not None:
            done = _script("stop", f"--pidfile={self.pidfile}", timeout=60)
            assert done.returncode == 0, f"stop failed:\n{done.stdout}\n{done.stderr}"
            self.pid = None
        for pid in self.pids:
            assert _group_alive(pid) == [], "tritonserver or a backend stub is still running"
        leaked = sorted(p.name for p in Path("/dev/shm").glob(self.prefix + "*"))
        assert leaked == [], f"shared memory left behind: {leaked}"


def setup_server_env() -> None:
    t0 = time.monotonic()
    done = _script("setup", timeout=800)
    assert done.returncode == 0, f"setup failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    print(f"\ntriton setup: {time.monotonic() - t0:.1f} s")  # shown with -s


@pytest.fixture
def server_control(tmp_path: Path) -> Iterator[ServerControl]:
    """A function-scoped server (not started: call ``start()``), stopped and checked after."""
    setup_server_env()
    control = ServerControl(tmp_path)
    try:
        yield control
    finally:
        control.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    t0 = time.monotonic()
    done = _script("setup", timeout=800)
    assert done.returncode == 0, f"setup failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    print(f"\ntriton setup: {time.monotonic() - t0:.1f} s")  # shown with -s
    tmp = tmp_path_factory.mktemp("triton")
    grpc_port, http_port, metrics_port = free_ports(3)
    prefix = f"asrd_test_triton_{os.getpid()}_{next(_starts)}_"
    pidfile, log = tmp / "tritonserver.pid", tmp / "tritonserver.log"
    done = _script(
        "start",
        f"--grpc-port={grpc_port}",
        f"--http-port={http_port}",
        f"--metrics-port={metrics_port}",
        f"--pidfile={pidfile}",
        f"--log={log}",
        f"--shm-prefix={prefix}",
        timeout=180,
    )
    assert done.returncode == 0, f"start failed:\n{done.stdout}\n{done.stderr}"
    pid = int(pidfile.read_text())
    try:
        yield Server(f"127.0.0.1:{grpc_port}", http_port, pid, prefix, log)
    finally:
        done = _script("stop", f"--pidfile={pidfile}", timeout=60)
        assert done.returncode == 0, f"stop failed:\n{done.stdout}\n{done.stderr}"
        assert not pidfile.exists()
        assert _group_alive(pid) == [], "tritonserver or a backend stub is still running"
        leaked = sorted(p.name for p in Path("/dev/shm").glob(prefix + "*"))
        assert leaked == [], f"shared memory left behind: {leaked}"
