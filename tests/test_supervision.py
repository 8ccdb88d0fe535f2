"""Supervision against real processes: the systemd watchdog and start-timeout extension, a
stuck worker (SIGABRT then SIGKILL), and a crash loop that stops its lane instead of spinning.

Each test starts ``asrd run`` with ``NOTIFY_SOCKET`` on a datagram socket the test reads (as
systemd would), sends real signals to real workers, and waits on the daemon's notifications,
status and log with bounded timeouts.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from daemon.launcher import DaemonProcess
from daemon.systemd import watchdog_interval
from ipc import protocol as p
from ipc.client import Client
from tests.daemon_fixtures import start_daemon as start_daemon
from tests.daemon_fixtures import status, wait_until, worker_pids
from tests.test_daemon import Start, tone

pytestmark = pytest.mark.timeout(120)
NO_VAD = p.VadOverrides(enabled=False)


def config(lanes: int = 1, **restart: object) -> str:
    text = f'lanes = {lanes}\nheartbeat_timeout_s = 3.0\n[backend]\nkind = "null"\n[restart]\n'
    restart = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "abort_grace_s": 0.5, **restart}
    return text + "".join(f"{k} = {v}\n" for k, v in restart.items())


def log_of(daemon: DaemonProcess) -> str:
    return (daemon.runtime_dir / "asrd.log").read_text()


def test_watchdog_interval_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    assert watchdog_interval() == 1.5
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 1.5
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "junk")
    assert watchdog_interval() is None


def test_watchdog_pings_only_while_every_heartbeat_is_fresh(start_daemon: Start) -> None:
    daemon = start_daemon(config(), extra_env={"WATCHDOG_USEC": "600000"})
    assert any("EXTEND_TIMEOUT_USEC=" in m for m in daemon.messages)  # asked while starting
    daemon.wait_for("WATCHDOG=1", 10)
    pid = worker_pids(daemon)[("infer", 0)]
    os.kill(pid, signal.SIGSTOP)  # alive, no progress
    wait_until(lambda: "watchdog ping withheld" in log_of(daemon), 30, "pings withheld")
    # Replaced (SIGABRT stays pending on a stopped process: SIGKILL after the grace).
    wait_until(lambda: worker_pids(daemon).get(("infer", 0)) not in (None, pid), 30, "respawn")
    daemon.wait_for("WATCHDOG=1", 30, after=len(daemon.messages))  # pings again
    log = log_of(daemon)
    assert "SIGABRT" in log and "SIGKILL" in log
    assert daemon.stop() == 0


def test_stuck_worker_gets_sigabrt_and_its_stack_is_logged(start_daemon: Start) -> None:
    daemon = start_daemon(config(abort_grace_s=10.0))  # SIGCONT comes well within the grace
    pid = worker_pids(daemon)[("ingress", 0)]
    # Frozen: no heartbeat. SIGABRT stays pending until SIGCONT, then faulthandler prints the
    # worker's stacks before it dies (a worker stuck in a loop gets it at once).
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: "sent no heartbeat" in log_of(daemon), 30, "stale heartbeat seen")
    os.kill(pid, signal.SIGCONT)  # now the pending SIGABRT is delivered: faulthandler dumps
    wait_until(lambda: worker_pids(daemon).get(("ingress", 0)) not in (None, pid), 30, "respawn")
    log = log_of(daemon)
    assert "Fatal Python error: Aborted" in log
    assert "File " in log  # the Python stack of the worker
    with Client.connect(daemon.socket_path, timeout=30) as c:
        assert len(c.transcribe(tone(0.3), stream="a", vad=NO_VAD, timeout=30)) == 1
    assert daemon.stop() == 0


def test_crash_loop_stops_the_lane_and_the_other_lane_serves(start_daemon: Start) -> None:
    daemon = start_daemon(config(lanes=2, max_failures=3, failure_window_s=60.0))
    for _ in range(3):
        pid = wait_until(lambda: worker_pids(daemon).get(("infer", 1)), 30, "infer lane 1")
        os.kill(int(pid), signal.SIGKILL)  # type: ignore[call-overload]
        wait_until(lambda pid=pid: worker_pids(daemon).get(("infer", 1)) != pid, 30, "exit")
    wait_until(lambda: status(daemon).lanes[1].failed, 30, "lane 1 reported failed")
    st = status(daemon)
    assert "3 failures within 60 s" in st.lanes[1].failed and not st.lanes[0].failed
    wait_until(lambda: not worker_pids(daemon).get(("ingress", 1)), 30, "lane 1 stopped")
    assert "lane 1 stopped" in log_of(daemon)
    for i in range(4):  # every connection lands on the lane that still serves
        with Client.connect(daemon.socket_path, timeout=30) as c:
            assert len(c.transcribe(tone(0.3), stream=f"s{i}", vad=NO_VAD, timeout=30)) == 1
    assert daemon.stop() == 0


def test_crash_loop_of_the_only_lane_exits_69(tmp_path: Path) -> None:
    daemon = DaemonProcess(
        config(lanes=1, max_failures=2, failure_window_s=60.0),
        runtime_dir=tmp_path,
        log_path=tmp_path / "asrd.log",
    )
    daemon.start(60)
    try:
        for _ in range(2):
            pid = wait_until(lambda: worker_pids(daemon).get(("infer", 0)), 30, "infer")
            os.kill(int(pid), signal.SIGKILL)  # type: ignore[call-overload]
            wait_until(
                lambda pid=pid: (
                    worker_pids(daemon).get(("infer", 0)) != pid or daemon.proc.poll() is not None
                ),  # type: ignore[union-attr]
                30,
                "exit",
            )
        assert daemon.proc is not None
        assert daemon.proc.wait(30) == 69
        log = log_of(daemon)
        assert "every lane failed" in log
    finally:
        daemon.kill_session()
        daemon.cleanup()


def test_notifier_never_blocks_on_a_full_socket(tmp_path: Path) -> None:
    """A manager that does not read its notify socket must not stall the supervisor's loop."""
    import socket

    from daemon.systemd import Notifier

    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    notifier = Notifier(str(path))
    try:
        sent = [notifier.watchdog() for _ in range(5000)]  # blocking would hang: the timeout
        assert sent[0] and not sent[-1]  # the first got through, the rest were dropped
    finally:
        notifier.close()
        receiver.close()
