"""Unit tests for ipc.ring (SPSC shared-memory ring) and ipc.wakeup.

Run as a script (``python tests/test_ring.py producer ...``) this file is also the child process
of the cross-process tests.
"""

from __future__ import annotations

import array
import mmap
import os
import random
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import posix_ipc
import pytest

import ipc.ring as ring_mod
from daemon.errors import RingError, ShmError
from ipc.ring import HEADER_SIZE, PAD_KIND, RECORD_HEADER, Record, Ring, max_payload_for
from ipc.wakeup import Wakeup

SHM_DIR = Path("/dev/shm")
REPO = Path(__file__).resolve().parent.parent


def _tag() -> str:
    return f"asrd-test-{os.getpid()}-"


def _leftovers() -> set[str]:
    return {p.name for p in SHM_DIR.glob(_tag() + "*")}


@pytest.fixture(autouse=True)
def no_leftover_segments() -> Iterator[None]:
    before = _leftovers()
    yield
    assert _leftovers() == before, "test left shared-memory segments behind"


@pytest.fixture
def make_ring() -> Iterator[Callable[..., Ring]]:
    """Factory for rings with unique names; every ring (and attachment) is closed and unlinked."""
    made: list[Ring] = []

    def make(capacity: int = 4096, name: str | None = None) -> Ring:
        r = Ring.create(name or f"/{_tag()}{uuid.uuid4().hex[:12]}", capacity)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()
        r.unlink()


def rec_size(n: int) -> int:
    return RECORD_HEADER + ((n + 7) & ~7)


def raw_index(r: Ring, off: int) -> int:
    """Peek at a header word (white-box checks)."""
    return int(struct.unpack_from("=Q", r._buf, off)[0])


def head_of(r: Ring) -> int:
    return raw_index(r, ring_mod.OFF_HEAD)


# ----------------------------------------------------------------------------- basics


def test_push_pop_round_trip(make_ring: Callable[..., Ring]) -> None:
    r = make_ring()
    assert r.pop() is None
    assert r.pop_many() == []
    assert r.try_push(7, key=0xDEADBEEF_00000001, seq=2**64 - 1, payload=b"hello", flags=3)
    rec = r.pop()
    assert rec == Record(kind=7, flags=3, key=0xDEADBEEF_00000001, seq=2**64 - 1, payload=b"hello")
    assert isinstance(rec.payload, bytes)
    assert r.pop() is None
    assert r.pending_bytes() == 0


def test_payload_types_and_empty_payload(make_ring: Callable[..., Ring]) -> None:
    r = make_ring()
    samples: list[tuple[bytes | bytearray | memoryview, bytes]] = [
        (b"", b""),
        (bytearray(b"abc"), b"abc"),
        (memoryview(b"0123456789")[2:7], b"23456"),
        # A non-byte format: copied by bytes, the length is nbytes.
        (memoryview(array.array("h", [1, -2, 3])), array.array("h", [1, -2, 3]).tobytes()),
    ]
    for i, (payload, _) in enumerate(samples):
        assert r.try_push(1, i, i, payload)
    got = r.pop_many()
    assert [g.payload for g in got] == [want for _, want in samples]
    assert [g.seq for g in got] == list(range(len(samples)))


