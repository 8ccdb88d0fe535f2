"""Real-process tests: ``asrd run`` with its workers, driven through the client library."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from daemon.launcher import DaemonProcess
from ipc import protocol as p
from ipc.client import Client, ConnectionClosed
from ipc.framing import BadFrame, FrameReader, FrameWriter
from tests.daemon_fixtures import shm_segments, status, wait_until, worker_pids

SPEECH = Path(__file__).resolve().parent.parent.parent / "shared" / "speech"
needs_speech = pytest.mark.skipif(
    not SPEECH.is_dir(), reason=f"real speech folder {SPEECH} is absent"
)

NULL = """
lanes = 1
heartbeat_timeout_s = 5.0
[backend]
kind = "null"
interim_ms = 0
"""

Start = Callable[..., DaemonProcess]


def read_wav(path: Path) -> bytes:
    with wave.open(str(path)) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        return w.readframes(w.getnframes())


def tone(seconds: float, rate: int = 16000, hz: float = 440.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * hz * t) * 8000).astype(np.int16).tobytes()


NO_VAD = p.VadOverrides(enabled=False)


def collect(client: Client, stream: str, timeout: float = 30.0) -> list[p.ServerMessage]:
    """Every message of ``stream`` up to and including its Closed or Error."""
    out: list[p.ServerMessage] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"stream {stream} did not end: {out}"
        msg = client.wait_for(lambda m: getattr(m, "stream", None) == stream, left)
        assert msg is not None, f"stream {stream} did not end: {out}"
        out.append(msg)
        if isinstance(msg, p.Closed | p.Error):
            return out


# --- the pipeline --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_null_backend_stream_lifecycle(start_daemon: Start) -> None:
    daemon = start_daemon(NULL)
    with Client.connect(daemon.socket_path) as c:
        assert c.welcome.protocol == p.PROTOCOL_VERSION
        assert c.welcome.backend == "null"
        c.start("a", 16000, vad=NO_VAD, wait=True)
        pcm = tone(1.0)
        msgs: list[p.ServerMessage] = []
        for i in range(10):
            c.send_audio("a", pcm[i * 3200 : (i + 1) * 3200])
            # interim_ms = 0: each chunk, once processed, gets a partial naming its seq.
            part = c.wait_for(lambda m: isinstance(m, p.Partial), 10)
            assert isinstance(part, p.Partial) and part.seq == i, part
        c.finish("a")
        msgs = collect(c, "a")
    kinds = [type(m).__name__ for m in msgs]
    assert kinds[0] == "Speech" and msgs[0].event == "start"
    finals = [m for m in msgs if isinstance(m, p.Final)]
    assert len(finals) == 1 and finals[0].utterance == 1
    assert finals[0].start_ms == 0 and 990 <= finals[0].end_ms <= 1010
    closed = msgs[-1]
    assert isinstance(closed, p.Closed) and closed.reason == "finished"
    assert closed.stats.chunks == 10 and closed.stats.audio_ms == 1000


@pytest.mark.timeout(60)
def test_resampled_rates_and_ping(start_daemon: Start) -> None:
    daemon = start_daemon(NULL)
    with Client.connect(daemon.socket_path) as c:
        assert c.ping(7) >= 0
        for rate in (8000, 32000, 48000):
            sid = f"r{rate}"
            c.start(sid, rate, vad=NO_VAD)
            c.send_audio(sid, tone(0.5, rate))
            c.finish(sid)
            msgs = collect(c, sid)
            closed = msgs[-1]
            assert isinstance(closed, p.Closed), msgs
            assert closed.stats.audio_ms == 500
            final = next(m for m in msgs if isinstance(m, p.Final))
            assert 480 <= final.end_ms <= 520  # resampled to 16 kHz, same duration


@needs_speech
@pytest.mark.timeout(180)
def test_transcripts_equal_direct_pocketsphinx(start_daemon: Start) -> None:
    from daemon.config import Config
    from workers.backends.embedded import transcribe_direct
    from workers.vad import SpeechAudio, StreamVad

    cfg = Config()
    daemon = start_daemon("lanes = 1\n")
    files = sorted(SPEECH.glob("librivox-*.wav"))[:3]
    with Client.connect(daemon.socket_path) as c:
        for path in files:
            pcm = read_wav(path)
            # VAD off: the whole file is one utterance.
            finals = c.transcribe(pcm, stream=f"whole-{path.stem}", vad=NO_VAD, timeout=60)
            assert [f.text for f in finals] == [transcribe_direct(pcm, cfg.backend.embedded)]
            # VAD on: each utterance equals a direct decode of the audio the VAD cut.
            finals = c.transcribe(pcm, stream=f"vad-{path.stem}", timeout=60)
            vad = StreamVad(cfg.vad, 16000)
            segments: dict[int, bytearray] = {}
            for ev in [*vad.process(pcm), *vad.flush()]:
                if isinstance(ev, SpeechAudio):
                    segments.setdefault(ev.utterance, bytearray()).extend(ev.pcm)
            expected = [
                transcribe_direct(bytes(s), cfg.backend.embedded) for s in segments.values()
            ]
            assert [f.text for f in finals] == expected
            assert all(f.words is not None for f in finals if f.text)
    # The VAD's frame counters reach the metrics (published with each heartbeat).
    wait_until(
        lambda: (
            (t := status(daemon).totals)["ingress.speech_frames"] > 0
            and t["ingress.silence_frames"] > 0
        ),
        10,
        "VAD counters",
    )


@needs_speech
@pytest.mark.timeout(180)
def test_concurrent_streams_get_their_own_text(start_daemon: Start) -> None:
    daemon = start_daemon("lanes = 2\n")
    files = sorted(SPEECH.glob("librivox-*.wav"))[:3]
    pcms = {f.stem: read_wav(f) for f in files}
    with Client.connect(daemon.socket_path) as c:
        alone = {
            name: " ".join(f.text for f in c.transcribe(pcm, stream=f"solo-{name}", vad=NO_VAD))
            for name, pcm in pcms.items()
        }
        for name in pcms:
            c.start(name, vad=NO_VAD)
        chunks = {
            name: [pcm[i : i + 3200] for i in range(0, len(pcm), 3200)]
            for name, pcm in pcms.items()
        }
        for i in range(max(len(v) for v in chunks.values())):
            for name, parts in chunks.items():
                if i < len(parts):
                    c.send_audio(name, parts[i])
        for name in pcms:
            c.finish(name)
        together = {}
        for name in pcms:
            msgs = collect(c, name, timeout=120)
            assert isinstance(msgs[-1], p.Closed), msgs[-1]
            together[name] = " ".join(m.text for m in msgs if isinstance(m, p.Final))
    assert together == alone
    assert len(set(alone.values())) == len(alone)


@pytest.mark.timeout(120)
def test_pipelined_decoding_waits_for_a_decoder_and_frees_it(start_daemon: Start) -> None:
    """One lane, one decoder, two decoding threads: the second of two concurrent utterances
    waits for the decoder (its audio kept) and both transcripts equal a direct decode; a
    client that vanishes mid-utterance gives the decoder back."""
    from daemon.config import Config
    from workers.backends.embedded import transcribe_direct

    samples = Path(__file__).resolve().parent.parent / "samples"
    pcms = {name: read_wav(samples / f"{name}.wav") for name in ("coffee", "how_are_you")}
    expected = {
        name: transcribe_direct(pcm, Config().backend.embedded) for name, pcm in pcms.items()
    }
    daemon = start_daemon(
        "lanes = 1\n[backend.embedded]\ndecoders = 1\nmax_decoders = 1\nthreads = 2\n"
    )
    with Client.connect(daemon.socket_path) as c:
        for name in pcms:
            c.start(name, vad=NO_VAD, wait=True)
        for i in range(0, max(len(pcm) for pcm in pcms.values()), 3200):
            for name, pcm in pcms.items():
                if i < len(pcm):
                    c.send_audio(name, pcm[i : i + 3200])
        for name in pcms:
            c.finish(name)
        for name in pcms:
            msgs = collect(c, name, timeout=60)
            assert isinstance(msgs[-1], p.Closed), msgs[-1]
            assert [m.text for m in msgs if isinstance(m, p.Final)] == [expected[name]]

        gone = Client.connect(daemon.socket_path)
        gone.start("gone", vad=NO_VAD, wait=True)
        gone.send_audio("gone", pcms["coffee"][:32000])
        gone.close()
        finals = c.transcribe(pcms["how_are_you"], stream="after", vad=NO_VAD, timeout=60)
        assert [f.text for f in finals] == [expected["how_are_you"]]
    wait_until(
        lambda: status(daemon).totals["infer.active_utterances"] == 0, 10, "no open utterance"
    )


# --- bad input -----------------------------------------------------------------------------------


def raw_connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


def read_msgs(s: socket.socket, n: int) -> list[p.ServerMessage]:
    reader: FrameReader[p.ServerMessage] = FrameReader(p.ServerMessage, 1 << 20)
    out: list[p.ServerMessage] = []
    while len(out) < n:
        data = s.recv(65536)
        if not data:
            break
        reader.feed(data)
        out.extend(m for m in reader if not isinstance(m, BadFrame))
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_every_bad_input_gets_its_error_and_others_keep_working(
    start_daemon: Start, loop: str
) -> None:
    daemon = start_daemon(NULL + f'[io]\nclient_loop = "{loop}"\n')
    good = Client.connect(daemon.socket_path)
    good.start("g", vad=NO_VAD, wait=True)
    good.send_audio("g", tone(0.2))

    # Hello required first.
    s = raw_connect(daemon.socket_path)
    s.sendall(FrameWriter().encode(p.Ping(id=1)))
    assert [m.code for m in read_msgs(s, 1)] == ["hello_required"]
    assert s.recv(10) == b""  # closed
    s.close()

    with Client.connect(daemon.socket_path) as c:
        cases: list[tuple[object, str]] = [
            (p.Start(stream="x", sample_rate=44100), "unsupported_sample_rate"),
            (p.Start(stream="x", encoding="f32le"), "unsupported_encoding"),
            (p.Audio(stream="nope", seq=0, pcm=b"\0\0"), "unknown_stream"),
            (p.Finish(stream="nope"), "unknown_stream"),
            (p.Start(stream="v", vad=p.VadOverrides(aggressiveness=9)), "invalid_message"),
        ]
        for msg, code in cases:
            c._send(msg)
            err = c.wait_for(lambda m: isinstance(m, p.Error), 10)
            assert isinstance(err, p.Error) and err.code == code, (msg, err)
        c.start("d", vad=NO_VAD, wait=True)
        c._send(p.Start(stream="d"))
        err = c.wait_for(lambda m: isinstance(m, p.Error), 10)
        assert err is not None and err.code == "duplicate_stream"
        c.send_audio("d", b"\0\0\0", seq=5)
        err = c.wait_for(lambda m: isinstance(m, p.Error), 10)
        assert err is not None and err.code == "odd_byte_count"
        c.send_audio("d", b"\0\0", seq=5)
        c.send_audio("d", b"\0\0", seq=5)
        err = c.wait_for(lambda m: isinstance(m, p.Error), 10)
        assert err is not None and err.code == "bad_sequence"
        # Raw garbage frames: the connection survives them.
        c._sock.sendall(b"\x00\x00\x00\x02\xc1\xc1")  # not msgpack
        c._sock.sendall(b"\x00\x00\x00\x01\x80")  # a map without "type"
        c._sock.sendall(FrameWriter().encode({"type": "audio", "stream": 5}))
        codes = []
        for _ in range(3):
            err = c.wait_for(lambda m: isinstance(m, p.Error), 10)
            assert err is not None
            codes.append(err.code)
        assert codes == ["malformed_frame", "unknown_message", "invalid_message"]
        assert c.ping(3) >= 0
        c.finish("d")
        assert isinstance(collect(c, "d")[-1], p.Closed)

    # A frame over the limit: refused before its body, connection closed.
    s = raw_connect(daemon.socket_path)
    s.sendall(FrameWriter().encode(p.Hello(protocol=1)))
    s.sendall((10 * 1024 * 1024).to_bytes(4, "big"))
    msgs = read_msgs(s, 2)
    assert isinstance(msgs[0], p.Welcome)
    assert isinstance(msgs[1], p.Error) and msgs[1].code == "frame_too_large"
    assert s.recv(10) == b""
    s.close()

    # A client that vanishes mid-utterance.
    v = Client.connect(daemon.socket_path)
    v.start("v", vad=NO_VAD, wait=True)
    v.send_audio("v", tone(0.3))
    v.close()

    good.send_audio("g", tone(0.2))
    good.finish("g")
    msgs = collect(good, "g")
    assert isinstance(msgs[-1], p.Closed) and msgs[-1].stats.chunks >= 2
    good.close()
    # Counters are published with each heartbeat.
    wait_until(lambda: status(daemon).totals["ingress.bad_frames"] >= 4, 10, "bad_frames")
    assert daemon.log_path is not None
    assert f"accepting connections ({loop} event loop)" in daemon.log_path.read_text()


# --- supervision ---------------------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("role", ["infer", "ingress"])
def test_kill_9_worker_is_respawned(start_daemon: Start, role: str) -> None:
    daemon = start_daemon(NULL)
    pids = worker_pids(daemon)
    c = Client.connect(daemon.socket_path)
    c.start("a", vad=NO_VAD, wait=True)
    c.send_audio("a", tone(0.5))
    assert c.wait_for(lambda m: isinstance(m, p.Partial), 10) is not None
    os.kill(pids[(role, 0)], signal.SIGKILL)
    if role == "infer":
        err = c.wait_for(lambda m: isinstance(m, p.Error), 20)
        assert isinstance(err, p.Error) and err.code == "worker_restarted" and err.stream == "a"
    else:
        with pytest.raises(ConnectionClosed):
            while True:
                c.recv(20)
    c.close()
    new = wait_until(
        lambda: (w := worker_pids(daemon)).get((role, 0)) not in (None, pids[(role, 0)]) and w,
        30,
        "respawn",
    )
    assert new
    # New streams work at once (they wait in the ring while the worker starts).
    with Client.connect(daemon.socket_path, timeout=30) as c2:
        finals = c2.transcribe(tone(0.5), stream="b", vad=NO_VAD, timeout=30)
        assert len(finals) == 1
    wait_until(
        lambda: all(w.state == "running" for lane in status(daemon).lanes for w in lane.workers),
        30,
        "all workers running",
    )
    st = status(daemon)
    restarted = [w for lane in st.lanes for w in lane.workers if w.role == role]
    assert restarted[0].restarts == 1


@pytest.mark.timeout(90)
def test_stuck_worker_is_killed_and_replaced(start_daemon: Start) -> None:
    daemon = start_daemon(NULL.replace("heartbeat_timeout_s = 5.0", "heartbeat_timeout_s = 1.5"))
    pid = worker_pids(daemon)[("infer", 0)]
    os.kill(pid, signal.SIGSTOP)  # alive but making no progress
    wait_until(lambda: worker_pids(daemon).get(("infer", 0)) not in (None, pid), 30, "replace")
    with Client.connect(daemon.socket_path, timeout=30) as c:
        assert len(c.transcribe(tone(0.3), stream="a", vad=NO_VAD, timeout=30)) == 1
    log = (daemon.runtime_dir / "asrd.log").read_text()
    assert "sent no heartbeat" in log


@pytest.mark.timeout(90)
def test_sigterm_drains_open_utterances(start_daemon: Start) -> None:
    daemon = start_daemon(NULL)
    c = Client.connect(daemon.socket_path)
    c.start("a", vad=NO_VAD, wait=True)
    c.send_audio("a", tone(0.5))
    assert c.wait_for(lambda m: isinstance(m, p.Partial), 10) is not None
    daemon.signal(signal.SIGTERM)
    msgs = collect(c, "a")
    finals = [m for m in msgs if isinstance(m, p.Final)]
    assert len(finals) == 1 and finals[0].end_ms == 500
    assert isinstance(msgs[-1], p.Closed) and msgs[-1].reason == "shutdown"
    assert daemon.wait(30) == 0
    c.close()
    assert not daemon.socket_path.exists() and not daemon.control_path.exists()


@pytest.mark.timeout(60)
def test_stale_segments_swept_and_socket_in_use(start_daemon: Start, tmp_path: Path) -> None:
    # A supervisor pid that cannot be alive: above pid_max.
    dead = 4_194_400
    daemon = start_daemon(NULL)
    instance = daemon.config_path.read_text().split('"')[3]
    stale = Path(f"/dev/shm/asrd-{instance}-{dead}-audio0")
    stale.write_bytes(b"\0" * 64)
    other = Path(f"/dev/shm/asrd-other{os.getpid()}-{dead}-audio0")
    other.write_bytes(b"\0" * 64)
    try:
        # A second daemon on the same socket: refused with the reserved exit code, and it
        # sweeps its own instance's stale segments on the way (never another instance's).
        proc = subprocess.run(
            [sys.executable, "-m", "daemon.cli", "run", "--config", str(daemon.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 75, proc.stderr
        assert "already listening" in proc.stderr
        assert not stale.exists()
        assert other.exists()
    finally:
        stale.unlink(missing_ok=True)
        other.unlink(missing_ok=True)
    assert daemon.proc is not None and daemon.proc.poll() is None  # the first one still runs
    with Client.connect(daemon.socket_path) as c:
        assert c.ping() >= 0


@pytest.mark.timeout(60)
def test_bad_config_exits_78_naming_field(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[vad]\naggressiveness = 7\n")
    for cmd in (["check-config", str(cfg)], ["run", "--config", str(cfg)]):
        proc = subprocess.run(
            [sys.executable, "-m", "daemon.cli", *cmd],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 78
        assert "vad.aggressiveness" in proc.stderr and "7" in proc.stderr


@pytest.mark.timeout(60)
def test_kill_9_supervisor_leaves_nothing_after_next_start(start_daemon: Start) -> None:
    daemon = start_daemon(NULL)
    instance = daemon.config_path.read_text().split('"')[3]
    pids = worker_pids(daemon)
    assert shm_segments(instance)
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait(10)
    # Workers notice their parent is gone and exit on their own.
    wait_until(lambda: not any(_alive(pid) for pid in pids.values()), 10, "workers to exit")
    again = DaemonProcess(
        daemon.config_path.read_text().split("\n", 1)[1], runtime_dir=daemon.runtime_dir
    )
    with again:
        segs = shm_segments(instance)
        assert segs and all(f"-{again.pid}-" in s for s in segs)
    assert shm_segments(instance) == []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(60)
def test_connections_spread_over_lanes(start_daemon: Start) -> None:
    daemon = start_daemon(NULL.replace("lanes = 1", "lanes = 2"))
    busy = Client.connect(daemon.socket_path)
    clients = [busy]
    try:
        first = busy.start("b0", vad=NO_VAD, wait=True)
        assert first is not None
        for i in range(1, 5):
            busy.start(f"b{i}", vad=NO_VAD, wait=True)
        # That lane now carries 1 connection + 5 streams; the next connections (1 stream each)
        # go to the other lane until it carries as much, whichever worker wakes first.
        for i in range(3):
            c = Client.connect(daemon.socket_path)
            clients.append(c)
            started = c.start(f"s{i}", vad=NO_VAD, wait=True)
            assert started is not None and started.lane != first.lane, (i, started)
    finally:
        for c in clients:
            c.close()


@pytest.mark.timeout(120)
def test_shipped_samples_transcribe_exactly(start_daemon: Start) -> None:
    """What `make demo` shows: each sample's utterances, as its transcript file lists them."""
    samples = sorted((Path(__file__).resolve().parent.parent / "samples").glob("*.wav"))
    assert samples
    daemon = start_daemon("lanes = 1\n")
    with Client.connect(daemon.socket_path) as c:
        for path in samples:
            with wave.open(str(path)) as w:
                rate, pcm = w.getframerate(), w.readframes(w.getnframes())
            expected = [line for line in path.with_suffix(".txt").read_text().split("\n") if line]
            # Chunk size must not matter, resampled audio included.
            for chunk_ms in (100, 30):
                finals = c.transcribe(
                    pcm, rate, stream=f"{path.stem}-{chunk_ms}", chunk_ms=chunk_ms, timeout=60
                )
                assert [f.text for f in finals] == expected, (path.name, chunk_ms)
