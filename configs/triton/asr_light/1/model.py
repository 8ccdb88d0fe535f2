"""asr_light: asr_streaming's contract with no recognition, for transport benchmarks and tests.

Each chunk is answered with ``TEXT = "n=<samples> rms=<energy>"`` of that chunk and IS_FINAL
false; END answers with the same over the whole sequence and IS_FINAL true. Sequences are
tracked like asr_streaming's decoders (START required, END releases, idle ones evicted), so a
client's sequence handling can be tested against this model at transport speed.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class _Sequence:
    __slots__ = ("last_used", "samples", "sumsq")

    def __init__(self, now: float) -> None:
        self.samples = 0
        self.sumsq = 0.0
        self.last_used = now


def _flag(request: Any, name: str) -> bool:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return tensor is not None and bool(tensor.as_numpy().reshape(-1)[0])


def _corrid(request: Any) -> int:
    tensor = pb_utils.get_input_tensor_by_name(request, "CORRID")
    if tensor is not None:
        return int(tensor.as_numpy().reshape(-1)[0])
    return int(request.correlation_id())


def _text(samples: int, sumsq: float) -> str:
    rms = math.sqrt(sumsq / samples) if samples else 0.0
    return f"n={samples} rms={rms:.1f}"


def _response(text: str, final: bool) -> Any:
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("TEXT", np.array([[text.encode()]], dtype=np.object_)),
            pb_utils.Tensor("IS_FINAL", np.array([[final]], dtype=np.bool_)),
        ]
    )


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        idle_us = int(config.get("sequence_batching", {}).get("max_sequence_idle_microseconds", 0))
        self._idle_s = float(params.get("idle_timeout_s", idle_us / 1e6 or 30.0))
        self._delay_s = float(params.get("delay_ms", "0")) / 1000.0
        # Fault injection for client tests: this many END answers (of sequences of at least
        # 1600 samples, so one-chunk health probes are not hit) come without IS_FINAL.
        self._malformed_finals = int(params.get("malformed_finals", "0"))
        self._live: dict[int, _Sequence] = {}

    def execute(self, requests: list[Any]) -> list[Any]:
        if self._delay_s > 0:
            time.sleep(self._delay_s)
        now = time.monotonic()
        for corrid in [c for c, s in self._live.items() if now - s.last_used > self._idle_s]:
            del self._live[corrid]  # Triton forgot it too: it says nothing on idle timeout
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
        ready = pb_utils.get_input_tensor_by_name(request, "READY")
        if ready is not None and not bool(ready.as_numpy().reshape(-1)[0]):
            return _response("", False)  # padding request (direct strategy)
        corrid = _corrid(request)
        seq = self._live.get(corrid)
        if _flag(request, "START"):
            seq = self._live[corrid] = _Sequence(now)
        elif seq is None:
            raise RuntimeError(
                f"sequence {corrid} is unknown: it never sent START, or was idle more than "
                f"{self._idle_s:g} s and evicted; restart it with START"
            )
        seq.last_used = now
        tensor = pb_utils.get_input_tensor_by_name(request, "AUDIO")
        audio = tensor.as_numpy().astype(np.float64) if tensor is not None else np.zeros(0)
        sumsq = float(np.dot(audio.reshape(-1), audio.reshape(-1)))
        seq.samples += audio.size
        seq.sumsq += sumsq
        if _flag(request, "END"):
            del self._live[corrid]
            if self._malformed_finals > 0 and seq.samples >= 1600:
                self._malformed_finals -= 1
                text = np.array([[_text(seq.samples, seq.sumsq).encode()]], dtype=np.object_)
                return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("TEXT", text)])
            return _response(_text(seq.samples, seq.sumsq), True)
        return _response(_text(audio.size, sumsq), False)

    def finalize(self) -> None:
        self._live.clear()
