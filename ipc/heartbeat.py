"""Heartbeat table: one shared-memory slot per worker, written by it, read by the supervisor.

Each worker writes ``time.monotonic()`` (CLOCK_MONOTONIC is one clock for every process on the
host) into its slot from its main loop, so a fresh beat proves the loop is making progress, not
just that the process exists. The slot also carries the worker's pid, state, generation and its
counters, so ``asrctl status`` reads them without asking the worker anything. Aligned 8-byte
stores are single-copy atomic on the platforms we run on; a reader may see counters from two
consecutive publishes, which is fine for statistics.
"""

from __future__ import annotations

import contextlib
import enum
import mmap
import struct

import numpy as np
import posix_ipc

from daemon.errors import RingError, ShmError

MAGIC = 0x6173726468627431  # "asrdhbt1"
HEADER = struct.Struct("<QQQ")  # magic, version, slots
HEADER_BYTES = 64
SLOT_WORDS = 32
FIRST_COUNTER = 8
MAX_COUNTERS = SLOT_WORDS - FIRST_COUNTER

INGRESS_COUNTERS = (
    "connections",
    "connections_total",
    "streams",
    "streams_total",
    "chunks",
    "audio_bytes",
    "speech_frames",
    "silence_frames",
    "vad_discarded",  # speech shorter than vad.min_speech_ms: dropped, never decoded
    "cut_silence",  # utterances ended by the VAD's end of speech
    "cut_max_length",  # ... cut at vad.max_utterance_s
    "cut_finish",  # ... ended by the stream's Finish (or the daemon's drain)
    "utterances",
    "finals",
    "errors_sent",
    "bad_frames",
    "backpressure_events",
    "pending_records",
)
_INFER_OWN = (
    "records",
    "audio_bytes",
    "utterances",
    "active_utterances",
    "waiting_utterances",
    "partials",
    "finals",
    "failures",
    "dropped_records",
    "decode_us",
)
MAX_ENDPOINTS = 4  # Triton endpoints per backend (config: backend.triton.endpoints)
# Published by the infer worker from its backend's stats() (0 where a backend has none). The
# Triton backend's: failovers and replays of utterances, utterances on the embedded fallback,
# inference_unavailable answers, breaker trips, parked utterances, endpoints up, and each
# endpoint's breaker state (ENDPOINT_STATES index + 1; 0 = no such endpoint).
BACKEND_COUNTERS = (
    "failovers",
    "replays",
    "fallback_utterances",
    "unavailable",
    "breaker_opened",
    "parked",
    "endpoints_up",
    *(f"endpoint{i}" for i in range(MAX_ENDPOINTS)),
)
ENDPOINT_STATES = ("closed", "half_open", "open")
INFER_COUNTERS = _INFER_OWN + BACKEND_COUNTERS


assert len(INGRESS_COUNTERS) <= MAX_COUNTERS and len(INFER_COUNTERS) <= MAX_COUNTERS


class WorkerState(enum.IntEnum):
    EMPTY = 0
    STARTING = 1
    RUNNING = 2
    DRAINING = 3
    STOPPED = 4


class HeartbeatTable:
    def __init__(self, name: str, shm: posix_ipc.SharedMemory, mm: mmap.mmap, slots: int) -> None:
        self.name = name
        self.slots = slots
        self._shm = shm
        self._mm = mm
        self._words: np.ndarray = np.ndarray(
            (slots, SLOT_WORDS), dtype=np.uint64, buffer=mm, offset=HEADER_BYTES
        )
        self._floats: np.ndarray = self._words.view(np.float64)

    @staticmethod
    def size_for(slots: int) -> int:
        return HEADER_BYTES + slots * SLOT_WORDS * 8

    @classmethod
    def create(cls, name: str, slots: int) -> HeartbeatTable:
        size = cls.size_for(slots)
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        except (posix_ipc.Error, OSError) as exc:
            raise ShmError(f"cannot create heartbeat segment {name}: {exc}") from exc
        mm = mmap.mmap(shm.fd, size)
        shm.close_fd()
        HEADER.pack_into(mm, 0, MAGIC, 1, slots)
        return cls(name, shm, mm, slots)

    @classmethod
    def attach(cls, name: str) -> HeartbeatTable:
        try:
            shm = posix_ipc.SharedMemory(name)
        except (posix_ipc.Error, OSError) as exc:
            raise RingError(f"cannot attach heartbeat segment {name}: {exc}") from exc
        size = shm.size
        mm = mmap.mmap(shm.fd, size)
        shm.close_fd()
        magic, _version, slots = HEADER.unpack_from(mm, 0)
        if magic != MAGIC or size < cls.size_for(slots):
            mm.close()
            raise RingError(f"{name} is not an asrd heartbeat table")
        return cls(name, shm, mm, slots)

    def slot(self, index: int) -> HeartbeatSlot:
        if not 0 <= index < self.slots:
            raise IndexError(index)
        return HeartbeatSlot(self, index)

    # supervisor side ---------------------------------------------------------------------------
    def reset_slot(self, index: int, pid: int, generation: int) -> None:
        self._words[index, :] = 0
        self._words[index, 0] = pid
        self._words[index, 1] = WorkerState.STARTING
        self._words[index, 2] = generation

    def read(self, index: int) -> tuple[int, WorkerState, int, float]:
        """(pid, state, generation, last beat in monotonic seconds; 0.0 before the first)."""
        w = self._words[index]
        return int(w[0]), WorkerState(int(w[1])), int(w[2]), float(self._floats[index, 3])

    def counter(self, index: int, position: int) -> int:
        return int(self._words[index, FIRST_COUNTER + position])

    def counters(self, index: int, names: tuple[str, ...]) -> dict[str, int]:
        row = self._words[index, FIRST_COUNTER : FIRST_COUNTER + len(names)]
        return {n: int(v) for n, v in zip(names, row.tolist(), strict=True)}

    def close(self) -> None:
        # Drop numpy views first: an mmap with live exports cannot be closed.
        del self._words, self._floats
        with contextlib.suppress(BufferError):
            self._mm.close()

    def unlink(self) -> None:
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(self.name)


class HeartbeatSlot:
    """A worker's own slot; it is the only writer."""

    __slots__ = ("_floats", "_words", "index")

    def __init__(self, table: HeartbeatTable, index: int) -> None:
        self.index = index
        self._words = table._words[index]
        self._floats = table._floats[index]

    def beat(self, now: float) -> None:
        self._floats[3] = now

    def set_state(self, state: WorkerState) -> None:
        self._words[1] = int(state)

    def set_counter(self, position: int, value: int) -> None:
        self._words[FIRST_COUNTER + position] = value

    def publish(self, counters: list[int]) -> None:
        self._words[FIRST_COUNTER : FIRST_COUNTER + len(counters)] = counters
