"""Backends: the embedded pocketsphinx pool on real speech, and the null recognizer's shapes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.config import BackendConfig, EmbeddedConfig, NullConfig
from tests.speech import SPEECH_DIR, load_wav, needs_speech, speech_files
from workers.backends import (
    SAMPLE_RATE,
    Backend,
    BackendBusy,
    BackendError,
    Transcript,
    WordTiming,
    create_backend,
)
from workers.backends.embedded import EmbeddedBackend, transcribe_direct
from workers.backends.null import NullBackend

CHUNK = SAMPLE_RATE * 2 // 10  # 100 ms, as the daemon forwards it
FILES = [*speech_files(), SPEECH_DIR / "goforward.raw"] if SPEECH_DIR.is_dir() else []
ONE_DECODER = EmbeddedConfig(decoders=1, max_decoders=2)


@pytest.fixture(scope="module")
def embedded() -> Iterator[EmbeddedBackend]:
    """One backend for the module: a decoder costs 0.25-0.5 s and about 91 MiB to create."""
    backend = EmbeddedBackend(ONE_DECODER)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def direct() -> dict[Path, str]:
    """transcribe_direct results, computed once per file (each decode takes 1-2 s)."""
    return {}


def reference(direct: dict[Path, str], path: Path) -> str:
    if path not in direct:
        direct[path] = transcribe_direct(load_wav(path)[1], ONE_DECODER)
    return direct[path]


def decode(backend: Backend, key: int, pcm: bytes, chunk: int = CHUNK) -> Transcript:
    backend.begin(key)
    for i in range(0, len(pcm), chunk):
        backend.feed(key, pcm[i : i + chunk])
    return backend.end(key)


def check_words(t: Transcript, duration_ms: int) -> None:
    assert t.words is not None
    assert " ".join(w.word for w in t.words) == t.text
    prev_end = 0
    for w in t.words:
        assert w.word and not w.word.startswith(("<", "[")) and "(" not in w.word
        assert prev_end <= w.start_ms < w.end_ms <= duration_ms, w
        assert 0.0 <= w.confidence <= 1.0
        prev_end = w.end_ms


# --- embedded ---------------------------------------------------------------------------------


@needs_speech
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_embedded_matches_direct(
    embedded: EmbeddedBackend, direct: dict[Path, str], path: Path
) -> None:
    rate, pcm = load_wav(path)
    assert rate == SAMPLE_RATE
    key = 7
    embedded.begin(key)
    assert embedded.partial(key) == ""
    for i in range(0, len(pcm), CHUNK):
        embedded.feed(key, pcm[i : i + CHUNK])
    assert embedded.partial(key)  # interim text by the end of the audio
    t = embedded.end(key)
    # Fed in 100 ms chunks to a pooled (reused) decoder == one call on a fresh decoder.
    assert t.text == reference(direct, path)
    assert t.text  # pocketsphinx hears something in every file
    check_words(t, len(pcm) // 32)
    assert t.confidence is not None and 0.0 < t.confidence <= 1.0
    assert embedded.active() == 0


@needs_speech
def test_reused_decoder_does_not_remember_other_streams(direct: dict[Path, str]) -> None:
    # pocketsphinx adapts its normalisation to what it hears; without the reset at each
    # utterance this pair decodes B as "... a real boy myself so" instead of "... i'm self
    # taught" (measured).
    a, b = SPEECH_DIR / "goforward.raw", SPEECH_DIR / "librivox-0930.wav"
    with EmbeddedBackend(EmbeddedConfig(decoders=1, max_decoders=1)) as backend:
        decode(backend, 1, load_wav(a)[1])
        t = decode(backend, 2, load_wav(b)[1])
        assert backend.stats()["decoders"] == 1  # B really ran on A's decoder
    assert t.text == reference(direct, b)


def test_pool_bound_busy_then_free(embedded: EmbeddedBackend) -> None:
    assert embedded.stats()["max_decoders"] == 2
    embedded.begin(1)
    embedded.begin(2)  # grows the pool to its bound
    refused = embedded.stats()["busy"]
    with pytest.raises(BackendBusy):
        embedded.begin(3)
    assert embedded.stats()["busy"] == refused + 1
    assert embedded.active() == 2
    t = embedded.end(1)
    assert t == Transcript("", [], None)  # no audio, no words
    embedded.begin(3)  # the freed decoder
    # cancel releases too, with no result
    embedded.cancel(2)
    embedded.begin(4)
    s = embedded.stats()
    assert (s["active"], s["decoders"], s["free"]) == (2, 2, 0)
    embedded.cancel(3)
    embedded.cancel(4)
    assert embedded.active() == 0 and embedded.stats()["free"] == 2


def test_protocol_errors(embedded: EmbeddedBackend) -> None:
    with pytest.raises(BackendError, match="no open utterance"):
        embedded.feed(99, b"\x00\x00")
    with pytest.raises(BackendError):
        embedded.end(99)
    embedded.cancel(99)  # nothing open: nothing to do
    with pytest.raises(BackendError):
        embedded.partial(99)
    embedded.begin(5)
    try:
        with pytest.raises(BackendError, match="already"):
            embedded.begin(5)
    finally:
        embedded.cancel(5)


def test_bad_model_is_a_backend_error(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="decoder"):
        EmbeddedBackend(EmbeddedConfig(decoders=1, hmm=str(tmp_path)))
    with pytest.raises(BackendError, match="decoder"):
        transcribe_direct(b"", EmbeddedConfig(hmm=str(tmp_path)))


def test_closed_backend_refuses() -> None:
    backend = EmbeddedBackend(EmbeddedConfig(decoders=0))  # creates nothing until needed
    assert backend.stats()["decoders"] == 0
    backend.close()
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.begin(1)


# --- null -------------------------------------------------------------------------------------


def test_null_shapes() -> None:
    backend = NullBackend(NullConfig())
    backend.begin(1)
    assert backend.partial(1) == "chunks=0 bytes=0"
    for _ in range(3):
        backend.feed(1, bytes(CHUNK))
    assert backend.partial(1) == f"chunks=3 bytes={3 * CHUNK}"
    t = backend.end(1)
    assert t == Transcript(
        "utterance of 300 ms", [WordTiming("utterance of 300 ms", 0, 300, 1.0)], 1.0
    )
    assert backend.stats() == {"active": 0, "utterances": 1, "cancelled": 0, "audio_ms": 300}


def test_null_unbounded_and_cancel() -> None:
    backend = NullBackend()
    for key in range(1000):
        backend.begin(key)
    assert backend.active() == 1000
    for key in range(1000):
        backend.cancel(key)
    assert backend.active() == 0 and backend.stats()["cancelled"] == 1000
    with pytest.raises(BackendError):
        backend.end(1)
    backend.cancel(1)  # nothing open: nothing to do
    assert backend.stats()["cancelled"] == 1000
    backend.begin(1)
    with pytest.raises(BackendError, match="already"):
        backend.begin(1)
    backend.close()
    assert backend.active() == 0


def test_null_delay_is_simulated_inference_time() -> None:
    backend = NullBackend(NullConfig(delay_ms=30))
    backend.begin(1)
    t0 = time.monotonic()
    backend.end(1)
    assert time.monotonic() - t0 >= 0.03


def test_create_backend() -> None:
    null = create_backend(BackendConfig(kind="null", null=NullConfig(delay_ms=1)))
    assert isinstance(null, NullBackend) and null.name == "null"
    embedded = create_backend(
        BackendConfig(kind="embedded", embedded=EmbeddedConfig(decoders=0, max_decoders=3))
    )
    with embedded:
        assert isinstance(embedded, EmbeddedBackend) and embedded.name == "embedded"
        assert embedded.stats()["max_decoders"] == 3
