"""Real read speech for tests: ``../shared/speech`` beside the repository (never copied into it).

Tests that need it carry :data:`needs_speech`, so they skip with a reason where it is absent.
"""

from __future__ import annotations

import wave
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SPEECH_DIR = REPO_ROOT.parent / "shared" / "speech"
RAW_RATE = 16000  # headerless .raw files there are 16 kHz s16le mono

needs_speech = pytest.mark.skipif(
    not SPEECH_DIR.is_dir(), reason=f"real speech samples not found at {SPEECH_DIR}"
)


def load_wav(path: str | Path) -> tuple[int, bytes]:
    """Return (sample rate, s16le mono PCM) of a WAV file (or a headerless 16 kHz .raw one)."""
    path = Path(path)
    if path.suffix == ".raw":
        return RAW_RATE, path.read_bytes()
    with wave.open(str(path), "rb") as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit mono, got {w.getnchannels()} channels")
        return w.getframerate(), w.readframes(w.getnframes())


def speech_files() -> list[Path]:
    """The WAV files that have a reference transcript (``.txt`` beside them), sorted."""
    if not SPEECH_DIR.is_dir():
        return []
    return sorted(p for p in SPEECH_DIR.glob("*.wav") if p.with_suffix(".txt").is_file())


def transcript(path: Path) -> str:
    return path.with_suffix(".txt").read_text().strip()
