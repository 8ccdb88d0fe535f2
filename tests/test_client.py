"""Blocking and async clients, and asrctl, against an in-test daemon stand-in.

``FakeDaemon`` speaks the client protocol on a real Unix socket the way asrd does (Welcome,
Started, Speech, Partial with the Audio seq, Final, Closed, Error, Pong) without recognising
anything: a Final's text reports the bytes and sample rate it received, so tests can check what
the client actually sent. It also serves the control socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import socket
import sys
import threading
import types
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import uvloop

from daemon import asrctl
from daemon.errors import ClientError
from ipc.client import (
    AsyncClient,
    Client,
    ConnectionClosed,
    ControlClient,
    DaemonError,
    transcribe,
)
from ipc.control import LaneStatus, Status, StatusRequest, WorkerStatus
from ipc.framing import BadFrame, FrameReader, FrameTooLarge, FrameWriter
from ipc.protocol import (
    PROTOCOL_VERSION,
    SAMPLE_RATES,
    Audio,
    Cancel,
    ClientMessage,
    Closed,
    Error,
    ErrorCode,
    Final,
    Finish,
    Hello,
    Limits,
    Partial,
    Ping,
    Pong,
    Speech,
    Start,
    Started,
    StreamStats,
    VadOverrides,
    Welcome,
    Word,
)

WAIT = 10.0  # bound on every wait in these tests
REPO = Path(__file__).resolve().parents[1]


# --- the daemon stand-in ----------------------------------------------------------------------


@dataclass
class _Stream:
    rate: int
    interim: bool
    vad: bool
    last_seq: int = -1
    nbytes: int = 0
    chunks: int = 0
    speaking: bool = False
    failed: bool = False


class FakeDaemon:
    """A threaded protocol server: one thread per connection, replies in order."""

    def __init__(
        self,
        path: Path,
        *,
        max_frame_bytes: int = 1024 * 1024,
        sample_rates: tuple[int, ...] = SAMPLE_RATES,
        control_path: Path | None = None,
    ) -> None:
        self.path = path
        self.control_path = control_path
        self.max_frame_bytes = max_frame_bytes
        self.sample_rates = sample_rates
        self.fail_streams: set[str] = set()  # streams that get inference_failed on audio
        self.drain_streams: set[str] = set()  # streams "shut down" at their second chunk
        self.raw_before_pong: bytes = b""  # injected verbatim before each Pong
        self.lock = threading.Lock()
        self.received: list[Any] = []  # every decoded client message, all connections
        self.audio: dict[str, bytearray] = {}
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._listeners: list[socket.socket] = []

    def start(self) -> FakeDaemon:
        self._listen(self.path, self._serve_client)
        if self.control_path is not None:
            self._listen(self.control_path, self._serve_control)
        return self

    def _listen(self, path: Path, handler: Callable[[socket.socket], None]) -> None:
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(str(path))
        lsock.listen(64)
        self._listeners.append(lsock)
        self._spawn(self._accept, lsock, handler)

    def _spawn(self, fn: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self, lsock: socket.socket, handler: Callable[[socket.socket], None]) -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return  # listener shut down
            self._conns.append(conn)
            self._spawn(handler, conn)

    def stop(self) -> None:
        for s in self._listeners + self._conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self._threads:
            t.join(WAIT)

    def messages(self, kind: type | None = None) -> list[Any]:
        with self.lock:
            return [m for m in self.received if kind is None or isinstance(m, kind)]

    # --- client protocol ----------------------------------------------------------------------

    def _serve_client(self, conn: socket.socket) -> None:
        reader: FrameReader[Any] = FrameReader(ClientMessage, self.max_frame_bytes)
        writer = FrameWriter()
        streams: dict[str, _Stream] = {}
        hello = False

        def send(*msgs: Any) -> None:
            out = bytearray()
            for m in msgs:
                if isinstance(m, bytes):  # a raw frame, injected verbatim
                    out += writer.take() + m
                else:
                    writer.append(m)
            conn.sendall(out + writer.take())

        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                reader.feed(data)
                try:
                    for msg in reader:
                        if isinstance(msg, BadFrame):
                            send(Error(code=msg.code, message=msg.message))
                            continue
                        with self.lock:
                            self.received.append(msg)
                        if not hello:
                            if not isinstance(msg, Hello):
                                send(Error(code=ErrorCode.HELLO_REQUIRED, message="Hello first"))
                                return
                            hello = True
                            send(self._welcome())
                            continue
                        self._handle(msg, streams, send)
                except FrameTooLarge as exc:
                    send(Error(code=ErrorCode.FRAME_TOO_LARGE, message=str(exc)))
                    return
        except OSError:
            return
        finally:
            conn.close()

    def _welcome(self) -> Welcome:
        limits = Limits(
            max_frame_bytes=self.max_frame_bytes,
            max_streams_per_connection=16,
            sample_rates=list(self.sample_rates),
            encodings=["s16le"],
        )
        return Welcome(protocol=PROTOCOL_VERSION, limits=limits, server="fake-asrd", backend="null")

    def _handle(self, msg: Any, streams: dict[str, _Stream], send: Callable[..., None]) -> None:
        if isinstance(msg, Ping):
            send(*([self.raw_before_pong] if self.raw_before_pong else []), Pong(id=msg.id))
            return
        if isinstance(msg, Start):
            if msg.stream in streams:
                send(Error(code=ErrorCode.DUPLICATE_STREAM, message="open", stream=msg.stream))
            elif msg.sample_rate not in self.sample_rates:
                send(
                    Error(
                        code=ErrorCode.UNSUPPORTED_SAMPLE_RATE,
                        message=f"{msg.sample_rate} Hz",
                        stream=msg.stream,
                    )
                )
            else:
                vad = msg.vad is None or msg.vad.enabled is not False
                streams[msg.stream] = _Stream(msg.sample_rate, msg.interim, vad)
                with self.lock:
                    self.audio[msg.stream] = bytearray()
                send(Started(stream=msg.stream, lane=0))
            return
        stream = getattr(msg, "stream", "")
        st = streams.get(stream)
        if st is None:
            send(Error(code=ErrorCode.UNKNOWN_STREAM, message="not open", stream=stream))
            return
        if isinstance(msg, Audio):
            if msg.seq <= st.last_seq:  # like asrd: the chunk is dropped, the stream goes on
                send(Error(code=ErrorCode.BAD_SEQUENCE, message="seq", stream=stream))
                return
            if stream in self.drain_streams and st.chunks == 1:
                # Like asrd on SIGTERM: the stream is finished for the client, audio after
                # that gets one shutting_down error, and it closes with reason "shutdown".
                del streams[stream]
                send(
                    Error(code=ErrorCode.SHUTTING_DOWN, message="draining", stream=stream),
                    Final(stream=stream, utterance=1, text="before", start_ms=0, end_ms=1),
                    Closed(stream=stream, reason="shutdown"),
                )
                return
            if stream in self.fail_streams:
                # Like asrd: the utterance fails, the stream goes on (and ends with no final).
                if not st.failed:
                    st.failed = True
                    send(
                        Error(
                            code=ErrorCode.INFERENCE_FAILED,
                            message="backend exploded",
                            stream=stream,
                            retry_after_ms=250,
                            utterance=0,
                        )
                    )
                return
            st.last_seq = msg.seq
            st.nbytes += len(msg.pcm)
            st.chunks += 1
            with self.lock:
                self.audio[stream] += msg.pcm
            out: list[Any] = []
            if st.vad and not st.speaking:
                st.speaking = True
                out.append(Speech(stream=stream, event="start", at_ms=0, utterance=0))
            if st.interim:
                out.append(Partial(stream=stream, utterance=0, text=str(st.nbytes), seq=msg.seq))
            send(*out)
        elif isinstance(msg, Finish) and st.failed:
            del streams[stream]
            send(Closed(stream=stream, reason="finished"))
        elif isinstance(msg, Finish):
            del streams[stream]
            end_ms = st.nbytes * 1000 // (2 * st.rate)
            out = []
            if st.vad:
                out.append(
                    Speech(stream=stream, event="end", at_ms=end_ms, reason="finish", confidence=1)
                )
            out += [
                Final(
                    stream=stream,
                    utterance=0,
                    text=f"bytes={st.nbytes} rate={st.rate}",
                    start_ms=0,
                    end_ms=end_ms,
                    words=[Word("bytes", 0, end_ms, 1.0)],
                    confidence=0.9,
                ),
                Closed(
                    stream=stream,
                    reason="finished",
                    stats=StreamStats(audio_ms=end_ms, chunks=st.chunks, utterances=1),
                ),
            ]
            send(*out)
        elif isinstance(msg, Cancel):
            del streams[stream]
            send(Closed(stream=stream, reason="cancelled"))

    # --- control socket -----------------------------------------------------------------------

    def _serve_control(self, conn: socket.socket) -> None:
        reader: FrameReader[Any] = FrameReader(StatusRequest, 65536)
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                reader.feed(data)
                for msg in reader:
                    if isinstance(msg, StatusRequest):
                        conn.sendall(FrameWriter().encode(sample_status(str(self.path))))
        except OSError:
            return
        finally:
            conn.close()


def sample_status(sock: str) -> Status:
    def worker(role: str, lane: int, pid: int) -> WorkerStatus:
        return WorkerStatus(
            role=role,
            lane=lane,
            pid=pid,
            state="running",
            restarts=lane,
            heartbeat_age_s=0.2,
            cpus=[2 * lane, 2 * lane + 1],
            rss_bytes=50 * 1024 * 1024,
            counters={"chunks": 100 * (lane + 1)},
        )

    return Status(
        version="0.1.0",
        instance="default",
        pid=4242,
        uptime_s=3723.5,
        state="serving",
        backend="null",
        socket=sock,
        lanes=[
            LaneStatus(
                lane=n,
                workers=[worker("ingress", n, 5000 + 2 * n), worker("infer", n, 5001 + 2 * n)],
                audio_ring={"capacity": 8388608, "used": 4096},
            )
            for n in range(2)
        ],
        totals={"streams": 3, "connections": 2, "errors": 0},
    )


@pytest.fixture
def sock_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="asrd-t") as d:
        yield Path(d)


@pytest.fixture
def daemon(sock_dir: Path) -> Iterator[FakeDaemon]:
    d = FakeDaemon(sock_dir / "asrd.sock", control_path=sock_dir / "control.sock").start()
    yield d
    d.stop()


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2")
    return np.repeat(mono[:, None], channels, axis=1) if channels > 1 else mono


def write_wav(path: Path, seconds: float, rate: int, channels: int = 1, width: int = 2) -> Path:
    data = tone(seconds, rate, channels)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        if width == 2:
            w.writeframes(data.tobytes())
        else:
            w.writeframes(b"\x00" * width * channels * len(data))
    return path


# --- blocking client --------------------------------------------------------------------------


def test_hello_welcome(daemon: FakeDaemon) -> None:
    with Client.connect(daemon.path, client_name="unit-test", timeout=WAIT) as c:
        assert c.welcome is not None
        assert c.welcome.server == "fake-asrd"
        assert c.welcome.backend == "null"
        assert c.limits.sample_rates == list(SAMPLE_RATES)
        assert c.max_frame_bytes == 1024 * 1024
        assert c.ping(5, timeout=WAIT) > 0
    hello = daemon.messages(Hello)
    assert hello == [Hello(protocol=PROTOCOL_VERSION, client="unit-test")]


def test_default_socket_from_env(daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASRD_SOCKET", str(daemon.path))
    with Client.connect(timeout=WAIT) as c:
        assert c.path == str(daemon.path)


def test_missing_socket_message(sock_dir: Path) -> None:
    path = sock_dir / "nobody.sock"
    with pytest.raises(ClientError) as info:
        Client.connect(path, timeout=WAIT)
    assert info.value.code == "no_daemon"
    assert str(info.value.message) == f"no asrd listening on {path}: start it with `asrd run`"


def test_stale_socket_file_message(sock_dir: Path) -> None:
    # A socket file left behind by a dead daemon: connect() is refused.
    path = sock_dir / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    with pytest.raises(ClientError, match=r"no asrd listening on .*asrd run"):
        Client.connect(path, timeout=WAIT)


def test_auto_seq(daemon: FakeDaemon) -> None:
    with Client.connect(daemon.path, timeout=WAIT) as c:
        c.start("a", 16000, wait=True)
        assert [c.send_audio("a", b"\x00\x01" * 10) for _ in range(3)] == [0, 1, 2]
        assert c.send_audio("a", b"\x00\x00", seq=10) == 10
        assert c.send_audio("a", b"\x00\x00") == 11
        assert c.send_audio("a", b"") == 11  # nothing sent
        c.start("b", 8000)
        assert c.send_audio("b", b"\x00\x00") == 0  # per stream
        c.ping(1, timeout=WAIT)  # in order: everything above has been handled
    seqs = [(m.stream, m.seq) for m in daemon.messages(Audio)]
    assert seqs == [("a", 0), ("a", 1), ("a", 2), ("a", 10), ("a", 11), ("b", 0)]


def test_restarted_stream_numbers_from_zero(daemon: FakeDaemon) -> None:
    with Client.connect(daemon.path, timeout=WAIT) as c:
        c.transcribe(b"\x00\x00" * 3200, 16000, stream="x", timeout=WAIT)
        c.start("x", wait=True)
        assert c.send_audio("x", b"\x00\x00") == 0


def test_audio_split_at_frame_limit(sock_dir: Path) -> None:
    limit = 4096
    d = FakeDaemon(sock_dir / "small.sock", max_frame_bytes=limit).start()
    try:
        pcm = np.arange(25_000, dtype="<i2").tobytes()  # 50,000 bytes: 13 frames
        with Client.connect(d.path, timeout=WAIT) as c:
            c.start("s", wait=True)
            last = c.send_audio("s", pcm)
            c.send_audio("s", b"\x01\x00")
            c.ping(timeout=WAIT)
            errors = [m for m in iter(lambda: c.recv(0), None) if isinstance(m, Error)]
        assert errors == []
        audio = d.messages(Audio)
        assert last == len(audio) - 2
        assert [m.seq for m in audio] == list(range(len(audio)))
        assert b"".join(m.pcm for m in audio[:-1]) == pcm
        enc = msgspec.msgpack.Encoder()
        for m in audio:
            assert len(enc.encode(m)) <= limit
            assert len(m.pcm) % 2 == 0
        assert len(enc.encode(audio[0])) > limit - 16  # pieces fill the frame
    finally:
        d.stop()


def test_transcribe_happy_path(daemon: FakeDaemon) -> None:
    pcm = tone(1.0, 16000).tobytes()
    events: list[Any] = []
    with Client.connect(daemon.path, timeout=WAIT) as c:
        finals = c.transcribe(pcm, 16000, stream="t", chunk_ms=100, on_event=events.append)
    assert [f.text for f in finals] == ["bytes=32000 rate=16000"]
    assert isinstance(events[0], Started)
    assert isinstance(events[-1], Closed) and events[-1].reason == "finished"
    partials = [e for e in events if isinstance(e, Partial)]
    assert [p.seq for p in partials] == list(range(10))  # one per 100 ms chunk
    assert daemon.audio["t"] == pcm


def test_transcribe_module_function(daemon: FakeDaemon) -> None:
    finals = transcribe(b"\x00\x00" * 800, 8000, path=daemon.path, stream="m", timeout=WAIT)
    assert finals[0].text == "bytes=1600 rate=8000"


def test_transcribe_realtime_is_paced(daemon: FakeDaemon) -> None:
    import time

    t0 = time.monotonic()
    with Client.connect(daemon.path, timeout=WAIT) as c:
        c.transcribe(tone(0.3, 16000).tobytes(), chunk_ms=100, realtime=True, timeout=WAIT)
    assert time.monotonic() - t0 >= 0.2  # chunks at 0, 100, 200 ms


def test_transcribe_big_input_does_not_deadlock(daemon: FakeDaemon) -> None:
    # 8 MB of audio in 10 ms chunks: 25,000 Audio frames out and as many Partials back, far
    # more than both socket buffers hold.
    pcm = bytes(8_000_000)
    with Client.connect(daemon.path, timeout=WAIT) as c:
        finals = c.transcribe(pcm, 16000, chunk_ms=10, vad=VadOverrides(enabled=False))
    assert finals[0].text == "bytes=8000000 rate=16000"


def test_transcribe_error_raises(daemon: FakeDaemon) -> None:
    daemon.fail_streams.add("bad")
    with Client.connect(daemon.path, timeout=WAIT) as c:
        with pytest.raises(DaemonError) as info:
            c.transcribe(tone(0.5, 16000).tobytes(), stream="bad", timeout=WAIT)
        assert info.value.code == ErrorCode.INFERENCE_FAILED
        assert info.value.stream == "bad"
        assert info.value.retry_after_ms == 250
        assert isinstance(info.value, ClientError)
        # The connection is still usable.
        assert c.transcribe(b"\x00\x00" * 1600, stream="good", timeout=WAIT)[0].text.startswith(
            "bytes=3200"
        )
        # Reusing the failed name: audio still in flight for the old stream draws
        # unknown_stream errors ahead of the new Started; they are not this stream's.
        daemon.fail_streams.clear()
        c.send_audio("bad", b"\x00\x00")
        finals = c.transcribe(b"\x00\x00" * 160, stream="bad", timeout=WAIT)
        assert finals[0].text == "bytes=320 rate=16000"
        assert c.recv(0) is None


def test_transcribe_non_fatal_error_waits_for_closed(daemon: FakeDaemon) -> None:
    daemon.drain_streams.add("d")
    with Client.connect(daemon.path, timeout=WAIT) as c:
        with pytest.raises(DaemonError) as info:
            c.transcribe(bytes(32000), stream="d", timeout=WAIT)
        assert info.value.code == ErrorCode.SHUTTING_DOWN
        assert [f.text for f in info.value.finals] == ["before"]
        c.send_audio("d", b"\x00\x00")  # as if still in flight when the stream closed
        c.ping(timeout=WAIT)
        # Its unknown_stream error was dropped as noise.
        assert c.recv(0) is None
        c.send_audio("never-started", b"\x00\x00")
        err = c.recv(WAIT)
        assert isinstance(err, Error) and err.code == ErrorCode.UNKNOWN_STREAM


def test_bad_sequence_is_not_fatal(daemon: FakeDaemon) -> None:
    with Client.connect(daemon.path, timeout=WAIT) as c:
        c.start("q", wait=True)
        c.send_audio("q", b"\x00\x00", seq=5)
        c.send_audio("q", b"\x00\x00", seq=5)
        c.finish("q")
        got = [c.recv(WAIT) for _ in range(5)]
    kinds = [type(m).__name__ for m in got]
    assert kinds == ["Speech", "Partial", "Error", "Speech", "Final"]


def test_start_error_and_unsupported_rate(daemon: FakeDaemon) -> None:
    with Client.connect(daemon.path, timeout=WAIT) as c:
        with pytest.raises(DaemonError) as info:
            c.start("r", 44100, wait=True)
        assert info.value.code == ErrorCode.UNSUPPORTED_SAMPLE_RATE
        with pytest.raises(DaemonError, match="unsupported_sample_rate"):
            c.transcribe(b"\x00\x00" * 100, 22050, stream="r2", timeout=WAIT)


def test_odd_byte_count_rejected_locally(daemon: FakeDaemon) -> None:
    with Client.connect(daemon.path, timeout=WAIT) as c, pytest.raises(ClientError) as info:
        c.transcribe(b"\x00\x00\x00")
    assert info.value.code == ErrorCode.ODD_BYTE_COUNT


def test_other_streams_messages_are_kept(daemon: FakeDaemon) -> None:
    with Client.connect(daemon.path, timeout=WAIT) as c:
        c.start("other", wait=True)
        c.send_audio("other", b"\x00\x00")
        c.ping(9, timeout=WAIT)  # the Partial for "other" is queued behind us
        c.transcribe(b"\x00\x00" * 160, stream="mine", timeout=WAIT)
        kept = list(iter(lambda: c.recv(0), None))
    assert any(isinstance(m, Partial) and m.stream == "other" for m in kept)
    assert any(isinstance(m, Pong) and m.id == 9 for m in kept) is False  # ping consumed it
    assert not any(getattr(m, "stream", None) == "mine" for m in kept)


def test_cancel(daemon: FakeDaemon) -> None:
    with Client.connect(daemon.path, timeout=WAIT) as c:
        c.start("c")
        c.cancel("c")
        msg = c.wait_for(lambda m: isinstance(m, Closed), WAIT)
    assert isinstance(msg, Closed) and msg.reason == "cancelled"


def test_recv_timeout_and_close(daemon: FakeDaemon) -> None:
    with Client.connect(daemon.path, timeout=WAIT) as c:
        assert c.recv(0.01) is None
        c._send(Start(stream="x"))
        c._send(Start(stream="x"))  # duplicate
        msgs = [c.recv(WAIT), c.recv(WAIT)]
        assert isinstance(msgs[0], Started)
        assert isinstance(msgs[1], Error) and msgs[1].code == ErrorCode.DUPLICATE_STREAM
        # The daemon closes on a frame over the limit: Error, then end of stream.
        c._sock.sendall((2 * 1024 * 1024).to_bytes(4, "big"))
        got = list(c)  # iteration ends at EOF
        assert [m.code for m in got if isinstance(m, Error)] == [ErrorCode.FRAME_TOO_LARGE]
        with pytest.raises(ConnectionClosed):
            c.recv(WAIT)


def test_unknown_message_type_is_skipped(daemon: FakeDaemon) -> None:
    daemon.raw_before_pong = FrameWriter().encode({"type": "from_the_future", "x": 1})
    with Client.connect(daemon.path, timeout=WAIT) as c:
        c.ping(3, wait=False)
        assert c.recv(WAIT) == Pong(id=3)


def test_hello_rejected(sock_dir: Path) -> None:
    # A daemon that answers Hello with an Error (e.g. too many connections).
    path = sock_dir / "busy.sock"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    lsock.listen(1)

    def serve() -> None:
        conn, _ = lsock.accept()
        conn.recv(1024)
        conn.sendall(
            FrameWriter().encode(
                Error(code=ErrorCode.TOO_MANY_CONNECTIONS, message="full", retry_after_ms=100)
            )
        )
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(DaemonError) as info:
            Client.connect(path, timeout=WAIT)
        assert info.value.code == ErrorCode.TOO_MANY_CONNECTIONS
        assert info.value.retry_after_ms == 100
    finally:
        t.join(WAIT)
        lsock.close()


def test_connect_times_out_without_welcome(sock_dir: Path) -> None:
    path = sock_dir / "mute.sock"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    lsock.listen(1)
    try:
        with pytest.raises(ClientError) as info:
            Client.connect(path, timeout=0.2)
        assert info.value.code == "timeout"
    finally:
        lsock.close()


# --- control socket ---------------------------------------------------------------------------


def test_control_status(daemon: FakeDaemon) -> None:
    st = ControlClient.status(daemon.control_path, timeout=WAIT)
    assert st == sample_status(str(daemon.path))


def test_control_status_missing(sock_dir: Path) -> None:
    with pytest.raises(ClientError, match="no asrd control socket listening on"):
        ControlClient.status(sock_dir / "none.sock", timeout=WAIT)


# --- async client -----------------------------------------------------------------------------


Run = Callable[[Any], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Run a coroutine, bounded, on asyncio's own loop or on uvloop's."""
    runner = uvloop.run if request.param == "uvloop" else asyncio.run

    def run(coro: Any) -> Any:
        async def bounded() -> Any:
            return await asyncio.wait_for(coro, WAIT)

        return runner(bounded())

    return run


