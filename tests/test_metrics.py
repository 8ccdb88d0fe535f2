"""Prometheus metrics: the text exposition (unit), the supervisor's HTTP endpoint over real
sockets with an injected clock, and a real daemon scraped while it transcribes."""

from __future__ import annotations

import re
import selectors
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import metrics
from daemon.config import parse_config
from daemon.errors import ConfigError
from daemon.metrics import MetricsServer, parse_listen, render
from ipc import control as ctl
from ipc.client import Client
from tests.daemon_fixtures import start_daemon as start_daemon
from tests.daemon_fixtures import status, wait_until
from tests.test_daemon import Start

pytestmark = pytest.mark.timeout(60)
SAMPLES = Path(__file__).resolve().parent.parent / "samples"
SAMPLE_LINE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-z_]+="(?:[^"\\]|\\.)*",?)*\})? (\S+)$'
)


def parse(text: str) -> dict[str, dict[str, str]]:
    """Check the exposition's shape and return {sample name + labels: value} by family.

    Every sample follows its family's one HELP and one TYPE line, no series repeats, counters
    end in ``_total``, and every value is a number."""
    families: dict[str, dict[str, str]] = {}
    kinds: dict[str, str] = {}
    current = ""
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            current = line.split()[2]
            assert current not in families, f"{current} described twice"
            families[current] = {}
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name == current and kind in ("counter", "gauge"), line
            kinds[name] = kind
            assert (kind == "counter") == name.endswith("_total"), line
        else:
            m = SAMPLE_LINE.match(line)
            assert m, f"not a sample line: {line!r}"
            assert m.group(1) == current and current in kinds, f"{line!r} outside its family"
            series = m.group(1) + (m.group(2) or "")
            assert series not in families[current], f"{series} twice"
            float(m.group(3))
            families[current][series] = m.group(3)
    return families


def status_with(backend: str = "embedded", **infer: int) -> ctl.Status:
    workers = [
        ctl.WorkerStatus(
            role="ingress",
            lane=0,
            pid=10,
            state="running",
            restarts=2,
            heartbeat_age_s=0.25,
            cpus=[0],
            rss_bytes=30 << 20,
            counters={
                "connections": 3,
                "connections_total": 7,
                "streams": 4,
                "streams_total": 9,
                "cut_silence": 5,
                "cut_max_length": 1,
                "cut_finish": 2,
            },
        ),
        ctl.WorkerStatus(
            role="infer",
            lane=0,
            pid=0,
            state="restarting",
            restarts=0,
            heartbeat_age_s=None,
            cpus=[],
            counters={"decode_us": 2_500_000, "active_utterances": 1, **infer},
        ),
    ]
    return ctl.Status(
        version="1.2",
        instance='odd"name\\',
        pid=1,
        uptime_s=12.5,
        state="draining",
        backend=backend,
        socket="/run/asrd.sock",
        lanes=[
            ctl.LaneStatus(
                lane=0, workers=workers, audio_ring={"capacity": 4096, "used": 64, "full_events": 2}
            )
        ],
    )


def test_render_names_kinds_and_values() -> None:
    f = parse(render(status_with()))
    assert f["asrd_up"] == {"asrd_up": "1"}
    assert f["asrd_info"] == {
        'asrd_info{version="1.2",instance="odd\\"name\\\\",backend="embedded"}': "1"
    }
    assert f["asrd_state"] == {
        'asrd_state{state="starting"}': "0",
        'asrd_state{state="serving"}': "0",
        'asrd_state{state="draining"}': "1",
    }
    assert f["asrd_worker_up"] == {
        'asrd_worker_up{role="ingress",lane="0"}': "1",
        'asrd_worker_up{role="infer",lane="0"}': "0",
    }
    assert (
        f["asrd_worker_restarts_total"]['asrd_worker_restarts_total{role="ingress",lane="0"}']
        == "2"
    )
    # No heartbeat yet, no memory figure: no sample rather than a made-up one.
    assert list(f["asrd_worker_heartbeat_age_seconds"]) == [
        'asrd_worker_heartbeat_age_seconds{role="ingress",lane="0"}'
    ]
    # A level and the running total of the same thing: two families.
    assert f["asrd_ingress_connections"] == {'asrd_ingress_connections{lane="0"}': "3"}
    assert f["asrd_ingress_connections_accepted_total"] == {
        'asrd_ingress_connections_accepted_total{lane="0"}': "7"
    }
    assert f["asrd_ingress_streams_started_total"] == {
        'asrd_ingress_streams_started_total{lane="0"}': "9"
    }
    assert f["asrd_ingress_utterance_cuts_total"] == {
        'asrd_ingress_utterance_cuts_total{lane="0",reason="silence"}': "5",
        'asrd_ingress_utterance_cuts_total{lane="0",reason="max_length"}': "1",
        'asrd_ingress_utterance_cuts_total{lane="0",reason="finish"}': "2",
    }
    assert f["asrd_infer_decode_seconds_total"] == {
        'asrd_infer_decode_seconds_total{lane="0"}': "2.5"
    }
    assert f["asrd_infer_active_utterances"] == {'asrd_infer_active_utterances{lane="0"}': "1"}
    assert f["asrd_ring_used_bytes"] == {'asrd_ring_used_bytes{lane="0",ring="audio"}': "64"}
    assert f["asrd_ring_full_events_total"] == {
        'asrd_ring_full_events_total{lane="0",ring="audio"}': "2"
    }
    assert f["asrd_lane_failed"] == {'asrd_lane_failed{lane="0"}': "0"}


