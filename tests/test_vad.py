"""StreamVad: endpointing on real and synthetic audio, chunking invariance, counters."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import msgspec
import numpy as np
import pytest
import soxr

from daemon.config import VadConfig
from tests.speech import load_wav, needs_speech, speech_files
from workers.vad import (
    SpeechAudio,
    SpeechEnd,
    SpeechStart,
    StreamVad,
    VadEvent,
)

RATE = 16000
BPMS = RATE * 2 // 1000  # bytes per millisecond at 16 kHz s16le
FILES = speech_files()


def silence(ms: int, rate: int = RATE) -> bytes:
    return bytes(rate * ms // 1000 * 2)


def tone(ms: int, rate: int = RATE) -> bytes:
    """A loud voiced-like buzz (180 Hz and harmonics): webrtcvad calls it speech."""
    t = np.arange(rate * ms // 1000) / rate
    x = sum(6000 / k * np.sin(2 * np.pi * 180 * k * t) for k in range(1, 8))
    return np.asarray(x).astype("<i2").tobytes()


def vad_config(**overrides: object) -> VadConfig:
    return msgspec.structs.replace(VadConfig(), **overrides)


def run(
    audio: bytes, config: VadConfig | None = None, chunk: int = 0, rate: int = RATE
) -> list[VadEvent]:
    vad = StreamVad(config or VadConfig(), rate)
    events: list[VadEvent] = []
    step = chunk or len(audio) or 1
    for i in range(0, len(audio), step):
        events += vad.process(audio[i : i + step])
    return events + vad.flush()


def utterances(events: list[VadEvent]) -> list[tuple[SpeechStart, bytes, SpeechEnd]]:
    """Check the event grammar and return (start, all audio, end) per utterance.

    Grammar: SpeechStart(n), SpeechAudio(n)+, SpeechEnd(n) for n = 1, 2, ...; the audio of an
    utterance is contiguous and begins at its start.
    """
    out = []
    it = iter(events)
    for n, ev in enumerate(it, start=1):
        assert isinstance(ev, SpeechStart) and ev.utterance == n, (n, ev)
        pcm = b""
        for ev2 in it:
            if isinstance(ev2, SpeechEnd):
                break
            assert isinstance(ev2, SpeechAudio) and ev2.utterance == n, ev2
            # at_ms is the first sample's time rounded down to a millisecond.
            assert ev2.at_ms == (ev.at_ms * BPMS + len(pcm)) // BPMS, "audio not contiguous"
            assert ev2.pcm
            pcm += ev2.pcm
        else:
            raise AssertionError(f"utterance {n} has no SpeechEnd")
        assert ev2.utterance == n and pcm
        assert ev2.at_ms >= ev.at_ms
        assert 0.0 <= ev2.confidence <= 1.0
        out.append((ev, pcm, ev2))
    return out


def coalesced(events: list[VadEvent]) -> list[VadEvent]:
    """Merge consecutive SpeechAudio of one utterance (chunking may split them differently)."""
    out: list[VadEvent] = []
    for ev in events:
        prev = out[-1] if out else None
        if isinstance(ev, SpeechAudio) and isinstance(prev, SpeechAudio):
            out[-1] = prev._replace(pcm=prev.pcm + ev.pcm)
        else:
            out.append(ev)
    return out


def speech_bounds(pcm: bytes) -> tuple[int, int]:
    """Where a file's speech begins and ends (ms), by energy: 10 ms frames within 30 dB of the
    loudest. Independent of webrtcvad, to check the VAD against."""
    x = np.frombuffer(pcm, "<i2").astype(np.float64)
    n = len(x) // 160
    rms = np.sqrt((x[: n * 160].reshape(n, 160) ** 2).mean(axis=1))
    loud = np.nonzero(rms > rms.max() * 10 ** (-30 / 20))[0]
    return int(loud[0]) * 10, int(loud[-1] + 1) * 10


def check_audio_is_stream(audio: bytes, utts: list[tuple[SpeechStart, bytes, SpeechEnd]]) -> None:
    """What is forwarded is the stream's own audio at the times the events give."""
    for start, pcm, _ in utts:
        at = start.at_ms * BPMS
        assert pcm == audio[at : at + len(pcm)]


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 16000, 32000, 48000])
def test_supported_rates(rate: int) -> None:
    vad = StreamVad(VadConfig(), rate)
    assert vad.process(silence(100, rate)) == []


