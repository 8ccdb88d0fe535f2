"""Ingress worker: client connections, protocol, limits, resampling and VAD for one lane.

Threading model: one asyncio event loop (uvloop's by default: ``io.client_loop``). Client
sockets are ``BufferedProtocol`` connections accepted on the listening socket shared by every
lane's ingress worker (the kernel gives each connection to one of them). Speech goes to the
lane's audio ring, the chunks of one loop iteration as one record; results come back through
the result ring, whose eventfd is registered with the loop. Socket writes are batched: messages
are encoded as they are produced and written once per loop iteration, except the results
drained from the result ring, which are written at the end of that drain (one callback covers
them all).

Liveness: a task beats the heartbeat every ``heartbeat_interval_s``; a beat older than
``heartbeat_timeout_s`` means the loop is blocked, and the supervisor replaces the worker.

Backpressure: when the audio ring is full, records wait in an in-process backlog (never
dropped); past ``BACKLOG_PAUSE_BYTES`` the worker stops reading from every client socket until
the infer worker catches up, so clients feel it as a slow socket.

Signals (enqueued on the loop): SIGTERM drains (no new connections or streams; open utterances
get their finals, then ``Closed(reason="shutdown")``); SIGUSR1 from the supervisor says the
lane's infer worker died: streams with an utterance in flight get ``worker_restarted``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec
import numpy as np
import soxr

from daemon.config import VadConfig, vad_with_overrides
from daemon.errors import ConfigError
from daemon.placement import choose_client_loop
from ipc import protocol as p
from ipc import records as rec
from ipc.framing import BadFrame, FrameReader, FrameTooLarge, FrameWriter
from ipc.heartbeat import INGRESS_COUNTERS, WorkerState
from workers.backends.base import SAMPLE_RATE
from workers.balance import LaneBalancer
from workers.common import LaneWorker, parent_alive, read_live_config, setup_process
from workers.faults import FaultInjector
from workers.spec import WorkerSpec, load_spec
from workers.vad import SpeechAudio, SpeechEnd, SpeechStart, StreamVad, VadCounters

log = logging.getLogger("asrd.ingress")

BACKLOG_PAUSE_BYTES = 4 * 1024 * 1024
MAX_UNREAD_BYTES = 8 * 1024 * 1024
ACCEPT_RECHECK_S = 0.02
_CONNECTIONS = INGRESS_COUNTERS.index("connections")
_STREAMS = INGRESS_COUNTERS.index("streams")
# Counter name -> the VadCounters field summed over the worker's streams, ended and live.
VAD_TOTALS = (
    ("speech_frames", "speech_frames"),
    ("silence_frames", "silence_frames"),
    ("vad_discarded", "discarded"),
    ("cut_silence", "cut_silence"),
    ("cut_max_length", "cut_max_length"),
    ("cut_finish", "cut_finish"),
)
MAX_STREAM_ID = 256
ENCODINGS = ("s16le",)


@dataclass(slots=True)
class Utterance:
    start_ms: int
    end_ms: int = -1


@dataclass(slots=True, eq=False)
class Stream:
    id: str
    key: int
    conn: Connection
    sample_rate: int
    vad: StreamVad
    resampler: Any  # soxr.ResampleStream | None
    interim_ms: int
    last_seq: int = -1
    chunks: int = 0
    samples_in: int = 0
    open_utterance: int = 0
    pending: dict[int, Utterance] = field(default_factory=dict)
    finishing: bool = False
    close_reason: str = "finished"
    told_shutdown: bool = False


def to_pcm16(samples: np.ndarray) -> bytes:
    out: bytes = np.rint(samples).clip(-32768, 32767).astype(np.int16).tobytes()
    return out


class Connection(asyncio.BufferedProtocol):
    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress
        self.reader: FrameReader[p.ClientMessage] = FrameReader(
            p.ClientMessage, ingress.config.limits.max_frame_bytes
        )
        self.writer = FrameWriter()
        self.transport: asyncio.Transport | None = None
        self.streams: dict[str, Stream] = {}
        self.greeted = False
        self.closing = False
        self.peer = "?"

    # asyncio callbacks ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Duck-typed: uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                pid, uid, _gid = struct.unpack("3i", creds)
                self.peer = f"pid {pid} uid {uid}"
            except OSError:
                pass
        self.ingress.connection_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.reader.buffer_updated(nbytes)
        ingress = self.ingress
        on_audio = ingress.on_audio
        Audio = p.Audio
        try:
            for msg in self.reader:
                if self.closing:
                    break
                try:
                    if type(msg) is Audio:  # most frames: straight to their handler
                        on_audio(self, msg)
                    else:
                        ingress.handle(self, msg)
                except Exception:
                    # A bug must cost one message, not the connection or the worker.
                    log.exception("failed to handle %s from %s", type(msg).__name__, self.peer)
                    ingress.stream_error(
                        self,
                        getattr(msg, "stream", None),
                        p.ErrorCode.INTERNAL,
                        f"internal error handling {type(msg).__name__.lower()}; see the "
                        "daemon's log",
                    )
        except FrameTooLarge as exc:
            ingress.counters["bad_frames"] += 1
            self.fail(p.ErrorCode.FRAME_TOO_LARGE, f"{exc}; closing the connection")

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.ingress.connection_lost(self)

    # helpers -------------------------------------------------------------------------------------
    def send(self, msg: Any) -> None:
        if self.transport is None or self.closing:
            return
        self.writer.append(msg)
        self.ingress.mark_dirty(self)

    def flush(self) -> None:
        transport = self.transport
        if transport is None or not len(self.writer):
            return
        transport.write(self.writer.take())
        if transport.get_write_buffer_size() > MAX_UNREAD_BYTES:
            # A client that does not read cannot be told; drop it so it cannot hold our memory.
            log.warning(
                "%s left %d bytes of results unread: dropping the connection",
                self.peer,
                transport.get_write_buffer_size(),
            )
            self.closing = True
            transport.abort()

    def fail(self, code: str, message: str) -> None:
        """Fatal connection error: say why, then close."""
        self.send(p.Error(code=code, message=message))
        self.ingress.counters["errors_sent"] += 1
        self.flush()
        self.closing = True
        if self.transport is not None:
            self.transport.close()


class Ingress(LaneWorker):
    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self.config = spec.config
        self.lane = spec.lane
        self.counters = dict.fromkeys(INGRESS_COUNTERS, 0)
        self.faults = FaultInjector(spec.config.faults, "ingress", spec.lane, spec.generation)
        self.connections: set[Connection] = set()
        self.by_key: dict[int, Stream] = {}
        self.next_key = 0
        # Totals of streams that have ended (live streams count their own, summed at publish).
        self.ended_chunks = 0
        self.ended_samples = 0
        self.ended_vad = VadCounters()
        lanes = max(1, spec.lanes)
        limits = self.config.limits
        self.max_connections = -(-limits.max_connections // lanes)
        self.max_streams = -(-limits.max_streams // lanes)
        self.welcome = p.Welcome(
            protocol=p.PROTOCOL_VERSION,
            limits=p.Limits(
                max_frame_bytes=limits.max_frame_bytes,
                max_streams_per_connection=limits.max_streams_per_connection,
                sample_rates=list(p.SAMPLE_RATES),
                encodings=list(ENCODINGS),
            ),
            backend=self.config.backend.kind,
        )
        # This loop iteration's audio chunks, pushed as one AUDIO_BATCH record by flush().
        self.batch_keys: list[int] = []
        self.batch_seqs: list[int] = []
        self.batch_pcms: list[bytes] = []
        self.batch_bytes = rec.audio_batch_bytes(0, 0)
        self.batch_limit = self.audio.max_payload
        self.backlog: deque[tuple[int, int, int, bytes]] = deque()
        self.backlog_bytes = 0
        self.paused = False
        self.signal_audio = False
        self.dirty: set[Connection] = set()
        self.flush_scheduled = False
        self.draining_results = False  # on_results writes what it produced itself
        self.draining = False
        self.stopped: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.listen_sock: socket.socket | None = None
        self.accepting = False
        self.accepted_pending = 0  # accepted, transport not made yet
        self.balancer = LaneBalancer(
            self.table, spec.lanes, spec.lane, stale_after_s=self.config.heartbeat_timeout_s
        )
        self._enc = msgspec.msgpack.Encoder()
        self._partial_dec = msgspec.msgpack.Decoder(rec.PartialResult)
        self._partials_dec = msgspec.msgpack.Decoder(list[rec.BatchedPartial])
        self._final_dec = msgspec.msgpack.Decoder(rec.FinalResult)
        self._error_dec = msgspec.msgpack.Decoder(rec.UtteranceError)

    # --- lifecycle ------------------------------------------------------------------------------
    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.stopped = asyncio.Event()
        sock = socket.socket(fileno=self.spec.listen_fd)
        sock.setblocking(False)
        self.listen_sock = sock
        self.resume_accepting()
        loop.add_reader(self.result_data.fileno(), self.on_results)
        loop.add_reader(self.audio_space.fileno(), self.on_audio_space)
        loop.add_signal_handler(signal.SIGTERM, self.start_drain)
        loop.add_signal_handler(signal.SIGUSR1, self.infer_restarted)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.push(rec.RESET, self.spec.generation, 0, b"")
        self.slot.set_state(WorkerState.RUNNING)
        heartbeat = asyncio.create_task(self.heartbeat())
        log.info("accepting connections (%s event loop)", loop_name(loop))
        self.on_results()  # results that arrived before we registered
        await self.stopped.wait()
        heartbeat.cancel()
        self.slot.set_state(WorkerState.STOPPED)
        self.publish()
        for conn in list(self.connections):
            conn.flush()
            if conn.transport is not None:
                conn.transport.close()
        self.pause_accepting()
        loop.remove_reader(self.result_data.fileno())
        loop.remove_reader(self.audio_space.fileno())
        # Let closing transports write what they still buffer (bounded: a client that does not
        # read cannot hold the exit up).
        deadline = loop.time() + 2.0
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return 0

    async def heartbeat(self) -> None:
        interval = self.config.heartbeat_interval_s
        while True:
            self.publish()
            if not parent_alive(self.spec):
                log.error("supervisor died; exiting")
                assert self.stopped is not None
                self.stopped.set()
                return
            if self.backlog:
                self.flush_backlog()  # a lost wake-up must not stall the lane
            await asyncio.sleep(interval)

    def publish(self) -> None:
        c = self.counters
        c["connections"] = len(self.connections)
        c["streams"] = len(self.by_key)
        streams = self.by_key.values()
        c["chunks"] = self.ended_chunks + sum(s.chunks for s in streams)
        c["audio_bytes"] = 2 * (self.ended_samples + sum(s.samples_in for s in streams))
        live = [s.vad.counters for s in streams]
        for name, attr in VAD_TOTALS:
            c[name] = getattr(self.ended_vad, attr) + sum(getattr(v, attr) for v in live)
        c["pending_records"] = len(self.backlog)
        self.slot.beat(time.monotonic())
        self.slot.publish(list(c.values()))

    def start_drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        log.info("draining: %d connections, %d streams", len(self.connections), len(self.by_key))
        self.slot.set_state(WorkerState.DRAINING)
        self.pause_accepting()
        for stream in list(self.by_key.values()):
            self.finish_stream(stream, reason="shutdown")
        for conn in list(self.connections):
            if not conn.streams:
                conn.flush()
                if conn.transport is not None:
                    conn.transport.close()
        self.check_drained()

    def check_drained(self) -> None:
        if self.draining and not self.by_key and self.stopped is not None:
            self.stopped.set()

    # --- accepting ------------------------------------------------------------------------------
    def load(self) -> int:
        return len(self.connections) + self.accepted_pending + len(self.by_key)

    def publish_load(self) -> None:
        """Connections and streams, at once: the other lanes balance on them."""
        self.slot.set_counter(_CONNECTIONS, len(self.connections) + self.accepted_pending)
        self.slot.set_counter(_STREAMS, len(self.by_key))

    def resume_accepting(self) -> None:
        if self.accepting or self.draining or self.listen_sock is None or self.loop is None:
            return
        self.accepting = True
        self.loop.add_reader(self.listen_sock.fileno(), self.on_acceptable)

    def pause_accepting(self) -> None:
        if self.accepting and self.listen_sock is not None and self.loop is not None:
            self.accepting = False
            self.loop.remove_reader(self.listen_sock.fileno())

    def on_acceptable(self) -> None:
        assert self.listen_sock is not None and self.loop is not None
        for _ in range(64):  # bounded, so a connection storm cannot starve the audio
            if not self.balancer.should_accept(self.load()):
                # Busier than another lane: let it take the next connections; look again soon.
                self.pause_accepting()
                self.loop.call_later(ACCEPT_RECHECK_S, self.resume_accepting)
                return
            try:
                sock, _ = self.listen_sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: say so, back off, keep serving
                log.error("accept failed: %s; retrying in 0.1 s", exc)
                self.pause_accepting()
                self.loop.call_later(0.1, self.resume_accepting)
                return
            sock.setblocking(False)
            self.accepted_pending += 1
            self.publish_load()
            self.loop.create_task(self.loop.connect_accepted_socket(lambda: Connection(self), sock))

    # --- connections ----------------------------------------------------------------------------
    def connection_made(self, conn: Connection) -> None:
        self.counters["connections_total"] += 1
        self.accepted_pending -= 1
        if self.draining:
            conn.fail(p.ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
            return
        if len(self.connections) >= self.max_connections:
            conn.fail(
                p.ErrorCode.TOO_MANY_CONNECTIONS,
                f"this lane already serves {len(self.connections)} connections "
                f"(limits.max_connections = {self.config.limits.max_connections} over "
                f"{self.spec.lanes} lanes)",
            )
            return
        self.connections.add(conn)
        self.publish_load()

    def connection_lost(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.dirty.discard(conn)
        for stream in list(conn.streams.values()):
            self.abandon(stream)
        conn.streams.clear()
        self.publish_load()
        self.check_drained()

    def mark_dirty(self, conn: Connection) -> None:
        self.dirty.add(conn)
        if not self.flush_scheduled and not self.draining_results and self.loop is not None:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Once per loop iteration: one socket write per connection, one ring wake-up."""
        self.flush_scheduled = False
        self.flush_audio()
        self.write_dirty()
        if self.signal_audio:
            self.signal_audio = False
            if self.audio.consumer_sleeping():
                self.audio_data.signal()

    def write_dirty(self) -> None:
        dirty, self.dirty = self.dirty, set()
        for conn in dirty:
            conn.flush()

    def stream_error(self, conn: Connection, stream: str | None, code: str, message: str) -> None:
        self.counters["errors_sent"] += 1
        conn.send(p.Error(code=code, message=message, stream=stream))

    # --- client messages ------------------------------------------------------------------------
    def handle(self, conn: Connection, msg: p.ClientMessage | BadFrame) -> None:
        """Every message but Audio, which Connection.buffer_updated hands to on_audio."""
        if isinstance(msg, BadFrame):
            self.counters["bad_frames"] += 1
            self.stream_error(conn, None, msg.code, msg.message)
        elif not conn.greeted:
            if isinstance(msg, p.Hello):
                if msg.protocol != p.PROTOCOL_VERSION:
                    conn.fail(
                        p.ErrorCode.UNSUPPORTED_PROTOCOL,
                        f"protocol {msg.protocol} is not supported; this daemon speaks "
                        f"protocol {p.PROTOCOL_VERSION}",
                    )
                    return
                conn.greeted = True
                conn.send(self.welcome)
            else:
                conn.fail(
                    p.ErrorCode.HELLO_REQUIRED,
                    f"the first message must be hello, not {type(msg).__name__.lower()}",
                )
        elif isinstance(msg, p.Start):
            self.on_start(conn, msg)
        elif isinstance(msg, p.Finish):
            stream = conn.streams.get(msg.stream)
            if stream is None:
                self.unknown_stream(conn, msg.stream)
            elif not stream.finishing:
                self.finish_stream(stream, reason="finished")
        elif isinstance(msg, p.Cancel):
            stream = conn.streams.get(msg.stream)
            if stream is None:
                self.unknown_stream(conn, msg.stream)
            else:
                self.abandon(stream)
                conn.streams.pop(stream.id, None)
                conn.send(p.Closed(stream=stream.id, reason="cancelled", stats=self.stats(stream)))
                self.check_drained()
        elif isinstance(msg, p.Ping):
            conn.send(p.Pong(id=msg.id))
        elif isinstance(msg, p.Hello):
            self.stream_error(conn, None, p.ErrorCode.INVALID_MESSAGE, "hello was already sent")

    def unknown_stream(self, conn: Connection, stream_id: str) -> None:
        self.stream_error(
            conn,
            stream_id,
            p.ErrorCode.UNKNOWN_STREAM,
            f"no open stream {stream_id!r} on this connection (send start first)",
        )

    def on_start(self, conn: Connection, msg: p.Start) -> None:
        sid = msg.stream
        code = None
        if self.draining:
            code, text = p.ErrorCode.SHUTTING_DOWN, "the daemon is shutting down"
        elif not sid or len(sid) > MAX_STREAM_ID:
            code = p.ErrorCode.INVALID_MESSAGE
            text = f"stream id must be 1 to {MAX_STREAM_ID} characters"
        elif sid in conn.streams:
            code, text = p.ErrorCode.DUPLICATE_STREAM, f"stream {sid!r} is already open"
        elif msg.sample_rate not in p.SAMPLE_RATES:
            code = p.ErrorCode.UNSUPPORTED_SAMPLE_RATE
            text = (
                f"sample_rate {msg.sample_rate} is not supported; use one of "
                f"{', '.join(map(str, p.SAMPLE_RATES))}"
            )
        elif msg.encoding not in ENCODINGS:
            code = p.ErrorCode.UNSUPPORTED_ENCODING
            text = f"encoding {msg.encoding!r} is not supported; use one of {', '.join(ENCODINGS)}"
        elif len(conn.streams) >= self.config.limits.max_streams_per_connection:
            code = p.ErrorCode.TOO_MANY_STREAMS
            text = (
                f"this connection already has {len(conn.streams)} streams "
                f"(limits.max_streams_per_connection)"
            )
        elif len(self.by_key) >= self.max_streams:
            code = p.ErrorCode.TOO_MANY_STREAMS
            text = f"this lane already serves {len(self.by_key)} streams (limits.max_streams)"
        if code is not None:
            self.stream_error(conn, sid, code, text)
            return
        try:
            vad_cfg: VadConfig = vad_with_overrides(
                self.config.vad, msg.vad, limits=self.config.limits
            )
        except ConfigError as exc:
            self.stream_error(conn, sid, p.ErrorCode.INVALID_MESSAGE, f"vad: {exc}")
            return
        self.next_key += 1
        key = rec.stream_key(self.spec.generation, self.next_key)
        resampler = None
        if msg.sample_rate != SAMPLE_RATE:
            # float32, rounded back to int16 here: soxr's int16 output is dithered with a seed
            # that changes per stream, so the same audio would not give the same transcript.
            resampler = soxr.ResampleStream(msg.sample_rate, SAMPLE_RATE, 1, dtype="float32")
        stream = Stream(
            id=sid,
            key=key,
            conn=conn,
            sample_rate=msg.sample_rate,
            vad=StreamVad(vad_cfg, SAMPLE_RATE),
            resampler=resampler,
            interim_ms=self.config.backend.interim_ms if msg.interim else -1,
        )
        conn.streams[sid] = stream
        self.by_key[key] = stream
        self.slot.set_counter(_STREAMS, len(self.by_key))
        self.counters["streams_total"] += 1
        conn.send(p.Started(stream=sid, lane=self.lane))

    def on_audio(self, conn: Connection, msg: p.Audio) -> None:
        stream = conn.streams.get(msg.stream)
        pcm = msg.pcm
        seq = msg.seq
        # One test for every way a chunk can be refused (no hello means no streams either).
        if stream is None or stream.finishing or len(pcm) & 1 or seq <= stream.last_seq:
            self.refuse_audio(conn, msg, stream)
            return
        stream.last_seq = seq
        stream.chunks += 1
        stream.samples_in += len(pcm) >> 1
        if stream.resampler is not None:
            pcm = to_pcm16(
                stream.resampler.resample_chunk(
                    np.frombuffer(pcm, dtype=np.int16).astype(np.float32)
                )
            )
        if stream.vad.pass_through(len(pcm)):
            self.push_audio(stream.key, seq, pcm)
        else:
            self.route(stream, stream.vad.process(pcm), seq)

    def refuse_audio(self, conn: Connection, msg: p.Audio, stream: Stream | None) -> None:
        if not conn.greeted:
            conn.fail(p.ErrorCode.HELLO_REQUIRED, "the first message must be hello, not audio")
        elif stream is None:
            self.unknown_stream(conn, msg.stream)
        elif stream.finishing:
            if self.draining and not stream.told_shutdown:
                stream.told_shutdown = True
                self.stream_error(
                    conn,
                    stream.id,
                    p.ErrorCode.SHUTTING_DOWN,
                    f"the daemon is shutting down: audio from seq {msg.seq} on is not "
                    "transcribed; the stream closes after its last final",
                )
            elif not self.draining:
                self.stream_error(
                    conn,
                    stream.id,
                    p.ErrorCode.INVALID_MESSAGE,
                    "audio after finish: the stream is closing",
                )
        elif len(msg.pcm) & 1:
            self.stream_error(
                conn,
                stream.id,
                p.ErrorCode.ODD_BYTE_COUNT,
                f"audio seq {msg.seq} has {len(msg.pcm)} bytes; s16le needs an even count "
                "(the chunk was not used)",
            )
        else:
            self.stream_error(
                conn,
                stream.id,
                p.ErrorCode.BAD_SEQUENCE,
                f"audio seq {msg.seq} is not above the previous seq {stream.last_seq} "
                "(the chunk was not used)",
            )

    def route(self, stream: Stream, events: list[Any], seq: int) -> None:
        """VAD events -> ring records and Speech messages."""
        if len(events) == 1 and type(events[0]) is SpeechAudio:  # most chunks
            self.push_audio(stream.key, seq, events[0].pcm)
            return
        conn = stream.conn
        for ev in events:
            t = type(ev)
            if t is SpeechAudio:
                self.push_audio(stream.key, seq, ev.pcm)
            elif t is SpeechStart:
                stream.open_utterance = ev.utterance
                stream.pending[ev.utterance] = Utterance(ev.at_ms)
                self.push(
                    rec.BEGIN,
                    stream.key,
                    ev.utterance,
                    self._enc.encode(rec.UtteranceBegin(stream.interim_ms)),
                )
                conn.send(
                    p.Speech(
                        stream=stream.id, event="start", at_ms=ev.at_ms, utterance=ev.utterance
                    )
                )
                self.counters["utterances"] += 1
            elif t is SpeechEnd:
                stream.open_utterance = 0
                utt = stream.pending.get(ev.utterance)
                if utt is not None:
                    utt.end_ms = ev.at_ms
                self.push(rec.END, stream.key, ev.utterance, b"")
                conn.send(
                    p.Speech(
                        stream=stream.id,
                        event="end",
                        at_ms=ev.at_ms,
                        utterance=ev.utterance,
                        reason=ev.reason,
                        confidence=round(ev.confidence, 3),
                    )
                )

    def finish_stream(self, stream: Stream, reason: str) -> None:
        """End of the stream's audio: cut the open utterance; close after the last final."""
        stream.finishing = True
        stream.close_reason = reason
        if stream.resampler is not None:
            tail = stream.resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
            self.route(stream, stream.vad.process(to_pcm16(tail)), stream.last_seq)
        self.route(stream, stream.vad.flush(), stream.last_seq)
        self.maybe_close(stream)

    def maybe_close(self, stream: Stream) -> None:
        if stream.finishing and not stream.pending:
            self.remove(stream)
            stream.conn.send(
                p.Closed(stream=stream.id, reason=stream.close_reason, stats=self.stats(stream))
            )
            conn = stream.conn
            if self.draining and not conn.streams:
                conn.flush()
                if conn.transport is not None:
                    conn.transport.close()
            self.check_drained()

    def remove(self, stream: Stream) -> None:
        if self.by_key.pop(stream.key, None) is not None:
            vc = stream.vad.counters
            self.ended_chunks += stream.chunks
            self.ended_samples += stream.samples_in
            ended = self.ended_vad
            for _name, attr in VAD_TOTALS:
                setattr(ended, attr, getattr(ended, attr) + getattr(vc, attr))
            self.slot.set_counter(_STREAMS, len(self.by_key))
        if stream.conn.streams.get(stream.id) is stream:
            del stream.conn.streams[stream.id]

    def abandon(self, stream: Stream) -> None:
        """Drop a stream without results; the infer worker frees its decoders."""
        for number in stream.pending:
            self.push(rec.CANCEL, stream.key, number, b"")
        stream.pending.clear()
        self.remove(stream)

    def stats(self, stream: Stream) -> p.StreamStats:
        vc = stream.vad.counters
        return p.StreamStats(
            audio_ms=stream.samples_in * 1000 // stream.sample_rate,
            chunks=stream.chunks,
            speech_frames=vc.speech_frames,
            silence_frames=vc.silence_frames,
            utterances=vc.utterances,
        )

    # --- audio ring -----------------------------------------------------------------------------
    def push_audio(self, key: int, seq: int, pcm: bytes) -> None:
        """Gather the chunk into this loop iteration's audio batch (pushed by flush_audio())."""
        n = len(pcm)
        if self.batch_bytes + n + rec.BATCH_ENTRY_BYTES > self.batch_limit:
            self.flush_audio()
            if n + rec.BATCH_ENTRY_BYTES > self.batch_limit:
                self.push_audio_split(key, seq, pcm)
                return
        self.batch_keys.append(key)
        self.batch_seqs.append(seq)
        self.batch_pcms.append(pcm)
        self.batch_bytes += n + rec.BATCH_ENTRY_BYTES
        if not self.flush_scheduled and self.loop is not None:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def push_audio_split(self, key: int, seq: int, pcm: bytes) -> None:
        limit = self.audio.max_payload
        view = memoryview(pcm)
        for i in range(0, len(pcm), limit):
            self.push(rec.AUDIO, key, seq, bytes(view[i : i + limit]))

    def flush_audio(self) -> None:
        """The gathered chunks as one ring record (a single chunk as a plain AUDIO record)."""
        pcms = self.batch_pcms
        if not pcms:
            return
        keys, seqs = self.batch_keys, self.batch_seqs
        if len(pcms) == 1:
            self.push_record(rec.AUDIO, keys[0], seqs[0], pcms[0])
        else:
            self.push_record(rec.AUDIO_BATCH, 0, 0, rec.pack_audio_batch(keys, seqs, pcms))
        keys.clear()
        seqs.clear()
        pcms.clear()
        self.batch_bytes = rec.audio_batch_bytes(0, 0)

    def push(self, kind: int, key: int, seq: int, payload: bytes) -> None:
        """A control record (or an oversized chunk): after the audio gathered before it."""
        self.flush_audio()
        self.push_record(kind, key, seq, payload)

    def push_record(self, kind: int, key: int, seq: int, payload: bytes) -> None:
        if self.faults.enabled:
            self.faults.record()
            payload = self.faults.payload(payload)
        self.signal_audio = True
        if not self.flush_scheduled and self.loop is not None:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)
        if not self.backlog and self.audio.try_push(kind, key, seq, payload):
            return
        if not self.backlog:
            self.counters["backpressure_events"] += 1
        self.backlog.append((kind, key, seq, payload))
        self.backlog_bytes += len(payload) + 32
        if self.backlog_bytes > BACKLOG_PAUSE_BYTES and not self.paused:
            self.paused = True
            log.warning(
                "audio ring of lane %d full and %d bytes waiting: pausing client reads",
                self.lane,
                self.backlog_bytes,
            )
            for conn in self.connections:
                if conn.transport is not None:
                    conn.transport.pause_reading()
        if self.audio.wait_for_space():
            self.flush_backlog()

    def on_audio_space(self) -> None:
        self.audio_space.drain()
        self.flush_backlog()

    def flush_backlog(self) -> None:
        backlog = self.backlog
        pushed = False
        while backlog:
            kind, key, seq, payload = backlog[0]
            if self.audio.try_push(kind, key, seq, payload):
                backlog.popleft()
                self.backlog_bytes -= len(payload) + 32
                pushed = True
            elif not self.audio.wait_for_space():
                break
        if pushed and self.audio.consumer_sleeping():
            self.audio_data.signal()
        if not backlog and self.paused:
            self.paused = False
            log.info("lane %d caught up: resuming client reads", self.lane)
            for conn in self.connections:
                if conn.transport is not None and not conn.closing:
                    conn.transport.resume_reading()

    # --- results --------------------------------------------------------------------------------
    def on_results(self) -> None:
        # The sleep flag is up whenever we are not draining here: while the loop does other
        # work the infer worker must wake us, but not while we are already draining.
        results = self.results
        results.end_sleep()
        self.result_data.drain()
        self.draining_results = True
        try:
            self.drain_results()
        finally:
            self.draining_results = False
        # The results' writes now, in this pass: they were all drained in this one callback, so
        # waiting a loop iteration batches nothing more (the ring wake-up after client reads
        # does wait, to cover every connection read in the iteration).
        self.write_dirty()

    def drain_results(self) -> None:
        results = self.results
        while True:
            batch = results.pop_many(256)
            if not batch:
                if results.prepare_sleep():
                    break
                continue
            if self.results.take_space_request():
                self.result_space.signal()
            for r in batch:
                try:
                    self.on_result(r)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    self.bad_result(r, exc)
        if self.results.take_space_request():
            self.result_space.signal()

    def bad_result(self, r: Any, exc: Exception) -> None:
        """A result record whose payload does not decode (a corrupt ring record): dropped; an
        utterance that was waiting for it gets an explicit error instead of its final."""
        log.error("corrupt result record (kind %d) for stream %x: %s", r.kind, r.key, exc)
        self.counters["bad_frames"] += 1
        stream = self.by_key.get(r.key)
        if stream is None or r.kind not in (rec.FINAL, rec.FAILED):
            return  # a partial: the final still comes
        if stream.pending.pop(r.seq, None) is None:
            return
        self.counters["errors_sent"] += 1
        stream.conn.send(
            p.Error(
                code=p.ErrorCode.INFERENCE_FAILED,
                message=f"utterance {r.seq}: its result was corrupt in the ring and is lost",
                stream=stream.id,
                utterance=r.seq,
            )
        )
        self.maybe_close(stream)

    def on_partials(self, payload: bytes) -> None:
        # Connection.send inlined (a partial per chunk): only called while draining results,
        # whose end writes every dirty connection, so no flush needs scheduling here.
        by_key = self.by_key
        dirty = self.dirty
        Partial = p.Partial
        for part in self._partials_dec.decode(payload):
            stream = by_key.get(part.key)
            if stream is not None and stream.interim_ms >= 0 and part.utterance in stream.pending:
                conn = stream.conn
                if conn.transport is None or conn.closing:
                    continue
                conn.writer.append(
                    Partial(
                        stream=stream.id,
                        utterance=part.utterance,
                        text=part.text,
                        seq=part.audio_seq,
                    )
                )
                dirty.add(conn)

    def on_result(self, r: Any) -> None:
        kind = r.kind
        if kind == rec.PARTIALS:
            self.on_partials(r.payload)
            return
        if kind == rec.HELLO:
            log.info("infer worker generation %d is serving lane %d", r.seq, self.lane)
            return
        stream = self.by_key.get(r.key)
        if stream is None:
            return  # its stream is gone (cancelled, client left, lane restarted)
        conn = stream.conn
        if kind == rec.PARTIAL:
            if stream.interim_ms >= 0 and r.seq in stream.pending:
                part = self._partial_dec.decode(r.payload)
                conn.send(
                    p.Partial(stream=stream.id, utterance=r.seq, text=part.text, seq=part.audio_seq)
                )
        elif kind == rec.FINAL:
            if r.seq not in stream.pending:
                return
            res = self._final_dec.decode(r.payload)  # first: a corrupt one leaves it pending
            utt = stream.pending.pop(r.seq)
            start = utt.start_ms
            end = utt.end_ms if utt.end_ms >= 0 else stream.vad.position_ms
            words = (
                [
                    p.Word(w.word, start + w.start_ms, start + w.end_ms, round(w.confidence, 4))
                    for w in res.words
                ]
                if res.words is not None
                else None
            )
            conn.send(
                p.Final(
                    stream=stream.id,
                    utterance=r.seq,
                    text=res.text,
                    start_ms=start,
                    end_ms=end,
                    words=words,
                    confidence=round(res.confidence, 4) if res.confidence is not None else None,
                )
            )
            self.counters["finals"] += 1
            self.maybe_close(stream)
        elif kind == rec.FAILED:
            # One utterance failed (no final will come for it); the stream goes on.
            err = self._error_dec.decode(r.payload)
            stream.pending.pop(r.seq, None)
            self.counters["errors_sent"] += 1
            conn.send(
                p.Error(
                    code=err.code,
                    message=f"utterance {r.seq}: {err.message}",
                    stream=stream.id,
                    retry_after_ms=err.retry_after_ms,
                    utterance=r.seq,
                )
            )
            self.maybe_close(stream)

    def reload(self) -> None:
        """SIGHUP: the supervisor reloaded the config. VAD settings and limits apply to new
        streams and connections; open ones keep what they started with."""
        cfg = read_live_config(self.spec)
        if cfg is None:
            return
        self.config = cfg
        lanes = max(1, self.spec.lanes)
        limits = cfg.limits
        self.max_connections = -(-limits.max_connections // lanes)
        self.max_streams = -(-limits.max_streams // lanes)
        self.welcome.limits.max_frame_bytes = limits.max_frame_bytes
        self.welcome.limits.max_streams_per_connection = limits.max_streams_per_connection
        log.info("config reloaded: new streams use it")

    def infer_restarted(self) -> None:
        """The lane's infer worker died: utterances it held are lost; say so per stream."""
        failed = 0
        for stream in list(self.by_key.values()):
            if not stream.pending:
                continue
            failed += 1
            numbers = ", ".join(map(str, sorted(stream.pending)))
            self.stream_error(
                stream.conn,
                stream.id,
                p.ErrorCode.WORKER_RESTARTED,
                f"the inference worker of lane {self.lane} stopped while utterance(s) "
                f"{numbers} were in flight; the stream is closed: start a new one",
            )
            self.abandon(stream)
        if failed:
            log.warning("infer worker of lane %d died: %d streams failed", self.lane, failed)
        self.check_drained()


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def main() -> int:
    spec = load_spec()
    setup_process(spec)
    try:
        ingress = Ingress(spec)
    except Exception:
        log.exception("ingress worker failed to start")
        return 70
    if choose_client_loop(spec.config, [])[0] == "uvloop":
        # The supervisor refused an explicit "uvloop" it could not import, so this imports.
        import uvloop

        return uvloop.run(ingress.serve())
    return asyncio.run(ingress.serve())


if __name__ == "__main__":
    raise SystemExit(main())
