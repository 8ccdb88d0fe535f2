"""Prometheus metrics: the daemon's status in the text exposition format, and the supervisor's
small HTTP endpoint that serves it (``metrics.listen``), for Prometheus to scrape.

The figures are those of ``asrctl status`` (one :class:`~ipc.control.Status`): per worker its
counters as last published (an ingress worker's every ``heartbeat_interval_s``, an infer
worker's every ``PUBLISH_INTERVAL_S`` while busy), its restarts, heartbeat age and memory; per
lane its rings; per Triton endpoint its breaker state. A worker's counters start again from 0
when it is replaced, which Prometheus's ``rate()`` and ``increase()`` take as a counter reset.

Threading model: none of its own. :class:`MetricsServer` registers its sockets in the
supervisor's selector (keys with data ``"metrics"`` and ``"metrics-conn"``) and is driven by that
loop: it accepts, reads one request of at most ``MAX_REQUEST_BYTES``, answers it and closes
(HTTP/1.0, no keep-alive). The answer, a few KiB, is sent with a blocking ``sendall`` bounded by
``SEND_TIMEOUT_S``; a connection that has not sent a whole request ``REQUEST_TIMEOUT_S`` after
it was accepted is closed by ``expire``, which the loop calls every tick. At most
``MAX_CONNECTIONS`` wait at once; more are closed on accept.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import selectors
import socket
import time
from collections.abc import Callable, Iterable

from ipc import control as ctl
from ipc.heartbeat import BACKEND_COUNTERS

log = logging.getLogger("asrd.metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 64

# Worker counters that are levels, not running totals (the rest only grow).
GAUGES = frozenset(
    {
        "connections",
        "streams",
        "pending_records",
        "active_utterances",
        "waiting_utterances",
        "parked",
        "endpoints_up",
    }
)
HELP = {
    "connections": "Client connections open.",
    "streams": "Streams open.",
    "pending_records": "Audio records waiting for room in the audio ring.",
    "active_utterances": "Utterances being decoded.",
    "waiting_utterances": "Utterances waiting for a free decoder.",
    "parked": "Utterances kept while every Triton endpoint is down.",
    "endpoints_up": "Triton endpoints whose breaker is closed.",
    "decode_seconds": "Time spent in the recognizer.",
    "connections_accepted": "Client connections accepted.",
    "streams_started": "Streams started.",
    "vad_discarded": "Speech shorter than vad.min_speech_ms, dropped undecoded.",
    "speech_frames": "VAD frames called voiced.",
    "silence_frames": "VAD frames called unvoiced.",
}
# Running totals whose names would clash with a level's once "_total" is appended.
RENAMED = {"connections_total": "connections_accepted", "streams_total": "streams_started"}
CUT_REASONS = {"cut_silence": "silence", "cut_max_length": "max_length", "cut_finish": "finish"}
DAEMON_STATES = ("starting", "serving", "draining")
RING_COUNTERS = ("records_pushed", "records_popped", "bytes_pushed", "full_events")
ENDPOINT_STATES = ("up", "degraded", "down")


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as (host, port); ``ValueError`` says what is wrong.

    The host must be an IP address: the endpoint is bound at start, with no name lookup."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError("must be host:port, e.g. 127.0.0.1:9464 or [::1]:9464")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        raise ValueError(
            f"{host!r} is not an IP address (no names: nothing is looked up)"
        ) from None
    if version == 6 and not bracketed:
        raise ValueError(f"an IPv6 address goes in brackets: [{host}]:{port_text}")
    if version == 4 and bracketed:
        raise ValueError("brackets are for an IPv6 address")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} must be 0-65535 (0: any free port)")
    return host, int(port_text)


# --- rendering --------------------------------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str | int]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class _Family:
    def __init__(self, name: str, kind: str, help: str) -> None:
        self.name, self.kind, self.help = name, kind, help
        self.samples: list[tuple[dict[str, str | int], float]] = []


class _Exposition:
    """Families in order of first use; each written once with its HELP and TYPE."""

    def __init__(self) -> None:
        self.families: dict[str, _Family] = {}

    def add(self, name: str, kind: str, help: str, value: float, **labels: str | int) -> None:
        family = self.families.get(name)
        if family is None:
            family = self.families[name] = _Family(name, kind, help)
        family.samples.append((labels, value))

    def text(self) -> str:
        out: list[str] = []
        for f in self.families.values():
            metric = f.name + "_total" if f.kind == "counter" else f.name
            out.append(f"# HELP {metric} {f.help}")
            out.append(f"# TYPE {metric} {f.kind}")
            for labels, value in f.samples:
                out.append(f"{metric}{_labels(labels)} {_number(value)}")
        return "\n".join(out) + "\n"


def render(status: ctl.Status) -> str:
    """The status as Prometheus text exposition (format 0.0.4)."""
    x = _Exposition()
    x.add("asrd_up", "gauge", "1 while the daemon answers.", 1)
    x.add(
        "asrd_info",
        "gauge",
        "The daemon's version, instance and backend (the value is 1).",
        1,
        version=status.version,
        instance=status.instance,
        backend=status.backend,
    )
    for state in DAEMON_STATES:
        x.add(
            "asrd_state",
            "gauge",
            "1 for the daemon's state: starting, serving or draining (SIGTERM).",
            int(status.state == state),
            state=state,
        )
    x.add("asrd_uptime_seconds", "gauge", "Seconds since the daemon started.", status.uptime_s)
    for lane in status.lanes:
        x.add(
            "asrd_lane_failed",
            "gauge",
            "1 for a lane stopped after a crash loop.",
            int(bool(lane.failed)),
            lane=lane.lane,
        )
        for w in lane.workers:
            who: dict[str, str | int] = {"role": w.role, "lane": w.lane}
            x.add(
                "asrd_worker_up",
                "gauge",
                "1 while the worker runs.",
                int(w.state == "running"),
                **who,
            )
            x.add(
                "asrd_worker_restarts",
                "counter",
                "Times the worker was replaced.",
                w.restarts,
                **who,
            )
            if w.heartbeat_age_s is not None:
                x.add(
                    "asrd_worker_heartbeat_age_seconds",
                    "gauge",
                    "Seconds since the worker's main loop last proved progress.",
                    w.heartbeat_age_s,
                    **who,
                )
            if w.rss_bytes is not None:
                x.add(
                    "asrd_worker_resident_memory_bytes",
                    "gauge",
                    "The worker's resident set size.",
                    w.rss_bytes,
                    **who,
                )
            for key, value in _worker_counters(w.counters, status.backend):
                if key in CUT_REASONS:
                    x.add(
                        "asrd_ingress_utterance_cuts",
                        "counter",
                        "Utterances ended, by why: silence (the VAD's end of speech), "
                        "max_length (vad.max_utterance_s) or finish (the stream's end).",
                        value,
                        lane=w.lane,
                        reason=CUT_REASONS[key],
                    )
                    continue
                name, kind, help = _counter_family(w.role, key)
                x.add(name, kind, help, value, lane=w.lane)
        for ring, stats in (("audio", lane.audio_ring), ("result", lane.result_ring)):
            where: dict[str, str | int] = {"lane": lane.lane, "ring": ring}
            if "capacity" in stats:
                x.add("asrd_ring_capacity_bytes", "gauge", "Ring size.", stats["capacity"], **where)
            if "used" in stats:
                x.add("asrd_ring_used_bytes", "gauge", "Bytes in the ring.", stats["used"], **where)
            for key in RING_COUNTERS:
                if key in stats:
                    x.add(
                        f"asrd_ring_{key}",
                        "counter",
                        f"Ring {key.replace('_', ' ')}.",
                        stats[key],
                        **where,
                    )
    for e in status.endpoints:
        for state in ENDPOINT_STATES:
            x.add(
                "asrd_triton_endpoint_state",
                "gauge",
                "1 for the Triton endpoint's state: up (breaker closed in every lane), "
                "degraded or down.",
                int(e.state == state),
                url=e.url,
                state=state,
            )
    return x.text()


def _worker_counters(counters: dict[str, int], backend: str) -> Iterable[tuple[str, float]]:
    for key, value in counters.items():
        if key.startswith("endpoint") and key[len("endpoint") :].isdigit():
            continue  # breaker states, encoded: asrd_triton_endpoint_state says them
        if key in BACKEND_COUNTERS and backend != "triton":
            continue  # the Triton backend's own: always 0 elsewhere
        if key == "decode_us":
            yield "decode_seconds", value / 1e6
        else:
            yield RENAMED.get(key, key), value


def _counter_family(role: str, key: str) -> tuple[str, str, str]:
    kind = "gauge" if key in GAUGES else "counter"
    help = HELP.get(key) or f"{key.replace('_', ' ').capitalize()} ({role} worker)."
    return f"asrd_{role}_{key}", kind, help


# --- the HTTP endpoint ------------------------------------------------------------------------


class MetricsServer:
    """``GET /metrics`` on a TCP address, answered from ``page()``; see the module docstring."""

    def __init__(
        self,
        host: str,
        port: int,
        page: Callable[[], str],
        selector: selectors.BaseSelector,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.page = page
        self.selector = selector
        self.clock = clock
        self.conns: dict[socket.socket, tuple[float, bytearray]] = {}
        bound = sock.getsockname()
        where = f"[{host}]" if family == socket.AF_INET6 else host
        self.url = f"http://{where}:{bound[1]}/metrics"
        selector.register(sock, selectors.EVENT_READ, "metrics")

    def accept(self) -> None:
        """Take a new connection and watch it for its request."""
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        if len(self.conns) >= MAX_CONNECTIONS:
            conn.close()
            return
        conn.setblocking(False)
        self.conns[conn] = (self.clock(), bytearray())
        self.selector.register(conn, selectors.EVENT_READ, "metrics-conn")

    def on_data(self, conn: socket.socket) -> None:
        """Read what came; answer and close once the request is whole."""
        _since, buf = self.conns[conn]
        try:
            data = conn.recv(MAX_REQUEST_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        buf += data
        if b"\r\n\r\n" not in buf and b"\n\n" not in buf:
            if len(buf) >= MAX_REQUEST_BYTES:
                self._answer(conn, 431, "Request Header Fields Too Large", "request too large\n")
            return
        line = bytes(buf.split(b"\n", 1)[0]).rstrip(b"\r").decode("latin-1")
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self._answer(conn, 400, "Bad Request", "expected: GET /metrics HTTP/1.1\n")
        elif parts[0] not in ("GET", "HEAD"):
            self._answer(conn, 405, "Method Not Allowed", "only GET and HEAD\n", head=False)
        elif parts[1].split("?", 1)[0] != "/metrics":
            self._answer(
                conn, 404, "Not Found", "asrd serves /metrics only\n", head=parts[0] == "HEAD"
            )
        else:
            try:
                page = self.page()
            except Exception as exc:  # a rendering bug must not take the supervisor down
                log.exception("metrics page failed")
                self._answer(conn, 500, "Internal Server Error", f"asrd: {exc!r}\n")
                return
            self._answer(conn, 200, "OK", page, head=parts[0] == "HEAD")

    def _answer(
        self, conn: socket.socket, code: int, reason: str, body: str, head: bool = False
    ) -> None:
        payload = body.encode()
        header = (
            f"HTTP/1.0 {code} {reason}\r\nContent-Type: {CONTENT_TYPE}\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n"
            + ("Allow: GET, HEAD\r\n" if code == 405 else "")
            + "\r\n"
        )
        try:
            conn.settimeout(SEND_TIMEOUT_S)
            conn.sendall(header.encode() + (b"" if head else payload))
            # Closing with unread bytes would reset the connection, and the client could lose
            # the answer: read what is already there (an oversized request's rest) first.
            conn.setblocking(False)
            with contextlib.suppress(BlockingIOError, InterruptedError):
                for _ in range(8):
                    if not conn.recv(MAX_REQUEST_BYTES):
                        break
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the scraper went away or stalled: nothing to tell it
        self.close(conn)

    def expire(self) -> int:
        """Close connections whose request has not come whole in time; how many."""
        now = self.clock()
        late = [c for c, (since, _) in self.conns.items() if now - since > REQUEST_TIMEOUT_S]
        for conn in late:
            self.close(conn)
        return len(late)

    def close(self, conn: socket.socket) -> None:
        self.conns.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        conn.close()

    def shutdown(self) -> None:
        for conn in list(self.conns):
            self.close(conn)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.sock)
        self.sock.close()
