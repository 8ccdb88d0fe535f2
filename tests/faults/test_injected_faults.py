"""Faults injected into a worker by the ``[faults]`` harness (workers/faults.py): hang, slow
consumer, corrupt ring record; and the harness refused outside tests.

What the client must see, per fault:

* infer worker hangs: the supervisor SIGABRTs it (its Python stack, ending in the harness's busy
  loop, is in the log), SIGKILLs and respawns it; streams of that lane with an utterance in flight
  get ``Error(worker_restarted)``, streams of the other lane their exact finals; new streams on
  every lane work afterwards.
* ingress worker hangs: its connections stop being served and are closed when it is replaced
  (the client sees the connection close); the other lane's streams get their exact finals.
* slow infer worker (a slow consumer) behind a small audio ring: the ring fills, the ingress
  holds its backlog and then stops reading the clients' sockets (backpressure); every stream
  still gets one final covering all of its audio, nothing dropped.
* a corrupt result record: dropped with a log line; if it was a final, that utterance gets
  ``Error(inference_failed)`` naming the corruption; every other utterance its final.
* a recognizer call stalled on a decoding thread (pipelined embedded decoding): the worker's
  heartbeat goes stale although its loop runs, and it is replaced like a hung one.

The null backend's finals say ``utterance of N ms``, so a final proves how much audio arrived.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.launcher import DaemonProcess
from ipc import protocol as p
from ipc.client import Client, ConnectionClosed
from tests.daemon_fixtures import start_daemon as start_daemon
from tests.daemon_fixtures import status, wait_counters, wait_until, worker_pids
from tests.test_daemon import Start

pytestmark = pytest.mark.timeout(120)
NO_VAD = p.VadOverrides(enabled=False)
ALLOW = {"ASRD_ALLOW_FAULTS": "1"}
WAIT = 60.0


def config(lanes: int, faults: str, extra: str = "") -> str:
    return (
        f'lanes = {lanes}\nheartbeat_timeout_s = 3.0\n[backend]\nkind = "null"\ninterim_ms = 0\n'
        "[restart]\nbackoff_initial_s = 0.05\nabort_grace_s = 3.0\n"
        f"{extra}[faults]\n{faults}"
    )


def log_of(daemon: DaemonProcess) -> str:
    return (daemon.runtime_dir / "asrd.log").read_text()


def pcm_ms(ms: int) -> bytes:
    return bytes(32 * ms)  # 16 kHz s16le: 32 bytes per ms


class Stream:
    """One stream on its own connection."""

    def __init__(self, daemon: DaemonProcess, name: str) -> None:
        self.name = name
        self.client = Client.connect(daemon.socket_path, timeout=WAIT)
        started = self.client.start(name, 16000, vad=NO_VAD, wait=True, timeout=WAIT)
        assert started is not None
        self.lane = started.lane
        self.sent_ms = 0

    def send(self, ms: int) -> None:
        for _ in range(ms // 100):
            self.client.send_audio(self.name, pcm_ms(100))
        self.sent_ms += ms

    def finish(self) -> tuple[list[str], list[str]]:
        """Finals and error codes until Closed, an ending error, or the connection closing."""
        finals: list[str] = []
        codes: list[str] = []
        try:
            self.client.finish(self.name)
            while True:
                msg = self.client.recv(WAIT)
                assert msg is not None, f"{self.name}: nothing within {WAIT} s"
                if isinstance(msg, p.Final):
                    finals.append(msg.text)
                elif isinstance(msg, p.Error):
                    codes.append(msg.code)
                    if msg.code == p.ErrorCode.WORKER_RESTARTED:
                        break
                elif isinstance(msg, p.Closed):
                    break
        except ConnectionClosed:
            codes.append("connection_closed")
        finally:
            self.client.close()
        return finals, codes


def one_stream_works(daemon: DaemonProcess, name: str) -> None:
    with Client.connect(daemon.socket_path, timeout=WAIT) as c:
        finals = c.transcribe(pcm_ms(500), stream=name, vad=NO_VAD, timeout=WAIT)
    assert [f.text for f in finals] == ["utterance of 500 ms"]


def streams_on_both_lanes(daemon: DaemonProcess, n: int) -> list[Stream]:
    streams = [Stream(daemon, f"s{i}") for i in range(n)]
    assert {s.lane for s in streams} == {0, 1}, "connections did not spread over the lanes"
    return streams


def test_faults_are_refused_without_the_test_switch(tmp_path: Path) -> None:
    cfg = tmp_path / "asrd.toml"
    cfg.write_text(f'runtime_dir = "{tmp_path}"\n[faults]\naction = "crash"\n')
    env = {k: v for k, v in os.environ.items() if k != "ASRD_ALLOW_FAULTS"}
    done = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 78
    assert "faults.action = 'crash'" in done.stderr and "ASRD_ALLOW_FAULTS=1" in done.stderr


def test_infer_worker_hangs(start_daemon: Start) -> None:
    daemon = start_daemon(
        config(2, 'action = "hang"\nworker = "infer"\nlane = 0\nafter_records = 8\n'),
        extra_env=ALLOW,
    )
    streams = streams_on_both_lanes(daemon, 6)
    for s in streams:
        s.send(1000)  # lane 0's infer worker hangs within these records
    wait_until(lambda: "fault injection: hanging now" in log_of(daemon), WAIT, "the hang")
    for s in streams:
        finals, codes = s.finish()
        if s.lane == 0:
            assert codes == [p.ErrorCode.WORKER_RESTARTED] and finals == [], (s.name, codes)
        else:
            assert (finals, codes) == (["utterance of 1000 ms"], []), s.name
    wait_until(lambda: "Fatal Python error: Aborted" in log_of(daemon), WAIT, "stack dump")
    log = log_of(daemon)
    assert "sent no heartbeat" in log and "workers/faults.py" in log  # where it hung
    wait_until(
        lambda: all(w.state == "running" for lane in status(daemon).lanes for w in lane.workers),
        WAIT,
        "lane 0 back",
    )
    for i in range(4):
        one_stream_works(daemon, f"after{i}")
    assert daemon.stop() == 0


def test_stalled_decoding_thread_makes_the_heartbeat_stale(start_daemon: Start) -> None:
    """A recognizer call stuck on a decoding thread (pipelined embedded decoding): the
    worker's loop keeps running, yet its heartbeat goes stale, so the supervisor replaces it."""
    daemon = start_daemon(
        "lanes = 1\nheartbeat_timeout_s = 3.0\n"
        "[restart]\nbackoff_initial_s = 0.05\nabort_grace_s = 3.0\n"
        "[backend.embedded]\nthreads = 2\n"
        '[faults]\naction = "stall"\nworker = "infer"\nlane = 0\nafter_records = 3\n',
        extra_env=ALLOW,
    )
    with Client.connect(daemon.socket_path, timeout=WAIT) as c:
        c.start("a", 16000, vad=NO_VAD, wait=True, timeout=WAIT)
        for _ in range(10):
            c.send_audio("a", pcm_ms(100))
        err = c.wait_for(lambda m: isinstance(m, p.Error), WAIT)
        assert isinstance(err, p.Error) and err.code == p.ErrorCode.WORKER_RESTARTED, err
    log = log_of(daemon)
    assert "stalling in a recognizer call now" in log and "sent no heartbeat" in log
    wait_until(lambda: "Fatal Python error: Aborted" in log_of(daemon), WAIT, "stack dump")
    assert "workers/faults.py" in log_of(daemon)  # the decoding thread's stack: where it stalled
    with Client.connect(daemon.socket_path, timeout=WAIT) as c:
        finals = c.transcribe(pcm_ms(500), stream="after", vad=NO_VAD, timeout=WAIT)
    assert len(finals) == 1  # silence: the text is empty, the final is there
    assert daemon.stop() == 0


