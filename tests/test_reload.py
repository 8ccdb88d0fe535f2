"""SIGHUP reload against the real daemon: live changes, lanes restarted one at a time for changes
that need new workers, and refusals (invalid config, changes that need a restart) that leave the
running config in place. The daemon reads the file ``DaemonProcess`` wrote (``--config``)."""

from __future__ import annotations

import signal

import pytest

from daemon.config import Config, parse_config, reload_plan
from daemon.launcher import DaemonProcess
from ipc import protocol as p
from ipc.client import Client, DaemonError
from tests.daemon_fixtures import start_daemon as start_daemon
from tests.daemon_fixtures import wait_until, worker_pids
from tests.test_daemon import Start

pytestmark = pytest.mark.timeout(120)
NO_VAD = p.VadOverrides(enabled=False)
BASE = 'lanes = 2\n[backend]\nkind = "null"\ninterim_ms = 0\n'


def pcm_ms(ms: int) -> bytes:
    return bytes(32 * ms)


def log_of(daemon: DaemonProcess) -> str:
    return (daemon.runtime_dir / "asrd.log").read_text()


def rewrite(daemon: DaemonProcess, text: str) -> None:
    """Replace the config file (keeping what the fixture put first) and send SIGHUP."""
    head = daemon.config_path.read_text().split(BASE)[0]
    daemon.config_path.write_text(head + text)
    daemon.signal(signal.SIGHUP)


def works(daemon: DaemonProcess, name: str) -> None:
    with Client.connect(daemon.socket_path, timeout=30) as c:
        finals = c.transcribe(pcm_ms(500), stream=name, vad=NO_VAD, timeout=30)
    assert [f.text for f in finals] == ["utterance of 500 ms"]


def test_reload_plan_classifies_changes() -> None:
    old = Config()
    assert reload_plan(old, parse_config("lanes = 3")) == (["lanes"], [], [])
    assert reload_plan(old, parse_config("vad.aggressiveness = 3")) == ([], [], ["vad"])
    assert reload_plan(old, parse_config('backend.kind = "null"')) == ([], ["backend"], [])
    breaker = parse_config("backend.triton.breaker.open_s = 2.0")
    assert reload_plan(old, breaker) == ([], [], ["backend.triton.breaker"])


def test_invalid_config_and_restart_only_changes_are_refused(start_daemon: Start) -> None:
    daemon = start_daemon(BASE)
    rewrite(daemon, BASE + "[vad]\naggressiveness = 9\n")
    wait_until(lambda: "reload refused" in log_of(daemon), 30, "refusal")
    assert "vad.aggressiveness = 9" in log_of(daemon)
    rewrite(daemon, BASE.replace("lanes = 2", "lanes = 3"))
    wait_until(lambda: "lanes changed, which needs a restart" in log_of(daemon), 30, "refusal")
    works(daemon, "still")
    assert len(worker_pids(daemon)) == 4  # nothing restarted
    assert daemon.stop() == 0


def test_live_change_applies_to_new_streams_without_restarts(start_daemon: Start) -> None:
    daemon = start_daemon(BASE)
    pids = worker_pids(daemon)
    with Client.connect(daemon.socket_path, timeout=30) as c:
        c.start("a", 16000, vad=NO_VAD, wait=True)
        c.start("b", 16000, vad=NO_VAD, wait=True)  # two streams on one connection: allowed
        rewrite(daemon, BASE + "[limits]\nmax_streams_per_connection = 1\n")
        wait_until(lambda: "config reloaded: new streams use it" in log_of(daemon), 30, "applied")
        with pytest.raises(DaemonError) as info:
            c.start("c", 16000, vad=NO_VAD, wait=True)  # a new stream: the new limit
        assert info.value.code == p.ErrorCode.TOO_MANY_STREAMS
        for name in ("a", "b"):  # the open streams go on
            c.send_audio(name, pcm_ms(300))
            c.finish(name)
        finals = []
        while len(finals) < 2:
            msg = c.recv(30)
            assert msg is not None
            if isinstance(msg, p.Final):
                finals.append(msg.text)
        assert finals == ["utterance of 300 ms"] * 2
    assert worker_pids(daemon) == pids  # no worker restarted
    assert daemon.stop() == 0


def test_backend_change_restarts_lanes_one_at_a_time_and_open_streams_finish(
    start_daemon: Start,
) -> None:
    daemon = start_daemon(BASE)
    pids = worker_pids(daemon)
    with Client.connect(daemon.socket_path, timeout=30) as c:
        started = c.start("open", 16000, vad=NO_VAD, wait=True)
        assert started is not None
        c.send_audio("open", pcm_ms(400))
        rewrite(daemon, BASE + "[backend.null]\ndelay_ms = 1.0\n")
        # Its lane drains: the stream gets its final, then Closed("shutdown").
        texts, reason = [], None
        while reason is None:
            msg = c.recv(30)
            assert msg is not None
            if isinstance(msg, p.Final):
                texts.append(msg.text)
            elif isinstance(msg, p.Closed):
                reason = msg.reason
        assert texts == ["utterance of 400 ms"] and reason == "shutdown"
    wait_until(lambda: "reload: every lane restarted" in log_of(daemon), 60, "all lanes")
    log = log_of(daemon)
    assert log.index("restarting lane 0") < log.index("lane 0 serves with the new config")
    assert log.index("lane 0 serves with the new config") < log.index("restarting lane 1")
    new = worker_pids(daemon)
    assert set(new) == set(pids) and not set(new.values()) & set(pids.values())
    for i in range(4):
        works(daemon, f"after{i}")
    assert daemon.stop() == 0
