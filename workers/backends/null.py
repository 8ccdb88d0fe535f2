"""A recognizer that does no recognition work: for benchmarks and pipeline tests.

It counts what it is fed and answers with well-formed results describing it: partials like
``"chunks=3 bytes=9600"``, a final ``"utterance of 300 ms"`` with one word timing spanning the
utterance and confidence 1.0. ``NullConfig.delay_ms`` makes ``end()`` sleep that long, standing in
for inference time (it blocks the calling thread, as a real decode would).

Threading model: see :mod:`workers.backends.base`; a lock guards the table of open utterances.
Cost: a dictionary lookup per call; the pool is unbounded (never BackendBusy).
"""

from __future__ import annotations

import threading
import time

from daemon.config import NullConfig
from workers.backends.base import (
    BYTES_PER_MS,
    Backend,
    BackendError,
    Transcript,
    WordTiming,
)


class _Utterance:
    __slots__ = ("bytes", "chunks")

    def __init__(self) -> None:
        self.chunks = 0
        self.bytes = 0


class NullBackend(Backend):
    name = "null"

    def __init__(self, config: NullConfig | None = None) -> None:
        self._delay_s = (config or NullConfig()).delay_ms / 1000.0
        self._lock = threading.Lock()
        self._open: dict[int, _Utterance] = {}
        self._ended = 0
        self._cancelled = 0
        self._audio_bytes = 0

    def begin(self, key: int) -> None:
        with self._lock:
            if key in self._open:
                raise BackendError(f"stream {key} already has an open utterance")
            self._open[key] = _Utterance()

    def feed(self, key: int, pcm: bytes) -> None:
        utt = self._get(key)
        utt.chunks += 1
        utt.bytes += len(pcm)

    def partial(self, key: int) -> str:
        utt = self._get(key)
        return f"chunks={utt.chunks} bytes={utt.bytes}"

    def end(self, key: int) -> Transcript:
        with self._lock:
            utt = self._pop(key)
            self._ended += 1
            self._audio_bytes += utt.bytes
        if self._delay_s > 0:
            time.sleep(self._delay_s)  # simulated inference time
        ms = utt.bytes // BYTES_PER_MS
        text = f"utterance of {ms} ms"
        return Transcript(text, [WordTiming(text, 0, ms, 1.0)], 1.0)

    def cancel(self, key: int) -> None:
        with self._lock:
            if self._open.pop(key, None) is not None:
                self._cancelled += 1

    def active(self) -> int:
        return len(self._open)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "active": len(self._open),
                "utterances": self._ended,
                "cancelled": self._cancelled,
                "audio_ms": self._audio_bytes // BYTES_PER_MS,
            }

    def close(self) -> None:
        with self._lock:
            self._open.clear()

    def _get(self, key: int) -> _Utterance:
        try:
            return self._open[key]
        except KeyError:
            raise BackendError(f"stream {key} has no open utterance") from None

    def _pop(self, key: int) -> _Utterance:
        try:
            return self._open.pop(key)
        except KeyError:
            raise BackendError(f"stream {key} has no open utterance") from None
