"""The io_uring event core (``ipc/uring.py``) serving real clients over a real Unix socket, its
clear failure where io_uring cannot be used, and a smoke run of ``bench.io_backend``.

The serving tests run only where the kernel gives a ring (``daemon.platform.probe()``) and the
installed ``liburing`` can make one in this process (``ipc.uring.check_binding()``: the 2026.x
wheels die with SIGILL on CPUs without AVX-512); elsewhere they skip with that reason, and the
tests of the failure path run instead.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from daemon.errors import BootError
from daemon.platform import probe
from ipc import uring
from ipc.framing import BadFrame, FrameTooLarge, FrameWriter

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[1]


def _unusable() -> str | None:
    io = probe().io_uring
    if io.state != "usable":
        return f"io_uring is {io.state}: {io.detail}"
    return uring.check_binding()


UNUSABLE = _unusable()
needs_uring = pytest.mark.skipif(UNUSABLE is not None, reason=str(UNUSABLE))


class Req(msgspec.Struct, tag="req"):
    seq: int
    reply_bytes: int = 0


class Rep(msgspec.Struct, tag="rep"):
    seq: int
    data: bytes = b""


class Err(msgspec.Struct, tag="err"):
    message: str


def handle(msg: Req | BadFrame) -> Rep | Err:
    if isinstance(msg, BadFrame):
        return Err(message=msg.message)
    return Rep(seq=msg.seq, data=b"x" * msg.reply_bytes)


def too_large(exc: FrameTooLarge) -> Err:
    return Err(message=str(exc))


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class Served:
    """A UringControlServer on a thread of its own (it owns the ring: one thread, as
    documented), driven by ``wait`` or, like the supervisor, by a selector on its eventfd."""

    def __init__(self, path: str, mode: str) -> None:
        self.path = path
        self.mode = mode
        self.server: uring.UringControlServer[Req] | None = None
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.sends = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(self.path)
            sock.listen(64)
            sock.setblocking(False)  # as the supervisor leaves its control socket
            server = uring.UringControlServer(
                sock, Req, handle, on_too_large=too_large, max_frame_bytes=4096
            )
            self.server = server
            real_send = server.loop.send

            def counting_send(fd: int, data: bytes, cb: uring.Completion) -> int:
                self.sends += 1
                return real_send(fd, data, cb)

            server.loop.send = counting_send  # type: ignore[method-assign]
            self.ready.set()
            try:
                if self.mode == "wait":
                    server.serve_forever(0.02, self.stop.is_set)
                else:
                    with selectors.DefaultSelector() as sel:
                        sel.register(server.fileno(), selectors.EVENT_READ)
                        while not self.stop.is_set():
                            for _key, _ in sel.select(0.02):
                                server.process()
            finally:
                server.close()
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    def __enter__(self) -> Served:
        self.thread.start()
        assert self.ready.wait(30)
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error

    @property
    def stats(self) -> dict[str, int]:
        assert self.server is not None
        return self.server.stats


@pytest.fixture
def sock_path() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="asrd-uring-") as d:
        yield os.path.join(d, "ctl.sock")


@pytest.fixture(params=["wait", "selector"])
def served(request: pytest.FixtureRequest, sock_path: str) -> Iterator[Served]:
    if UNUSABLE is not None:
        pytest.skip(UNUSABLE)
    with Served(sock_path, request.param) as s:
        yield s


class Client:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(path)
        self.writer = FrameWriter()
        self.dec = msgspec.msgpack.Decoder(Rep | Err)
        self.buf = bytearray()

    def send(self, *msgs: Any) -> None:
        for m in msgs:
            self.writer.append(m)
        self.sock.sendall(self.writer.take())

    def read(self, n: int = 1, delay_s: float = 0.0) -> list[Rep | Err]:
        out: list[Rep | Err] = []
        while len(out) < n:
            while len(self.buf) >= 4:
                size = int.from_bytes(self.buf[:4], "big")
                if len(self.buf) < 4 + size:
                    break
                out.append(self.dec.decode(bytes(self.buf[4 : 4 + size])))
                del self.buf[: 4 + size]
            if len(out) >= n:
                break
            if delay_s:
                time.sleep(delay_s)
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed the connection")
            self.buf += data
        return out

    def close(self) -> None:
        self.sock.close()


# --- serving ------------------------------------------------------------------------------------


def test_concurrent_connections(served: Served) -> None:
    clients = [Client(served.path) for _ in range(8)]
    try:
        for rnd in range(20):
            for i, c in enumerate(clients):
                c.send(Req(seq=rnd * 100 + i))
            for i, c in enumerate(clients):
                assert c.read() == [Rep(seq=rnd * 100 + i)]
    finally:
        for c in clients:
            c.close()
    deadline = time.monotonic() + 10
    while served.stats["closed"] < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served.stats["accepted"] == 8
    assert served.stats["requests"] == 160
    assert served.stats["closed"] == 8


def test_clients_in_threads(served: Served) -> None:
    errors: list[BaseException] = []

    def one(k: int) -> None:
        try:
            c = Client(served.path)
            for j in range(50):
                c.send(Req(seq=k * 1000 + j))
                assert c.read() == [Rep(seq=k * 1000 + j)]
            c.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert served.stats["requests"] == 16 * 50


def test_pipelined_requests_answer_in_order(served: Served) -> None:
    c = Client(served.path)
    c.send(*(Req(seq=i) for i in range(200)))  # one write, many frames
    assert [r.seq for r in c.read(200) if isinstance(r, Rep)] == list(range(200))
    # Frames split at every byte boundary still decode.
    frame = FrameWriter().encode(Req(seq=7))
    for b in frame:
        c.sock.sendall(bytes([b]))
    assert c.read() == [Rep(seq=7)]
    c.close()


def test_bad_frame_gets_error_and_connection_goes_on(served: Served) -> None:
    c = Client(served.path)
    c.sock.sendall(b"\x00\x00\x00\x03abc")
    (err,) = c.read()
    assert isinstance(err, Err)
    c.send(Req(seq=1))
    assert c.read() == [Rep(seq=1)]
    c.close()


def test_oversized_frame_gets_error_then_close(served: Served) -> None:
    c = Client(served.path)
    c.sock.sendall((1 << 30).to_bytes(4, "big"))
    (err,) = c.read()
    assert isinstance(err, Err) and "exceeds the limit" in err.message
    with pytest.raises(EOFError):
        c.read()
    c.close()


def test_client_vanishing_mid_frame_and_reset(served: Served) -> None:
    # Half a frame, then gone.
    c = Client(served.path)
    frame = FrameWriter().encode(Req(seq=1))
    c.sock.sendall(frame[: len(frame) // 2])
    c.close()
    # Requests whose replies are never read: the close resets the server's side (ECONNRESET /
    # EPIPE on its next recv or send).
    c = Client(served.path)
    c.send(*(Req(seq=i, reply_bytes=2000) for i in range(200)))
    time.sleep(0.05)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.close()
    # A connection that never sends anything and goes.
    Client(served.path).close()
    deadline = time.monotonic() + 10
    while served.stats["closed"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served.stats["closed"] == 3
    # The server goes on serving.
    ok = Client(served.path)
    ok.send(Req(seq=99))
    assert ok.read() == [Rep(seq=99)]
    ok.close()


def test_large_reply_takes_several_sends(served: Served) -> None:
    c = Client(served.path)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    before = served.sends
    size = 4 << 20
    c.send(Req(seq=5, reply_bytes=size))
    (rep,) = c.read(delay_s=0.0005)
    assert isinstance(rep, Rep) and rep.seq == 5 and rep.data == b"x" * size
    assert served.sends - before >= 2  # short sends were continued
    c.send(Req(seq=6))
    assert c.read() == [Rep(seq=6)]
    c.close()


def test_writer_that_never_reads_does_not_grow_the_server(sock_path: str) -> None:
    if UNUSABLE is not None:
        pytest.skip(UNUSABLE)
    n, reply = 300, 60_000  # 18 MB of replies asked for in a few KB of requests
    with Served(sock_path, "wait") as s:
        c = Client(sock_path)
        sender = threading.Thread(
            target=c.send, args=tuple(Req(seq=i, reply_bytes=reply) for i in range(n))
        )
        sender.start()
        time.sleep(0.5)  # the client reads nothing meanwhile
        assert s.server is not None
        (conn,) = s.server.conns.values()
        assert conn.paused and conn.recv_ud == 0  # it stopped answering and reading
        assert conn.backlog() <= s.server.max_pending_bytes + reply + 100
        got = c.read(n)  # now read: the rest is answered as the backlog drains
        sender.join(10)
        assert [r.seq for r in got if isinstance(r, Rep)] == list(range(n))
        assert all(isinstance(r, Rep) and len(r.data) == reply for r in got)
        c.close()


def test_close_releases_every_fd(sock_path: str) -> None:
    if UNUSABLE is not None:
        pytest.skip(UNUSABLE)
    uring.check_binding()  # cached before counting
    before = fd_count()
    with Served(sock_path, "selector") as s:
        clients = [Client(sock_path) for _ in range(5)]
        for c in clients:
            c.send(Req(seq=1))
            c.read()
        half = Client(sock_path)
        half.sock.sendall(b"\x00\x00")  # a recv in flight with a partial frame buffered
        time.sleep(0.05)
        assert s.server is not None and len(s.server.conns) == 6
    # The server closed with 6 connections open: their ends must now be closed.
    for c in [*clients, half]:
        c.sock.settimeout(5)
        assert c.sock.recv(10) == b""
        c.close()
    assert fd_count() == before


def test_loop_close_cancels_inflight(sock_path: str) -> None:
    if UNUSABLE is not None:
        pytest.skip(UNUSABLE)
    before = fd_count()
    a, b = socket.socketpair()
    called: list[int] = []
    loop = uring.UringLoop(8)
    assert loop.fileno() >= 0 and loop.ring_fd >= 0
    buf = bytearray(100)
    loop.recv(a.fileno(), buf, lambda res, flags: called.append(res))
    assert loop.inflight == 1
    b.sendall(b"hello")
    deadline = time.monotonic() + 5
    while not called and time.monotonic() < deadline:
        loop.wait(0.05)
    assert called == [5] and bytes(buf[:5]) == b"hello"
    loop.recv(a.fileno(), buf, lambda res, flags: called.append(res))
    loop.close()
    loop.close()  # idempotent
    assert called == [5]  # the cancelled recv's callback is not called
    assert loop.inflight == 0
    a.close()
    b.close()
    assert fd_count() == before


def test_eventfd_is_readable_when_completions_are_pending() -> None:
    if UNUSABLE is not None:
        pytest.skip(UNUSABLE)
    a, b = socket.socketpair()
    with uring.UringLoop(8) as loop, selectors.DefaultSelector() as sel:
        sel.register(loop.fileno(), selectors.EVENT_READ)
        got: list[int] = []
        loop.recv(a.fileno(), bytearray(16), lambda res, flags: got.append(res))
        assert sel.select(0.05) == []
        b.sendall(b"abc")
        assert sel.select(5)
        assert loop.process() == 1 and got == [3]
        assert sel.select(0.05) == []  # process() reset it
    a.close()
    b.close()


# --- where io_uring cannot be used ---------------------------------------------------------------


def test_import_needs_no_liburing() -> None:
    code = "import sys; sys.modules['liburing'] = None; import ipc.uring; print('ok')"
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_missing_liburing_is_a_boot_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_liburing() -> Any:
        raise ImportError("No module named 'liburing'")

    monkeypatch.setattr(uring, "_import_liburing", no_liburing)
    with pytest.raises(uring.UringUnavailable, match="not importable") as info:
        uring.UringLoop()
    assert isinstance(info.value, BootError) and info.value.exit_code == 70


def test_binding_that_dies_with_sigill_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.SimpleNamespace(__version__="9999.1.1", __file__="/nowhere/liburing.py")
    monkeypatch.setattr(uring, "_import_liburing", lambda: fake)
    monkeypatch.setattr(uring, "_CHECKED", {})
    monkeypatch.setattr(
        uring, "_CANARY_CODE", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"
    )
    reason = uring.check_binding()
    assert reason is not None and "SIGILL" in reason and "9999.1.1" in reason
    with pytest.raises(uring.UringUnavailable, match="SIGILL"):
        uring.UringLoop()
    # The verdict is cached: no second child.
    monkeypatch.setattr(uring, "_CANARY_CODE", "raise SystemExit(0)")
    assert uring.check_binding() == reason


def test_seccomp_kill_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.SimpleNamespace(__version__="1", __file__="/nowhere/liburing.py")
    monkeypatch.setattr(uring, "_import_liburing", lambda: fake)
    monkeypatch.setattr(uring, "_CHECKED", {})
    monkeypatch.setattr(
        uring, "_CANARY_CODE", "import os, signal; os.kill(os.getpid(), signal.SIGSYS)"
    )
    reason = uring.check_binding()
    assert reason is not None and "seccomp" in reason


@pytest.mark.skipif(UNUSABLE is None, reason="io_uring is usable here")
def test_unusable_here_raises_the_reason() -> None:
    assert UNUSABLE is not None
    with pytest.raises(BootError) as info:
        uring.UringLoop()
    assert str(info.value)


# --- the benchmark ------------------------------------------------------------------------------


def test_bench_io_backend_smoke(tmp_path: Path) -> None:
    from bench import io_backend

    out = tmp_path / "io.json"
    assert io_backend.main(["--smoke", "--json", str(out)]) == 0
    report = msgspec.json.decode(out.read_bytes())
    backends = {c["backend"] for c in report["cells"]}
    assert {"asyncio", "selectors"} <= backends
    if UNUSABLE is None:
        assert {"uring", "uring-selector"} <= backends
    else:
        assert set(report["config"]["skipped"]) == {"uring", "uring-selector"}
    for c in report["cells"]:
        assert c["round_trips"] > 0 and c["latency_us"]["p50"] > 0
        assert c["server_cpu_us_per_msg"] > 0
    assert report["machine"]["cpus_logical"] >= 1
    # No server process is left behind.
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        with contextlib.suppress(OSError):
            assert b"bench.io_backend\x00--serve" not in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_daemon_with_io_uring_serves_status_or_refuses_to_start(tmp_path: Path) -> None:
    """``io.backend = "io_uring"``: where the binding works the control socket is served through
    io_uring; where it cannot (no liburing, a wheel this CPU cannot run, io_uring blocked) the
    daemon refuses to start with exit 78 and the reason, instead of crashing."""
    from daemon.launcher import DaemonProcess
    from ipc.client import ControlClient

    problem = uring.check_binding()
    config = 'lanes = 1\n[io]\nbackend = "io_uring"\n[backend]\nkind = "null"\n'
    daemon = DaemonProcess(config, runtime_dir=tmp_path, log_path=tmp_path / "asrd.log")
    if problem is None:
        with daemon:
            assert ControlClient.status(daemon.control_path).state == "serving"
            assert "io io_uring" in (tmp_path / "asrd.log").read_text()
        return
    with pytest.raises(RuntimeError, match="exited with 78"):
        daemon.start(60)
    daemon.kill_session()
    daemon.cleanup()
    log = (tmp_path / "asrd.log").read_text()
    assert "io.backend = 'io_uring'" in log and problem.split(";")[0][:40] in log
