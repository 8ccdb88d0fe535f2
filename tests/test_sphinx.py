"""pocketsphinx through its C API (workers/backends/sphinx.py) and parallel decoding.

The binding must give exactly what pocketsphinx's own Python module gives, decode without the
GIL, and let the embedded backend decode several streams on its threads with the transcripts
of one-at-a-time decoding.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pocketsphinx import Decoder

from daemon.config import EmbeddedConfig
from tests.speech import SPEECH_DIR, load_wav, needs_speech, speech_files
from workers.backends import SAMPLE_RATE, BackendError, Transcript
from workers.backends.embedded import EmbeddedBackend, decode_threads, decoder_options
from workers.backends.sphinx import SphinxDecoder

pytestmark = pytest.mark.timeout(180)

CHUNK = SAMPLE_RATE * 2 // 10  # 100 ms
OPTIONS = decoder_options(EmbeddedConfig())


@pytest.fixture(scope="module")
def speech() -> list[bytes]:
    if not SPEECH_DIR.is_dir():
        pytest.skip(f"no shared speech at {SPEECH_DIR}")
    return [load_wav(p)[1] for p in speech_files()[:3]]


@needs_speech
def test_same_results_as_pocketsphinx_module(speech: list[bytes]) -> None:
    """Hypothesis after every block, final text, probability and word segmentation."""
    ours, theirs = SphinxDecoder(OPTIONS), Decoder(**OPTIONS)
    pcm = speech[0]
    for d in (ours, theirs):
        d.reinit_feat()
        d.start_utt()
    for i in range(0, len(pcm), CHUNK):
        ours.process_raw(pcm[i : i + CHUNK])
        theirs.process_raw(pcm[i : i + CHUNK], False, False)
        hyp = theirs.hyp()
        assert ours.hyp() == (hyp.hypstr if hyp is not None else None)
    ours.end_utt()
    theirs.end_utt()
    hyp = theirs.hyp()
    assert hyp is not None and hyp.hypstr and ours.hyp() == hyp.hypstr
    assert ours.prob() == pytest.approx(hyp.prob, rel=1e-12)
    segs = [(s.word, s.start_frame, s.end_frame, s.prob) for s in theirs.seg()]
    assert len(segs) > 5
    assert ours.seg() == segs
    assert ours.frame_ms == 10


def test_no_hypothesis_before_audio() -> None:
    d = SphinxDecoder(OPTIONS)
    d.start_utt()
    assert d.hyp() is None or d.hyp() == ""
    d.end_utt()
    d.close()
    d.close()  # idempotent


def test_bad_options_and_models(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no_such_option"):
        SphinxDecoder({**OPTIONS, "no_such_option": 1})
    with pytest.raises(RuntimeError, match="models did not load"):
        SphinxDecoder({**OPTIONS, "hmm": str(tmp_path)})


@needs_speech
def test_decoding_runs_without_the_gil(speech: list[bytes]) -> None:
    """While one long process_raw runs on a thread, this thread keeps running Python.

    With the GIL held for the call (pocketsphinx's own module), this thread would run only
    before the call starts and after it ends."""
    d = SphinxDecoder(OPTIONS)
    d.start_utt()
    pcm = speech[0] * 2  # one call of 20-40 s of audio: seconds of decoding
    in_call = threading.Event()
    done = threading.Event()
    span: list[float] = []

    def decode() -> None:
        in_call.set()
        t0 = time.monotonic()
        d.process_raw(pcm)
        span.append(time.monotonic() - t0)
        done.set()

    worker = threading.Thread(target=decode)
    worker.start()
    assert in_call.wait(10)
    seen = []
    while not done.is_set():
        seen.append(time.monotonic())
        time.sleep(0.001)
    worker.join()
    d.end_utt()
    assert span and span[0] > 0.2
    # This thread ran all through the call, not only at its edges.
    assert len(seen) > 20
    assert seen[-1] - seen[0] > 0.8 * span[0]


def decode_all(backend: EmbeddedBackend, pcms: list[bytes]) -> list[Transcript]:
    """Every stream at once, a 100 ms chunk of each per feed_many, as the infer worker does."""
    keys = list(range(1, len(pcms) + 1))
    for key in keys:
        backend.begin(key)
    for i in range(0, max(map(len, pcms)), CHUNK):
        items = [(k, p[i : i + CHUNK]) for k, p in zip(keys, pcms, strict=True) if i < len(p)]
        assert backend.feed_many(items) == {}
    return [backend.end(k) for k in keys]


@pytest.fixture(scope="module")
def serial() -> Iterator[EmbeddedBackend]:
    backend = EmbeddedBackend(EmbeddedConfig(decoders=3, threads=1))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def parallel() -> Iterator[EmbeddedBackend]:
    backend = EmbeddedBackend(EmbeddedConfig(decoders=3, threads=3))
    yield backend
    backend.close()


@needs_speech
def test_threads_give_the_serial_transcripts(
    speech: list[bytes], serial: EmbeddedBackend, parallel: EmbeddedBackend
) -> None:
    one_by_one = decode_all(serial, speech)
    at_once = decode_all(parallel, speech)
    assert [t.text for t in at_once] == [t.text for t in one_by_one]
    assert all(t.text for t in at_once)
    assert [t.words for t in at_once] == [t.words for t in one_by_one]
    assert parallel.stats()["threads"] == 3
    assert parallel.stats()["utterances"] >= 3


def test_one_failing_stream_does_not_stop_the_others(parallel: EmbeddedBackend) -> None:
    silence = bytes(CHUNK)
    parallel.begin(10)
    parallel.begin(11)
    before = parallel.stats()["audio_ms"]
    errors = parallel.feed_many([(10, silence), (99, silence), (11, silence)])
    assert list(errors) == [99]
    assert isinstance(errors[99], BackendError)
    assert "stream 99 has no open utterance" in str(errors[99])
    parallel.end(10)
    assert parallel.stats()["audio_ms"] == before + 100  # stream 10's chunk was decoded
    parallel.cancel(11)
    assert parallel.active() == 0


def test_auto_threads_follow_usable_cpus() -> None:
    assert decode_threads(EmbeddedConfig(threads=3)) == 3
    expected = 2 if len(os.sched_getaffinity(0)) > 1 else 1
    assert decode_threads(EmbeddedConfig(threads=0)) == expected