def test_async_hello_seq_split_and_ping(sock_dir: Path, run: Run) -> None:
    d = FakeDaemon(sock_dir / "a.sock", max_frame_bytes=4096).start()

    async def main() -> None:
        async with await AsyncClient.connect(d.path, client_name="aio") as c:
            assert c.welcome is not None and c.welcome.server == "fake-asrd"
            started = await c.start("s", wait=True)
            assert started == Started(stream="s", lane=0)
            assert await c.send_audio("s", b"\x00\x00") == 0
            assert await c.send_audio("s", bytes(10_000)) == 3  # split in three
            assert await c.send_audio("s", b"\x00\x00", seq=100) == 100
            assert await c.ping(7) > 0
            await c.finish("s")
            kinds = []
            async for msg in c:
                kinds.append(type(msg).__name__)
                if isinstance(msg, Closed):
                    break
            assert kinds[-2:] == ["Final", "Closed"]

    try:
        run(main())
        assert [m.seq for m in d.messages(Audio)] == [0, 1, 2, 3, 100]
        assert d.messages(Hello)[0].client == "aio"
    finally:
        d.stop()


def test_async_transcribe_and_error(daemon: FakeDaemon, run: Run) -> None:
    daemon.fail_streams.add("bad")
    events: list[Any] = []

    async def main() -> None:
        c = await AsyncClient.connect(daemon.path)
        try:
            pcm = tone(0.5, 16000).tobytes()
            finals = await c.transcribe(pcm, 16000, stream="ok", on_event=events.append)
            assert [f.text for f in finals] == ["bytes=16000 rate=16000"]
            big = await c.transcribe(bytes(4_000_000), chunk_ms=10, stream="big")
            assert big[0].text == "bytes=4000000 rate=16000"
            with pytest.raises(DaemonError) as info:
                await c.transcribe(pcm, stream="bad", timeout=WAIT)
            assert info.value.code == ErrorCode.INFERENCE_FAILED
            assert await c.recv(0.01) is None
        finally:
            await c.close()

    run(main())
    assert [p.seq for p in events if isinstance(p, Partial)] == [0, 1, 2, 3, 4]


