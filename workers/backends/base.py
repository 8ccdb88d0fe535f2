"""The recognizer interface every inference backend implements.

An utterance of one stream goes ``begin(key)``, ``feed(key, pcm)`` any number of times (with
``partial(key)`` in between for interim results), then ``end(key)`` for the final transcript or
``cancel(key)`` to drop it. ``key`` identifies the stream; one utterance per key at a time.
Audio is always 16 kHz s16le mono (:data:`SAMPLE_RATE`): the ingress side resamples.

Threading model (all backends): ``begin``/``end``/``cancel``/``active``/``stats``/``close`` may
be called from any thread; calls for one key must not overlap each other (the infer worker
gives each stream to one thread at a time). Cost and blocking behaviour are per backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import TracebackType
from typing import NamedTuple

SAMPLE_RATE = 16000  # every backend takes 16 kHz s16le mono
BYTES_PER_MS = SAMPLE_RATE * 2 // 1000


class WordTiming(NamedTuple):
    word: str
    start_ms: int  # relative to the utterance's first sample fed
    end_ms: int  # exclusive
    confidence: float  # 0..1; what it means is backend-specific (see the backend's docstring)


class Transcript(NamedTuple):
    text: str
    words: list[WordTiming] | None  # None: the backend gives no word timings
    confidence: float | None  # 0..1, or None when the backend has no measure (or no words)


class BackendBusy(Exception):
    """No decoder is free now: queue the utterance and retry begin() after an end()/cancel()."""


class BackendError(Exception):
    """The backend failed, or was used against the protocol (unknown key, key already open)."""


class BackendUnavailable(BackendError):
    """No recognizer can take the utterance now (every endpoint down, no fallback); try again
    after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Backend(ABC):
    """One recognizer; see the module docstring for the call sequence and threading model."""

    name: str
    # Streams whose calls may run on separate threads at once, without the GIL between them;
    # at 2 or more the infer worker decodes each stream as its audio arrives
    # (workers.decoding) instead of in passes over feed_many.
    parallel_streams: int = 1

    @abstractmethod
    def begin(self, key: int) -> None:
        """Start an utterance for stream ``key``; raises BackendBusy at the pool's bound."""

    @abstractmethod
    def feed(self, key: int, pcm: bytes) -> None:
        """More 16 kHz s16le mono audio of ``key``'s utterance."""

    def feed_many(self, items: Sequence[tuple[int, bytes]]) -> dict[int, Exception]:
        """Feed several streams at once (one chunk each); the error of each key that failed.

        A backend that can overlap the work of several streams (Triton's concurrent requests)
        overrides this; the default feeds one after the other."""
        errors: dict[int, Exception] = {}
        for key, pcm in items:
            try:
                self.feed(key, pcm)
            except Exception as exc:
                errors[key] = exc
        return errors

    def maintain(self) -> None:  # noqa: B027 (an optional hook: most backends need nothing)
        """Periodic work (health probes), called from the infer worker's loop at least every
        heartbeat interval. Default: nothing."""

    @abstractmethod
    def partial(self, key: int) -> str:
        """The current hypothesis text ("" if none yet)."""

    @abstractmethod
    def end(self, key: int) -> Transcript:
        """Finish ``key``'s utterance and release its decoder."""

    @abstractmethod
    def cancel(self, key: int) -> None:
        """Drop ``key``'s utterance without a result and release its decoder. A key with no
        open utterance is not an error (error paths may cancel after a failed ``end``)."""

    @abstractmethod
    def active(self) -> int:
        """Utterances open now."""

    @abstractmethod
    def stats(self) -> dict[str, int]:
        """Counters and gauges for metrics (names are per backend, values ints)."""

    @abstractmethod
    def close(self) -> None:
        """Release every decoder; open utterances are dropped. Idempotent."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
