"""Single-producer single-consumer byte ring in a POSIX shared-memory segment.

Threading model: exactly one producer and one consumer per ring, usually in two processes (one
may restart and re-attach while the other keeps running). Within a process a :class:`Ring`
object is not thread-safe: one thread uses the producer methods (``try_push``, ``free_bytes``,
``wait_for_space``), one thread uses the consumer methods (``pop``, ``pop_many``,
``take_space_request``, ``pending_bytes``). ``stats`` may be called by anyone at any time (the
figures are a racy snapshot). ``reset`` is for the supervisor only, while neither side runs.

Layout (native byte order, which is also what the atomics use)::

    0    magic u64, version u32, header size u32, capacity u64          read-only after create
    64   head u64, records_pushed u64, bytes_pushed u64, full_events u64  producer's cache line
    128  tail u64, records_popped u64                                     consumer's cache line
    192  want_space u64                                                   set by producer, cleared
                                                                          by either side
    200  consumer_sleeping u64                                            consumer's sleep flag
    256  data area, ``capacity`` bytes

``head`` and ``tail`` are monotonic byte counters (position = counter % capacity); ``head - tail``
bytes are in use. Each side writes only its own index, with a release store after the bytes it
publishes, and reads the other side's index with an acquire load, so the consumer never sees an
index before the record behind it (this matters on ARM64, where stores are not kept in order).
Counters are plain stores: statistics only.

A record is a 32-byte header ``(length u32, kind u16, flags u16, key u64, seq u64, reserved u64)``
and the payload, padded to 8 bytes. A record never wraps: if it does not fit before the end of
the data area, the producer first fills the rest with a PAD record (kind 0xFFFF), or, when fewer
than 32 bytes are left, with nothing at all (both sides skip a tail shorter than a header).

Sleep/wake is the caller's business (see :mod:`ipc.wakeup`), except for the ``want_space`` flag
that lets a producer blocked on a full ring ask the consumer for a wake-up without a syscall per
pop::

    producer                                  consumer
    while not ring.try_push(...):             recs = ring.pop_many()
        if not ring.wait_for_space():         ...
            space.wait(timeout); space.drain()  if ring.take_space_request():
                                                  space.signal()
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

import posix_ipc

from daemon.errors import RingError, ShmError
from ipc._atomic import load_acquire as _load_acquire
from ipc._atomic import store_release as _store_release
from ipc._atomic import store_seq_cst as _store_seq_cst

MAGIC: int = struct.unpack("=Q", b"ASRDRING")[0]
VERSION = 1
HEADER_SIZE = 256
RECORD_HEADER = 32
PAD_KIND = 0xFFFF
MIN_CAPACITY = 256  # smallest ring whose max_payload is positive

# Header offsets (bytes) and the matching indexes into the u64 view of the header.
OFF_MAGIC = 0
OFF_VERSION = 8
OFF_CAPACITY = 16
OFF_HEAD = 64
OFF_RECORDS_PUSHED = 72
OFF_BYTES_PUSHED = 80
OFF_FULL_EVENTS = 88
OFF_TAIL = 128
OFF_RECORDS_POPPED = 136
OFF_WANT_SPACE = 192
OFF_CONSUMER_SLEEPING = 200
_Q_HEAD = OFF_HEAD // 8
_Q_RECORDS_PUSHED = OFF_RECORDS_PUSHED // 8
_Q_BYTES_PUSHED = OFF_BYTES_PUSHED // 8
_Q_FULL_EVENTS = OFF_FULL_EVENTS // 8
_Q_TAIL = OFF_TAIL // 8
_Q_RECORDS_POPPED = OFF_RECORDS_POPPED // 8
_Q_WANT_SPACE = OFF_WANT_SPACE // 8

_IDENT = struct.Struct("=QIIQ")  # magic, version, header size, capacity
_REC = struct.Struct("=IHHQQQ")  # length, kind, flags, key, seq, reserved
assert _REC.size == RECORD_HEADER

# The C extension has no stub; give its functions precise types here.
load_acquire: Callable[[Any, int], int] = _load_acquire
store_release: Callable[[Any, int, int], None] = _store_release
store_seq_cst: Callable[[Any, int, int], None] = _store_seq_cst


class Record(NamedTuple):
    """One popped record; ``payload`` is a copy, so the ring slot is reusable at once."""

    kind: int
    flags: int
    key: int
    seq: int
    payload: bytes


# Building the tuple directly skips NamedTuple's Python-level __new__ (about 150 ns a record).
_new_record: Callable[[type[Record], tuple[int, int, int, int, bytes]], Record] = tuple.__new__


def max_payload_for(capacity: int) -> int:
    """Largest payload one record may carry in a ring of ``capacity`` bytes.

    A quarter of the ring keeps a wrapping record (PAD + record) well under the capacity, so a
    producer facing an empty ring can always push, whatever its position.
    """
    return max(0, (capacity // 4 - RECORD_HEADER) & ~7)


class Ring:
    """A mapped ring; build it with :meth:`create` (supervisor) or :meth:`attach` (workers)."""

    __slots__ = (
        "_base",
        "_buf",
        "_hdr",
        "_mm",
        "_space_need",
        "capacity",
        "max_payload",
        "name",
    )

    def __init__(self, name: str, mm: mmap.mmap) -> None:
        # Private: callers use create() or attach(), which validate the mapping first.
        self.name = name
        self._mm = mm
        self._buf = memoryview(mm)
        # Plain u64 view of the header: own-index reads and counter updates (~35 ns vs ~110 ns
        # for struct). Only the other side's index needs load_acquire.
        self._hdr = self._buf[:HEADER_SIZE].cast("Q")
        _, _, _, capacity = _IDENT.unpack_from(mm, 0)
        self.capacity: int = capacity
        self.max_payload: int = max_payload_for(capacity)
        self._base = HEADER_SIZE
        # Bytes the last failed try_push needed (pad included): what wait_for_space re-checks.
        self._space_need = RECORD_HEADER

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(cls, name: str, capacity: int) -> Ring:
        """Create, size, commit and initialise a new segment; fails if ``name`` exists."""
        if capacity < MIN_CAPACITY or capacity % 8:
            raise ValueError(
                f"ring capacity must be a multiple of 8 and at least {MIN_CAPACITY}, got {capacity}"
            )
        _check_name(name)
        size = HEADER_SIZE + capacity
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600)
        except posix_ipc.ExistentialError as exc:
            raise ShmError(f"shared-memory segment {name} already exists") from exc
        except (posix_ipc.Error, OSError, ValueError) as exc:
            raise ShmError(f"cannot create shared-memory segment {name}: {exc}") from exc
        try:
            try:
                os.ftruncate(shm.fd, size)
                # tmpfs is sparse: without this a full /dev/shm shows up later as SIGBUS on
                # first touch; posix_fallocate reserves the pages now and fails with ENOSPC.
                os.posix_fallocate(shm.fd, 0, size)
                mm = mmap.mmap(shm.fd, size)
            except OSError as exc:
                raise ShmError(
                    f"cannot size shared-memory segment {name} to {size} bytes "
                    f"(is /dev/shm full?): {exc}"
                ) from exc
            finally:
                shm.close_fd()  # the mapping keeps the memory; no fd to leak into children
        except BaseException:
            _unlink_quietly(name)
            raise
        _IDENT.pack_into(mm, OFF_MAGIC, MAGIC, VERSION, HEADER_SIZE, capacity)
        return cls(name, mm)

    @classmethod
    def attach(cls, name: str) -> Ring:
        """Map an existing ring and validate its header; indices are read live, never cached."""
        _check_name(name)
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError as exc:
            raise RingError(f"ring {name} does not exist") from exc
        except (posix_ipc.Error, OSError, ValueError) as exc:
            raise RingError(f"cannot open ring {name}: {exc}") from exc
        try:
            size = os.fstat(shm.fd).st_size
            if size < HEADER_SIZE + MIN_CAPACITY:
                raise RingError(f"ring {name} is {size} bytes, too small for a ring")
            mm = mmap.mmap(shm.fd, size)
        except OSError as exc:
            raise RingError(f"cannot map ring {name}: {exc}") from exc
        finally:
            shm.close_fd()
        try:
            magic, version, header_size, capacity = _IDENT.unpack_from(mm, 0)
            if magic != MAGIC:
                raise RingError(f"{name} is not an asrd ring (magic {magic:#018x})")
            if version != VERSION:
                raise RingError(f"ring {name} has layout version {version}, expected {VERSION}")
            if header_size != HEADER_SIZE:
                raise RingError(f"ring {name} has a {header_size}-byte header, expected 256")
            if capacity < MIN_CAPACITY or capacity % 8 or HEADER_SIZE + capacity != size:
                raise RingError(
                    f"ring {name} claims capacity {capacity} but the segment is {size} bytes"
                )
            (head,) = struct.unpack_from("=Q", mm, OFF_HEAD)
            (tail,) = struct.unpack_from("=Q", mm, OFF_TAIL)
            if head < tail or head - tail > capacity or head % 8 or tail % 8:
                raise RingError(f"ring {name} has corrupt indices head={head} tail={tail}")
        except BaseException:
            mm.close()
            raise
        return cls(name, mm)

    def close(self) -> None:
        """Unmap; idempotent. Records already popped stay valid (they are copies)."""
        # Views must go before the mmap, or close() raises BufferError; all three are idempotent.
        self._hdr.release()
        self._buf.release()
        self._mm.close()

    def unlink(self) -> None:
        """Remove the name (mappings stay valid until closed); idempotent."""
        _unlink_quietly(self.name)

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self._mm.closed else ""
        return f"<Ring {self.name} capacity={self.capacity}{state}>"

    # ------------------------------------------------------------------ producer side

    def try_push(
        self,
        kind: int,
        key: int,
        seq: int,
        payload: bytes | bytearray | memoryview = b"",
        flags: int = 0,
    ) -> bool:
        """Append one record; False if it does not fit now (nothing is dropped: retry later).

        ``kind`` 0..0xFFFE, ``flags`` u16, ``key`` and ``seq`` u64.
        """
        n = payload.nbytes if type(payload) is memoryview else len(payload)
        if n > self.max_payload:
            raise ValueError(f"payload of {n} bytes exceeds max_payload {self.max_payload}")
        if kind == PAD_KIND:
            raise ValueError("kind 0xFFFF is reserved for padding")
        hdr = self._hdr
        buf = self._buf
        cap = self.capacity
        head = hdr[_Q_HEAD]  # our own index: a plain read is exact
        size = RECORD_HEADER + ((n + 7) & ~7)
        pos = head % cap
        room = cap - pos
        skip = 0 if size <= room else room  # bytes to pad before wrapping to 0
        free = cap - (head - load_acquire(buf, OFF_TAIL))
        if skip + size > free:
            self._space_need = skip + size
            hdr[_Q_FULL_EVENTS] += 1
            return False
        base = self._base
        if skip:
            if skip >= RECORD_HEADER:
                _REC.pack_into(buf, base + pos, skip - RECORD_HEADER, PAD_KIND, 0, 0, 0, 0)
            pos = 0
        at = base + pos
        try:
            _REC.pack_into(buf, at, n, kind, flags, key, seq, 0)
        except struct.error as exc:
            # Nothing is published yet, so a half-written header is harmless.
            raise ValueError(f"record field out of range: {exc}") from None
        if n:
            at += RECORD_HEADER
            # Slicing the mmap (not the memoryview) copies any contiguous buffer by bytes,
            # whatever its format, and is the fastest copy Python offers.
            self._mm[at : at + n] = payload
        hdr[_Q_RECORDS_PUSHED] += 1
        hdr[_Q_BYTES_PUSHED] += n
        store_release(buf, OFF_HEAD, head + skip + size)
        return True

    def free_bytes(self) -> int:
        """Bytes free now; a record of n payload bytes needs 32 + n rounded up to 8 (+ padding
        when it would cross the end)."""
        return self.capacity - (self._hdr[_Q_HEAD] - load_acquire(self._buf, OFF_TAIL))

    def wait_for_space(self) -> bool:
        """Ask the consumer for a wake-up once it frees space; call after try_push returned False.

        Returns True when the space the failed push needed appeared meanwhile (the flag is
        cleared again; retry the push). False means the request stands: wait on the space
        Wakeup, then retry. The seq_cst store orders the flag before the re-check of ``tail``,
        and the consumer fences between its ``tail`` store and its flag check, so one of the
        two sides always sees the other (no lost wake-up).
        """
        buf = self._buf
        store_seq_cst(buf, OFF_WANT_SPACE, 1)
        if self.free_bytes() >= self._space_need:
            store_release(buf, OFF_WANT_SPACE, 0)
            return True
        return False

    # ------------------------------------------------------------------ consumer side

    def pop(self) -> Record | None:
        """Take the oldest record, or None if the ring is empty."""
        hdr = self._hdr
        buf = self._buf
        tail = hdr[_Q_TAIL]
        head = load_acquire(buf, OFF_HEAD)
        cap = self.capacity
        base = self._base
        mm = self._mm
        while tail != head:
            pos = tail % cap
            if cap - pos < RECORD_HEADER:  # a tail too short for a header: skipped silently
                tail += cap - pos
                continue
            at = base + pos
            n, kind, flags, key, seq, _ = _REC.unpack_from(buf, at)
            end = tail + RECORD_HEADER + ((n + 7) & ~7)
            if end > head or pos + (end - tail) > cap:
                raise RingError(
                    f"ring {self.name}: corrupt record at {tail} (length {n}, head {head})"
                )
            tail = end
            if kind == PAD_KIND:
                continue
            at += RECORD_HEADER
            payload: bytes = mm[at : at + n]
            hdr[_Q_RECORDS_POPPED] += 1
            store_release(buf, OFF_TAIL, tail)
            return _new_record(Record, (kind, flags, key, seq, payload))
        if tail != hdr[_Q_TAIL]:  # consumed only padding: still hand the space back
            store_release(buf, OFF_TAIL, tail)
        return None

    def pop_many(self, max_records: int = 1 << 30) -> list[Record]:
        """Take up to ``max_records`` records with one acquire of head and one release of tail."""
        hdr = self._hdr
        buf = self._buf
        start = tail = hdr[_Q_TAIL]
        head = load_acquire(buf, OFF_HEAD)
        out: list[Record] = []
        if tail == head:
            return out
        cap = self.capacity
        base = self._base
        mm = self._mm
        append = out.append
        unpack = _REC.unpack_from
        new = _new_record
        count = 0
        while tail != head and count < max_records:
            pos = tail % cap
            if cap - pos < RECORD_HEADER:
                tail += cap - pos
                continue
            at = base + pos
            n, kind, flags, key, seq, _ = unpack(buf, at)
            end = tail + RECORD_HEADER + ((n + 7) & ~7)
            if end > head or pos + (end - tail) > cap:
                # Hand back what was consumed cleanly before reporting the corruption.
                self._finish_pop(start, tail, count)
                raise RingError(
                    f"ring {self.name}: corrupt record at {tail} (length {n}, head {head})"
                )
            tail = end
            if kind == PAD_KIND:
                continue
            at += RECORD_HEADER
            append(new(Record, (kind, flags, key, seq, mm[at : at + n])))
            count += 1
        self._finish_pop(start, tail, count)
        return out

    def _finish_pop(self, start: int, tail: int, count: int) -> None:
        if count:
            self._hdr[_Q_RECORDS_POPPED] += count
        if tail != start:
            store_release(self._buf, OFF_TAIL, tail)

    def take_space_request(self) -> bool:
        """True (and the flag cleared) if the producer asked to be woken for space.

        Call after popping; on True, signal the space Wakeup. Re-storing ``tail`` with seq_cst
        is the full fence that keeps the flag load after our earlier tail store (the
        store-load order that release/acquire alone does not give).
        """
        buf = self._buf
        store_seq_cst(buf, OFF_TAIL, self._hdr[_Q_TAIL])
        if load_acquire(buf, OFF_WANT_SPACE):
            store_release(buf, OFF_WANT_SPACE, 0)
            return True
        return False

    def prepare_sleep(self) -> bool:
        """Consumer: announce a sleep on the data Wakeup; False if records arrived meanwhile.

        With the flag down, producers skip the wake-up syscall, which is most of a producer's
        cost per batch while the consumer is busy anyway. The seq_cst store orders the flag
        before the head load; the producer's :meth:`consumer_sleeping` mirrors it (Dekker), so
        a record published while we decide to sleep is either seen here or wakes us.
        """
        buf = self._buf
        store_seq_cst(buf, OFF_CONSUMER_SLEEPING, 1)
        if load_acquire(buf, OFF_HEAD) != self._hdr[_Q_TAIL]:
            store_release(buf, OFF_CONSUMER_SLEEPING, 0)
            return False
        return True

    def end_sleep(self) -> None:
        """Consumer: awake again (producers may skip their wake-ups)."""
        store_release(self._buf, OFF_CONSUMER_SLEEPING, 0)

    def consumer_sleeping(self) -> bool:
        """Producer, after publishing: does the consumer need a wake-up?

        Re-storing ``head`` with seq_cst is the full fence that keeps the flag load after the
        publication. A consumer that never uses :meth:`prepare_sleep` must be signalled always.
        """
        buf = self._buf
        store_seq_cst(buf, OFF_HEAD, self._hdr[_Q_HEAD])
        return bool(load_acquire(buf, OFF_CONSUMER_SLEEPING))

    def pending_bytes(self) -> int:
        """Bytes in use (records, headers and padding) as seen by the consumer."""
        return load_acquire(self._buf, OFF_HEAD) - self._hdr[_Q_TAIL]

    # ------------------------------------------------------------------ anyone

    def stats(self) -> dict[str, int]:
        """Racy snapshot of the counters; for metrics and diagnostics."""
        hdr = self._hdr
        buf = self._buf
        tail = load_acquire(buf, OFF_TAIL)
        head = load_acquire(buf, OFF_HEAD)
        return {
            "capacity": self.capacity,
            "used": max(0, head - tail),
            "records_pushed": hdr[_Q_RECORDS_PUSHED],
            "records_popped": hdr[_Q_RECORDS_POPPED],
            "bytes_pushed": hdr[_Q_BYTES_PUSHED],
            "full_events": hdr[_Q_FULL_EVENTS],
        }

    def reset(self) -> None:
        """Empty the ring (head = tail = 0, flag cleared, counters kept).

        Supervisor only, while neither producer nor consumer is running: it writes both
        indices, which breaks the single-writer rule if either side is live.
        """
        buf = self._buf
        store_release(buf, OFF_WANT_SPACE, 0)
        store_release(buf, OFF_CONSUMER_SLEEPING, 0)
        store_release(buf, OFF_TAIL, 0)
        store_release(buf, OFF_HEAD, 0)


def _check_name(name: str) -> None:
    # POSIX leaves names without the leading slash implementation-defined; keep one spelling.
    if not name.startswith("/") or "/" in name[1:] or len(name) < 2:
        raise ValueError(f"shared-memory name {name!r} must be '/' followed by a plain name")


def _unlink_quietly(name: str) -> None:
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory(name)