def test_async_missing_socket(sock_dir: Path, run: Run) -> None:
    with pytest.raises(ClientError, match=r"no asrd listening on .*start it with `asrd run`"):
        run(AsyncClient.connect(sock_dir / "none.sock"))


def test_async_connection_closed(daemon: FakeDaemon, run: Run) -> None:
    async def main() -> None:
        c = await AsyncClient.connect(daemon.path)
        c._conn.write((1 << 30).to_bytes(4, "big"))
        msgs = [m async for m in c]
        assert isinstance(msgs[-1], Error) and msgs[-1].code == ErrorCode.FRAME_TOO_LARGE
        with pytest.raises(ConnectionClosed):
            await c.recv()
        await c.close()

    run(main())


# --- the example client in docs/protocol.md ---------------------------------------------------


def test_doc_example_client(daemon: FakeDaemon, sock_dir: Path, capsys: Any) -> None:
    text = (REPO / "docs" / "protocol.md").read_text()
    code = re.search(r"<!-- example-client -->\s*```python\n(.*?)```", text, re.S)
    assert code, "example client block not found in docs/protocol.md"
    raw = sock_dir / "audio.raw"
    raw.write_bytes(tone(0.35, 16000).tobytes())
    # The example uses the `msgpack` package; msgspec's msgpack codec stands in for it.
    shim = types.ModuleType("msgpack")
    shim.packb = msgspec.msgpack.encode  # type: ignore[attr-defined]
    shim.unpackb = msgspec.msgpack.decode  # type: ignore[attr-defined]
    saved = sys.modules.get("msgpack")
    sys.modules["msgpack"] = shim
    argv = sys.argv
    sys.argv = ["example.py", str(daemon.path), str(raw)]
    try:
        exec(compile(code.group(1), "protocol.md:example", "exec"), {"__name__": "__main__"})
    finally:
        sys.argv = argv
        if saved is None:
            del sys.modules["msgpack"]
        else:
            sys.modules["msgpack"] = saved
    out = capsys.readouterr().out
    assert "final: bytes=11200 rate=16000" in out
    assert [m.seq for m in daemon.messages(Audio)] == [0, 1, 2, 3]