@pytest.mark.parametrize("rate", [0, 11025, 22050, 44100, 96000])
def test_unsupported_rate_raises(rate: int) -> None:
    with pytest.raises(ValueError, match="not supported"):
        StreamVad(VadConfig(), rate)


def test_odd_byte_count_raises() -> None:
    vad = StreamVad(VadConfig())
    with pytest.raises(ValueError, match="16-bit"):
        vad.process(b"\x00" * 961)
    assert vad.process(b"\x00" * 962) == []  # still usable
    assert vad.position_ms == 30


# --- synthetic audio --------------------------------------------------------------------------


@pytest.mark.parametrize("aggressiveness", [0, 1, 2, 3])
def test_digital_silence_gives_nothing(aggressiveness: int) -> None:
    vad = StreamVad(vad_config(aggressiveness=aggressiveness))
    events: list[VadEvent] = []
    for _ in range(10):
        events += vad.process(silence(1000))
    assert vad.position_ms == 9990  # whole 30 ms frames analysed; the rest is buffered
    events += vad.flush()
    assert vad.position_ms == 10_000
    assert events == []
    c = vad.counters
    assert (c.utterances, c.discarded, c.speech_frames) == (0, 0, 0)
    assert c.silence_frames == 10_000 // 30
    assert not vad.in_speech


@pytest.mark.parametrize("aggressiveness", [0, 1, 2, 3])
def test_blip_shorter_than_min_speech_is_discarded(aggressiveness: int) -> None:
    audio = silence(1000) + tone(100) + silence(1000)
    vad = StreamVad(vad_config(aggressiveness=aggressiveness))
    events = vad.process(audio) + vad.flush()
    assert events == []
    assert vad.counters.discarded == 1 and vad.counters.utterances == 0
    assert vad.counters.speech_frames > 0  # it was heard, then dropped


def test_held_audio_is_released_only_once_confirmed() -> None:
    config = vad_config(min_speech_ms=1000)
    # 600 ms of buzz is a blip at this setting ...
    assert run(silence(500) + tone(600) + silence(1000), config) == []
    # ... 1500 ms is not, but nothing is said until 1 s of it has been heard.
    audio = silence(500) + tone(1500) + silence(1000)
    vad = StreamVad(config)
    events: list[VadEvent] = []
    for i in range(0, len(audio), 100 * BPMS):
        new = vad.process(audio[i : i + 100 * BPMS])
        if any(isinstance(e, SpeechStart) for e in new):
            assert vad.position_ms >= 500 + 1000
            assert vad.in_speech
        events += new
    events += vad.flush()
    [(start, pcm, end)] = utterances(events)
    assert start.at_ms <= 500 and end.reason == "silence"
    check_audio_is_stream(audio, [(start, pcm, end)])


def test_tone_bracketed_and_timed() -> None:
    audio = silence(1000) + tone(1000) + silence(1500)
    config = VadConfig()
    events = run(audio, config)
    [(start, pcm, end)] = utterances(events)
    # Start: the start window's first frame minus the pre-roll; the tone begins at 1000 ms.
    assert 1000 - config.pre_roll_ms - config.start_window_ms <= start.at_ms <= 1000
    # End point: where the trailing silence began, give or take webrtcvad's own hangover.
    assert 2000 <= end.at_ms <= 2000 + 200
    # The audio runs to the end decision (the hangover), and no further.
    assert start.at_ms + len(pcm) // BPMS <= end.at_ms + config.end_window_ms
    assert end.confidence > 0.9
    check_audio_is_stream(audio, [(start, pcm, end)])


