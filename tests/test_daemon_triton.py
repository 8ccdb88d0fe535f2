"""The daemon with ``backend.kind = "triton"`` against a real Triton server."""

from __future__ import annotations

import wave
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from daemon.config import EmbeddedConfig
from ipc import protocol as p
from ipc.client import Client
from tests.daemon_fixtures import start_daemon as start_daemon
from tests.test_daemon import SPEECH, Start, needs_speech, read_wav
from tests.triton_fixtures import Server
from tests.triton_fixtures import server as server
from workers.backends.embedded import transcribe_direct

pytestmark = pytest.mark.timeout(900)
SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@needs_speech
@pytest.mark.parametrize(
    ("protocol", "shared_memory"), [("grpc", "system"), ("grpc", "none"), ("http", "system")]
)
def test_daemon_transcribes_through_triton(
    start_daemon: Start,
    server: Server,
    protocol: str,
    shared_memory: str,
) -> None:
    url = server.url if protocol == "grpc" else f"127.0.0.1:{server.http_port}"
    daemon = start_daemon(
        f'lanes = 1\n[backend]\nkind = "triton"\n[backend.triton]\nendpoints = ["{url}"]\n'
        f'protocol = "{protocol}"\nshared_memory = "{shared_memory}"\n'
    )
    pcm = read_wav(SPEECH / "librivox-0880.wav")
    with Client.connect(daemon.socket_path) as c:
        finals = c.transcribe(pcm, stream="whole", vad=p.VadOverrides(enabled=False), timeout=60)
        assert [f.text for f in finals] == [transcribe_direct(pcm, EmbeddedConfig())]
        with wave.open(str(SAMPLES / "two_utterances.wav")) as w:
            sample = w.readframes(w.getnframes())
        finals = c.transcribe(sample, stream="vad", timeout=60)
        expected = (SAMPLES / "two_utterances.txt").read_text().split("\n")
        assert [f.text for f in finals] == [line for line in expected if line]
    assert daemon.stop() == 0
    # The lane's region was unregistered from the server when the worker stopped.
    status = grpcclient.InferenceServerClient(server.url).get_system_shared_memory_status(
        as_json=True
    )
    names = [r["name"] for r in status.get("regions", {}).values()] if status else []
    assert not [n for n in names if n.startswith("asrd-")], names