# --- asrctl -----------------------------------------------------------------------------------


class TtyIO(io.StringIO):
    def isatty(self) -> bool:
        return True


def ctl(argv: list[str], capsys: Any) -> tuple[int, str, str]:
    rc = asrctl.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_asrctl_json(daemon: FakeDaemon, tmp_path: Path, capsys: Any) -> None:
    wav = write_wav(tmp_path / "tone.wav", 0.5, 16000)
    rc, out, err = ctl(["transcribe", str(wav), "--socket", str(daemon.path), "--json"], capsys)
    assert rc == 0, err
    events = [msgspec.json.decode(line) for line in out.splitlines()]
    assert all(e["file"] == str(wav) for e in events)
    types_ = [e["type"] for e in events]
    assert types_[0] == "started" and types_[-1] == "closed"
    assert types_.count("partial") == 5
    final = next(e for e in events if e["type"] == "final")
    assert final["text"] == "bytes=16000 rate=16000"
    assert final["words"] == [["bytes", 0, 500, 1.0]]


def test_asrctl_plain(daemon: FakeDaemon, tmp_path: Path, capsys: Any) -> None:
    wav = write_wav(tmp_path / "tone.wav", 0.5, 16000)
    rc, out, err = ctl(["transcribe", str(wav), "--socket", str(daemon.path)], capsys)
    assert rc == 0, err
    assert out == f"{wav}: bytes=16000 rate=16000\n"
    # Plain output without --partials does not even ask for partials.
    assert daemon.messages(Start)[0].interim is False
    assert daemon.messages(Partial) == []


