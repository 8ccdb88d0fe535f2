"""Word error rate of the embedded recognizer under each of its decoding settings.

Run: ``python -m bench.accuracy [--json PATH]``. Decodes the shared LibriVox read speech
(``../shared/speech/librivox-*.wav``, references in the ``.txt`` beside each) and the shipped
``samples/`` (synthetic espeak-ng speech) with pocketsphinx's default en-us model under every
combination of:

- initial cepstral mean: the model's own (``cmn_init = ""``) or asrd's default ``cmn_init``;
- ``fwdflat`` (the second, flat-lexicon pass at utterance end) on or off;
- streaming (fixed 100 ms blocks, as the daemon and ``transcribe_direct`` feed) or batch (the
  whole utterance in one ``process_raw(pcm, False, True)`` call).

Audio is cut into utterances the way the daemon cuts it (8 kHz files resampled with a soxr
stream, then the default ``StreamVad``), and every utterance gets a fresh decoder. WER is word
edits (Levenshtein over words) divided by reference words, per corpus. ``end_utt()`` is timed
in thread CPU time, which is what holds a final back once the last audio is in. Settings run in
parallel worker processes, one per usable core (about 1.5 min on the 2-core dev VM).

Prints a table and writes JSON (default ``bench/results/accuracy-<timestamp>.json``) with the
machine facts, the per-setting figures and every hypothesis.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import sys
import time
import wave
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soxr
from pocketsphinx import Decoder

from bench.load import machine_facts
from daemon.config import DEFAULT_CMN_INIT, EmbeddedConfig, VadConfig
from workers.backends.base import SAMPLE_RATE
from workers.backends.embedded import _feed_blocks, decoder_options
from workers.vad import SpeechAudio, StreamVad

REPO = Path(__file__).resolve().parents[1]
SPEECH_DIR = Path(__file__).resolve().parents[2] / "shared" / "speech"
SAMPLES_DIR = REPO / "samples"
RESULTS_DIR = REPO / "bench" / "results"


@dataclass(frozen=True)
class Setting:
    cmn: str  # "model" (the acoustic model's own initial mean) | "default" (asrd's cmn_init)
    fwdflat: bool
    mode: str  # "streaming" | "batch"

    @property
    def label(self) -> str:
        return f"cmn={self.cmn:<7} fwdflat={'on ' if self.fwdflat else 'off'} {self.mode}"

    @property
    def is_daemon_default(self) -> bool:
        d = EmbeddedConfig()
        return (
            self.mode == "streaming"
            and self.fwdflat == d.fwdflat
            and (self.cmn == "default") == (d.cmn_init == DEFAULT_CMN_INIT)
        )

    def config(self) -> EmbeddedConfig:
        return EmbeddedConfig(
            cmn_init=DEFAULT_CMN_INIT if self.cmn == "default" else "", fwdflat=self.fwdflat
        )


SETTINGS = [
    Setting(cmn, fwdflat, mode)
    for cmn in ("model", "default")
    for fwdflat in (False, True)
    for mode in ("streaming", "batch")
]


@dataclass(frozen=True)
class Item:
    corpus: str  # "librivox" | "samples"
    name: str
    reference: list[str]  # one line per utterance (LibriVox files are one utterance each)
    utterances: list[bytes]  # 16 kHz s16le, as the daemon's VAD cuts them


def _read_wav(path: Path) -> tuple[int, bytes]:
    with wave.open(str(path), "rb") as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise SystemExit(f"bench.accuracy: {path}: expected 16-bit mono WAV")
        return w.getframerate(), w.readframes(w.getnframes())


def _to_16k(pcm: bytes, rate: int) -> bytes:
    """Resample as the ingress worker does: one soxr stream, then its flushed tail.

    soxr dithers int16 output with a seed that varies between streams, so this can differ from
    the daemon's by a few LSB; the shipped 8 kHz sample was picked to transcribe the same
    either way.
    """
    if rate == SAMPLE_RATE:
        return pcm
    stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="int16")
    head = stream.resample_chunk(np.frombuffer(pcm, dtype=np.int16))
    tail = stream.resample_chunk(np.zeros(0, dtype=np.int16), last=True)
    return np.concatenate([head, tail]).tobytes()


def _utterances(pcm: bytes) -> list[bytes]:
    vad = StreamVad(VadConfig(), SAMPLE_RATE)
    parts: dict[int, bytearray] = {}
    for ev in vad.process(pcm) + vad.flush():
        if isinstance(ev, SpeechAudio):
            parts.setdefault(ev.utterance, bytearray()).extend(ev.pcm)
    return [bytes(parts[k]) for k in sorted(parts)]


def load_corpus(corpus: str, files: list[Path]) -> list[Item]:
    items = []
    for wav in files:
        rate, pcm = _read_wav(wav)
        lines = [ln.strip() for ln in wav.with_suffix(".txt").read_text().splitlines()]
        items.append(
            Item(corpus, wav.name, [ln for ln in lines if ln], _utterances(_to_16k(pcm, rate)))
        )
    return items


def word_errors(reference: str, hypothesis: str) -> int:
    """Word-level Levenshtein distance (substitutions, insertions and deletions)."""
    ref, hyp = reference.split(), hypothesis.split()
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        diag, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (r != h))
    return row[-1]


def decode(options: dict[str, Any], pcm: bytes, mode: str) -> tuple[str, float]:
    """(hypothesis, end_utt() thread CPU ms) with a fresh decoder."""
    decoder = Decoder(**options)
    decoder.start_utt()
    if mode == "streaming":
        _feed_blocks(decoder, bytearray(pcm), final=True)  # the daemon's own feeding code
    else:
        decoder.process_raw(pcm, False, True)
    t0 = time.thread_time()
    decoder.end_utt()
    ms = (time.thread_time() - t0) * 1000
    hyp = decoder.hyp()
    return (hyp.hypstr if hyp is not None else ""), ms


def run_setting(setting: Setting, items: list[Item]) -> dict[str, Any]:
    options = decoder_options(setting.config())
    files = []
    end_ms: list[float] = []
    for item in items:
        hyps, times = [], []
        for pcm in item.utterances:
            text, ms = decode(options, pcm, setting.mode)
            hyps.append(text)
            times.append(round(ms, 2))
        end_ms += times
        files.append(
            {"corpus": item.corpus, "file": item.name, "hypotheses": hyps, "end_utt_ms": times}
        )
    return {"setting": setting, "files": files, "end_ms": end_ms}


def score(items: list[Item], files: list[dict[str, Any]], corpus: str) -> dict[str, Any]:
    errors = words = exact = utterances = 0
    for item, f in zip(items, files, strict=True):
        if item.corpus != corpus:
            continue
        ref, hyps = item.reference, f["hypotheses"]
        errors += word_errors(" ".join(ref), " ".join(hyps))
        words += len(" ".join(ref).split())
        utterances += len(ref)
        # An utterance is exact only if the VAD cut the file into as many as the reference has.
        if len(hyps) == len(ref):
            exact += sum(r == h for r, h in zip(ref, hyps, strict=True))
    return {
        "wer": errors / words if words else None,
        "errors": errors,
        "words": words,
        "exact_utterances": exact,
        "utterances": utterances,
    }


def _fmt_wer(s: dict[str, Any]) -> str:
    return "-" if s["wer"] is None else f"{100 * s['wer']:5.1f} %"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.accuracy", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--json", type=Path, help="where to write the results (default: bench/results)")
    args = ap.parse_args(argv)

    speech = sorted(p for p in SPEECH_DIR.glob("librivox-*.wav") if p.with_suffix(".txt").is_file())
    if not speech:
        raise SystemExit(
            f"bench.accuracy: no LibriVox speech (librivox-*.wav with .txt) at {SPEECH_DIR}; "
            "it lives beside the repository, in ../shared/speech"
        )
    samples = sorted(p for p in SAMPLES_DIR.glob("*.wav") if p.with_suffix(".txt").is_file())
    items = load_corpus("librivox", speech) + load_corpus("samples", samples)
    n_utt = sum(len(i.utterances) for i in items)
    audio_s = sum(len(u) for i in items for u in i.utterances) / (2 * SAMPLE_RATE)
    print(
        f"bench.accuracy: {len(speech)} LibriVox files, {len(samples)} samples: {n_utt} "
        f"utterances, {audio_s:.1f} s of speech; {len(SETTINGS)} settings",
        file=sys.stderr,
        flush=True,
    )

    t0 = time.monotonic()
    workers = min(len(SETTINGS), len(os.sched_getaffinity(0)))
    with ProcessPoolExecutor(workers) as pool:
        runs = list(pool.map(run_setting, SETTINGS, [items] * len(SETTINGS)))
    elapsed = time.monotonic() - t0

    rows = []
    for run in runs:
        setting: Setting = run["setting"]
        ms = run["end_ms"]
        rows.append(
            {
                "cmn": setting.cmn,
                "cmn_init": setting.config().cmn_init,
                "fwdflat": setting.fwdflat,
                "mode": setting.mode,
                "daemon_default": setting.is_daemon_default,
                "librivox": score(items, run["files"], "librivox"),
                "samples": score(items, run["files"], "samples"),
                "end_utt_ms": {"median": statistics.median(ms), "max": max(ms), "count": len(ms)},
                "files": run["files"],
            }
        )

    print(
        f"\n{'setting':<38} {'LibriVox WER':>12} {'samples WER':>12} {'exact':>7} "
        f"{'end_utt ms med':>14} {'max':>6}"
    )
    for row, run in zip(rows, runs, strict=True):
        s = row["samples"]
        mark = "  <- daemon default" if row["daemon_default"] else ""
        print(
            f"{run['setting'].label:<38} {_fmt_wer(row['librivox']):>12} {_fmt_wer(s):>12} "
            f"{s['exact_utterances']:>3}/{s['utterances']:<3} "
            f"{row['end_utt_ms']['median']:>14.1f} {row['end_utt_ms']['max']:>6.1f}{mark}"
        )
    words = rows[0]["librivox"]["words"], rows[0]["samples"]["words"]
    print(
        f"\nreference words: LibriVox {words[0]}, samples {words[1]}; exact = sample utterances "
        f"transcribed exactly; end_utt = thread CPU time; {elapsed:.0f} s on {workers} processes"
    )

    report = {
        "benchmark": "accuracy",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_facts(),
        "pocketsphinx": importlib.metadata.version("pocketsphinx"),
        "default_cmn_init": DEFAULT_CMN_INIT,
        "model_cmn_init": Decoder(samprate=SAMPLE_RATE, loglevel="ERROR").get_cmn(),
        "corpora": {
            "librivox": {"dir": str(SPEECH_DIR), "files": [p.name for p in speech]},
            "samples": {"dir": str(SAMPLES_DIR), "files": [p.name for p in samples]},
        },
        "references": {f"{i.corpus}/{i.name}": i.reference for i in items},
        "utterances": n_utt,
        "speech_s": round(audio_s, 2),
        "elapsed_s": round(elapsed, 1),
        "results": rows,
    }
    path = args.json or RESULTS_DIR / f"accuracy-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
