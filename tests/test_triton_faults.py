"""Fault injection against a real Triton server: the daemon's ``triton`` backend survives it.

Each test runs the real daemon (``asrd run``) against its own development Triton server
(``server_control``: started, killed with SIGKILL, started again on the same ports), with the
light model ``asr_light``, whose final is ``n=<samples> rms=<energy>`` over the whole
sequence: a final equal to that of the whole utterance proves the replay after a failure sent
every sample once, none lost and none twice. The embedded fallback's final is checked against a
direct pocketsphinx decode of the same audio.

Streams are driven step by step (audio, then the fault, then more audio, then ``Finish``), with
bounded waits on the daemon's status and on messages, so no test depends on timing. After each
test the daemon fixture checks that no shared-memory segment of the daemon is left, and the test
checks that no region is left registered on the server.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm

from daemon.config import EmbeddedConfig
from daemon.launcher import DaemonProcess
from ipc import protocol as p
from ipc.client import Client
from tests.daemon_fixtures import start_daemon as start_daemon
from tests.daemon_fixtures import status, wait_counters, wait_until
from tests.test_daemon import Start
from tests.triton_fixtures import ServerControl
from tests.triton_fixtures import server_control as server_control
from workers.backends.embedded import transcribe_direct

pytestmark = pytest.mark.timeout(300)
SAMPLES = Path(__file__).resolve().parent.parent / "samples"
NO_VAD = p.VadOverrides(enabled=False)
WAIT = 60.0


def _wav(name: str) -> bytes:
    with wave.open(str(SAMPLES / name)) as w:
        assert w.getframerate() == 16000
        return w.readframes(w.getnframes())


def light_final(pcm: bytes) -> str:
    """asr_light's final for a sequence of exactly this audio."""
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    return f"n={x.size} rms={math.sqrt(float(np.dot(x, x)) / x.size):.1f}"


def config(url: str, **triton: Any) -> str:
    lines = [
        "lanes = 1",
        "heartbeat_timeout_s = 30.0",
        "[backend]",
        'kind = "triton"',
        "interim_ms = 0",
        "[backend.embedded]",
        "decoders = 1",
        "[backend.triton]",
        f'endpoints = ["{url}"]',
        'model = "asr_light"',
        "health_interval_s = 0.2",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in triton.items()]
    lines += ["[backend.triton.breaker]", "open_s = 0.2", "max_open_s = 1.0"]
    return "\n".join(lines) + "\n"


def endpoint_state(daemon: DaemonProcess) -> str:
    endpoints = status(daemon).endpoints
    assert len(endpoints) == 1
    return str(endpoints[0].state)


def registered_regions(url: str) -> list[str]:
    with grpcclient.InferenceServerClient(url) as c:
        regions = c.get_system_shared_memory_status(as_json=True).get("regions", {})
    return sorted(r for r in regions if r.startswith("asrd-"))


class Stream:
    """One stream on its own connection, driven step by step."""

    def __init__(self, daemon: DaemonProcess, name: str, vad: p.VadOverrides | None = NO_VAD):
        self.name = name
        self.client = Client.connect(daemon.socket_path)
        self.client.start(name, 16000, vad=vad, wait=True)
        self.messages: list[p.ServerMessage] = []

    def send(self, pcm: bytes, chunk: int = 3200) -> int:
        seq = -1
        for i in range(0, len(pcm), chunk):
            seq = self.client.send_audio(self.name, pcm[i : i + chunk])
        return seq

    def _until(self, pred: Any, what: str) -> None:
        deadline = time.monotonic() + WAIT
        while True:
            msg = self.client.recv(max(0.0, deadline - time.monotonic()))
            assert msg is not None, f"stream {self.name}: no {what} in {WAIT} s: {self.messages}"
            self.messages.append(msg)
            if pred(msg):
                return

    def wait_partial(self, seq: int) -> None:
        """Until the partial for chunk ``seq`` (everything up to it was decoded)."""
        self._until(lambda m: isinstance(m, p.Partial) and m.seq >= seq, f"partial for {seq}")

    def finish(self) -> tuple[list[str], list[p.Error]]:
        """Finish and collect the finals and errors until Closed."""
        self.client.finish(self.name)
        self._until(lambda m: isinstance(m, p.Closed), "Closed")
        self.client.close()
        finals = [m.text for m in self.messages if isinstance(m, p.Final)]
        errors = [m for m in self.messages if isinstance(m, p.Error)]
        return finals, errors