def test_asrctl_plain_partials_and_options(daemon: FakeDaemon, tmp_path: Path, capsys: Any) -> None:
    wav = write_wav(tmp_path / "tone.wav", 0.2, 16000)
    argv = ["transcribe", str(wav), "--socket", str(daemon.path), "--partials", "--no-vad"]
    rc, out, _ = ctl([*argv, "--chunk-ms", "50"], capsys)
    assert rc == 0
    lines = out.splitlines()
    assert lines[:4] == [f"{wav} (partial): {n}" for n in (1600, 3200, 4800, 6400)]
    assert lines[4] == f"{wav}: bytes=6400 rate=16000"
    start = daemon.messages(Start)[0]
    assert start.vad == VadOverrides(enabled=False)
    assert start.interim is True


def test_asrctl_several_files_one_connection(
    daemon: FakeDaemon, tmp_path: Path, capsys: Any
) -> None:
    a = write_wav(tmp_path / "a.wav", 0.3, 16000)
    b = write_wav(tmp_path / "b.wav", 0.6, 8000)
    rc, out, err = ctl(["transcribe", str(a), str(b), "--socket", str(daemon.path)], capsys)
    assert rc == 0, err
    assert sorted(out.splitlines()) == [
        f"{a}: bytes=9600 rate=16000",
        f"{b}: bytes=9600 rate=8000",
    ]
    assert len(daemon.messages(Hello)) == 1
    # Interleaved: b's first chunk goes out before a's last.
    order = [m.stream for m in daemon.messages(Audio)]
    assert order.index("f1") < len(order) - 1 - order[::-1].index("f0")


