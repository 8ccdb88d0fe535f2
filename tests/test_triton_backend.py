"""TritonBackend against the real development Triton server (scripts/triton_server.py).

The module fixture runs ``setup`` (a stamp check once .venv-triton exists) and ``start`` on free
loopback ports, as tests/test_triton_server.py does, and stops the server in teardown, checking
that no process of it and no /dev/shm region of the server's or of this module's is left.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from daemon.config import EmbeddedConfig
from tests.speech import load_wav
from tests.triton_fixtures import Server, free_ports
from tests.triton_fixtures import server as server
from workers.backends.base import BackendError
from workers.backends.embedded import transcribe_direct
from workers.backends.triton import TritonBackend

SPEECH = Path(__file__).resolve().parents[2] / "shared" / "speech"
CHUNK_BYTES = 3200  # 100 ms at 16 kHz s16le
STREAMING, LIGHT = "asr_streaming", "asr_light"

pytestmark = pytest.mark.timeout(900)

needs_speech = pytest.mark.skipif(
    not SPEECH.is_dir(), reason=f"real speech samples not found at {SPEECH}"
)


def _our_regions(server: Server) -> list[str]:
    with grpcclient.InferenceServerClient(server.url) as c:
        regions = c.get_system_shared_memory_status(as_json=True).get("regions", {})
    return sorted(r for r in regions if r.startswith(server.shm_prefix))


@pytest.fixture(params=["shm", "none"])
def shm_name(request: pytest.FixtureRequest, server: Server) -> Iterator[str | None]:
    if request.param == "none":
        yield None
        return
    name = f"/{server.shm_prefix}triton0"
    yield name
    assert not Path("/dev/shm", name[1:]).exists(), "region left in /dev/shm"
    assert _our_regions(server) == [], "region left registered on the server"


def _pcm(name: str) -> bytes:
    rate, pcm = load_wav(SPEECH / name)
    assert rate == 16000
    return pcm


def _chunks(pcm: bytes, size: int = CHUNK_BYTES) -> list[bytes]:
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


@pytest.fixture(scope="module")
def expected() -> dict[str, str]:
    return {}


def _expected(cache: dict[str, str], name: str) -> str:
    if name not in cache:
        cache[name] = transcribe_direct(_pcm(name), EmbeddedConfig())
    return cache[name]


@needs_speech
def test_final_equals_embedded(
    server: Server, shm_name: str | None, expected: dict[str, str]
) -> None:
    pcm = _pcm("librivox-0880.wav")
    with TritonBackend(server.url, STREAMING, shm_name=shm_name) as backend:
        backend.begin(1)
        assert backend.partial(1) == ""
        partials = []
        for chunk in _chunks(pcm):
            backend.feed(1, chunk)
            partials.append(backend.partial(1))
        assert any(partials), "no partial hypothesis"
        result = backend.end(1)
        assert backend.active() == 0
        assert result.words is None and result.confidence is None
        assert result.text == _expected(expected, "librivox-0880.wav")
        stats = backend.stats()
        assert stats["errors"] == 0 and stats["ended"] == 1


@needs_speech
def test_interleaved_utterances(
    server: Server, shm_name: str | None, expected: dict[str, str]
) -> None:
    files = ["librivox-0880.wav", "librivox-0930.wav"]
    streams = [_chunks(_pcm(f), size) for f, size in zip(files, (CHUNK_BYTES, 2468), strict=True)]
    finals: dict[int, str] = {}
    with TritonBackend(server.url, STREAMING, shm_name=shm_name) as backend:
        for k in range(len(files)):
            backend.begin(k)
        assert backend.active() == 2
        for i in range(max(len(s) for s in streams)):
            for k, chunks in enumerate(streams):
                if i < len(chunks):
                    backend.feed(k, chunks[i])
                    if i == len(chunks) - 1:
                        finals[k] = backend.end(k).text
    assert finals == {k: _expected(expected, name) for k, name in enumerate(files)}


def test_cancel_and_close_with_open_utterances(server: Server, shm_name: str | None) -> None:
    silence = bytes(CHUNK_BYTES)
    backend = TritonBackend(server.url, LIGHT, shm_name=shm_name)
    try:
        backend.begin(1)
        backend.feed(1, silence)
        assert backend.partial(1) == "n=1600 rms=0.0"
        backend.cancel(1)
        backend.cancel(1)  # not open: no error
        backend.begin(2)  # never fed: cancel sends nothing
        backend.cancel(2)
        assert backend.active() == 0 and backend.stats()["cancelled"] == 2
        with pytest.raises(BackendError):
            backend.feed(1, silence)
        backend.begin(1)  # the key is free again: a new sequence
        backend.feed(1, silence)
        assert backend.end(1).text == "n=1600 rms=0.0"
        backend.begin(3)
        assert backend.end(3).text == "n=0 rms=0.0"  # an utterance with no audio
        backend.begin(4)
        backend.feed(4, silence)  # left open: close() ends it on the server
    finally:
        backend.close()
    backend.close()  # idempotent
    with pytest.raises(BackendError):
        backend.begin(5)


def test_server_errors_become_backend_errors(server: Server, shm_name: str | None) -> None:
    with TritonBackend(server.url, "no_such_model", shm_name=shm_name) as backend:
        backend.begin(1)
        with pytest.raises(BackendError, match="no_such_model"):
            backend.feed(1, bytes(CHUNK_BYTES))
        backend.cancel(1)
    with TritonBackend(server.url, LIGHT, shm_name=shm_name) as backend:
        backend.begin(1)
        with pytest.raises(BackendError):
            backend.feed(1, b"\x00")  # not whole samples
        with pytest.raises(BackendError, match="already has"):
            backend.begin(1)
        backend.feed(1, bytes(CHUNK_BYTES))
        # The server forgets the sequence (a restart would too): the next request is refused.
        seq = backend._open[1]
        seq.corrid += 1 << 40
        with pytest.raises(BackendError, match="START"):
            backend.feed(1, bytes(CHUNK_BYTES))
        seq.corrid -= 1 << 40
        backend.end(1)


def test_region_reregistered_when_lost(server: Server) -> None:
    name = f"/{server.shm_prefix}triton1"
    with TritonBackend(server.url, LIGHT, shm_name=name) as backend:
        backend.begin(1)
        backend.feed(1, bytes(CHUNK_BYTES))
        with grpcclient.InferenceServerClient(server.url) as c:
            c.unregister_system_shared_memory(name[1:])  # as a server restart would lose it
        backend.feed(1, bytes(CHUNK_BYTES))
        assert backend.end(1).text == "n=3200 rms=0.0"
        assert backend.stats()["reregistered"] == 1
        assert _our_regions(server) == [name[1:]]
    assert _our_regions(server) == []
    assert not Path("/dev/shm", name[1:]).exists()


def test_unreachable_server(shm_name: str | None) -> None:
    port = free_ports(1)[0]
    with TritonBackend(f"127.0.0.1:{port}", LIGHT, shm_name=shm_name, timeout_s=1) as backend:
        backend.begin(1)
        with pytest.raises(BackendError):
            backend.feed(1, bytes(CHUNK_BYTES))


def test_round_trip_per_chunk(server: Server, shm_name: str | None) -> None:
    """Per-chunk round trip through the backend on the light model (printed with -s)."""
    chunk = (b"\x10\x00" * 1600)[:CHUNK_BYTES]
    times = []
    with TritonBackend(server.url, LIGHT, shm_name=shm_name) as backend:
        backend.begin(1)
        for _ in range(300):
            t0 = time.perf_counter()
            backend.feed(1, chunk)
            times.append(time.perf_counter() - t0)
        backend.end(1)
    times = sorted(times[20:])
    p50, p99 = times[len(times) // 2] * 1e3, times[int(len(times) * 0.99)] * 1e3
    print(f"\nround trip, 100 ms chunk, shm={shm_name}: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    assert p50 < 100
