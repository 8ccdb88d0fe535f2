"""Per-stream voice activity detection and endpointing.

webrtcvad classifies each 10/20/30 ms frame as voiced or not; :class:`StreamVad` turns those
decisions into utterances: speech starts when the voiced share of the last ``start_window_ms``
reaches ``start_threshold`` and ends when the unvoiced share of the last ``end_window_ms``
reaches ``end_threshold``. ``docs/vad.md`` describes every setting, the exact boundaries and how
to tune them, with measured figures.

Threading model: one :class:`StreamVad` per stream, used by one thread at a time (the ingress
worker's event loop). It is pure computation: no I/O, no clock, no locks; times are stream times
derived from the number of samples seen, so the same audio always gives the same events however
it is chunked.

Cost: one webrtcvad call per frame (3.5 µs for 30 ms at 16 kHz on the dev VM), plus about
1 µs of asrd's own per frame at 100 ms chunks (4.5 µs in all, measured; docs/vad.md). The
windows are a preallocated ring of cumulative voiced counts, so a window's count is one
subtraction whatever its length. Audio is kept only while it may still be sent:
``pre_roll_ms + start_window_ms`` of history while idle, and the frames of an utterance not yet
confirmed. One :class:`SpeechAudio` per utterance per :meth:`StreamVad.process` call.
"""

from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple

import msgspec
import webrtcvad

from daemon.config import VadConfig

VAD_SAMPLE_RATES = (8000, 16000, 32000, 48000)  # the rates webrtcvad accepts

# Utterance states.
_IDLE = 0  # no speech: frames go to the pre-roll history
_HELD = 1  # speech started but shorter than min_speech_ms: frames held back, no events yet
_SPEECH = 2  # confirmed: SpeechStart sent, frames forwarded


class SpeechStart(NamedTuple):
    utterance: int
    at_ms: int  # stream time of the utterance's first sample (pre-roll included)


class SpeechAudio(NamedTuple):
    utterance: int
    pcm: bytes  # s16le mono at the stream's rate, to forward to the recognizer
    at_ms: int  # stream time of its first sample


class SpeechEnd(NamedTuple):
    utterance: int
    at_ms: int  # where speech ended (see docs/vad.md); audio up to the decision was sent
    reason: str  # "silence" | "max_length" | "finish"
    confidence: float  # mean voiced share of the utterance's frames


VadEvent = SpeechStart | SpeechAudio | SpeechEnd
_new_tuple = tuple.__new__


class VadCounters(msgspec.Struct):
    """Per-stream totals, for metrics and the stream's Closed stats."""

    speech_frames: int = 0  # frames webrtcvad called voiced
    silence_frames: int = 0  # frames webrtcvad called unvoiced
    utterances: int = 0  # confirmed utterances (each got SpeechStart ... SpeechEnd)
    discarded: int = 0  # started but ended before min_speech_ms: never forwarded
    cut_silence: int = 0
    cut_max_length: int = 0
    cut_finish: int = 0


def _frames(ms: float, frame_ms: int) -> int:
    """Whole frames covering ``ms``, rounded up."""
    return math.ceil(ms / frame_ms - 1e-9)


