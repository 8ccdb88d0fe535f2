"""Two-process stress test of the shared-memory ring: ordering, integrity, sleep/wake, backpressure.

A child process (this file run as a script) pushes records of random size (0..4096 bytes) cut
from a seeded random buffer; each carries its sequence number in ``seq``, its length in
``flags`` and ``zlib.crc32(payload) | length << 32`` in ``key``. The test process pops them,
regenerates the same random stream and checks every field, the checksum and the bytes. Both
sides sleep on eventfds (data / space) and the producer uses ``want_space`` when the ring is
full, so a lost wake-up shows up as a timeout and a publication-order bug as a mismatch.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import pytest

from ipc.ring import Ring
from ipc.wakeup import Wakeup

RECORDS = int(os.environ.get("ASRD_STRESS_RECORDS", "1000000"))
CAPACITY = 64 * 1024  # small: wraps every ~30 records and fills often
MAX_SIZE = 4096
SPAN = 1 << 16  # payloads are cut at random offsets from SPAN + MAX_SIZE random bytes
DEADLINE_S = 100.0
REPO = Path(__file__).resolve().parent.parent


def _stream(seed: int) -> tuple[random.Random, bytes]:
    """The producer's random choices and source bytes; the consumer replays them."""
    return random.Random(seed), random.Random(seed ^ 0x5EED).randbytes(SPAN + MAX_SIZE)


def _next(rng: random.Random) -> tuple[int, int]:
    v = rng.getrandbits(32)
    return v % (MAX_SIZE + 1), (v >> 13) % SPAN  # (size, offset)


@pytest.mark.timeout(int(DEADLINE_S) + 20)
def test_two_process_stress() -> None:
    name = f"/asrd-test-{os.getpid()}-stress-{uuid.uuid4().hex[:8]}"
    seed = random.randrange(1 << 30)
    ring = Ring.create(name, CAPACITY)
    data, space = Wakeup(), Wakeup()
    fds = (*data.fds(), *space.fds())
    child: subprocess.Popen[bytes] | None = None
    try:
        t0 = time.monotonic()
        child = subprocess.Popen(
            [sys.executable, __file__, name, str(seed), str(RECORDS), *map(str, fds)],
            pass_fds=tuple(set(fds)),
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            cwd=REPO,
            stderr=subprocess.PIPE,
        )
        nbytes, wakeups = _consume(ring, data, space, child, seed, t0 + DEADLINE_S)
        _, err = child.communicate(timeout=max(1.0, t0 + DEADLINE_S - time.monotonic()))
        assert child.returncode == 0, f"producer failed:\n{err.decode()}"
        elapsed = time.monotonic() - t0
        s = ring.stats()
        assert s["records_pushed"] == s["records_popped"] == RECORDS
        assert s["bytes_pushed"] == nbytes
        assert s["used"] == 0
        print(
            f"\n{RECORDS} records, {nbytes / 1e6:.0f} MB in {elapsed:.1f} s "
            f"({RECORDS / elapsed / 1e3:.0f}k rec/s); consumer sleeps {wakeups}, "
            f"producer full events {s['full_events']}; seed {seed}"
        )
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        ring.close()
        ring.unlink()
        data.close()
        space.close()
    assert not list(Path("/dev/shm").glob(name[1:] + "*"))


def _consume(
    ring: Ring,
    data: Wakeup,
    space: Wakeup,
    child: subprocess.Popen[bytes],
    seed: int,
    deadline: float,
) -> tuple[int, int]:
    rng, src = _stream(seed)
    crc32 = zlib.crc32
    want = 0
    nbytes = 0
    sleeps = 0
    batch_max = 1
    while want < RECORDS:
        # Alternate single pops and batches of varying size: both code paths get the load.
        batch_max = batch_max * 5 % 97 + 1
        if batch_max < 10:
            one = ring.pop()
            batch = [] if one is None else [one]
        else:
            batch = ring.pop_many(batch_max)
        if ring.take_space_request():
            space.signal()
        if batch:
            for kind, flags, key, seq, payload in batch:
                n, off = _next(rng)
                if (
                    seq != want
                    or kind != want % 0xFFFF
                    or flags != n
                    or len(payload) != n
                    or key >> 32 != n
                    or crc32(payload) != key & 0xFFFFFFFF
                    or payload != src[off : off + n]
                ):
                    pytest.fail(
                        f"record mismatch (seed {seed}): expected seq {want} kind "
                        f"{want % 0xFFFF} size {n}; got seq {seq} kind {kind} flags {flags} "
                        f"key {key:#x} size {len(payload)} crc {crc32(payload):#x}"
                    )
                nbytes += n
                want += 1
            continue
        # Empty: sleep until the producer signals. Short slices only to notice a dead child.
        if child.poll() is not None:
            ring_empty = ring.pending_bytes() == 0
            if ring_empty:
                pytest.fail(f"producer exited ({child.returncode}) after {want} records")
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"timed out waiting for record {want} (seed {seed}): lost wake-up?")
        sleeps += 1
        data.wait(min(left, 0.5))
        data.drain()
    assert ring.pop() is None
    return nbytes, sleeps


def _produce(name: str, seed: int, count: int, fds: list[int]) -> int:
    data = Wakeup.from_fds(fds[0], fds[1])
    space = Wakeup.from_fds(fds[2], fds[3])
    ring = Ring.attach(name)
    rng, src = _stream(seed)
    srcv = memoryview(src)
    crc32 = zlib.crc32
    deadline = time.monotonic() + DEADLINE_S
    try:
        for seq in range(count):
            n, off = _next(rng)
            payload = srcv[off : off + n]
            key = crc32(payload) | n << 32
            while not ring.try_push(seq % 0xFFFF, key, seq, payload, n):
                if ring.wait_for_space():
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    print(f"producer: no space for record {seq}: lost wake-up?", file=sys.stderr)
                    return 1
                space.wait(left)
                space.drain()
            data.signal()
    finally:
        ring.close()
        data.close()
        space.close()
    return 0


if __name__ == "__main__":
    sys.exit(
        _produce(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), [int(x) for x in sys.argv[4:8]])
    )