def test_triton_figures_only_with_the_triton_backend() -> None:
    triton_keys = {"failovers": 2, "endpoints_up": 1, "endpoint0": 1}
    without = parse(render(status_with("embedded", **triton_keys)))
    assert not [name for name in without if "failovers" in name or "endpoint" in name]
    st = status_with("triton", **triton_keys)
    st.endpoints = [ctl.EndpointStatus(url="10.0.0.5:8001", lanes=["open"], state="down")]
    f = parse(render(st))
    assert f["asrd_infer_failovers_total"] == {'asrd_infer_failovers_total{lane="0"}': "2"}
    assert f["asrd_infer_endpoints_up"] == {'asrd_infer_endpoints_up{lane="0"}': "1"}
    assert f["asrd_triton_endpoint_state"] == {
        'asrd_triton_endpoint_state{url="10.0.0.5:8001",state="up"}': "0",
        'asrd_triton_endpoint_state{url="10.0.0.5:8001",state="degraded"}': "0",
        'asrd_triton_endpoint_state{url="10.0.0.5:8001",state="down"}': "1",
    }
    assert not [name for name in f if re.search(r"endpoint\d", name)]  # encoded states stay in


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::1]:9464", ("::1", 9464)),
    ],
)
def test_listen_addresses(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected
    assert parse_config(f'[metrics]\nlisten = "{value}"\n').metrics.listen == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("9464", "must be host:port, e.g. 127.0.0.1:9464 or [::1]:9464"),
        ("localhost:9464", "'localhost' is not an IP address (no names: nothing is looked up)"),
        ("::1:9464", "an IPv6 address goes in brackets: [::1]:9464"),
        ("[10.0.0.1]:80", "brackets are for an IPv6 address"),
        ("127.0.0.1:70000", "port '70000' must be 0-65535 (0: any free port)"),
    ],
)
def test_bad_listen_address_names_field_value_and_rule(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f'[metrics]\nlisten = "{value}"\n', source="asrd.toml")
    assert str(info.value) == f'asrd.toml: metrics.listen = "{value}": {message}'


# --- the HTTP endpoint, driven like the supervisor drives it ----------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server() -> Iterator[tuple[MetricsServer, selectors.BaseSelector, Clock]]:
    sel = selectors.DefaultSelector()
    clock = Clock()
    srv = MetricsServer("127.0.0.1", 0, lambda: "asrd_up 1\n", sel, clock)
    yield srv, sel, clock
    srv.shutdown()
    assert sel.get_map() == {}  # every socket unregistered
    sel.close()


def pump(srv: MetricsServer, sel: selectors.BaseSelector) -> None:
    for key, _ in sel.select(0.05):
        if key.data == "metrics":
            srv.accept()
        else:
            srv.on_data(key.fileobj)  # type: ignore[arg-type]