def test_ingress_worker_hangs(start_daemon: Start) -> None:
    daemon = start_daemon(
        config(2, 'action = "hang"\nworker = "ingress"\nlane = 0\nafter_records = 5\n'),
        extra_env=ALLOW,
    )
    streams = streams_on_both_lanes(daemon, 6)
    for s in streams:
        if s.lane == 1:
            s.send(1000)
    for s in streams:
        if s.lane == 0:
            s.send(1000)  # the first of these pushes make lane 0's ingress hang
    for s in streams:
        finals, codes = s.finish()
        if s.lane == 0:
            assert codes == ["connection_closed"], (s.name, finals, codes)
        else:
            assert (finals, codes) == (["utterance of 1000 ms"], []), s.name
    assert "fault injection: hanging now" in log_of(daemon)
    wait_until(lambda: worker_pids(daemon).get(("ingress", 0)), WAIT, "ingress 0 respawned")
    for i in range(4):
        one_stream_works(daemon, f"after{i}")
    assert daemon.stop() == 0


def test_slow_consumer_backpressure_loses_nothing(start_daemon: Start) -> None:
    daemon = start_daemon(
        config(
            1,
            'action = "slow"\nworker = "infer"\nafter_records = 0\nslow_ms = 5.0\n',
            extra="[ring]\naudio_bytes = 65536\n",
        ),
        extra_env=ALLOW,
    )
    streams = [Stream(daemon, f"s{i}") for i in range(4)]
    for s in streams:
        s.send(3000)  # 120 records of 3200 bytes: far more than the 64 KiB ring holds
    for s in streams:
        assert s.finish() == (["utterance of 3000 ms"], []), s.name
    totals = wait_counters(daemon, ingress__backpressure_events=1)
    assert totals["infer.dropped_records"] == 0
    assert daemon.stop() == 0


def test_corrupt_result_record(start_daemon: Start) -> None:
    daemon = start_daemon(
        config(1, 'action = "corrupt"\nworker = "infer"\nafter_records = 5\n'),
        extra_env=ALLOW,
    )
    streams = [Stream(daemon, f"s{i}") for i in range(3)]
    for s in streams:
        s.send(500)
    outcomes = [s.finish() for s in streams]
    wait_until(lambda: "corrupt result record" in log_of(daemon), WAIT, "the corruption logged")
    for finals, codes in outcomes:
        # A corrupt partial is dropped (the final still comes); a corrupt final is an error.
        assert (finals, codes) in ((["utterance of 500 ms"], []), ([], ["inference_failed"]))
    one_stream_works(daemon, "after")
    assert daemon.stop() == 0


def test_crash_fault_under_load_respawns(start_daemon: Start) -> None:
    daemon = start_daemon(
        config(2, 'action = "crash"\nworker = "infer"\nlane = 1\nafter_records = 20\n'),
        extra_env=ALLOW,
    )
    streams = streams_on_both_lanes(daemon, 6)
    for s in streams:
        s.send(1000)
    for s in streams:
        finals, codes = s.finish()
        if s.lane == 1:
            assert codes == [p.ErrorCode.WORKER_RESTARTED] or finals == ["utterance of 1000 ms"]
        else:
            assert (finals, codes) == (["utterance of 1000 ms"], []), s.name
    assert "fault injection: crashing now" in log_of(daemon)
    wait_until(lambda: "infer lane 1 was killed by SIGKILL" in log_of(daemon), WAIT, "reaped")
    for i in range(4):
        one_stream_works(daemon, f"after{i}")
    assert daemon.stop() == 0
