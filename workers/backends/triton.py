"""A streaming recognizer on NVIDIA Triton Inference Server, through ``tritonclient.grpc``.

One utterance is one Triton *sequence* (docs/triton.md, "The models"): its correlation id comes
from a counter that starts at a random 62-bit base, so the ids of two workers (or two backends)
talking to one server do not collide. ``begin`` only records the utterance; the first ``feed``
sends its audio with the START flag, every ``feed`` is one request whose ``TEXT`` answer becomes
the partial, and ``end`` sends the END request (with an empty chunk: the model accepts
``[1, 0]``) whose ``TEXT`` is the final (``IS_FINAL`` must be true). ``cancel`` ends a started
sequence on the server, ignoring errors, so that it holds no decoder and does not block unloads.

Transport: with ``shm_name`` (``/asrd-<instance>-<pid>-triton0``, the DESIGN.md scheme) the
backend creates one system shared-memory region of ``shm_bytes``, registers it with the server
before its first request (and again, once, when a request fails because the server lost the
registration, e.g. after a restart), writes each chunk at offset 0 and asks for ``TEXT`` and
``IS_FINAL`` at fixed offsets at the end of the region. A chunk larger than the input part goes
in the request instead. With ``shm_name=None`` every tensor travels in the request. ``close()``
ends open sequences, unregisters the region and unlinks it (ignoring errors when the server is
gone) and closes the client.

Threading model: synchronous and single-threaded; one instance per infer-worker thread (the
gRPC client is sticky and not shared). Nothing here is locked. Every request carries
``client_timeout=timeout_s``; a server or transport error becomes :class:`BackendError` with the
server's message. The model's configuration (``max_batch_size``, hence the input shape) is read
on the first request, so constructing the backend needs no reachable server.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from workers.backends.base import Backend, BackendError, Transcript

INPUT, TEXT, IS_FINAL = "AUDIO", "TEXT", "IS_FINAL"
TEXT_BYTES_MAX = 64 * 1024  # TEXT's slot in the region: a 4-byte length and the UTF-8 text
_ID_MASK = (1 << 64) - 1


def _message(exc: BaseException) -> str:
    if isinstance(exc, InferenceServerException):
        return str(exc.message() or exc)
    return str(exc)


class _Sequence:
    __slots__ = ("corrid", "started", "text")

    def __init__(self, corrid: int) -> None:
        self.corrid = corrid
        self.started = False  # the server has seen its START
        self.text = ""


class TritonBackend(Backend):
    name = "triton"

    def __init__(
        self,
        url: str,
        model: str = "asr_streaming",
        *,
        shm_name: str | None = None,
        shm_bytes: int = 1 << 20,
        timeout_s: float = 5.0,
    ) -> None:
        self._url = url
        self._model = model
        self._timeout_s = timeout_s
        self._next_id = random.SystemRandom().getrandbits(62) + 1
        self._open: dict[int, _Sequence] = {}
        self._batched: bool | None = None  # model's max_batch_size > 0; read on first use
        self._closed = False
        self._counters = dict.fromkeys(
            ("requests", "errors", "ended", "cancelled", "audio_bytes", "reregistered"), 0
        )
        try:
            self._client = grpcclient.InferenceServerClient(url)
        except (InferenceServerException, ValueError) as exc:
            raise BackendError(f"triton client for {url}: {_message(exc)}") from exc
        # Shared memory: [input | ... | TEXT slot | IS_FINAL byte]
        self._region: str | None = None
        self._handle: Any = None
        self._registered = False
        self._shm_bytes = shm_bytes
        self._text_bytes = 0
        self._text_off = self._final_off = 0
        if shm_name is not None:
            key = "/" + shm_name.lstrip("/")
            self._text_bytes = min(TEXT_BYTES_MAX, shm_bytes // 4)
            self._final_off = shm_bytes - 1
            self._text_off = self._final_off - self._text_bytes
            if self._text_bytes < 8 or self._text_off < 2:
                self._client.close()
                raise BackendError(f"shm_bytes {shm_bytes} is too small for a region")
            try:
                self._handle = shm.create_shared_memory_region(key[1:], key, shm_bytes)
            except shm.SharedMemoryException as exc:
                self._client.close()
                raise BackendError(f"cannot create shared memory {key}: {exc}") from exc
            self._region = key[1:]
            self._shm_key = key

    def __enter__(self) -> TritonBackend:
        return self

    # --- utterances -------------------------------------------------------------------------

    def begin(self, key: int) -> None:
        if self._closed:
            raise BackendError("backend is closed")
        if key in self._open:
            raise BackendError(f"stream {key} already has an open utterance")
        self._open[key] = _Sequence(self._next_id)
        self._next_id = (self._next_id + 1) & _ID_MASK or 1  # 0 means "no sequence"

    def feed(self, key: int, pcm: bytes) -> None:
        seq = self._get(key)
        if len(pcm) % 2:
            raise BackendError(f"stream {key}: odd number of bytes ({len(pcm)}) in s16le audio")
        if not pcm:
            return
        text, _ = self._infer(seq, pcm, end=False)
        seq.started = True
        seq.text = text
        self._counters["audio_bytes"] += len(pcm)

    def partial(self, key: int) -> str:
        return self._get(key).text

    def end(self, key: int) -> Transcript:
        seq = self._get(key)
        del self._open[key]
        text, final = self._infer(seq, b"", end=True)
        if not final:
            self._counters["errors"] += 1
            raise BackendError(f"stream {key}: the END answer of {self._model} is not final")
        self._counters["ended"] += 1
        return Transcript(text, None, None)

    def cancel(self, key: int) -> None:
        seq = self._open.pop(key, None)
        if seq is None:
            return
        self._counters["cancelled"] += 1
        if seq.started:
            with contextlib.suppress(BackendError):
                self._infer(seq, b"", end=True)

    def active(self) -> int:
        return len(self._open)

    def stats(self) -> dict[str, int]:
        return {**self._counters, "active": len(self._open)}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for key in list(self._open):
            self.cancel(key)
        if self._handle is not None:
            with contextlib.suppress(InferenceServerException, OSError, ValueError):
                if self._registered:
                    self._client.unregister_system_shared_memory(
                        self._region, client_timeout=self._timeout_s
                    )
            with contextlib.suppress(shm.SharedMemoryException, OSError):
                shm.destroy_shared_memory_region(self._handle)
            self._handle = None
            self._registered = False
        with contextlib.suppress(Exception):
            self._client.close()

    # --- requests ---------------------------------------------------------------------------

    def _get(self, key: int) -> _Sequence:
        if self._closed:
            raise BackendError("backend is closed")
        seq = self._open.get(key)
        if seq is None:
            raise BackendError(f"stream {key} has no open utterance")
        return seq

    def _is_batched(self) -> bool:
        if self._batched is None:
            try:
                config = self._client.get_model_config(self._model, client_timeout=self._timeout_s)
            except InferenceServerException as exc:
                self._counters["errors"] += 1
                raise BackendError(f"triton {self._url} {self._model}: {_message(exc)}") from exc
            self._batched = int(config.config.max_batch_size) > 0
        return self._batched

    def _register(self) -> None:
        assert self._region is not None
        with contextlib.suppress(InferenceServerException):  # stale one of ours after a crash
            self._client.unregister_system_shared_memory(
                self._region, client_timeout=self._timeout_s
            )
        self._client.register_system_shared_memory(
            self._region, self._shm_key, self._shm_bytes, client_timeout=self._timeout_s
        )
        self._registered = True

    def _region_lost(self) -> bool:
        """True when the server no longer lists our region (it restarted, or someone
        unregistered it); False when it does or when the server cannot say."""
        try:
            status = self._client.get_system_shared_memory_status(
                as_json=True, client_timeout=self._timeout_s
            )
        except InferenceServerException:
            return False
        return self._region not in status.get("regions", {})

    def _infer(self, seq: _Sequence, pcm: bytes, end: bool) -> tuple[str, bool]:
        try:
            batched = self._is_batched()
            samples = np.frombuffer(pcm, dtype="<i2")
            shape = [1, len(samples)] if batched else [len(samples)]
            in_shm = self._handle is not None  # outputs always; AUDIO when it fits
            if in_shm and not self._registered:
                self._register()
            try:
                result = self._request(seq, samples, shape, in_shm, end)
            except InferenceServerException:
                if not (in_shm and self._region_lost()):
                    raise
                self._register()
                self._counters["reregistered"] += 1
                result = self._request(seq, samples, shape, in_shm, end)
            return self._read(result, in_shm)
        except InferenceServerException as exc:
            self._counters["errors"] += 1
            raise BackendError(
                f"triton {self._url} {self._model} sequence {seq.corrid}: {_message(exc)}"
            ) from exc
        finally:
            self._counters["requests"] += 1

    def _request(
        self, seq: _Sequence, samples: np.ndarray, shape: list[int], in_shm: bool, end: bool
    ) -> Any:
        audio = grpcclient.InferInput(INPUT, shape, "INT16")
        outputs = None
        if in_shm and 0 < samples.nbytes <= self._text_off:  # a region can't hold 0 bytes
            shm.set_shared_memory_region(self._handle, [samples])
            audio.set_shared_memory(self._region, samples.nbytes)
        else:
            audio.set_data_from_numpy(samples.reshape(shape))
        if in_shm:
            text_out = grpcclient.InferRequestedOutput(TEXT)
            text_out.set_shared_memory(self._region, self._text_bytes, offset=self._text_off)
            final_out = grpcclient.InferRequestedOutput(IS_FINAL)
            final_out.set_shared_memory(self._region, 1, offset=self._final_off)
            outputs = [text_out, final_out]
        return self._client.infer(
            self._model,
            [audio],
            outputs=outputs,
            sequence_id=seq.corrid,
            sequence_start=not seq.started,
            sequence_end=end,
            client_timeout=self._timeout_s,
        )

    def _read(self, result: Any, in_shm: bool) -> tuple[str, bool]:
        if in_shm:
            text_meta, final_meta = result.get_output(TEXT), result.get_output(IS_FINAL)
            if text_meta is None or final_meta is None:
                raise BackendError(f"{self._model} answered without {TEXT} or {IS_FINAL}")
            text = shm.get_contents_as_numpy(
                self._handle, np.object_, list(text_meta.shape), offset=self._text_off
            )
            final = shm.get_contents_as_numpy(
                self._handle, np.bool_, list(final_meta.shape), offset=self._final_off
            )
        else:
            text, final = result.as_numpy(TEXT), result.as_numpy(IS_FINAL)
        if text is None or final is None or text.size != 1 or final.size != 1:
            raise BackendError(f"{self._model} answered a malformed {TEXT}/{IS_FINAL}")
        value = text.reshape(-1)[0]
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        return str(value), bool(final.reshape(-1)[0])
