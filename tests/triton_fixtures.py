"""A real Triton server (scripts/triton_server.py serving configs/triton/) for tests.

The module-scoped ``server`` fixture runs ``setup`` (builds .venv-triton: about 45 s and 410 MB
the first time, a stamp check after) and ``start`` on free loopback ports, and stops the server
at the end of the module. Teardown checks that the server, its backend stubs and every /dev/shm
region with the server's prefix are gone.
"""

from __future__ import annotations

import itertools
import os
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
