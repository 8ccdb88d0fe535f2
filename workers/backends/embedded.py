"""pocketsphinx in the infer worker: a bounded pool of decoders, one per open utterance.

Pool: ``EmbeddedConfig.decoders`` decoders (at most ``max_decoders``) are created with the
backend; ``begin()`` takes a free one, creates another while fewer than ``max_decoders`` exist,
and raises :class:`~workers.backends.base.BackendBusy` beyond that. Decoders live as long as the
backend (creating one costs 0.25-0.5 s and about 91 MiB) and are reused across utterances and
streams. pocketsphinx adapts its feature normalisation (the live cepstral mean and its running
statistics) to what it hears, so a reused decoder would decode differently depending on what
other streams said before it. ``reinit_feat()`` before every ``start_utt`` (about 0.1 ms) puts
the feature pipeline back to its configured initial state (``cmn_init``): every utterance gets
the transcript a fresh decoder would give. Restoring only the mean with ``set_cmn`` is not
enough: the statistics behind it carry over (measured: one of the five LibriVox transcripts
changed).

Results: the text is pocketsphinx's hypothesis. Word timings come from its segmentation (10 ms
frames, relative to the utterance's first sample), without ``<s>``, ``</s>``, ``<sil>`` and
fillers such as ``[NOISE]``, and with pronunciation variants (``word(2)``) folded. A word's
confidence is its posterior probability in the lattice. The utterance's confidence comes from
the hypothesis probability, the lattice posterior of the whole word sequence; that shrinks
geometrically with the number of words (1e-11 for the 24-word hypothesis of librivox-0870), so
its n-th root over the n words is reported: a per-word geometric mean in 0..1, or None when no
word was recognised.

Threading model: see :mod:`workers.backends.base`; a lock guards the pool, and decoders are
created outside it. Decoders are pocketsphinx's C API through :mod:`workers.backends.sphinx`,
which runs without the GIL, so a lane whose streams need more than one core gets more:
``parallel_streams`` (``EmbeddedConfig.threads``) tells the infer worker to call each stream
from its own decoding threads as its audio arrives (:mod:`workers.decoding`); ``feed_many``
(the Triton backend's embedded fallback) decodes one pass's streams on up to that many threads
at once and waits for all. One stream, or ``threads = 1``, decodes on the caller's thread.

Cost (thread CPU time on the 2-core dev VM, on the shared speech): ``feed`` of 100 ms takes
15-50 ms (the VM's speed varies that much; single blocks up to 140 ms where the search widens);
``partial`` next to nothing (``feed`` keeps the hypothesis current); ``end`` 10-150 ms with
``fwdflat`` off (the default), about 0.25 s with pocketsphinx's second, flat-lexicon pass over
the whole utterance; ``begin`` 0.3 ms with a free decoder, 0.25-0.5 s when it must create one.
The final may differ from the last partial.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from daemon.config import EmbeddedConfig
from workers.backends.base import (
    BYTES_PER_MS,
    SAMPLE_RATE,
    Backend,
    BackendBusy,
    BackendError,
    Transcript,
    WordTiming,
)
from workers.backends.sphinx import SphinxDecoder

# pocketsphinx raises these for bad models, bad audio or calls out of order.
_PS_ERRORS = (RuntimeError, ValueError, OSError)


def decoder_options(config: EmbeddedConfig) -> dict[str, Any]:
    """Keyword arguments for ``pocketsphinx.Decoder``: the shipped model unless configured."""
    options: dict[str, Any] = {"samprate": SAMPLE_RATE, "loglevel": "ERROR"}
    for name in ("hmm", "dict", "lm"):
        value = getattr(config, name)
        if value:
            options[name] = value
    if config.beam is not None:
        options["beam"] = config.beam
    if config.cmn_init:
        options["cmninit"] = config.cmn_init
    options["fwdflat"] = config.fwdflat
    return options


def _new_decoder(options: dict[str, Any]) -> SphinxDecoder:
    try:
        return SphinxDecoder(options)
    except _PS_ERRORS as exc:
        raise BackendError(f"cannot create a pocketsphinx decoder: {exc}") from exc


def decode_threads(config: EmbeddedConfig) -> int:
    """``threads``, with 0 (auto) as ``AUTO_THREADS`` (1 where one CPU is usable).

    Two per lane, with a lane per CPU, was the best measured (docs/performance.md): more
    decoding threads than about twice the CPUs made every stream cost more (their decoders
    evict each other from the caches), 4 per lane on 16 vCPUs worse than 1."""
    if config.threads:
        return config.threads
    return AUTO_THREADS if len(os.sched_getaffinity(0)) > 1 else 1


AUTO_THREADS = 2


# pocketsphinx's scores depend on how audio is cut into process_raw() calls (measured: calls of
# 10-20 ms change them). Feeding fixed 100 ms blocks (the remainder at the utterance's end)
# makes a transcript independent of client chunk sizes and VAD cut points.
BLOCK_BYTES = 3200


def _feed_blocks(decoder: SphinxDecoder, pending: bytearray, final: bool) -> None:
    """Feed every whole block of ``pending`` (and the rest when ``final``), then drop them."""
    whole = len(pending) - len(pending) % BLOCK_BYTES
    for off in range(0, whole, BLOCK_BYTES):
        decoder.process_raw(bytes(pending[off : off + BLOCK_BYTES]))
    if whole:
        del pending[:whole]
    if final and pending:
        decoder.process_raw(bytes(pending))
        pending.clear()


def transcribe_direct(pcm: bytes, config: EmbeddedConfig) -> str:
    """Decode 16 kHz s16le mono audio with a fresh decoder and the backend's settings.

    The reference the daemon's output is compared to: the same decoder options, the same
    initial normalisation state, and the same fixed-block feeding as :class:`EmbeddedBackend`.
    """
    decoder = _new_decoder(decoder_options(config))
    try:
        decoder.start_utt()
        _feed_blocks(decoder, bytearray(pcm), final=True)
        decoder.end_utt()
    except _PS_ERRORS as exc:
        raise BackendError(f"pocketsphinx failed: {exc}") from exc
    return decoder.hyp() or ""


class _Utterance:
    __slots__ = ("bytes", "decoder", "pending")

    def __init__(self, decoder: SphinxDecoder) -> None:
        self.decoder = decoder
        self.bytes = 0
        self.pending = bytearray()  # audio short of a whole block


class EmbeddedBackend(Backend):
    name = "embedded"

    def __init__(self, config: EmbeddedConfig | None = None) -> None:
        config = config or EmbeddedConfig()
        self._options = decoder_options(config)
        self._max = config.max_decoders
        self._lock = threading.Lock()
        self._free: list[SphinxDecoder] = []
        self._open: dict[int, _Utterance | None] = {}  # None: begin() is still starting it
        self._decoders = 0  # created (or being created) and not dropped
        self._frame_ms = 10
        self._threads = decode_threads(config)
        self.parallel_streams = self._threads
        self._pool: ThreadPoolExecutor | None = None  # started at the first parallel feed
        self._closed = False
        self._ended = 0
        self._cancelled = 0
        self._refused = 0
        self._errors = 0
        self._audio_bytes = 0
        for _ in range(min(config.decoders, self._max)):
            self._free.append(self._create())
            self._decoders += 1

    def _create(self) -> SphinxDecoder:
        decoder = _new_decoder(self._options)
        self._frame_ms = decoder.frame_ms
        return decoder

    # --- utterances -------------------------------------------------------------------------

    def begin(self, key: int) -> None:
        with self._lock:
            if self._closed:
                raise BackendError("backend is closed")
            if key in self._open:
                raise BackendError(f"stream {key} already has an open utterance")
            decoder = self._free.pop() if self._free else None
            if decoder is None:
                if self._decoders >= self._max:
                    self._refused += 1
                    raise BackendBusy(f"all {self._max} decoders are in use")
                self._decoders += 1  # reserve the slot; create outside the lock
            self._open[key] = None
        try:
            if decoder is None:
                decoder = self._create()
            decoder.reinit_feat()
            decoder.start_utt()
        except (*_PS_ERRORS, BackendError) as exc:
            with self._lock:
                self._open.pop(key, None)
                self._decoders -= 1  # a decoder in an unknown state is not reused
                self._errors += 1
            if isinstance(exc, BackendError):
                raise
            raise BackendError(f"pocketsphinx failed to start an utterance: {exc}") from exc
        with self._lock:
            if key in self._open:  # not closed meanwhile
                self._open[key] = _Utterance(decoder)

    def feed(self, key: int, pcm: bytes) -> None:
        utt = self._get(key)
        utt.pending += pcm
        try:
            _feed_blocks(utt.decoder, utt.pending, final=False)
        except _PS_ERRORS as exc:
            raise BackendError(f"pocketsphinx failed on audio of stream {key}: {exc}") from exc
        utt.bytes += len(pcm)

    def feed_many(self, items: Sequence[tuple[int, bytes]]) -> dict[int, Exception]:
        """Several streams' audio on up to ``threads`` threads at once (each stream's decoder
        on one thread); one stream, or ``threads = 1``, on the calling thread."""
        if self._threads < 2 or len(items) < 2:
            return super().feed_many(items)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="asrd-decode")
        errors: dict[int, Exception] = {}
        for (key, _), exc in zip(items, self._pool.map(self._try_feed, items), strict=True):
            if exc is not None:
                errors[key] = exc
        return errors

    def _try_feed(self, item: tuple[int, bytes]) -> Exception | None:
        try:
            self.feed(*item)
        except Exception as exc:
            return exc
        return None

    def partial(self, key: int) -> str:
        return self._get(key).decoder.hyp() or ""

    def end(self, key: int) -> Transcript:
        utt = self._pop(key)
        if utt is None:
            raise BackendError(f"stream {key} has no open utterance")
        decoder = utt.decoder
        try:
            _feed_blocks(decoder, utt.pending, final=True)
            decoder.end_utt()
            transcript = self._transcript(decoder)
        except _PS_ERRORS as exc:
            self._drop()
            raise BackendError(f"pocketsphinx failed to finish stream {key}: {exc}") from exc
        with self._lock:
            self._ended += 1
            self._audio_bytes += utt.bytes
            self._release(decoder)
        return transcript

    def cancel(self, key: int) -> None:
        utt = self._pop(key)
        if utt is None:
            return
        decoder = utt.decoder
        try:
            decoder.end_utt()  # a decoder must leave its utterance before the next start_utt
        except _PS_ERRORS:
            self._drop()
            return
        with self._lock:
            self._cancelled += 1
            self._release(decoder)

    def _transcript(self, decoder: SphinxDecoder) -> Transcript:
        text = decoder.hyp()
        if text is None:
            return Transcript("", [], None)
        fm = self._frame_ms
        words = []
        for word, start, end, prob in decoder.seg():
            if word[0] in "<[+":  # <s> </s> <sil>, fillers: [NOISE], ++NOISE++ in older models
                continue
            if word[-1] == ")":  # a pronunciation variant: word(2)
                word = word[: word.rindex("(")]
            words.append(WordTiming(word, start * fm, (end + 1) * fm, min(1.0, max(0.0, prob))))
        if not words:
            return Transcript(text, words, None)
        return Transcript(text, words, min(1.0, decoder.prob() ** (1.0 / len(words))))

    # --- pool -------------------------------------------------------------------------------

    def _get(self, key: int) -> _Utterance:
        utt = self._open.get(key)
        if utt is None:
            raise BackendError(f"stream {key} has no open utterance")
        return utt

    def _pop(self, key: int) -> _Utterance | None:
        with self._lock:
            utt = self._open.get(key)
            if utt is not None:
                del self._open[key]
            return utt

    def _release(self, decoder: SphinxDecoder) -> None:
        """Back to the free list (caller holds the lock), unless the backend was closed."""
        if not self._closed:
            self._free.append(decoder)

    def _drop(self) -> None:
        """Forget a decoder that failed: it is not reused; a new one may be created."""
        with self._lock:
            self._errors += 1
            if not self._closed:  # close() already forgot every decoder
                self._decoders -= 1

    def active(self) -> int:
        return len(self._open)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "active": len(self._open),
                "decoders": self._decoders,
                "free": len(self._free),
                "max_decoders": self._max,
                "threads": self._threads,
                "utterances": self._ended,
                "cancelled": self._cancelled,
                "busy": self._refused,
                "errors": self._errors,
                "audio_ms": self._audio_bytes // BYTES_PER_MS,
            }

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # idle unless feed_many is running on another thread
        with self._lock:
            self._closed = True
            self._free.clear()
            self._open.clear()
            self._decoders = 0
