"""Naming, manifest and sweep of asrd's POSIX shared-memory segments.

Threading model: the supervisor alone uses this module (workers only attach to names they are
given). It names every segment ``/asrd-<instance>-<supervisor pid>-<role><n>``, records each one
in a :class:`Manifest` as it creates it, unlinks them all at exit (:meth:`Manifest.unlink_all`),
and at start calls :func:`sweep_stale` to remove what a crashed supervisor of the same instance
left behind. Instance names match ``[A-Za-z0-9_]{1,32}`` (as the config enforces), so the ``-``
separators parse unambiguously and one instance's sweep can never match another's segments.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import posix_ipc
import psutil

from ipc.heartbeat import MAX_ENDPOINTS

PREFIX = "asrd"
SHM_DIR = Path("/dev/shm")

_INSTANCE_RE = re.compile(r"[A-Za-z0-9_]{1,32}")
_ROLE_RE = re.compile(r"[a-z][a-z_]*")
_MANIFEST_VERSION = 1
_ASRD_WORD = re.compile(rf"{PREFIX}\b")


def _check_instance(instance: str) -> None:
    if not _INSTANCE_RE.fullmatch(instance):
        raise ValueError(f"instance name {instance!r} must match [A-Za-z0-9_]{{1,32}}")


def segment_name(instance: str, supervisor_pid: int, role: str, n: int) -> str:
    """``/asrd-<instance>-<pid>-<role><n>``, e.g. ``/asrd-default-1234-audio0``."""
    _check_instance(instance)
    if not _ROLE_RE.fullmatch(role):
        raise ValueError(f"segment role {role!r} must be lower-case letters")
    if supervisor_pid <= 0 or n < 0:
        raise ValueError(f"bad pid {supervisor_pid} or index {n} for a segment name")
    return f"/{PREFIX}-{instance}-{supervisor_pid}-{role}{n}"


def _instance_pattern(instance: str) -> re.Pattern[str]:
    # File names in /dev/shm have no leading slash.
    return re.compile(rf"{PREFIX}-{re.escape(instance)}-(\d+)-([a-z][a-z_]*\d+)")


def parse_segment(name: str, instance: str) -> int | None:
    """The supervisor pid in ``name`` if it is a segment of ``instance``, else None."""
    m = _instance_pattern(instance).fullmatch(name.lstrip("/"))
    return int(m.group(1)) if m else None


def triton_region_name(instance: str, supervisor_pid: int, lane: int, endpoint: int) -> str:
    """The Triton region of ``lane``'s infer worker for endpoint ``endpoint``:
    ``/asrd-<instance>-<pid>-triton<n>`` with n = lane * MAX_ENDPOINTS + endpoint."""
    return segment_name(instance, supervisor_pid, "triton", lane * MAX_ENDPOINTS + endpoint)


def is_stale_segment(name: str, instance: str) -> bool:
    """True if ``name`` (with or without the leading slash) is a segment or region of
    ``instance`` whose supervisor is gone; what :func:`sweep_stale` removes."""
    pid = parse_segment(name, instance)
    return pid is not None and not is_asrd_alive(pid)


def _unlink(name: str, shm_dir: Path) -> bool:
    """Unlink one segment by name; False if it was already gone."""
    if shm_dir == SHM_DIR:
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            return False
        return True
    # A test's fake directory: same effect as shm_unlink on Linux, where /dev/shm is the namespace.
    try:
        (shm_dir / name.lstrip("/")).unlink()
    except FileNotFoundError:
        return False
    return True


class Manifest:
    """The segments one supervisor created, in ``<runtime_dir>/shm-<instance>.json``.

    The file is rewritten atomically (temp file + rename) on every change, so a crash at any
    point leaves either the old or the new list for the next start's sweep.
    """

    def __init__(self, runtime_dir: Path, instance: str, pid: int | None = None) -> None:
        _check_instance(instance)
        self.runtime_dir = Path(runtime_dir)
        self.instance = instance
        self.pid = os.getpid() if pid is None else pid
        self.path = manifest_path(self.runtime_dir, instance)
        self._names: list[str] = []
        # A supervisor that re-creates its Manifest object keeps its own list; anyone else's
        # file is the sweep's business and gets replaced on our first add().
        found = read_manifest(self.path)
        if found is not None and found[0] == self.pid:
            self._names = found[1]

    def add(self, name: str) -> None:
        if name not in self._names:
            self._names.append(name)
            self._write()

    def remove(self, name: str) -> None:
        """Forget ``name`` (after the caller unlinked it); unknown names are ignored."""
        if name in self._names:
            self._names.remove(name)
            self._write()

    def names(self) -> list[str]:
        return list(self._names)

    def unlink_all(self) -> list[str]:
        """Unlink every listed segment (ignoring ones already gone), then delete the file.

        Returns the names that were actually unlinked.
        """
        done = [name for name in self._names if _unlink(name, SHM_DIR)]
        self._names.clear()
        self.path.unlink(missing_ok=True)
        return done

    def _write(self) -> None:
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        data = {
            "version": _MANIFEST_VERSION,
            "instance": self.instance,
            "pid": self.pid,
            "segments": self._names,
        }
        tmp = self.path.with_name(f".{self.path.name}.{self.pid}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def manifest_path(runtime_dir: Path, instance: str) -> Path:
    return Path(runtime_dir) / f"shm-{instance}.json"


def read_manifest(path: Path) -> tuple[int, list[str]] | None:
    """(pid, segment names) from a manifest file; None if it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        pid = data["pid"]
        names = data["segments"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(pid, int) or not isinstance(names, list):
        return None
    return pid, [n for n in names if isinstance(n, str)]


def is_asrd_alive(pid: int) -> bool:
    """True if ``pid`` is this process or a live asrd process.

    "asrd" means the process name or the basename of an argv word starts with the word asrd:
    ``asrd run``, ``/usr/bin/asrd``, a setproctitle title like ``asrd: ingress lane 0``. A
    checkout under ``.../asrd/.venv/bin/python`` does not count, so a recycled pid now held by
    an unrelated program never protects stale segments. A process we may not inspect counts as
    alive (never delete what might be in use); a zombie is dead.
    """
    if pid == os.getpid():
        return True
    if not psutil.pid_exists(pid):
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        words = [proc.name(), *proc.cmdline()]
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True
    return any(_ASRD_WORD.match(os.path.basename(w)) for w in words)


def sweep_stale(
    instance: str,
    runtime_dir: Path | None = None,
    *,
    shm_dir: Path = SHM_DIR,
    is_alive: Callable[[int], bool] = is_asrd_alive,
) -> list[str]:
    """Unlink ``instance``'s segments whose supervisor is gone, and its stale manifest.

    Returns the names unlinked (with the leading slash). Segments of other instances, and of
    live supervisors of this one, are never touched.
    """
    _check_instance(instance)
    pattern = _instance_pattern(instance)
    alive: dict[int, bool] = {}

    def dead(pid: int) -> bool:
        if pid not in alive:
            alive[pid] = is_alive(pid)
        return not alive[pid]

    removed: list[str] = []
    try:
        entries = sorted(os.listdir(shm_dir))
    except FileNotFoundError:
        entries = []
    for entry in entries:
        m = pattern.fullmatch(entry)
        if m and dead(int(m.group(1))) and _unlink("/" + entry, shm_dir):
            removed.append("/" + entry)

    if runtime_dir is not None:
        path = manifest_path(runtime_dir, instance)
        found = read_manifest(path)
        if found is not None and dead(found[0]):
            # The directory scan normally got these already; the manifest is the backstop for
            # names a future layout might not match. Still only this instance's names.
            for name in found[1]:
                if pattern.fullmatch(name.lstrip("/")) and _unlink(name, shm_dir):
                    removed.append(name)
            path.unlink(missing_ok=True)
        elif found is None and path.exists():
            path.unlink(missing_ok=True)  # unreadable: nobody can use it
        # Temp files of manifests whose writer died mid-rename.
        for tmp in Path(runtime_dir).glob(f".{path.name}.*.tmp"):
            pid_text = tmp.name[len(path.name) + 2 : -len(".tmp")]
            if pid_text.isdigit() and dead(int(pid_text)):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
    return removed


def list_segments(instance: str | None = None, *, shm_dir: Path = SHM_DIR) -> list[str]:
    """Names (with leading slash) of asrd segments, all or one instance's, sorted."""
    if instance is None:
        pattern = re.compile(rf"{PREFIX}-.+")
    else:
        _check_instance(instance)
        pattern = _instance_pattern(instance)
    try:
        entries = os.listdir(shm_dir)
    except FileNotFoundError:
        return []
    return sorted("/" + e for e in entries if pattern.fullmatch(e))