def half(pcm: bytes) -> int:
    return len(pcm) // 2 & ~1


def test_kill9_mid_stream_fails_over_to_embedded_then_recovers(
    start_daemon: Start, server_control: ServerControl
) -> None:
    server_control.start()
    url = server_control.url
    daemon = start_daemon(config(url, fallback="embedded", timeout_s=2.0))
    wait_until(lambda: endpoint_state(daemon) == "up", WAIT, "endpoint up")
    names = ["coffee.wav", "how_are_you.wav", "two_utterances.wav"]
    audio = [_wav(n) for n in names]
    streams = [Stream(daemon, f"s{i}") for i in range(len(audio))]
    for s, pcm in zip(streams, audio, strict=True):
        s.wait_partial(s.send(pcm[: half(pcm)]))  # half of each decoded by Triton
    server_control.kill9()
    for s, pcm in zip(streams, audio, strict=True):
        s.send(pcm[half(pcm) :])
    for s, pcm in zip(streams, audio, strict=True):
        finals, errors = s.finish()
        assert errors == []
        # Replayed from its first sample on the embedded recognizer: its whole transcript.
        assert finals == [transcribe_direct(pcm, EmbeddedConfig())]
    wait_until(lambda: endpoint_state(daemon) == "down", WAIT, "endpoint reported down")
    wait_counters(daemon, infer__failovers=len(audio), infer__fallback_utterances=len(audio))

    # The server comes back: the breaker closes after a probe and Triton serves again.
    server_control.start()
    wait_until(lambda: endpoint_state(daemon) == "up", WAIT, "endpoint up again")
    s = Stream(daemon, "after")
    s.send(audio[0])
    assert s.finish() == ([light_final(audio[0])], [])
    assert registered_regions(url) != []  # registered again on the new server
    assert daemon.stop() == 0
    assert registered_regions(url) == []


def test_kill9_and_restart_mid_utterance_replays_on_triton(
    start_daemon: Start, server_control: ServerControl
) -> None:
    server_control.start()
    url = server_control.url
    daemon = start_daemon(config(url, timeout_s=2.0))
    wait_until(lambda: endpoint_state(daemon) == "up", WAIT, "endpoint up")
    pcm = _wav("two_utterances.wav")
    third = len(pcm) // 3 & ~1
    streams = [Stream(daemon, f"s{i}") for i in range(2)]
    for s in streams:
        s.wait_partial(s.send(pcm[:third]))
    server_control.kill9()
    for s in streams:  # fails on the dead endpoint: the utterance is parked, audio kept
        s.send(pcm[third : 2 * third])
    wait_until(lambda: endpoint_state(daemon) == "down", WAIT, "endpoint reported down")
    server_control.start()
    wait_until(lambda: endpoint_state(daemon) == "up", WAIT, "endpoint up again")
    for s in streams:
        s.send(pcm[2 * third :])
        # One final, over every sample of the utterance: replayed whole, nothing twice.
        assert s.finish() == ([light_final(pcm)], [])
    assert wait_counters(daemon, infer__replays=2)["infer.unavailable"] == 0
    assert daemon.stop() == 0
    assert registered_regions(url) == []


