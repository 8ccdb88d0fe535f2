"""pocketsphinx decoders through its C API, so that decoding runs without the GIL.

pocketsphinx's Python module calls the decoder with the GIL held: two threads decoding at once
take about 2.4x the time of one, and an infer worker could use one core at most. The module's
extension library exports the whole C API (pocketsphinx 5.0 and later), so this module calls
it through :mod:`ctypes`, which releases the GIL for every call: threads that each own a
decoder decode in parallel (measured on the 2-vCPU dev VM: two streams on two threads in
1.1-1.3x the wall time of one, against 2.45x).

The configuration is the Python module's own (``pocketsphinx.Config`` with the same keyword
arguments, so the same default model paths), handed to the C library as JSON. Transcripts,
word timings and probabilities are those of ``pocketsphinx.Decoder`` (tests/test_sphinx.py
compares them on the shared speech).

Threading: a decoder is not safe for concurrent use; each must be used by one thread at a time.
Different decoders may be used by different threads at once. pocketsphinx's log goes to the
process's stderr (the Python module installs no log callback); its level is the ``loglevel``
option, which is process-wide in pocketsphinx.
"""

from __future__ import annotations

import ctypes
import json
from typing import Any

import pocketsphinx
from pocketsphinx import _pocketsphinx

from workers.backends.base import BackendError

_P = ctypes.c_void_p
_I32 = ctypes.c_int32
_I32P = ctypes.POINTER(ctypes.c_int32)
_INTP = ctypes.POINTER(ctypes.c_int)

# name: (result type, argument types)
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "ps_config_parse_json": (_P, [_P, ctypes.c_char_p]),
    "ps_config_free": (ctypes.c_int, [_P]),
    "ps_config_int": (ctypes.c_long, [_P, ctypes.c_char_p]),
    "ps_init": (_P, [_P]),
    "ps_free": (ctypes.c_int, [_P]),
    "ps_get_config": (_P, [_P]),
    "ps_get_logmath": (_P, [_P]),
    "ps_reinit_feat": (ctypes.c_int, [_P, _P]),
    "ps_start_utt": (ctypes.c_int, [_P]),
    "ps_process_raw": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int,
                                      ctypes.c_int]),
    "ps_end_utt": (ctypes.c_int, [_P]),
    "ps_get_hyp": (ctypes.c_char_p, [_P, _I32P]),
    "ps_get_prob": (_I32, [_P]),
    "ps_seg_iter": (_P, [_P]),
    "ps_seg_next": (_P, [_P]),
    "ps_seg_word": (ctypes.c_char_p, [_P]),
    "ps_seg_frames": (None, [_P, _INTP, _INTP]),
    "ps_seg_prob": (_I32, [_P, _I32P, _I32P, _I32P]),
    "logmath_exp": (ctypes.c_double, [_P, ctypes.c_int]),
}  # fmt: skip


def _load() -> Any:
    lib = ctypes.CDLL(_pocketsphinx.__file__)
    for name, (restype, argtypes) in _SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError as exc:
            raise BackendError(
                f"pocketsphinx {getattr(pocketsphinx, '__version__', '')} does not export "
                f"{name} from {_pocketsphinx.__file__}; asrd needs pocketsphinx 5 (pip install "
                "'pocketsphinx>=5.0.3,<6')"
            ) from exc
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


_lib: Any = None


def _library() -> Any:
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib


class SphinxDecoder:
    """One pocketsphinx decoder, created from ``pocketsphinx.Decoder``'s keyword arguments.

    Raises ``ValueError`` for options pocketsphinx does not know and ``RuntimeError`` when the
    models do not load or a call fails, as ``pocketsphinx.Decoder`` does; :class:`BackendError`
    when the installed pocketsphinx lacks the C API."""

    __slots__ = ("_lib", "_lmath", "_ps", "frame_ms")

    def __init__(self, options: dict[str, Any]) -> None:
        self._ps: int | None = None
        lib = self._lib = _library()
        try:
            config_json = pocketsphinx.Config(**options).dumps()
        except KeyError as exc:
            raise ValueError(f"unknown pocketsphinx option: {exc}") from exc
        config = lib.ps_config_parse_json(None, config_json.encode())
        if not config:
            raise RuntimeError(f"pocketsphinx refused its own configuration: {config_json}")
        try:
            ps = lib.ps_init(config)  # takes its own reference to the configuration
        finally:
            lib.ps_config_free(config)
        if not ps:
            raise RuntimeError(
                "the models did not load (pocketsphinx's log says which file): "
                + json.dumps({k: options[k] for k in ("hmm", "dict", "lm") if k in options})
            )
        self._ps = ps
        self._lmath = lib.ps_get_logmath(ps)
        self.frame_ms = 1000 // int(lib.ps_config_int(lib.ps_get_config(ps), b"frate"))

    def reinit_feat(self) -> None:
        if self._lib.ps_reinit_feat(self._ps, None) < 0:
            raise RuntimeError("failed to reinitialize feature extraction")

    def start_utt(self) -> None:
        if self._lib.ps_start_utt(self._ps) < 0:
            raise RuntimeError("failed to start an utterance")

    def process_raw(self, pcm: bytes) -> None:
        """Decode 16-bit signed little-endian mono samples."""
        if self._lib.ps_process_raw(self._ps, pcm, len(pcm) // 2, 0, 0) < 0:
            raise RuntimeError(f"failed to process {len(pcm) // 2} samples")

    def end_utt(self) -> None:
        if self._lib.ps_end_utt(self._ps) < 0:
            raise RuntimeError("failed to end the utterance")

    def hyp(self) -> str | None:
        """The current hypothesis, or None before there is one."""
        score = _I32()
        text = self._lib.ps_get_hyp(self._ps, ctypes.byref(score))
        return None if text is None else text.decode("utf-8")

    def prob(self) -> float:
        """Posterior probability of the hypothesis (1.0 unless the lattice was built)."""
        lib = self._lib
        return float(lib.logmath_exp(self._lmath, lib.ps_get_prob(self._ps)))

    def seg(self) -> list[tuple[str, int, int, float]]:
        """The hypothesis's words: (word, first frame, last frame inclusive, posterior)."""
        lib = self._lib
        out = []
        sf, ef = ctypes.c_int(), ctypes.c_int()
        ascr, lscr, lback = _I32(), _I32(), _I32()
        it = lib.ps_seg_iter(self._ps)
        while it:
            word = lib.ps_seg_word(it).decode("utf-8")
            lib.ps_seg_frames(it, ctypes.byref(sf), ctypes.byref(ef))
            logp = lib.ps_seg_prob(it, ctypes.byref(ascr), ctypes.byref(lscr), ctypes.byref(lback))
            out.append((word, sf.value, ef.value, float(lib.logmath_exp(self._lmath, logp))))
            it = lib.ps_seg_next(it)  # frees the iterator after the last word
        return out

    def close(self) -> None:
        ps, self._ps = self._ps, None
        if ps:
            self._lib.ps_free(ps)

    def __del__(self) -> None:
        self.close()