def exchange(srv: MetricsServer, sel: selectors.BaseSelector, request: bytes) -> bytes:
    port = int(srv.url.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(request)
        c.setblocking(False)
        reply = b""
        for _ in range(200):
            pump(srv, sel)
            try:
                data = c.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                return reply
            reply += data
    raise AssertionError(f"no complete answer to {request!r}; got {reply!r}")


def test_http_answers(server: tuple[MetricsServer, selectors.BaseSelector, Clock]) -> None:
    srv, sel, _ = server
    ok = exchange(srv, sel, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, body = ok.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
    assert b"Content-Length: 10" in head and body == b"asrd_up 1\n"
    assert exchange(srv, sel, b"GET /metrics?x=1 HTTP/1.0\n\n").endswith(b"\r\n\r\nasrd_up 1\n")
    assert exchange(srv, sel, b"HEAD /metrics HTTP/1.1\r\n\r\n").endswith(b"\r\n\r\n")
    assert exchange(srv, sel, b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 404 Not Found")
    post = exchange(srv, sel, b"POST /metrics HTTP/1.1\r\n\r\n")
    assert post.startswith(b"HTTP/1.0 405 Method Not Allowed") and b"Allow: GET, HEAD" in post
    assert exchange(srv, sel, b"hello\r\n\r\n").startswith(b"HTTP/1.0 400 Bad Request")
    big = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * metrics.MAX_REQUEST_BYTES
    assert exchange(srv, sel, big).startswith(b"HTTP/1.0 431")
    assert srv.conns == {}


def test_a_failing_page_is_a_500_and_the_server_goes_on(
    server: tuple[MetricsServer, selectors.BaseSelector, Clock],
) -> None:
    srv, sel, _ = server
    good = srv.page
    srv.page = lambda: str(1 / 0)
    assert exchange(srv, sel, b"GET /metrics HTTP/1.1\r\n\r\n").startswith(
        b"HTTP/1.0 500 Internal Server Error"
    )
    srv.page = good
    assert exchange(srv, sel, b"GET /metrics HTTP/1.1\r\n\r\n").endswith(b"asrd_up 1\n")


def test_a_silent_client_is_dropped_and_others_are_served_meanwhile(
    server: tuple[MetricsServer, selectors.BaseSelector, Clock],
) -> None:
    srv, sel, clock = server
    port = int(srv.url.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as silent:
        silent.sendall(b"GET /metr")  # and nothing more
        wait_until(lambda: (pump(srv, sel), len(srv.conns) == 1)[1], 5, "the silent client")
        assert exchange(srv, sel, b"GET /metrics HTTP/1.1\r\n\r\n").endswith(b"asrd_up 1\n")
        clock.now += metrics.REQUEST_TIMEOUT_S - 0.1
        assert srv.expire() == 0
        clock.now += 0.2
        assert srv.expire() == 1 and srv.conns == {}
        silent.settimeout(5)
        assert silent.recv(100) == b""  # closed, unanswered


def test_connections_beyond_the_bound_are_closed_on_accept(
    server: tuple[MetricsServer, selectors.BaseSelector, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, sel, _ = server
    monkeypatch.setattr(metrics, "MAX_CONNECTIONS", 2)
    port = int(srv.url.split(":")[2].split("/")[0])
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    try:
        wait_until(lambda: (pump(srv, sel), len(srv.conns) == 2)[1], 5, "two held")
        for _ in range(10):
            pump(srv, sel)
        assert len(srv.conns) == 2
        assert clients[2].recv(100) == b""  # the third was closed at once
    finally:
        for c in clients:
            c.close()


# --- a real daemon ----------------------------------------------------------------------------


def scrape(url: str) -> dict[str, dict[str, str]]:
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == metrics.CONTENT_TYPE
        return parse(r.read().decode())


def test_a_real_daemon_is_scraped_while_it_transcribes(start_daemon: Start) -> None:
    daemon = start_daemon('lanes = 2\n[metrics]\nlisten = "127.0.0.1:0"\n')
    url = status(daemon).metrics
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", url), url
    assert f"Prometheus metrics on {url}" in daemon.log_path.read_text()  # type: ignore[union-attr]
    f = scrape(url)
    assert set(f["asrd_worker_up"].values()) == {"1"} and len(f["asrd_worker_up"]) == 4
    assert f["asrd_state"]['asrd_state{state="serving"}'] == "1"

    with wave.open(str(SAMPLES / "coffee.wav")) as w:
        pcm = w.readframes(w.getnframes())
    with Client.connect(daemon.socket_path) as c:
        finals = c.transcribe(pcm, 16000)
    assert finals

    def finals_counted() -> bool:
        done = scrape(url)["asrd_ingress_finals_total"]
        return sum(int(v) for v in done.values()) >= len(finals)

    wait_until(finals_counted, 10, "the finals in the scraped metrics")
    f = scrape(url)
    cuts = {
        k.split('reason="')[1].rstrip('"}'): int(v)
        for k, v in f["asrd_ingress_utterance_cuts_total"].items()
        if int(v)
    }
    # Every utterance ended at a silence or at the stream's end, one cut per final.
    assert sum(cuts.values()) == len(finals) and set(cuts) <= {"silence", "finish"}, cuts
    assert sum(float(v) for v in f["asrd_infer_decode_seconds_total"].values()) > 0
    assert sum(int(v) for v in f["asrd_ingress_streams_started_total"].values()) >= 1

    # asrctl metrics prints the same families from the control socket.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon.asrctl",
            "metrics",
            "--control-socket",
            str(daemon.control_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert set(parse(out.stdout)) == set(f)

    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url.replace("/metrics", "/"), timeout=5)
    assert info.value.code == 404
    port = int(url.split(":")[2].split("/")[0])
    assert daemon.stop() == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_metrics_port_in_use_is_a_boot_failure_naming_the_field(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = tmp_path / "asrd.toml"
        cfg.write_text(
            f'instance = "m{port}"\nruntime_dir = "{tmp_path / "rt"}"\n'
            f'[backend]\nkind = "null"\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
        )
        proc = subprocess.run(
            [sys.executable, "-m", "daemon.cli", "run", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 75, proc.stderr
    assert f"metrics.listen = '127.0.0.1:{port}': the address is in use" in proc.stderr
    assert not list((tmp_path / "rt").glob("*.sock"))  # nothing left behind