def test_asrctl_stereo_8k_44k(daemon: FakeDaemon, tmp_path: Path, capsys: Any) -> None:
    stereo = write_wav(tmp_path / "stereo.wav", 1.0, 16000, channels=2)
    rc, out, err = ctl(["transcribe", str(stereo), "--socket", str(daemon.path)], capsys)
    assert rc == 0
    assert "stereo, downmixed to mono" in err
    assert out.strip().endswith("bytes=32000 rate=16000")
    assert daemon.audio["f0"] == tone(1.0, 16000).tobytes()  # both channels equal: exact

    narrow = write_wav(tmp_path / "8k.wav", 1.0, 8000)
    rc, out, err = ctl(["transcribe", str(narrow), "--socket", str(daemon.path)], capsys)
    assert rc == 0 and "resampl" not in err
    assert out.strip().endswith("bytes=16000 rate=8000")

    cd = write_wav(tmp_path / "44k.wav", 1.0, 44100)
    rc, out, err = ctl(["transcribe", str(cd), "--socket", str(daemon.path)], capsys)
    assert rc == 0
    assert "44100 Hz, resampled to 16000 Hz client-side" in err
    assert out.strip().endswith("bytes=32000 rate=16000")


def test_asrctl_resamples_to_the_daemons_rates(sock_dir: Path, tmp_path: Path, capsys: Any) -> None:
    d = FakeDaemon(sock_dir / "n.sock", sample_rates=(16000,)).start()
    try:
        wav = write_wav(tmp_path / "48k.wav", 0.5, 48000)
        rc, out, err = ctl(["transcribe", str(wav), "--socket", str(d.path)], capsys)
    finally:
        d.stop()
    assert rc == 0, err
    assert "48000 Hz, resampled" in err
    assert out.strip().endswith("bytes=16000 rate=16000")


