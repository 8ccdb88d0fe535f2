"""Record kinds and payloads of the lane rings (ingress -> infer audio, infer -> ingress results).

A record's ``key`` is the stream key the ingress worker assigned (unique per lane across ingress
restarts: the ingress generation in the high 32 bits); ``seq`` is the utterance number, except
for AUDIO where it is the last client Audio seq that contributed samples. Audio payloads are raw
16 kHz s16le bytes; the small control payloads are msgpack Structs.

Batches: the chunks the ingress worker reads in one loop iteration travel as one AUDIO_BATCH
record, and the partials of one pass of the infer worker as one PARTIALS record, so that the
ring's per-record cost (a push, a pop, a dispatch) is paid once per wake-up, not once per chunk.
"""

from __future__ import annotations

import struct

import msgspec

# ingress -> infer (audio ring)
RESET = 1  # a new ingress worker started: every utterance of the previous one is abandoned
BEGIN = 2  # utterance start; payload UtteranceBegin
AUDIO = 3  # speech audio of the open utterance of `key`
END = 4  # utterance end: decode what is left and send the final
CANCEL = 5  # drop the utterance without a result
AUDIO_BATCH = 6  # AUDIO records of several streams in one: see pack_audio_batch

# infer -> ingress (result ring)
HELLO = 16  # a new infer worker started: utterances sent to the previous one are lost
PARTIAL = 17  # payload PartialResult
FINAL = 18  # payload FinalResult
FAILED = 19  # payload UtteranceError
PARTIALS = 20  # partials of several utterances in one: payload list[BatchedPartial] (key 0)

KIND_NAMES = {
    RESET: "reset",
    BEGIN: "begin",
    AUDIO: "audio",
    END: "end",
    CANCEL: "cancel",
    AUDIO_BATCH: "audio_batch",
    HELLO: "hello",
    PARTIAL: "partial",
    FINAL: "final",
    FAILED: "failed",
    PARTIALS: "partials",
}


def stream_key(generation: int, counter: int) -> int:
    return ((generation & 0xFFFFFFFF) << 32) | (counter & 0xFFFFFFFF)


def key_generation(key: int) -> int:
    return key >> 32


class UtteranceBegin(msgspec.Struct, array_like=True):
    interim_ms: int  # -1: no partials; 0: a partial after every audio record batch


class PartialResult(msgspec.Struct, array_like=True):
    text: str
    audio_seq: int


class BatchedPartial(msgspec.Struct, array_like=True):
    key: int
    utterance: int
    text: str
    audio_seq: int


class WordResult(msgspec.Struct, array_like=True):
    word: str
    start_ms: int  # relative to the utterance's first sample
    end_ms: int
    confidence: float


class FinalResult(msgspec.Struct, array_like=True):
    text: str
    words: list[WordResult] | None
    confidence: float | None


class UtteranceError(msgspec.Struct, array_like=True):
    code: str
    message: str
    retry_after_ms: int | None = None


_COUNT = struct.Struct("<I")
BATCH_ENTRY_BYTES = 20  # per chunk: key u64, seq u64, length u32


class CorruptBatch(ValueError):
    """An AUDIO_BATCH payload whose header does not describe its bytes."""


def audio_batch_bytes(pcm_bytes: int, chunks: int) -> int:
    """Payload size of a batch of ``chunks`` chunks holding ``pcm_bytes`` of audio."""
    return _COUNT.size + BATCH_ENTRY_BYTES * chunks + pcm_bytes


def pack_audio_batch(keys: list[int], seqs: list[int], pcms: list[bytes]) -> bytes:
    """One payload for many AUDIO chunks: count, keys, seqs, lengths (little-endian), then the
    audio back to back. Packing costs the caller three list appends per chunk."""
    n = len(pcms)
    head = struct.pack(f"<I{n}Q{n}Q{n}I", n, *keys, *seqs, *map(len, pcms))
    return b"".join((head, *pcms))


def unpack_audio_batch(payload: bytes) -> list[tuple[int, int, bytes]]:
    """(key, seq, pcm) per chunk of a :func:`pack_audio_batch` payload; :class:`CorruptBatch`
    if the header does not match the payload's size."""
    size = len(payload)
    if size < _COUNT.size:
        raise CorruptBatch(f"audio batch of {size} bytes has no header")
    (n,) = _COUNT.unpack_from(payload)
    at = _COUNT.size + BATCH_ENTRY_BYTES * n
    if at > size:
        raise CorruptBatch(f"audio batch of {size} bytes cannot hold a header for {n} chunks")
    fields = struct.unpack_from(f"<{n}Q{n}Q{n}I", payload, _COUNT.size)
    lengths = fields[2 * n :]
    if at + sum(lengths) != size:
        raise CorruptBatch(f"audio batch of {size} bytes does not hold its {n} chunks")
    out = []
    for key, seq, length in zip(fields[:n], fields[n : 2 * n], lengths, strict=True):
        out.append((key, seq, payload[at : at + length]))
        at += length
    return out