def test_pre_roll_clamped_at_stream_start() -> None:
    audio = silence(60) + tone(800) + silence(1000)
    [(start, pcm, _)] = utterances(run(audio, vad_config(pre_roll_ms=1000)))
    assert start.at_ms == 0
    assert pcm == audio[: len(pcm)]


def test_pre_roll_does_not_reach_into_previous_utterance() -> None:
    # The gap is shorter than pre-roll + start window: the second utterance's pre-roll must
    # begin after the first one's last forwarded sample, never send audio twice.
    audio = tone(800) + silence(700) + tone(800) + silence(1000)
    utts = utterances(run(audio, vad_config(pre_roll_ms=1000, end_window_ms=300)))
    assert len(utts) == 2
    (s1, p1, _), (s2, _, _) = utts
    assert s2.at_ms >= s1.at_ms + len(p1) // BPMS
    check_audio_is_stream(audio, utts)


def test_max_utterance_cut_and_continue() -> None:
    audio = silence(500) + tone(4500) + silence(1000)
    utts = utterances(run(audio, vad_config(max_utterance_s=2.0)))
    reasons = [end.reason for _, _, end in utts]
    assert reasons == ["max_length", "max_length", "silence"]
    # Cut at whole frames: 2 s is 66 frames of 30 ms, 1980 ms.
    assert all(len(pcm) <= 1980 * BPMS for _, pcm, _ in utts)
    for (s1, p1, e1), (s2, _, _) in itertools.pairwise(utts):
        assert len(p1) == 1980 * BPMS and e1.at_ms == s1.at_ms + 1980
        assert s2.at_ms == e1.at_ms  # speech went on: the next one starts where the cut was
    check_audio_is_stream(audio, utts)
    # Between them, the three utterances forward all of the buzz.
    first, last = utts[0][0].at_ms, utts[-1][0].at_ms + len(utts[-1][1]) // BPMS
    assert first <= 500 and last >= 5000


def test_disabled_is_one_utterance_from_the_first_sample() -> None:
    audio = silence(700) + tone(500) + silence(700) + b"\x01\x00"  # a partial last frame too
    vad = StreamVad(vad_config(enabled=False))
    events = vad.process(audio[:3000]) + vad.process(audio[3000:])
    assert vad.in_speech
    events += vad.flush()
    [(start, pcm, end)] = utterances(events)
    assert start.at_ms == 0 and pcm == audio
    assert (end.reason, end.at_ms, end.confidence) == ("finish", 1900, 1.0)
    assert vad.counters.utterances == 1 and vad.counters.cut_finish == 1
    assert vad.counters.speech_frames == vad.counters.silence_frames == 0  # nothing classified


def test_disabled_cuts_at_max_length_and_continues() -> None:
    audio = silence(2500)
    utts = utterances(run(audio, vad_config(enabled=False, max_utterance_s=1.0), chunk=777 * 2))
    assert [(s.at_ms, e.at_ms, e.reason) for s, _, e in utts] == [
        (0, 1000, "max_length"),
        (1000, 2000, "max_length"),
        (2000, 2500, "finish"),
    ]
    assert b"".join(p for _, p, _ in utts) == audio


def test_finish_ends_open_utterance_with_partial_frame() -> None:
    audio = silence(300) + tone(1000) + b"\x10\x00" * 7
    vad = StreamVad(VadConfig())
    events = vad.process(audio)
    assert vad.in_speech
    events += vad.flush()
    [(start, pcm, end)] = utterances(events)
    assert end.reason == "finish" and end.at_ms == vad.position_ms
    assert pcm == audio[start.at_ms * BPMS :]  # the unclassified tail is sent too
    assert vad.counters.cut_finish == 1 and not vad.in_speech


def test_finish_discards_unconfirmed_utterance() -> None:
    vad = StreamVad(vad_config(min_speech_ms=2000))
    assert vad.process(silence(300) + tone(1000)) == []
    assert vad.flush() == []
    assert vad.counters.discarded == 1 and vad.counters.utterances == 0