def test_asrctl_bad_files(daemon: FakeDaemon, tmp_path: Path, capsys: Any) -> None:
    eight = write_wav(tmp_path / "u8.wav", 0.1, 16000, width=1)
    rc, _, err = ctl(["transcribe", str(eight), "--socket", str(daemon.path)], capsys)
    assert rc == 2
    assert "8-bit samples; asrd takes 16-bit PCM" in err
    notwav = tmp_path / "x.wav"
    notwav.write_bytes(b"hello, not a wav")
    rc, _, err = ctl(["transcribe", str(notwav), "--socket", str(daemon.path)], capsys)
    assert rc == 2 and "not a 16-bit PCM WAV file" in err
    rc, _, err = ctl(["transcribe", str(tmp_path / "nope.wav")], capsys)
    assert rc == 2 and "no such file" in err
    assert daemon.messages(Hello) == []  # bad input is found before connecting


def test_asrctl_connection_error(sock_dir: Path, tmp_path: Path, capsys: Any) -> None:
    wav = write_wav(tmp_path / "t.wav", 0.1, 16000)
    path = sock_dir / "none.sock"
    rc, out, err = ctl(["transcribe", str(wav), "--socket", str(path)], capsys)
    assert rc == 2
    assert f"no asrd listening on {path}: start it with `asrd run`" in err
    assert out == ""