def test_server_down_at_start_then_up(start_daemon: Start, server_control: ServerControl) -> None:
    url = server_control.url  # nothing listens there yet
    daemon = start_daemon(config(url, shared_memory="none", timeout_s=2.0))
    wait_until(lambda: endpoint_state(daemon) == "down", WAIT, "endpoint reported down")
    pcm = _wav("coffee.wav")
    s = Stream(daemon, "early")
    s.send(pcm)
    finals, errors = s.finish()
    assert finals == []
    assert [e.code for e in errors] == [p.ErrorCode.INFERENCE_UNAVAILABLE]
    assert errors[0].retry_after_ms is not None and errors[0].retry_after_ms > 0
    assert errors[0].utterance == 1
    assert url in errors[0].message
    server_control.start()
    wait_until(lambda: endpoint_state(daemon) == "up", WAIT, "endpoint up")
    s = Stream(daemon, "later")
    s.send(pcm)
    assert s.finish() == ([light_final(pcm)], [])
    assert daemon.stop() == 0


def test_slow_model_trips_breaker_and_recovers(
    start_daemon: Start, server_control: ServerControl
) -> None:
    server_control.start()
    url = server_control.url
    daemon = start_daemon(config(url, fallback="embedded", timeout_s=0.5))
    wait_until(lambda: endpoint_state(daemon) == "up", WAIT, "endpoint up")
    with grpcclient.InferenceServerClient(url) as c:
        cfg = c.get_model_config("asr_light", as_json=True)["config"]
        cfg["parameters"]["delay_ms"] = {"string_value": "1500"}
        c.load_model("asr_light", config=json.dumps(cfg))
    pcm = _wav("how_are_you.wav")
    s = Stream(daemon, "slow")
    s.send(pcm)
    # Timed out on Triton, replayed on the embedded recognizer.
    assert s.finish() == ([transcribe_direct(pcm, EmbeddedConfig())], [])
    wait_until(lambda: endpoint_state(daemon) == "down", WAIT, "breaker open")
    wait_counters(daemon, infer__breaker_opened=1)
    with grpcclient.InferenceServerClient(url) as c:
        cfg["parameters"]["delay_ms"] = {"string_value": "0"}
        c.load_model("asr_light", config=json.dumps(cfg))  # fast again
    # Half-open probes succeed: closed again, and Triton serves new utterances.
    wait_until(lambda: endpoint_state(daemon) == "up", WAIT, "breaker closed")
    s = Stream(daemon, "fast")
    s.send(pcm)
    assert s.finish() == ([light_final(pcm)], [])
    assert daemon.stop() == 0
    assert registered_regions(url) == []


def test_region_unregistered_behind_the_daemons_back(
    start_daemon: Start, server_control: ServerControl
) -> None:
    server_control.start()
    url = server_control.url
    daemon = start_daemon(config(url))
    wait_until(lambda: endpoint_state(daemon) == "up", WAIT, "endpoint up")
    pcm = _wav("coffee.wav")
    s = Stream(daemon, "one")
    s.wait_partial(s.send(pcm[:32000]))
    regions = registered_regions(url)
    assert len(regions) == 1
    with grpcclient.InferenceServerClient(url) as c:
        c.unregister_system_shared_memory()  # all of them
    s.send(pcm[32000:])
    assert s.finish() == ([light_final(pcm)], [])
    assert registered_regions(url) == regions  # registered again, same name
    assert status(daemon).totals["infer.failovers"] == 0
    assert daemon.stop() == 0
    assert registered_regions(url) == []


