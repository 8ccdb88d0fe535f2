"""Batched ring records: the ingress worker's AUDIO_BATCH (the chunks of one loop iteration) and
the infer worker's PARTIALS (the partials of one pass), on real rings in shared memory.

The workers run in this process (``bench.hotpath.Lane``), their loops driven by hand: frames go
into a real Connection, records through real rings, so each test sees exactly which records
crossed which ring.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.hotpath import CHUNK, Lane
from ipc import protocol as p
from ipc import records as rec

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def lane() -> Iterator[Lane]:
    lane = Lane(1 << 20)
    try:
        lane.send(p.Hello(protocol=p.PROTOCOL_VERSION))
        lane.audio_records()  # the RESET
        yield lane
    finally:
        lane.close()


def test_pack_round_trip_and_every_corruption_is_refused() -> None:
    keys, seqs, pcms = [1, 2**64 - 1, 7], [0, 5, 2**63], [b"ab", b"", CHUNK]
    payload = rec.pack_audio_batch(keys, seqs, pcms)
    assert len(payload) == rec.audio_batch_bytes(sum(map(len, pcms)), 3)
    assert rec.unpack_audio_batch(payload) == list(zip(keys, seqs, pcms, strict=True))
    for bad in (b"", b"\x01\x00", payload[:-1], payload + b"x", b"\xc1\xff garbage: not msgpack"):
        with pytest.raises(rec.CorruptBatch):
            rec.unpack_audio_batch(bad)


def test_one_read_is_one_record_and_control_records_keep_their_place(lane: Lane) -> None:
    starts = [p.Start(stream=f"s{i}", sample_rate=16000) for i in range(4)]
    lane.send(*starts)
    first = [p.Audio(stream=f"s{i}", seq=1, pcm=CHUNK) for i in range(4)]
    lane.send(*first)
    records = lane.audio_records()
    # Each stream's first chunk opens its utterance: its BEGIN goes before its audio.
    assert [(r.kind, r.key) for r in records] == [
        (kind, stream.key)
        for stream in lane.conn.streams.values()
        for kind in (rec.BEGIN, rec.AUDIO)
    ]
    lane.infer_pass(records)
    lane.replies()

    lane.send(*[p.Audio(stream=f"s{i}", seq=2, pcm=CHUNK[: 2 * (i + 1)]) for i in range(4)])
    (batch,) = lane.audio_records()
    assert batch.kind == rec.AUDIO_BATCH
    chunks = rec.unpack_audio_batch(bytes(batch.payload))
    assert [(seq, pcm) for _, seq, pcm in chunks] == [(2, CHUNK[: 2 * (i + 1)]) for i in range(4)]

    # Finish after audio in the same read: the audio is pushed before the END.
    lane.send(p.Audio(stream="s0", seq=3, pcm=CHUNK), p.Finish(stream="s0"))
    records = lane.audio_records()
    assert [r.kind for r in records] == [rec.AUDIO, rec.END]


def test_partials_of_one_pass_travel_as_one_record(lane: Lane) -> None:
    lane.send(*[p.Start(stream=f"s{i}", sample_rate=16000) for i in range(5)])
    lane.send(*[p.Audio(stream=f"s{i}", seq=1, pcm=CHUNK) for i in range(5)])
    lane.infer_pass(lane.audio_records())
    (record,) = lane.ingress.results.pop_many()
    assert record.kind == rec.PARTIALS
    lane.ingress.on_result(record)
    lane.ingress.write_dirty()
    partials = [m for m in lane.replies() if isinstance(m, p.Partial)]
    assert sorted((m.stream, m.seq, m.text) for m in partials) == [
        (f"s{i}", 1, "chunks=1 bytes=3200") for i in range(5)
    ]


def test_a_corrupt_audio_batch_is_dropped_and_the_lane_goes_on(lane: Lane) -> None:
    lane.send(*[p.Start(stream=f"s{i}", sample_rate=16000) for i in range(2)])
    lane.send(*[p.Audio(stream=f"s{i}", seq=1, pcm=CHUNK) for i in range(2)])
    lane.infer_pass(lane.audio_records())
    lane.replies()
    lane.ingress.faults._corrupt_pending = True  # the harness's "corrupt": the next record
    lane.send(*[p.Audio(stream=f"s{i}", seq=2, pcm=CHUNK) for i in range(2)])
    lane.infer_pass(lane.audio_records())
    assert lane.infer.counters["dropped_records"] == 1
    lane.send(*[p.Audio(stream=f"s{i}", seq=3, pcm=CHUNK) for i in range(2)])
    lane.send(*[p.Finish(stream=f"s{i}") for i in range(2)])
    lane.infer_pass(lane.audio_records())
    finals = [m for m in lane.replies() if isinstance(m, p.Final)]
    # The lost batch's 100 ms is missing from each final; the rest arrived.
    assert sorted((m.stream, m.text) for m in finals) == [
        ("s0", "utterance of 200 ms"),
        ("s1", "utterance of 200 ms"),
    ]


def test_a_batch_never_exceeds_the_ring_record_limit() -> None:
    lane = Lane(64 * 1024)
    try:
        lane.send(p.Hello(protocol=p.PROTOCOL_VERSION))
        lane.send(*[p.Start(stream=f"s{i}", sample_rate=16000) for i in range(40)])
        lane.audio_records()
        limit = lane.ingress.audio.max_payload
        sent: list[tuple[int, bytes]] = []
        got: list[tuple[int, bytes]] = []
        for seq in (1, 2):
            msgs = [p.Audio(stream=f"s{i}", seq=seq, pcm=CHUNK) for i in range(40)]
            sent += [(seq, CHUNK)] * 40
            for part in (msgs[:20], msgs[20:]):
                lane.send(*part)
                # The ring holds less than a read: what does not fit waits in the backlog.
                while records := lane.audio_records():
                    for r in records:
                        assert len(r.payload) <= limit
                        if r.kind == rec.AUDIO:
                            got.append((r.seq, bytes(r.payload)))
                        elif r.kind != rec.BEGIN:  # seq 1 opens each utterance
                            assert r.kind == rec.AUDIO_BATCH
                            batch = rec.unpack_audio_batch(bytes(r.payload))
                            got += [(s, pcm) for _, s, pcm in batch]
                    lane.ingress.flush_backlog()
                assert not lane.ingress.backlog
        assert got == sent
    finally:
        lane.close()