def test_asrctl_stream_failure(daemon: FakeDaemon, tmp_path: Path, capsys: Any) -> None:
    daemon.fail_streams.add("f1")
    a = write_wav(tmp_path / "a.wav", 0.3, 16000)
    b = write_wav(tmp_path / "b.wav", 0.3, 16000)
    rc, out, err = ctl(["transcribe", str(a), str(b), "--socket", str(daemon.path)], capsys)
    assert rc == 1
    assert out == f"{a}: bytes=9600 rate=16000\n"
    assert f"{b}: error inference_failed: backend exploded" in err


def test_asrctl_terminal_view(
    daemon: FakeDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wav = write_wav(tmp_path / "long.wav", 12.0, 8000)  # long enough for a progress indication
    out, err = TtyIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    assert asrctl.main(["transcribe", str(wav), "--socket", str(daemon.path)]) == 0
    text = out.getvalue()
    assert "\r\x1b[2K" in text  # partials rewritten in place
    assert "\r\x1b[2K192000" in text  # the last partial (no prefix: one file)
    assert text.endswith("\r\x1b[2Kbytes=192000 rate=8000\n")  # live line gone, final kept
    assert daemon.messages(Start)[0].interim is True


def test_asrctl_progress_on_stderr(
    daemon: FakeDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wav = write_wav(tmp_path / "long.wav", 12.0, 8000)
    out, err = io.StringIO(), TtyIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    r = asrctl.Renderer(
        [asrctl.FileStream(asrctl.load_wav(wav), "f0", str(wav))],
        json=False,
        partials=False,
        out=out,
        err=err,
    )
    r.files[0].sent = len(r.files[0].audio.pcm) // 2
    r.progress()
    r.files[0].sent = len(r.files[0].audio.pcm)
    r.progress()
    r.close()
    assert err.getvalue() == "\r[ 50%] audio sent\r\x1b[2K"
    # On a terminal, the percentage leads the live line instead.
    tty = TtyIO()
    r = asrctl.Renderer(r.files, json=False, partials=False, out=tty, err=io.StringIO())
    r.files[0].sent = len(r.files[0].audio.pcm) // 4
    r.progress()
    r.event(r.files[0], Partial(stream="f0", utterance=1, text="hello"))
    assert tty.getvalue() == "\r\x1b[2K[ 25%] \r\x1b[2K[ 25%] hello"
    assert asrctl.main(["transcribe", str(wav), "--socket", str(daemon.path)]) == 0
    assert out.getvalue() == f"{wav}: bytes=192000 rate=8000\n"


def test_asrctl_status(daemon: FakeDaemon, capsys: Any) -> None:
    rc, out, err = ctl(["status", "--control-socket", str(daemon.control_path)], capsys)
    assert rc == 0, err
    assert "asrd 0.1.0  instance default  pid 4242  serving  up 01:02:03" in out
    assert re.search(r"LANE\s+ROLE\s+PID\s+STATE\s+RESTARTS\s+HEARTBEAT\s+CPUS\s+RSS", out)
    assert re.search(r"1\s+infer\s+5003\s+running\s+1\s+0\.2s ago\s+2-3\s+50\.0 MiB", out)
    assert "streams" in out and "lane 0 audio: capacity=8388608  used=4096" in out
    rc, out, _ = ctl(["status", "--json", "--control-socket", str(daemon.control_path)], capsys)
    assert rc == 0
    assert msgspec.json.decode(out, type=Status) == sample_status(str(daemon.path))


def test_asrctl_status_missing(sock_dir: Path, capsys: Any) -> None:
    rc, _, err = ctl(["status", "--control-socket", str(sock_dir / "no.sock")], capsys)
    assert rc == 2 and "no asrd control socket listening on" in err


def test_asrctl_ping(daemon: FakeDaemon, capsys: Any) -> None:
    rc, out, _ = ctl(["ping", "--socket", str(daemon.path), "--count", "3"], capsys)
    assert rc == 0
    assert out.startswith("pong from fake-asrd") and "3 round trips" in out
    assert [m.id for m in daemon.messages(Ping)] == [0, 1, 2]


def test_asrctl_usage(capsys: Any) -> None:
    rc, out, _ = ctl(["--help"], capsys)
    assert rc == 0 and "examples:" in out
    rc, out, _ = ctl(["transcribe", "--help"], capsys)
    assert rc == 0 and "--no-vad" in out and "examples:" in out
    rc, _, err = ctl(["transcribe"], capsys)
    assert rc == 2 and "FILE" in err
    rc, _, err = ctl(["transcribe", "x.wav", "--chunk-ms", "0"], capsys)
    assert rc == 2 and "at least 1" in err
    rc, _, _ = ctl([], capsys)
    assert rc == 2


def test_asrctl_status_helpers() -> None:
    assert asrctl._cpus([8, 0, 1, 2, 3]) == "0-3,8"
    assert asrctl._cpus([]) == "-"
    assert asrctl._bytes(None) == "-" and asrctl._bytes(3 * 1024**3) == "3.0 GiB"
    assert asrctl._duration(90061) == "1d 01:01:01"
