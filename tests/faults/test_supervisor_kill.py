"""SIGKILL of the supervisor while 50 streams over 10 connections and both lanes stream audio in
real time, then a fresh ``asrd run`` of the same instance in the same runtime directory.

What the clients must see: every connection is closed by the daemon (EOF) within a few seconds
of the kill, once its ingress worker notices that its parent is gone (it checks with each
heartbeat, every 0.5 s). No stream gets a final, a ``Closed`` or an error (no ``Finish`` was sent,
and nothing drains: the supervisor that would have is dead), and every partial before the EOF
describes exactly its own stream's audio. Once every worker has exited (asserted within 5 s of
the kill; the code checks every 0.5 s) a new connection is refused (``no_daemon``: the socket file
is still there, nobody listens) and the dead supervisor's five segments are still in
``/dev/shm`` (nobody could unlink them). The next ``asrd run`` logs that it removed exactly those
stale segments, serves exact finals on both lanes, holds only segments named after itself, and
leaves nothing in ``/dev/shm`` when it stops.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.errors import ClientError
from daemon.launcher import DaemonProcess
from ipc.client import Client
from tests.daemon_fixtures import shm_segments, wait_until, worker_pids
from tests.daemon_fixtures import start_daemon as start_daemon
from tests.faults.streams import (
    Load,
    check_cut_off,
    config,
    gone,
    instance_of,
    log_text,
    serve_every_lane,
)

Start = Callable[..., DaemonProcess]

WORKERS_GONE_S = 5.0  # loose: workers check their parent every 0.5 s


async def kill_under_load(daemon: DaemonProcess) -> tuple[Load, float]:
    """Returns the load and the monotonic time of the kill."""
    load = Load(daemon.socket_path, connections=10, per_conn=5, chunks=1000)
    try:
        await load.open()
        assert len(load.on_lane(0)) >= 2 and len(load.on_lane(1)) >= 2, [c.lane for c in load.conns]
        await load.send(0, 5, finish=False)
        await load.until(
            lambda: all(s.covered(4) for s in load.streams), 30, "partials of every stream"
        )
        # Audio keeps flowing (never a Finish) until the daemon closes each connection.
        sender = asyncio.create_task(load.send(5, 1000, finish=False))
        await load.until(
            lambda: all(s.covered(9) for s in load.streams), 30, "the sender to be under way"
        )
        killed_at = time.monotonic()
        os.kill(daemon.pid, signal.SIGKILL)
        await load.until(
            lambda: all(c.eof for c in load.conns), WORKERS_GONE_S, "every connection to close"
        )
        await asyncio.wait_for(sender, 10)
    finally:
        await load.close()
    return load, killed_at


@pytest.fixture
def sweep_dead() -> Iterator[list[str]]:
    """Segments named here are unlinked after the test, whatever happened: a failing test must
    not leave a dead supervisor's segments in /dev/shm for later runs."""
    names: list[str] = []
    yield names
    for name in names:
        (Path("/dev/shm") / name).unlink(missing_ok=True)


@pytest.mark.timeout(180)
def test_kill_9_supervisor_under_load_then_restart(
    start_daemon: Start, sweep_dead: list[str]
) -> None:
    """Clients must see every connection closed (EOF) within 5 s of the kill, with nothing for
    their streams but sound partials (no final, no ``Closed``, no error); then ``no_daemon``
    on connect until the next ``asrd run``, which sweeps the dead one's segments, says so in
    its log, and serves exact finals on every lane."""
    daemon = start_daemon(config(lanes=2))
    instance = instance_of(daemon)
    old_pid = daemon.pid
    pids = worker_pids(daemon)
    assert len(pids) == 4
    stale = shm_segments(instance)
    assert len(stale) == 5 and all(f"-{old_pid}-" in s for s in stale), stale
    sweep_dead.extend(stale)

    load, killed_at = asyncio.run(kill_under_load(daemon))

    assert daemon.wait(10) == -signal.SIGKILL
    left = killed_at + WORKERS_GONE_S - time.monotonic()
    wait_until(lambda: all(gone(pid) for pid in pids.values()), max(left, 0.1), "workers to exit")
    took = time.monotonic() - killed_at
    eof_after = max(c.eof_at for c in load.conns) - killed_at
    for s in load.streams:
        check_cut_off(s)
        assert s.sent >= 10, (s.name, "audio was not flowing at the kill")
    # Nobody listens any more; the dead supervisor's segments are all still there.
    with pytest.raises(ClientError) as refused:
        Client.connect(daemon.socket_path, timeout=5)
    assert refused.value.code == "no_daemon"
    assert shm_segments(instance) == stale

    # The same instance and runtime directory: the new supervisor sweeps the old segments.
    config_text = daemon.config_path.read_text().split("\n", 1)[1]  # less runtime_dir
    again = DaemonProcess(
        config_text, runtime_dir=daemon.runtime_dir, log_path=daemon.runtime_dir / "again.log"
    )
    with again:
        log = log_text(again)
        swept = f"removed {len(stale)} stale shared-memory segments of instance {instance!r}"
        assert swept in log, log
        for name in stale:
            assert name in log, (name, log)
        now = shm_segments(instance)
        assert len(now) == len(stale) and all(f"-{again.pid}-" in s for s in now), now
        assert not any(f"-{old_pid}-" in s for s in os.listdir("/dev/shm"))
        assert serve_every_lane(again) == {0, 1}
    assert shm_segments(instance) == []
    print(f"\nworkers gone {took:.2f} s after the kill, last connection closed {eof_after:.2f} s")
