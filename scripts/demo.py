"""`make demo`: start asrd with the default config, transcribe the samples live, stop it cleanly."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from daemon.launcher import DaemonProcess

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    samples = sorted(str(p) for p in (ROOT / "samples").glob("*.wav"))
    if not samples:
        print("no samples/*.wav found", file=sys.stderr)
        return 1
    print("==> starting asrd (embedded pocketsphinx recognizer, default config) ...", flush=True)
    t0 = time.monotonic()
    daemon = DaemonProcess()
    with daemon:
        print(
            f"==> asrd ready in {time.monotonic() - t0:.1f} s on {daemon.socket_path}; "
            f"streaming {len(samples)} files in real time, one stream each",
            flush=True,
        )
        asrctl = [sys.executable, "-m", "daemon.asrctl"]
        # On a terminal partials update in place; elsewhere they print as lines of their own.
        partials = [] if sys.stdout.isatty() else ["--partials"]
        rc = subprocess.call(
            [
                *asrctl,
                "transcribe",
                "--socket",
                str(daemon.socket_path),
                "--realtime",
                *partials,
                *samples,
            ]
        )
        print("==> daemon status:", flush=True)
        subprocess.call([*asrctl, "status", "--control-socket", str(daemon.control_path)])
        print("==> stopping asrd (SIGTERM: drain, then exit)", flush=True)
        code = daemon.stop()
        print(f"==> asrd exited with code {code}", flush=True)
    return rc or code


if __name__ == "__main__":
    raise SystemExit(main())
