"""The development Triton server (scripts/triton_server.py) serving configs/triton/, for real.

The module fixture runs ``setup`` (builds .venv-triton: about 45 s and 410 MB the first time, a
stamp check after) and ``start`` on free loopback ports, and stops the server at the end; the
tests talk to it with ``tritonclient.grpc`` from asrd's environment (numpy 2; the server's has
numpy < 2). Teardown checks that the server, its backend stubs and every /dev/shm region the test
or the server created are gone.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from daemon.config import EmbeddedConfig
from tests.speech import SPEECH_DIR, load_wav, needs_speech
from tests.triton_fixtures import Server
from tests.triton_fixtures import server as server
from workers.backends.embedded import transcribe_direct

CHUNK = 1600  # samples: 100 ms at 16 kHz, as the daemon forwards audio
STREAMING, LIGHT = "asr_streaming", "asr_light"

# Setup may build .venv-triton (a minute or more on a slow mirror); the server then needs ~2 s.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture
def client(server: Server) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.url) as c:
        yield c


def _infer(
    client: grpcclient.InferenceServerClient,
    model: str,
    samples: np.ndarray,
    seq: int,
    start: bool,
    end: bool,
) -> tuple[str, bool]:
    audio = grpcclient.InferInput("AUDIO", [1, len(samples)], "INT16")
    audio.set_data_from_numpy(samples.reshape(1, -1))
    result = client.infer(
        model, [audio], sequence_id=seq, sequence_start=start, sequence_end=end, client_timeout=30
    )
    text = result.as_numpy("TEXT")
    final = result.as_numpy("IS_FINAL")
    assert text is not None and final is not None
    assert text.shape == (1, 1) and final.shape == (1, 1)
    return text[0, 0].decode(), bool(final[0, 0])


def _chunks(samples: np.ndarray, size: int = CHUNK) -> list[np.ndarray]:
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def _stream(
    client: grpcclient.InferenceServerClient, model: str, samples: np.ndarray, seq: int
) -> list[tuple[str, bool]]:
    chunks = _chunks(samples)
    return [
        _infer(client, model, c, seq, i == 0, i == len(chunks) - 1) for i, c in enumerate(chunks)
    ]


def _speech(name: str) -> tuple[bytes, np.ndarray]:
    rate, pcm = load_wav(SPEECH_DIR / name)
    assert rate == 16000
    return pcm, np.frombuffer(pcm, dtype="<i2")


@pytest.fixture(scope="module")
def direct() -> Iterator[dict[str, str]]:
    """transcribe_direct per file, computed once (1-2 s each)."""
    cache: dict[str, str] = {}
    yield cache


def _expected(cache: dict[str, str], name: str) -> str:
    if name not in cache:
        cache[name] = transcribe_direct(_speech(name)[0], EmbeddedConfig())
    return cache[name]


def _light_text(samples: np.ndarray) -> str:
    values = samples.astype(np.float64)
    rms = float(np.sqrt(np.dot(values, values) / len(values))) if len(values) else 0.0
    return f"n={len(values)} rms={rms:.1f}"


def test_server_and_models_ready(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    for model in (STREAMING, LIGHT):
        assert client.is_model_ready(model)
        meta = client.get_model_metadata(model, as_json=True)
        assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
            ("AUDIO", "INT16", ["-1", "-1"])
        ]
        assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == [
            ("TEXT", "BYTES"),
            ("IS_FINAL", "BOOL"),
        ]
        config = client.get_model_config(model, as_json=True)["config"]
        assert int(config["max_batch_size"]) > 1
        batcher = config["sequence_batching"]
        # JSON leaves out enum zero, CONTROL_SEQUENCE_START.
        kinds = {
            c["name"]: c["control"][0].get("kind", "CONTROL_SEQUENCE_START")
            for c in batcher["control_input"]
        }
        assert kinds == {
            "START": "CONTROL_SEQUENCE_START",
            "END": "CONTROL_SEQUENCE_END",
            "READY": "CONTROL_SEQUENCE_READY",
            "CORRID": "CONTROL_SEQUENCE_CORRID",
        }
        assert int(batcher["max_sequence_idle_microseconds"]) > 0


@needs_speech
def test_streaming_final_equals_embedded_backend(
    client: grpcclient.InferenceServerClient, direct: dict[str, str]
) -> None:
    _, samples = _speech("librivox-0880.wav")
    results = _stream(client, STREAMING, samples, seq=101)
    assert [final for _, final in results] == [False] * (len(results) - 1) + [True]
    assert any(text for text, _ in results[:-1]), "no partial hypothesis"
    assert results[-1][0] == _expected(direct, "librivox-0880.wav")


@needs_speech
def test_interleaved_sequences_each_get_their_own_text(
    client: grpcclient.InferenceServerClient, direct: dict[str, str]
) -> None:
    files = ["librivox-0880.wav", "librivox-0930.wav"]
    # The second in odd-sized chunks: the model feeds fixed blocks, so the final is the same.
    streams = [_chunks(_speech(f)[1], size) for f, size in zip(files, (CHUNK, 1234), strict=True)]
    finals: dict[int, str] = {}
    for i in range(max(len(s) for s in streams)):  # one chunk of each in turn
        for k, chunks in enumerate(streams):
            if i < len(chunks):
                text, final = _infer(
                    client, STREAMING, chunks[i], 200 + k, i == 0, i == len(chunks) - 1
                )
                assert final == (i == len(chunks) - 1)
                if final:
                    finals[k] = text
    assert finals == {k: _expected(direct, name) for k, name in enumerate(files)}


@needs_speech
def test_concurrent_streams_are_batched(server: Server, direct: dict[str, str]) -> None:
    """Four streams at once, a client each: right finals, and Triton batched across them."""
    files = ["librivox-0880.wav", "librivox-0930.wav", "librivox-0890.wav", "librivox-0880.wav"]
    audio = [_speech(f) for f in files]
    finals: dict[int, str] = {}
    errors: list[BaseException] = []

    def stream(k: int) -> None:
        try:
            with grpcclient.InferenceServerClient(server.url) as c:
                finals[k] = _stream(c, STREAMING, audio[k][1], seq=300 + k)[-1][0]
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(k,)) for k in range(len(files))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert finals == {k: _expected(direct, name) for k, name in enumerate(files)}
    with grpcclient.InferenceServerClient(server.url) as c:
        stats = c.get_inference_statistics(STREAMING, as_json=True)["model_stats"][0]
    sizes = [int(b["batch_size"]) for b in stats.get("batch_stats", [])]
    assert max(sizes) > 1, f"no batch across streams: {sizes}"


def test_light_answers_every_chunk(client: grpcclient.InferenceServerClient) -> None:
    rng = np.random.default_rng(7)
    samples = rng.integers(-3000, 3000, size=CHUNK * 5 + 100, dtype=np.int16)
    results = _stream(client, LIGHT, samples, seq=400)
    chunks = _chunks(samples)
    expected = [(_light_text(c), False) for c in chunks[:-1]] + [(_light_text(samples), True)]
    assert results == expected


def test_light_rejects_a_sequence_without_start(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="START"):
        _infer(client, LIGHT, np.zeros(CHUNK, dtype=np.int16), seq=401, start=False, end=False)


def test_light_through_system_shared_memory(
    server: Server, client: grpcclient.InferenceServerClient
) -> None:
    """Input and outputs at offsets in one registered region, as the triton backend does it."""
    name = server.shm_prefix + "io"
    in_bytes, text_bytes = CHUNK * 2, 256  # TEXT is 4-byte length + the string
    size = in_bytes + text_bytes + 1
    handle = shm.create_shared_memory_region(name, "/" + name, size)
    try:
        client.register_system_shared_memory(name, "/" + name, size)
        rng = np.random.default_rng(11)
        chunks = [rng.integers(-8000, 8000, size=CHUNK, dtype=np.int16) for _ in range(4)]
        for i, chunk in enumerate(chunks):
            shm.set_shared_memory_region(handle, [chunk.reshape(1, -1)])
            audio = grpcclient.InferInput("AUDIO", [1, CHUNK], "INT16")
            audio.set_shared_memory(name, in_bytes)
            text_out = grpcclient.InferRequestedOutput("TEXT")
            text_out.set_shared_memory(name, text_bytes, offset=in_bytes)
            final_out = grpcclient.InferRequestedOutput("IS_FINAL")
            final_out.set_shared_memory(name, 1, offset=in_bytes + text_bytes)
            end = i == len(chunks) - 1
            result = client.infer(
                LIGHT,
                [audio],
                outputs=[text_out, final_out],
                sequence_id=500,
                sequence_start=i == 0,
                sequence_end=end,
                client_timeout=30,
            )
            output = result.get_output("TEXT")
            assert output is not None and not output.HasField("contents")  # it is in the region
            shape = list(output.shape)
            text = shm.get_contents_as_numpy(handle, np.object_, shape, offset=in_bytes)
            final = shm.get_contents_as_numpy(handle, np.bool_, [1, 1], in_bytes + text_bytes)
            whole = np.concatenate(chunks) if end else chunk
            assert (text[0, 0].decode(), bool(final[0, 0])) == (_light_text(whole), end)
    finally:
        client.unregister_system_shared_memory(name)
        shm.destroy_shared_memory_region(handle)
    assert client.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}
    assert not Path("/dev/shm", name).exists()


def test_idle_sequence_loses_its_decoder(client: grpcclient.InferenceServerClient) -> None:
    """Reloaded with one decoder and a 1 s idle timeout: an abandoned sequence frees it."""
    config = client.get_model_config(STREAMING, as_json=True)["config"]
    config["sequence_batching"]["max_sequence_idle_microseconds"] = "1000000"
    config["parameters"]["decoders"] = {"string_value": "1"}
    config["parameters"]["max_decoders"] = {"string_value": "1"}
    client.load_model(STREAMING, config=json.dumps(config))
    try:
        silence = np.zeros(CHUNK, dtype=np.int16)
        assert _infer(client, STREAMING, silence, 600, start=True, end=False) == ("", False)
        with pytest.raises(InferenceServerException, match="decoders are in use"):
            _infer(client, STREAMING, silence, 601, start=True, end=True)
        time.sleep(1.5)  # 600 sends nothing more and never ends
        with pytest.raises(InferenceServerException, match="START"):  # Triton forgot it
            _infer(client, STREAMING, silence, 600, start=False, end=False)
        assert _infer(client, STREAMING, silence, 602, start=True, end=True) == ("", True)
    finally:
        client.load_model(STREAMING)  # the repository's configuration again
    assert client.is_model_ready(STREAMING)