def test_malformed_response_fails_one_utterance_and_the_stream_goes_on(
    start_daemon: Start, server_control: ServerControl
) -> None:
    server_control.start()
    url = server_control.url
    daemon = start_daemon(config(url))
    wait_until(lambda: endpoint_state(daemon) == "up", WAIT, "endpoint up")
    with grpcclient.InferenceServerClient(url) as c:
        cfg = c.get_model_config("asr_light", as_json=True)["config"]
        cfg["parameters"]["malformed_finals"] = {"string_value": "1"}
        c.load_model("asr_light", config=json.dumps(cfg))
    wait_until(lambda: endpoint_state(daemon) == "up", WAIT, "endpoint up after the reload")
    # Two utterances cut by the VAD on one stream: the first final is malformed.
    s = Stream(daemon, "vad", vad=None)
    s.send(_wav("two_utterances.wav"))
    finals, errors = s.finish()
    assert [e.code for e in errors] == [p.ErrorCode.INFERENCE_FAILED]
    assert errors[0].utterance == 1
    assert "without" in errors[0].message and "IS_FINAL" in errors[0].message
    assert len(finals) == 1 and finals[0].startswith("n=")  # the second utterance's final
    assert endpoint_state(daemon) == "up"  # a model error is not the endpoint's failure
    assert daemon.stop() == 0
    assert registered_regions(url) == []


def test_second_endpoint_takes_over_and_first_comes_back(
    start_daemon: Start, server_control: ServerControl, tmp_path: Path
) -> None:
    second = ServerControl(tmp_path / "second")
    (tmp_path / "second").mkdir()
    try:
        server_control.start()
        second.start()
        first_url, second_url = server_control.url, second.url
        cfg = config(first_url, timeout_s=2.0).replace(
            f'endpoints = ["{first_url}"]', f'endpoints = ["{first_url}", "{second_url}"]'
        )
        daemon = start_daemon(cfg)
        wait_until(
            lambda: [e.state for e in status(daemon).endpoints] == ["up", "up"],
            WAIT,
            "both endpoints up",
        )
        pcm = _wav("coffee.wav")
        s = Stream(daemon, "moving")
        s.wait_partial(s.send(pcm[: half(pcm)]))
        assert len(registered_regions(first_url)) == 1  # one region per lane and endpoint
        server_control.kill9()
        s.send(pcm[half(pcm) :])
        assert s.finish() == ([light_final(pcm)], [])  # replayed whole on the second server
        wait_until(
            lambda: [e.state for e in status(daemon).endpoints] == ["down", "up"],
            WAIT,
            "first endpoint down",
        )
        s = Stream(daemon, "second")
        s.send(pcm)
        assert s.finish() == ([light_final(pcm)], [])
        server_control.start()
        wait_until(
            lambda: [e.state for e in status(daemon).endpoints] == ["up", "up"],
            WAIT,
            "first endpoint back",
        )
        totals = wait_counters(daemon, infer__failovers=1)
        assert totals["infer.failovers"] == 1 and totals["infer.unavailable"] == 0
        assert daemon.stop() == 0
        assert registered_regions(first_url) == [] and registered_regions(second_url) == []
    finally:
        second.stop()


def test_regions_left_by_a_dead_daemon_are_unregistered_at_start(
    start_daemon: Start, server_control: ServerControl
) -> None:
    server_control.start()
    url = server_control.url
    # A region registered by a daemon of this instance that died (pid 999999 is not running).
    daemon = start_daemon(config(url, shared_memory="none"))
    instance = status(daemon).instance
    assert daemon.stop() == 0
    stale = f"asrd-{instance}-999999-triton0"
    region = shm.create_shared_memory_region(stale, "/" + stale, 65536)
    try:
        with grpcclient.InferenceServerClient(url) as c:
            c.register_system_shared_memory(stale, "/" + stale, 65536)
        assert registered_regions(url) == [stale]
        daemon = start_daemon(config(url), instance=instance)
        wait_until(lambda: stale not in registered_regions(url), WAIT, "stale region swept")
        assert [r for r in registered_regions(url) if r != stale]  # the daemon's own
        assert daemon.stop() == 0
        assert registered_regions(url) == []
    finally:
        with contextlib.suppress(shm.SharedMemoryException, OSError):  # swept by the daemon
            shm.destroy_shared_memory_region(region)
