"""Record kinds and payloads of the lane rings (ingress -> infer audio, infer -> ingress results).

A record's ``key`` is the stream key the ingress worker assigned (unique per lane across ingress
restarts: the ingress generation in the high 32 bits); ``seq`` is the utterance number, except
for AUDIO where it is the last client Audio seq that contributed samples. Audio payloads are raw
16 kHz s16le bytes; the small control payloads are msgpack Structs.
"""

from __future__ import annotations

import msgspec

# ingress -> infer (audio ring)
RESET = 1  # a new ingress worker started: every utterance of the previous one is abandoned
BEGIN = 2  # utterance start; payload UtteranceBegin
AUDIO = 3  # speech audio of the open utterance of `key`
END = 4  # utterance end: decode what is left and send the final
CANCEL = 5  # drop the utterance without a result

# infer -> ingress (result ring)
HELLO = 16  # a new infer worker started: utterances sent to the previous one are lost
PARTIAL = 17  # payload PartialResult
FINAL = 18  # payload FinalResult
FAILED = 19  # payload UtteranceError

KIND_NAMES = {
    RESET: "reset",
    BEGIN: "begin",
    AUDIO: "audio",
    END: "end",
    CANCEL: "cancel",
    HELLO: "hello",
    PARTIAL: "partial",
    FINAL: "final",
    FAILED: "failed",
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
