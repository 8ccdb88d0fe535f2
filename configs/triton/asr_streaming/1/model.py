"""asr_streaming: a streaming pocketsphinx recognizer as a Triton Python-backend model.

Runs inside Triton's Python stub (the server's own environment, numpy < 2), not in asrd: it must
not import asrd. The decoding matches ``workers/backends/embedded.py`` exactly, so a sequence's
final equals ``transcribe_direct`` of the same audio: the same decoder options, the same initial
normalisation state per sequence (``reinit_feat()`` then ``start_utt()``), and audio fed in fixed
100 ms blocks whatever the chunk sizes (pocketsphinx's live CMN updates per ``process_raw`` call).

One request is one chunk of one sequence (CORRID). START takes a decoder from the pool for the
sequence; every request returns the current hypothesis with IS_FINAL false; END feeds the rest,
ends the utterance, returns the final with IS_FINAL true and gives the decoder back. Triton tells
the model nothing when a sequence times out, so decoders of sequences idle longer than the
batcher's ``max_sequence_idle_microseconds`` are evicted here at the next ``execute``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from pocketsphinx import Decoder

# Copied from asrd's daemon/config.py DEFAULT_CMN_INIT (the model cannot import asrd): the
# initial cepstral mean measured on speech, so the first words decode as well as later ones.
CMN_INIT = "46.76,4.62,-2.72,10.98,-8.89,3.91,-4.48,-3.61,1.56,-1.97,2.09,-1.85,0.46"
DECODER_OPTIONS: dict[str, Any] = {
    "samprate": 16000,
    "loglevel": "ERROR",
    "cmninit": CMN_INIT,
    "fwdflat": False,  # asrd's default: the second pass costs ~10x the final's latency
}
BLOCK_BYTES = 3200  # 100 ms of 16 kHz s16le, as in asrd's embedded backend

_PS_ERRORS = (RuntimeError, ValueError, OSError)


class _Sequence:
    __slots__ = ("decoder", "last_used", "pending")

    def __init__(self, decoder: Decoder, now: float) -> None:
        self.decoder = decoder
        self.pending = bytearray()  # audio short of a whole block
        self.last_used = now


def _feed_blocks(decoder: Decoder, pending: bytearray, final: bool) -> None:
    """Feed every whole block of ``pending`` (and the rest when ``final``), then drop them."""
    whole = len(pending) - len(pending) % BLOCK_BYTES
    if whole:
        view = memoryview(pending)
        try:
            for off in range(0, whole, BLOCK_BYTES):
                decoder.process_raw(view[off : off + BLOCK_BYTES], False, False)
        finally:
            view.release()
        del pending[:whole]
    if final and pending:
        decoder.process_raw(bytes(pending), False, False)
        pending.clear()


def _hypothesis(decoder: Decoder) -> str:
    hyp = decoder.hyp()
    return hyp.hypstr if hyp is not None else ""


def _flag(request: Any, name: str) -> bool:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return tensor is not None and bool(tensor.as_numpy().reshape(-1)[0])


def _corrid(request: Any) -> int:
    tensor = pb_utils.get_input_tensor_by_name(request, "CORRID")
    if tensor is not None:
        return int(tensor.as_numpy().reshape(-1)[0])
    return int(request.correlation_id())


def _audio(request: Any) -> bytes:
    tensor = pb_utils.get_input_tensor_by_name(request, "AUDIO")
    if tensor is None:
        return b""
    # s16le whatever the host: pocketsphinx reads little-endian 16-bit samples.
    return np.ascontiguousarray(tensor.as_numpy(), dtype="<i2").tobytes()


def _response(text: str, final: bool) -> Any:
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("TEXT", np.array([[text.encode()]], dtype=np.object_)),
            pb_utils.Tensor("IS_FINAL", np.array([[final]], dtype=np.bool_)),
        ]
    )


def _log(message: str) -> None:
    try:
        pb_utils.Logger.log_info(f"asr_streaming: {message}")
    except AttributeError:  # older backends have no Logger
        print(f"asr_streaming: {message}", flush=True)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        idle_us = int(config.get("sequence_batching", {}).get("max_sequence_idle_microseconds", 0))
        self._idle_s = float(params.get("idle_timeout_s", idle_us / 1e6 or 30.0))
        self._max = max(1, int(params.get("max_decoders", "32")))
        self._free: list[Decoder] = [
            Decoder(**DECODER_OPTIONS)
            for _ in range(min(int(params.get("decoders", "2")), self._max))
        ]
        self._created = len(self._free)  # decoders alive: free plus held by live sequences
        self._live: dict[int, _Sequence] = {}
        self._evicted = 0

    def execute(self, requests: list[Any]) -> list[Any]:
        now = time.monotonic()
        self._evict_idle(now)
        responses = []
        for request in requests:
            try:
                responses.append(self._handle(request, now))
            except Exception as exc:  # one bad request must not fail the others in the batch
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(str(exc))
                    )
                )
        return responses

    def _handle(self, request: Any, now: float) -> Any:
        # READY false marks a padding request (direct strategy): nothing to decode.
        ready = pb_utils.get_input_tensor_by_name(request, "READY")
        if ready is not None and not bool(ready.as_numpy().reshape(-1)[0]):
            return _response("", False)
        corrid = _corrid(request)
        start, end = _flag(request, "START"), _flag(request, "END")
        seq = self._live.get(corrid)
        if start:
            if seq is not None:  # a restarted sequence begins from scratch
                self._release(corrid, reuse=True)
            seq = self._begin(corrid, now)
        elif seq is None:
            raise RuntimeError(
                f"sequence {corrid} has no decoder: it never sent START, or was idle more than "
                f"{self._idle_s:g} s and evicted; restart it with START"
            )
        seq.last_used = now
        seq.pending += _audio(request)
        try:
            _feed_blocks(seq.decoder, seq.pending, final=end)
            if end:
                seq.decoder.end_utt()
        except _PS_ERRORS as exc:
            self._release(corrid, reuse=False)  # a decoder in an unknown state is not reused
            raise RuntimeError(f"pocketsphinx failed on sequence {corrid}: {exc}") from exc
        text = _hypothesis(seq.decoder)
        if end:
            self._live.pop(corrid)
            self._free.append(seq.decoder)
        return _response(text, end)

    def _begin(self, corrid: int, now: float) -> _Sequence:
        if self._free:
            decoder = self._free.pop()
        elif self._created < self._max:
            decoder = Decoder(**DECODER_OPTIONS)  # about 0.3 s; the pool grows on demand
            self._created += 1
        else:
            raise RuntimeError(f"all {self._max} decoders are in use (max_decoders)")
        try:
            decoder.reinit_feat()  # the configured initial normalisation, not the last stream's
            decoder.start_utt()
        except _PS_ERRORS as exc:
            self._created -= 1
            raise RuntimeError(f"pocketsphinx failed to start sequence {corrid}: {exc}") from exc
        seq = _Sequence(decoder, now)
        self._live[corrid] = seq
        return seq

    def _release(self, corrid: int, reuse: bool) -> None:
        seq = self._live.pop(corrid)
        if reuse:
            try:
                seq.decoder.end_utt()  # leave the utterance before the next start_utt
            except _PS_ERRORS:
                reuse = False
        if reuse:
            self._free.append(seq.decoder)
        else:
            self._created -= 1

    def _evict_idle(self, now: float) -> None:
        stale = [c for c, s in self._live.items() if now - s.last_used > self._idle_s]
        for corrid in stale:
            self._release(corrid, reuse=True)
            self._evicted += 1
            _log(f"evicted sequence {corrid} after {self._idle_s:g} s idle")

    def finalize(self) -> None:
        self._live.clear()
        self._free.clear()