class StreamVad:
    """VAD and endpointing for one stream; see the module docstring and ``docs/vad.md``."""

    def __init__(self, config: VadConfig, sample_rate: int = 16000) -> None:
        if sample_rate not in VAD_SAMPLE_RATES:
            raise ValueError(
                f"sample rate {sample_rate} Hz is not supported by the VAD "
                f"(allowed: {', '.join(map(str, VAD_SAMPLE_RATES))})"
            )
        self.config = config
        self.sample_rate = sample_rate
        self._counters = VadCounters()
        fm = config.frame_ms
        self._frame_ms = fm
        self._frame_bytes = sample_rate * fm // 1000 * 2
        self._max_frames = max(1, int(config.max_utterance_s * 1000 // fm))
        self._enabled = config.enabled
        self._vad = webrtcvad.Vad(config.aggressiveness)

        self._ws = max(1, _frames(config.start_window_ms, fm))
        self._ks = max(1, math.ceil(config.start_threshold * self._ws - 1e-9))
        self._we = max(1, _frames(config.end_window_ms, fm))
        self._ke = max(1, math.ceil(config.end_threshold * self._we - 1e-9))
        self._min_frames = _frames(config.min_speech_ms, fm)
        # ring[i & mask] = voiced frames in 0..i. It is longer than either window, so the slot
        # of frame i - W still holds that frame's count, and a slot not yet written reads 0:
        # frames before the stream count as unvoiced. A power of two: & is cheaper than %.
        size = 1 << max(self._ws, self._we).bit_length()
        self._mask = size - 1
        self._ring = [0] * size
        self._hist: deque[bytes] = deque(maxlen=_frames(config.pre_roll_ms, fm) + self._ws)
        # Everything process() needs that never changes, in one tuple: one load per call.
        self._loop = (
            self._vad.is_speech,
            sample_rate,
            self._ring,
            self._mask,
            self._hist.append,
            self._ws,
            self._ks,
            self._we,
            self._ke,
            self._max_frames,
            self._min_frames,
        )

        self._pending = b""  # a partial frame left from the previous call
        self._tail_samples = 0  # samples of the partial frame flushed at finish
        self._frame = -1  # index of the last frame analysed
        self._cum = 0  # voiced frames so far
        self._last_voiced = -1
        self._state = _IDLE
        self._utt = 0  # number of the last confirmed utterance
        # Windows never reach back past the previous utterance's last frame: its speech must
        # not start (or end) the next one.
        self._floor = -1
        # The open utterance (states _HELD and _SPEECH).
        self._first = 0  # first frame, pre-roll included
        self._start = 0  # start point: first frame of the start window
        self._base = 0  # voiced frames before _start
        self._onset = 0  # first voiced frame at or after _start
        self._held: list[bytes] = []
        # Confirmed audio not yet emitted, frames from _out_first on: only the held frames at
        # confirmation. Later frames are not copied one by one but sliced from the call's
        # buffer once, when emitted.
        self._out: list[bytes] = []
        self._out_first = 0
        self._bytes = 0  # enabled=False: audio sent in the open utterance
        self._bytes_seen = 0  # enabled=False: all audio given so far
        # enabled=False: utterances are cut at exactly max_utterance_s (whole samples).
        self._limit_bytes = max(1, int(config.max_utterance_s * sample_rate)) * 2

    @property
    def counters(self) -> VadCounters:
        """The stream's counters (one object, updated in place; frame counts brought up to
        date on access rather than on every frame)."""
        c = self._counters
        if self._enabled:
            c.speech_frames = self._cum
            c.silence_frames = self._frame + 1 - self._cum
        return c

    @property
    def in_speech(self) -> bool:
        """True between a SpeechStart and its SpeechEnd (a held, unconfirmed start is not)."""
        return self._state == _SPEECH

    @property
    def position_ms(self) -> int:
        """Stream time of the audio analysed so far (a buffered partial frame not included)."""
        if not self._enabled:
            return self._bytes_seen // 2 * 1000 // self.sample_rate
        samples = (self._frame + 1) * (self._frame_bytes // 2) + self._tail_samples
        return samples * 1000 // self.sample_rate

    def pass_through(self, nbytes: int) -> bool:
        """With the VAD off and room left in the open utterance, count ``nbytes`` (whole
        samples) of audio as speech and return True: the caller forwards it as it is, with no
        event to route. False: call :meth:`process`. The per-chunk cost of the VAD-off path."""
        if (
            self._state == _SPEECH
            and not self._enabled
            and self._bytes + nbytes < self._limit_bytes
        ):
            self._bytes += nbytes
            self._bytes_seen += nbytes
            return True
        return False

    def process(self, pcm: bytes) -> list[VadEvent]:
        """Analyse more audio (s16le mono, any length); return the events it completes."""
        if len(pcm) & 1:
            raise ValueError(f"audio must be whole 16-bit samples, got {len(pcm)} bytes")
        if not self._enabled:
            return self._process_disabled(bytes(pcm))
        data = self._pending + pcm if self._pending else bytes(pcm)
        fb = self._frame_bytes
        end = len(data) - len(data) % fb
        self._pending = data[end:]
        events: list[VadEvent] = []
        if end == 0:
            return events

        # The loop keeps its state in locals (attribute access would double its cost) and
        # reloads them after each state change, which the methods below make.
        is_speech, rate, ring, mask, remember, ws, ks, we, ke, max_frames, min_frames = self._loop
        d, cum, last_voiced = self._frame, self._cum, self._last_voiced
        first = d + 1  # index of the call's first frame
        state, floor = self._state, self._floor
        start_lo, onset, cut_at = self._start - 1, self._onset, self._first + max_frames - 1
        seg = 0  # where this call's confirmed audio not yet emitted begins in data
        for off in range(0, end, fb):
            frame = data[off : off + fb]
            d += 1
            if is_speech(frame, rate):
                cum += 1
                last_voiced = d
            ring[d & mask] = cum
            if not state:  # _IDLE
                remember(frame)
                lo = d - ws
                if lo < floor:
                    lo = floor
                if cum - ring[lo & mask] < ks:
                    continue
                self._begin(d, lo)
                state, start_lo, onset = _HELD, lo, self._onset
                cut_at = self._first + max_frames - 1
                if last_voiced - onset + 1 >= min_frames:
                    self._confirm(events)
                    state, seg = _SPEECH, off + fb
                # No end check on the start frame, but pre-roll and start window may already
                # fill max_utterance_s.
                if d < cut_at:
                    continue
                stop, voiced, reason = d + 1, cum - self._base, "max_length"
            else:
                if state == _HELD:
                    self._held.append(frame)
                    if last_voiced - onset + 1 >= min_frames:
                        self._confirm(events)
                        state, seg = _SPEECH, off + fb
                lo = d - we
                if lo < start_lo:
                    lo = start_lo
                if (d - lo) - (cum - ring[lo & mask]) >= ke:
                    # Speech stopped ke unvoiced frames ago (exactly so when it stopped cleanly).
                    stop = max(d + 1 - ke, start_lo + 2)
                    voiced = ring[(stop - 1) & mask] - self._base
                    reason = "silence"
                elif d >= cut_at:
                    stop, voiced, reason = d + 1, cum - self._base, "max_length"
                else:
                    continue
            if state == _SPEECH:
                self._emit_audio(events, data[seg : off + fb], first + seg // fb)
                self._end(events, reason, stop, voiced, stop * self._frame_ms)
                floor = d
            else:
                self._discard()
            state = _IDLE
        self._frame, self._cum, self._last_voiced = d, cum, last_voiced
        self._state, self._floor = state, floor
        if state == _SPEECH:
            self._emit_audio(events, data[seg:end], first + seg // fb)
        return events

    def flush(self) -> list[VadEvent]:
        """End of stream: close an open utterance with reason "finish" (or discard a blip)."""
        events: list[VadEvent] = []
        tail, self._pending = self._pending, b""
        self._tail_samples += len(tail) // 2
        state, self._state = self._state, _IDLE
        if state == _HELD:
            self._discard()
        elif state == _SPEECH and not self._enabled:
            self._finish_disabled(events, "finish")
        elif state == _SPEECH:
            # A partial frame cannot be classified, but it is the utterance's last audio.
            self._emit_audio(events, tail, self._frame + 1)
            voiced = self._cum - self._base
            self._end(events, "finish", self._frame + 1, voiced, self.position_ms)
            self._floor = self._frame
        return events

    # --- state changes (rare: a few per utterance) ----------------------------------------

    def _begin(self, d: int, lo: int) -> None:
        """The start window ``lo + 1 .. d`` reached the threshold: open a held utterance."""
        ring, mask = self._ring, self._mask
        self._start = lo + 1
        self._base = ring[lo & mask]
        onset = self._start
        while onset < d and ring[onset & mask] == ring[(onset - 1) & mask]:
            onset += 1
        self._onset = onset
        # The pre-roll gives way where it would make the utterance longer than allowed.
        held = list(self._hist)[-self._max_frames :]
        self._first = d - len(held) + 1
        self._held = held
        self._hist.clear()

    def _confirm(self, events: list[VadEvent]) -> None:
        self._utt += 1
        self._counters.utterances += 1
        events.append(SpeechStart(self._utt, self._first * self._frame_ms))
        self._out, self._held = self._held, []
        self._out_first = self._first

    def _discard(self) -> None:
        """A held utterance ended before min_speech_ms: it never reaches the recognizer."""
        self._counters.discarded += 1
        self._hist.extend(self._held)  # its audio can still be pre-roll of the next one
        self._held = []

    def _emit_audio(self, events: list[VadEvent], tail: bytes, tail_frame: int) -> None:
        """Emit the audio held in _out followed by ``tail`` (which starts at frame
        ``tail_frame``) as one SpeechAudio."""
        out = self._out
        if out:
            pcm = b"".join((*out, tail)) if tail else b"".join(out)
            at = self._out_first
            self._out = []
        elif tail:
            pcm, at = tail, tail_frame
        else:
            return
        # tuple.__new__ skips the NamedTuple's Python-level __new__: half the cost, same object.
        events.append(_new_tuple(SpeechAudio, (self._utt, pcm, at * self._frame_ms)))

    def _end(self, events: list[VadEvent], reason: str, stop: int, voiced: int, at_ms: int) -> None:
        """Close the confirmed utterance: ``stop`` is its end point (frame index, exclusive),
        ``voiced`` the voiced frames from its start point to there."""
        frames = stop - self._start
        confidence = voiced / frames if frames > 0 else 0.0
        events.append(SpeechEnd(self._utt, at_ms, reason, confidence))
        c = self._counters
        if reason == "silence":
            c.cut_silence += 1
        elif reason == "max_length":
            c.cut_max_length += 1
        else:
            c.cut_finish += 1
        self._hist.clear()

    # --- enabled=False: all audio is speech, cut only by max_utterance_s --------------------

    def _process_disabled(self, pcm: bytes) -> list[VadEvent]:
        n = len(pcm)
        if self._state == _SPEECH and self._bytes + n < self._limit_bytes:
            # The common case, one event: the chunk goes on the open utterance.
            at = self._bytes_seen // 2 * 1000 // self.sample_rate
            self._bytes += n
            self._bytes_seen += n
            return [SpeechAudio(self._utt, pcm, at)]
        events: list[VadEvent] = []
        limit = self._limit_bytes
        pos = 0
        while pos < len(pcm):
            if self._state == _IDLE:
                self._utt += 1
                self._counters.utterances += 1
                self._state = _SPEECH
                self._bytes = 0
                events.append(SpeechStart(self._utt, self.position_ms))
            take = min(limit - self._bytes, len(pcm) - pos)
            events.append(SpeechAudio(self._utt, pcm[pos : pos + take], self.position_ms))
            pos += take
            self._bytes += take
            self._bytes_seen += take
            if self._bytes == limit:
                self._finish_disabled(events, "max_length")
        return events

    def _finish_disabled(self, events: list[VadEvent], reason: str) -> None:
        # No frame is classified with the VAD off: the client declared it all speech.
        events.append(SpeechEnd(self._utt, self.position_ms, reason, 1.0))
        if reason == "max_length":
            self._counters.cut_max_length += 1
        else:
            self._counters.cut_finish += 1
        self._state = _IDLE