def test_counters() -> None:
    audio = (silence(800) + tone(600)) * 3 + silence(800) + tone(100) + silence(1000)
    vad = StreamVad(VadConfig())
    utts = utterances(vad.process(audio) + vad.flush())
    c = vad.counters
    assert len(utts) == c.utterances == 3
    assert (c.cut_silence, c.cut_max_length, c.cut_finish, c.discarded) == (3, 0, 0, 1)
    assert c.speech_frames + c.silence_frames == len(audio) // (30 * BPMS)
    assert 0 < c.speech_frames < c.silence_frames
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(c)) == msgspec.structs.asdict(c)


@pytest.mark.parametrize("rate", [8000, 32000, 48000])
def test_other_rates(rate: int) -> None:
    audio = silence(500, rate) + tone(800, rate) + silence(1000, rate)
    [(start, pcm, end)] = utterances(run(audio, rate=rate))
    assert start.at_ms <= 500 <= 1300 <= end.at_ms
    at = start.at_ms * rate // 1000 * 2
    assert pcm == audio[at : at + len(pcm)]


# --- chunking invariance ----------------------------------------------------------------------


def _chunked(audio: bytes, config: VadConfig, sizes: list[int]) -> list[VadEvent]:
    vad = StreamVad(config)
    events: list[VadEvent] = []
    pos, k = 0, 0
    while pos < len(audio):
        n = sizes[k % len(sizes)]
        events += vad.process(audio[pos : pos + n])
        pos, k = pos + n, k + 1
    return events + vad.flush()


def _invariance_audio() -> bytes:
    parts = [silence(400), tone(700), silence(900), tone(120), silence(700), tone(1500)]
    if FILES:
        parts += [silence(1000), load_wav(FILES[1])[1], silence(300)]
    return b"".join(parts) + b"\x00\x01" * 5  # and a partial last frame


@pytest.mark.parametrize(
    "config",
    [
        VadConfig(),
        vad_config(max_utterance_s=0.5, frame_ms=10),
        vad_config(enabled=False, max_utterance_s=2.0),
    ],
    ids=["default", "10ms-max0.5s", "disabled"],
)
def test_chunk_sizes_give_identical_events(config: VadConfig) -> None:
    audio = _invariance_audio()
    reference = run(audio, config)
    assert len(utterances(reference)) >= 2
    rng = random.Random(7)
    plans = [
        [7 * RATE * 2],  # 7 s
        [30 * BPMS],  # exactly one frame
        [962],  # one frame and a sample
        [6, 5000, 2, 40000],
        [rng.randrange(1, 4000) * 2 for _ in range(50)],
    ]
    for sizes in plans:
        got = _chunked(audio, config, sizes)
        assert coalesced(got) == coalesced(reference), sizes
    # One sample at a time, on a shorter stretch (160,000 calls would be slow for nothing).
    short = audio[: 3 * RATE * 2]
    assert coalesced(_chunked(short, config, [2])) == coalesced(run(short, config))


def test_one_audio_event_per_utterance_per_call() -> None:
    audio = silence(300) + tone(3000) + silence(1000)
    vad = StreamVad(VadConfig())
    for i in range(0, len(audio), 500 * BPMS):
        events = vad.process(audio[i : i + 500 * BPMS])
        kinds = [(type(e).__name__, e.utterance) for e in events]
        assert len(kinds) == len(set(kinds))


# --- real speech ------------------------------------------------------------------------------


@needs_speech
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_speech_file_between_silences(path: Path) -> None:
    rate, pcm = load_wav(path)
    assert rate == RATE
    begin, finish = speech_bounds(pcm)
    audio = silence(1000) + pcm + silence(1000)
    config = VadConfig()
    utts = utterances(run(audio, config, chunk=100 * BPMS))
    [(start, sent, end)] = utts
    assert end.reason == "silence" and end.confidence > 0.8
    # Start and end bracket the speech (the end point within a frame or so of webrtcvad's
    # idea of the last speech; the audio sent runs past it by the end window).
    assert start.at_ms <= 1000 + begin
    assert abs(end.at_ms - (1000 + finish)) <= 250
    assert start.at_ms + len(sent) // BPMS >= 1000 + finish
    # Silence never reaches the recognizer.
    assert start.at_ms >= 1000 - config.pre_roll_ms - config.start_window_ms
    assert start.at_ms + len(sent) // BPMS <= 1000 + len(pcm) // BPMS + config.end_window_ms
    check_audio_is_stream(audio, utts)


