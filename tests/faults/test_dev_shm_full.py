"""``/dev/shm`` too small for the config: the daemon exits 71 at boot with a message that says
so, leaves no segment behind, and (per the unit's RestartPreventExitStatus) is not restarted in
a loop. Run in a private mount namespace with an 8 MiB tmpfs on /dev/shm, so the test cannot
fill the machine's real /dev/shm (which is RAM)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)


def _can_mount_private_shm() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    done = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t tmpfs -o size=1m tmpfs /dev/shm",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        return f"cannot mount a private /dev/shm here: {done.stderr.strip()}"
    return None


def test_dev_shm_too_small_exits_71_and_leaves_nothing(tmp_path: Path) -> None:
    why = _can_mount_private_shm()
    if why is not None:
        pytest.skip(why)
    cfg = tmp_path / "asrd.toml"
    # Two lanes of 4 MiB + 1 MiB rings: more than the 8 MiB tmpfs holds.
    cfg.write_text(
        f'runtime_dir = "{tmp_path}"\nlanes = 2\n[backend]\nkind = "null"\n'
        "[ring]\naudio_bytes = 4194304\nresult_bytes = 1048576\n"
    )
    script = (
        "mount -t tmpfs -o size=8m tmpfs /dev/shm && "
        f"{sys.executable} -m daemon.cli run --config {cfg}; rc=$?; "
        "echo left: $(ls /dev/shm | wc -l); exit $rc"
    )
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 71, done.stderr[-2000:]
    assert "is /dev/shm full?" in done.stderr
    assert "left: 0" in done.stdout  # every segment created before the failure was removed