def test_payload_copied_out(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(1024)
    r.try_push(1, 0, 0, b"A" * 200)
    rec = r.pop()
    assert rec is not None
    # Reuse the same slot bytes many times; the popped copy must not change.
    for i in range(20):
        assert r.try_push(1, 0, i, b"B" * 200)
        assert r.pop() is not None
    assert rec.payload == b"A" * 200


def test_record_boundaries_and_alignment(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(8192)
    expected = 0
    for n in range(0, 40):
        assert r.try_push(2, n, n, bytes([n]) * n)
        expected += rec_size(n)
        assert head_of(r) == expected
        assert head_of(r) % 8 == 0
        assert r.pending_bytes() == expected
    for n in range(0, 40):
        rec = r.pop()
        assert rec is not None and rec.payload == bytes([n]) * n and rec.key == n
    assert r.pending_bytes() == 0


def test_capacity_validation(make_ring: Callable[..., Ring]) -> None:
    for bad in (0, 8, 248, 1001, 4100):
        with pytest.raises(ValueError, match="capacity"):
            make_ring(bad)
    r = make_ring(256)
    assert r.max_payload == 32


# ----------------------------------------------------------------------------- wrap-around


def _fill_to(r: Ring, pos: int) -> None:
    """Push then pop records on a fresh ring so that head and tail stand at position ``pos``."""
    assert head_of(r) == 0
    left = pos
    while left:
        size = min(r.max_payload + RECORD_HEADER, left)
        if 0 < left - size < RECORD_HEADER:
            size = left - RECORD_HEADER  # keep the remainder big enough for one more record
        assert r.try_push(9, 0, 0, b"x" * (size - RECORD_HEADER))
        left -= size
    r.pop_many()
    assert head_of(r) == pos and r.pending_bytes() == 0


def test_wrap_with_pad_record(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(1024)
    _fill_to(r, 1024 - 64)  # 64 bytes left: room for a PAD header, not for a 96-byte record
    stats_before = r.stats()
    assert r.try_push(3, 1, 42, b"p" * 64)
    assert r.pending_bytes() == 64 + rec_size(64)
    pad = struct.unpack_from("=IH", r._buf, HEADER_SIZE + 1024 - 64)
    assert pad == (64 - RECORD_HEADER, PAD_KIND)
    assert r.pop() == Record(3, 0, 1, 42, b"p" * 64)
    assert r.pending_bytes() == 0
    # The PAD is consumed silently: exactly one record counted each way.
    s = r.stats()
    assert s["records_pushed"] - stats_before["records_pushed"] == 1
    assert s["records_popped"] - stats_before["records_popped"] == 1
    assert head_of(r) % 1024 == rec_size(64)


@pytest.mark.parametrize("left", [8, 16, 24])
def test_wrap_with_tail_shorter_than_a_header(make_ring: Callable[..., Ring], left: int) -> None:
    r = make_ring(1024)
    _fill_to(r, 1024 - left)
    assert r.try_push(3, 1, 43, b"q" * 10)
    assert r.pending_bytes() == left + rec_size(10)
    assert r.pop() == Record(3, 0, 1, 43, b"q" * 10)
    assert r.pending_bytes() == 0


def test_record_ending_exactly_at_the_end(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(1024)
    _fill_to(r, 1024 - rec_size(100))
    assert r.try_push(1, 0, 1, b"e" * 100)
    assert head_of(r) % 1024 == 0  # no PAD needed
    assert r.try_push(1, 0, 2, b"f" * 100)
    assert [x.payload for x in r.pop_many()] == [b"e" * 100, b"f" * 100]


@pytest.mark.parametrize("batch", [False, True])
def test_consumer_that_sees_only_padding(make_ring: Callable[..., Ring], batch: bool) -> None:
    r = make_ring(1024)
    _fill_to(r, 1024 - 64)
    assert r.try_push(3, 1, 1, b"p" * 64)
    full_head = head_of(r)
    # Pretend the consumer's acquire of head saw only the PAD: it must return nothing, yet
    # hand the padding back so the producer regains that space.
    ring_mod.store_release(r._buf, ring_mod.OFF_HEAD, 1024)
    assert (r.pop_many() if batch else r.pop()) in (None, [])
    assert raw_index(r, ring_mod.OFF_TAIL) == 1024
    ring_mod.store_release(r._buf, ring_mod.OFF_HEAD, full_head)
    assert r.pop() == Record(3, 0, 1, 1, b"p" * 64)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_many_wrap_cycles_against_a_model(make_ring: Callable[..., Ring], seed: int) -> None:
    rng = random.Random(seed)
    cap = 2048
    r = make_ring(cap)
    # (record, head just after it): the model recomputes indices with the documented rules.
    model: deque[tuple[Record, int]] = deque()
    head = tail = 0
    pushed = popped = fulls = 0
    for step in range(20_000):
        if rng.random() < 0.55:
            n = rng.choice([0, 1, 7, 8, 9, rng.randrange(r.max_payload + 1), r.max_payload])
            payload = rng.randbytes(n)
            size = rec_size(n)
            room = cap - head % cap
            need = size if size <= room else room + size
            ok = r.try_push(step & 0x7FFF, step, step, payload, flags=n & 0xFFFF)
            assert ok == (need <= cap - (head - tail)), f"step {step}: push {n} bytes"
            if ok:
                head += need
                pushed += 1
                model.append((Record(step & 0x7FFF, n & 0xFFFF, step, step, payload), head))
            else:
                fulls += 1
                assert r.free_bytes() < need
        elif rng.random() < 0.5:
            rec = r.pop()
            if model:
                want, tail = model.popleft()
                assert rec == want
                popped += 1
            else:
                assert rec is None
        else:
            k = rng.randrange(1, 8)
            got = r.pop_many(k)
            assert len(got) == min(k, len(model))
            for rec in got:
                want, tail = model.popleft()
                assert rec == want
            popped += len(got)
        assert head_of(r) == head
        assert raw_index(r, ring_mod.OFF_TAIL) == tail
        assert r.pending_bytes() == head - tail
    assert r.pop_many() == [m[0] for m in model]
    s = r.stats()
    assert s["records_pushed"] == pushed
    assert s["records_popped"] == popped + len(model)
    assert s["full_events"] == fulls
    assert fulls > 100 and pushed > 5000  # the test did exercise full rings and wrapping
    assert head > 20 * cap


# ----------------------------------------------------------------------------- full ring


def test_full_ring_backpressure_and_recovery(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(4096)
    pushed = 0
    while r.try_push(1, 0, pushed, b"z" * 500):
        pushed += 1
    assert pushed == 4096 // rec_size(500)
    assert r.stats()["full_events"] == 1
    assert not r.try_push(1, 0, pushed, b"z" * 500)
    assert r.stats()["full_events"] == 2
    first = r.pop()
    assert first is not None and first.seq == 0
    assert r.try_push(1, 0, pushed, b"z" * 500)
    seqs = [x.seq for x in r.pop_many()]
    assert seqs == list(range(1, pushed + 1))  # nothing dropped, order kept


def test_exact_fill(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(1024)
    n = r.max_payload
    assert rec_size(n) * 4 == 1024
    for i in range(4):
        assert r.try_push(1, 0, i, bytes([i]) * n)
    assert r.free_bytes() == 0
    assert r.pending_bytes() == 1024
    assert not r.try_push(1, 0, 9, b"")
    assert r.pop() is not None
    assert r.free_bytes() == rec_size(n)
    assert r.try_push(1, 0, 4, bytes([4]) * n)  # lands at position 0, no padding
    assert r.free_bytes() == 0
    assert [x.seq for x in r.pop_many()] == [1, 2, 3, 4]


def test_max_payload_limit(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(8192)
    assert r.max_payload == 8192 // 4 - RECORD_HEADER
    assert max_payload_for(1000) == (250 - 32) & ~7
    assert r.try_push(1, 0, 0, b"m" * r.max_payload)
    with pytest.raises(ValueError, match="max_payload"):
        r.try_push(1, 0, 1, b"m" * (r.max_payload + 1))
    rec = r.pop()
    assert rec is not None and len(rec.payload) == r.max_payload
    assert r.pop() is None


def test_field_validation(make_ring: Callable[..., Ring]) -> None:
    r = make_ring()
    with pytest.raises(ValueError, match="reserved"):
        r.try_push(PAD_KIND, 0, 0)
    for args in ((0x10000, 0, 0), (1, -1, 0), (1, 0, 2**64), (1, 0, 0, b"", 0x10000)):
        with pytest.raises(ValueError, match="out of range"):
            r.try_push(*args)
    assert r.pending_bytes() == 0  # nothing half-published
    assert r.try_push(1, 2, 3)
    assert r.pop() == Record(1, 0, 2, 3, b"")


def test_corrupt_record_is_reported(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(1024)
    assert r.try_push(1, 0, 0, b"abc")
    struct.pack_into("=I", r._buf, HEADER_SIZE, 900)  # length beyond head
    with pytest.raises(RingError, match="corrupt record"):
        r.pop()
    with pytest.raises(RingError, match="corrupt record"):
        r.pop_many()


# ----------------------------------------------------------------------------- pop_many


def test_pop_many_batching(make_ring: Callable[..., Ring], monkeypatch: pytest.MonkeyPatch) -> None:
    r = make_ring(1 << 16)
    for i in range(100):
        assert r.try_push(1, i % 3, i, i.to_bytes(2, "little") * (i % 17))
    calls: dict[str, int] = {"load": 0, "store": 0}
    real_load, real_store = ring_mod.load_acquire, ring_mod.store_release

    def load(buf: Any, off: int) -> int:
        calls["load"] += 1
        return real_load(buf, off)

    def store(buf: Any, off: int, value: int) -> None:
        calls["store"] += 1
        real_store(buf, off, value)

    monkeypatch.setattr(ring_mod, "load_acquire", load)
    monkeypatch.setattr(ring_mod, "store_release", store)
    first = r.pop_many(10)
    assert calls == {"load": 1, "store": 1}
    assert [x.seq for x in first] == list(range(10))
    rest = r.pop_many()
    assert calls == {"load": 2, "store": 2}
    assert [x.seq for x in rest] == list(range(10, 100))
    assert all(x.payload == x.seq.to_bytes(2, "little") * (x.seq % 17) for x in first + rest)
    assert r.pop_many() == []
    assert calls == {"load": 3, "store": 2}  # empty: nothing to hand back
    assert r.pop_many(0) == []


# ----------------------------------------------------------------------------- counters, flags


def test_counters(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(1024)
    s = r.stats()
    assert s == {
        "capacity": 1024,
        "used": 0,
        "records_pushed": 0,
        "records_popped": 0,
        "bytes_pushed": 0,
        "full_events": 0,
    }
    sizes = [0, 5, 200, 200, 200, 200]
    for n in sizes:
        assert r.try_push(1, 0, 0, b"c" * n)
    assert not r.try_push(1, 0, 0, b"c" * 200)
    r.pop()
    s = r.stats()
    assert s["records_pushed"] == 6
    assert s["bytes_pushed"] == sum(sizes)
    assert s["records_popped"] == 1
    assert s["full_events"] == 1
    assert s["used"] == sum(rec_size(n) for n in sizes[1:])
    other = Ring.attach(r.name)
    try:
        assert other.stats() == s  # counters live in the segment
    finally:
        other.close()


def test_want_space_protocol(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(1024)
    consumer = Ring.attach(r.name)
    try:
        assert not consumer.take_space_request()
        while r.try_push(1, 0, 0, b"w" * 200):
            pass
        # Still full: the request stands and the consumer sees it once it pops.
        assert r.wait_for_space() is False
        assert raw_index(r, ring_mod.OFF_WANT_SPACE) == 1
        assert consumer.pop() is not None
        assert consumer.take_space_request() is True
        assert consumer.take_space_request() is False  # cleared
        assert raw_index(r, ring_mod.OFF_WANT_SPACE) == 0
        # Space appeared between the failed push and wait_for_space: True, flag cleared again.
        assert r.try_push(1, 0, 0, b"w" * 200)
        assert not r.try_push(1, 0, 0, b"w" * 200)
        assert consumer.pop() is not None
        assert r.wait_for_space() is True
        assert consumer.take_space_request() is False
        assert r.try_push(1, 0, 0, b"w" * 200)
    finally:
        consumer.close()


def test_wait_for_space_compares_with_the_failed_push(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(1024)
    for n in (8, 8, 200, 200, 200):
        assert r.try_push(1, 0, 0, b"s" * n)
    assert r.free_bytes() == 1024 - 776
    # 248 bytes before the end: this record wraps and needs 248 (PAD) + 256.
    assert not r.try_push(1, 0, 0, b"s" * 224)
    r.pop()  # 40 more bytes free: not the 504 the push needs
    assert r.wait_for_space() is False
    assert r.take_space_request() is True
    r.pop()
    assert r.wait_for_space() is False
    r.pop()  # 560 free now
    assert r.wait_for_space() is True
    assert r.try_push(1, 0, 0, b"s" * 224)


def test_reset(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(1024)
    for i in range(3):
        r.try_push(1, 0, i, b"r" * 100)
    r.pop()
    r.wait_for_space()
    before = r.stats()
    r.reset()
    assert r.pending_bytes() == 0 and r.free_bytes() == 1024
    assert r.pop() is None
    assert head_of(r) == 0 and raw_index(r, ring_mod.OFF_TAIL) == 0
    assert raw_index(r, ring_mod.OFF_WANT_SPACE) == 0
    after = r.stats()
    for k in ("records_pushed", "records_popped", "bytes_pushed", "full_events"):
        assert after[k] == before[k]
    assert r.try_push(1, 0, 7, b"after")
    assert r.pop() == Record(1, 0, 0, 7, b"after")


# ----------------------------------------------------------------------------- lifecycle


def test_create_existing_name_raises_shm_error(make_ring: Callable[..., Ring]) -> None:
    r = make_ring()
    with pytest.raises(ShmError, match="already exists"):
        Ring.create(r.name, 4096)
    # The failed create must not have unlinked the existing segment.
    again = Ring.attach(r.name)
    again.close()


def test_names_must_be_absolute() -> None:
    for bad in ("noslash", "/a/b", "/", ""):
        with pytest.raises(ValueError, match="shared-memory name"):
            Ring.create(bad, 4096)
        with pytest.raises(ValueError, match="shared-memory name"):
            Ring.attach(bad)


def test_create_failure_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"/{_tag()}{uuid.uuid4().hex[:12]}"

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(ShmError, match="/dev/shm full"):
        Ring.create(name, 4096)
    assert not (SHM_DIR / name[1:]).exists()


def test_close_and_unlink_idempotent(make_ring: Callable[..., Ring]) -> None:
    r = make_ring()
    r.try_push(1, 0, 0, b"x")
    rec_keep = Ring.attach(r.name)
    r.close()
    r.close()
    with pytest.raises(ValueError):
        r.try_push(1, 0, 0, b"x")
    r.unlink()
    r.unlink()
    # An existing mapping outlives the name.
    assert rec_keep.pop() == Record(1, 0, 0, 0, b"x")
    rec_keep.close()
    with pytest.raises(RingError, match="does not exist"):
        Ring.attach(r.name)


def test_context_manager(make_ring: Callable[..., Ring]) -> None:
    r = make_ring()
    with Ring.attach(r.name) as other:
        assert other.capacity == r.capacity
    with pytest.raises(ValueError):
        other.pop()


def _raw_segment(name: str, size: int) -> mmap.mmap:
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=size)
    try:
        return mmap.mmap(shm.fd, size)
    finally:
        shm.close_fd()


def test_attach_validation(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(4096)

    def patched(off: int, fmt: str, value: int) -> None:
        shm = posix_ipc.SharedMemory(r.name)
        mm = mmap.mmap(shm.fd, HEADER_SIZE)
        shm.close_fd()
        saved = mm[off : off + struct.calcsize(fmt)]
        struct.pack_into(fmt, mm, off, value)
        try:
            Ring.attach(r.name).close()
        finally:
            mm[off : off + len(saved)] = saved
            mm.close()

    with pytest.raises(RingError, match="not an asrd ring"):
        patched(ring_mod.OFF_MAGIC, "=Q", 0x1234)
    with pytest.raises(RingError, match="version 99"):
        patched(ring_mod.OFF_VERSION, "=I", 99)
    with pytest.raises(RingError, match="capacity"):
        patched(ring_mod.OFF_CAPACITY, "=Q", 8192)
    with pytest.raises(RingError, match="corrupt indices"):
        patched(ring_mod.OFF_HEAD, "=Q", 8192)
    Ring.attach(r.name).close()  # restored: valid again

    # A segment of the wrong size for what its header claims.
    name = f"/{_tag()}{uuid.uuid4().hex[:12]}"
    mm = _raw_segment(name, HEADER_SIZE + 1024)
    try:
        struct.pack_into("=QIIQ", mm, 0, ring_mod.MAGIC, ring_mod.VERSION, HEADER_SIZE, 4096)
        with pytest.raises(RingError, match="capacity 4096 but the segment is 1280 bytes"):
            Ring.attach(name)
        # Too small to hold a ring at all.
        posix_ipc.unlink_shared_memory(name)
        mm.close()
        mm = _raw_segment(name, 64)
        with pytest.raises(RingError, match="too small"):
            Ring.attach(name)
    finally:
        mm.close()
        posix_ipc.unlink_shared_memory(name)
    with pytest.raises(RingError, match="does not exist"):
        Ring.attach(name)


def test_attach_continues_from_header_indices(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(1024)
    producer = Ring.attach(r.name)
    for i in range(3):
        assert producer.try_push(1, 0, i, b"a" * 100)
    producer.close()  # "restart": a new attachment continues from the header
    producer = Ring.attach(r.name)
    for i in range(3, 6):
        assert producer.try_push(1, 0, i, b"a" * 100)
    producer.close()
    assert [x.seq for x in r.pop_many()] == list(range(6))


# ----------------------------------------------------------------------------- Wakeup


@pytest.fixture(params=["eventfd", "pipe"])
def wakeup(request: pytest.FixtureRequest) -> Iterator[Wakeup]:
    if request.param == "eventfd":
        w = Wakeup()
        assert w.fds()[0] == w.fds()[1]
    else:
        w = Wakeup.from_fds(*os.pipe())
        assert w.fds()[0] != w.fds()[1]
    yield w
    w.close()


def test_wakeup_signal_wait_drain(wakeup: Wakeup) -> None:
    w = wakeup
    assert w.drain() == 0
    t0 = time.monotonic()
    assert w.wait(0.05) is False
    assert time.monotonic() - t0 >= 0.04
    w.signal()
    w.signal()
    assert w.wait(5) is True
    assert w.wait(0) is True  # level-triggered until drained
    assert w.drain() == 2
    assert w.wait(0) is False
    assert w.fileno() == w.fds()[0]


def test_wakeup_signal_never_blocks_on_full_pipe() -> None:
    w = Wakeup.from_fds(*os.pipe())
    try:
        for _ in range(70_000):  # beyond a 64 KiB pipe buffer
            w.signal()
        assert w.wait(0)
        assert 0 < w.drain() <= 70_000
        assert not w.wait(0)
    finally:
        w.close()


def test_wakeup_close_idempotent(wakeup: Wakeup) -> None:
    wakeup.close()
    wakeup.close()
    assert wakeup.closed
    with pytest.raises(ValueError):
        wakeup.wait(0)


def test_wakeup_across_threads(wakeup: Wakeup) -> None:
    timer = threading.Timer(0.05, wakeup.signal)
    timer.start()
    try:
        assert wakeup.wait(10) is True
    finally:
        timer.join()


# ----------------------------------------------------------------------------- two processes


def _spawn(*args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *args],
        pass_fds=pass_fds,
        env=env,
        cwd=REPO,
        stderr=subprocess.PIPE,
    )


def _consume(
    r: Ring,
    data: Wakeup,
    space: Wakeup,
    count: int,
    first_seq: int,
    deadline: float,
) -> None:
    want = first_seq
    while want < first_seq + count:
        for rec in r.pop_many(64):
            assert rec.seq == want, f"expected seq {want}, got {rec.seq}"
            assert rec.payload == _child_payload(want), f"payload mismatch at seq {want}"
            assert rec.key == len(rec.payload) and rec.kind == 5
            want += 1
        if r.take_space_request():
            space.signal()
        if want < first_seq + count and r.pending_bytes() == 0:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for seq {want}"
            data.wait(left)
            data.drain()


def _child_payload(seq: int) -> bytes:
    return seq.to_bytes(8, "little") * (seq % 97)


@pytest.mark.timeout(60)
def test_second_process_produces_while_we_consume(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(16384)
    data, space = Wakeup(), Wakeup()
    try:
        fds = (*data.fds(), *space.fds())
        deadline = time.monotonic() + 45
        # Two producer processes in turn: the second attaches and continues where the first
        # stopped (the header's indices are the only state).
        for first in (0, 5000):
            child = _spawn(
                "producer", r.name, str(first), "5000", *map(str, fds), pass_fds=tuple(set(fds))
            )
            try:
                _consume(r, data, space, 5000, first, deadline)
                _, err = child.communicate(timeout=max(1.0, deadline - time.monotonic()))
                assert child.returncode == 0, err.decode()
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()
        s = r.stats()
        assert s["records_pushed"] == s["records_popped"] == 10_000
        assert s["full_events"] > 0  # the small ring made the producer wait for space
    finally:
        data.close()
        space.close()


def _producer_main(name: str, first: int, count: int, fds: list[int]) -> int:
    data = Wakeup.from_fds(fds[0], fds[1])
    space = Wakeup.from_fds(fds[2], fds[3])
    r = Ring.attach(name)
    deadline = time.monotonic() + 45
    try:
        for seq in range(first, first + count):
            payload = _child_payload(seq)
            while not r.try_push(5, len(payload), seq, payload):
                if not r.wait_for_space():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        print(f"producer: timed out at seq {seq}", file=sys.stderr)
                        return 1
                    space.wait(left)
                    space.drain()
            data.signal()
    finally:
        r.close()
        data.close()
        space.close()
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "producer":
        sys.exit(
            _producer_main(
                sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), [int(x) for x in sys.argv[5:9]]
            )
        )
    sys.exit(f"unknown child role {sys.argv[1]!r}")


def test_sleep_flag_protocol(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(4096)
    consumer = Ring.attach(ring.name)
    try:
        # An awake consumer needs no wake-up.
        assert not ring.consumer_sleeping()
        assert consumer.prepare_sleep()  # empty ring: may sleep
        assert ring.try_push(3, 1, 1, b"x")
        assert ring.consumer_sleeping()  # the producer must signal now
        consumer.end_sleep()
        assert not ring.consumer_sleeping()
        # A record already waiting: the consumer must not sleep, and withdraws the flag.
        assert not consumer.prepare_sleep()
        assert not ring.consumer_sleeping()
        assert consumer.pop_many() == [Record(3, 0, 1, 1, b"x")]
        assert consumer.prepare_sleep()
        ring.reset()
        assert not ring.consumer_sleeping()
    finally:
        consumer.close()