@needs_speech
def test_two_speech_files_give_two_utterances() -> None:
    a, b = (load_wav(p)[1] for p in FILES[:2])
    audio = silence(500) + a + silence(1000) + b + silence(1000)
    utts = utterances(run(audio, chunk=160 * BPMS))
    assert [end.reason for _, _, end in utts] == ["silence", "silence"]
    (s1, p1, e1), (s2, _, e2) = utts
    a_end, b_begin = 500 + len(a) // BPMS, 500 + len(a) // BPMS + 1000
    assert e1.at_ms <= a_end + 100 and s2.at_ms >= a_end  # each in its own file's time
    assert s1.at_ms + len(p1) // BPMS <= s2.at_ms
    assert s2.at_ms <= b_begin + speech_bounds(b)[0] <= e2.at_ms
    check_audio_is_stream(audio, utts)


@needs_speech
def test_all_files_in_a_row() -> None:
    gap = silence(3000)
    audio = b"".join(load_wav(p)[1] + gap for p in FILES)
    config = VadConfig()
    vad = StreamVad(config)
    utts = utterances(vad.process(audio) + vad.flush())
    assert len(utts) == len(FILES) == vad.counters.cut_silence
    check_audio_is_stream(audio, utts)
    # Of each gap, only the hangover and the next pre-roll and start window are sent.
    sent = sum(len(p) for _, p, _ in utts)
    around = config.end_window_ms + config.pre_roll_ms + config.start_window_ms
    assert sent <= len(audio) - len(FILES) * (len(gap) - around * BPMS)


@needs_speech
@pytest.mark.parametrize("rate", [8000, 48000])
def test_speech_at_other_rates(rate: int) -> None:
    _, pcm = load_wav(FILES[0])
    x = soxr.resample(np.frombuffer(pcm, "<i2"), RATE, rate)
    audio = silence(1000, rate) + np.asarray(x, dtype="<i2").tobytes() + silence(1000, rate)
    [(start, _, end)] = utterances(run(audio, rate=rate))
    assert start.at_ms <= 1000 + speech_bounds(pcm)[0] and end.reason == "silence"


def test_random_configs_and_audio_keep_the_invariants() -> None:
    """Whatever the settings: the event grammar holds, what is sent is the stream's own audio,
    utterances never overlap nor exceed max_utterance_s, and chunking changes nothing."""
    rng = random.Random(11)
    for _ in range(25):
        config = vad_config(
            aggressiveness=rng.randrange(4),
            frame_ms=rng.choice([10, 20, 30]),
            start_window_ms=rng.randrange(10, 600),
            start_threshold=rng.uniform(0.05, 1.0),
            end_window_ms=rng.randrange(10, 1200),
            end_threshold=rng.uniform(0.05, 1.0),
            pre_roll_ms=rng.randrange(0, 800),
            min_speech_ms=rng.randrange(0, 600),
            max_utterance_s=rng.uniform(0.2, 3.0),
        )
        audio = b"".join(
            rng.choice([silence, tone])(rng.randrange(20, 1500)) for _ in range(rng.randrange(1, 9))
        )
        events = run(audio, config)
        utts = utterances(events)
        check_audio_is_stream(audio, utts)
        sent_until = 0
        for start, pcm, end in utts:
            assert start.at_ms >= sent_until, config  # nothing sent twice
            assert len(pcm) <= config.max_utterance_s * 1000 * BPMS
            assert end.at_ms <= start.at_ms + len(pcm) // BPMS
            sent_until = start.at_ms + len(pcm) // BPMS
        sizes = [rng.randrange(1, 3000) * 2 for _ in range(7)]
        assert coalesced(_chunked(audio, config, sizes)) == coalesced(events), config
