"""The platform probe: what this machine offers asrd, each fact with the file or call it came from.

What is probed, and from where (paths are below ``root``, ``/`` unless a test passes a tree):

* **Kernel**: ``/proc/sys/kernel/osrelease``, else ``os.uname()`` (real root only).
* **CPUs**: online and offline CPUs (``/sys/devices/system/cpu/online``, ``offline``),
  isolated CPUs (``/sys/devices/system/cpu/isolated``, else ``isolcpus=`` in ``/proc/cmdline``),
  the CPUs this process may use (``os.sched_getaffinity(0)``, which already reflects a cgroup
  cpuset and ``taskset``) and the SMT sibling groups
  (``/sys/devices/system/cpu/cpuN/topology/thread_siblings_list``).
* **NUMA nodes**: ``/sys/devices/system/node/nodeN/cpulist`` and ``meminfo``; a kernel without
  NUMA sysfs is reported as one node holding every online CPU (``/proc/meminfo``).
* **Virtualization**: the ``hypervisor`` CPU flag (``/proc/cpuinfo``), DMI
  (``/sys/class/dmi/id/{sys_vendor,product_name,bios_vendor,board_vendor,bios_version,
  chassis_asset_tag}``), ``/sys/hypervisor/{type,uuid}``, the clock sources and the kernel
  command line; see :func:`_classify` for the rules and ``docs/platform.md`` for their limits.
* **Container**: ``/.dockerenv``, ``/run/.containerenv``, ``/run/systemd/container``,
  ``container=`` in ``/proc/1/environ`` (when readable), runtime names in ``/proc/self/cgroup``,
  and a cgroup cpuset narrower than the online CPUs.
* **io_uring**: kernel >= 5.1, ``kernel.io_uring_disabled`` / ``io_uring_group``, and on the real
  root a real ``io_uring_setup(2)`` call through ``syscall(2)`` (ctypes, no liburing).
* **SIMD**: the CPU flags that matter to the recognizers (SSE4.2, AVX2, FMA, AVX-512, NEON/ASIMD,
  SVE) and the SIMD targets numpy dispatches to at run time on this CPU.
* **/dev/shm**: size and free space (``os.statvfs``) and its filesystem type; compare with
  :func:`shm_bytes_needed`.

"Safe" means: no part needs root, and nothing raises. A missing file is an ordinary answer
(many are optional: DMI in Firecracker, ``io_uring_disabled`` before Linux 6.6); an unreadable,
garbled or wrong-kind file (a directory, a FIFO, a device) gives the part's safe fallback and a
``warnings`` entry; files are opened non-blocking and only if regular, and read up to a size
limit, so a FIFO or ``/dev/zero`` in the tree cannot hang or flood the probe. Each part runs
under a last-resort ``except`` that records the failure and substitutes a neutral value.

Limits: the probe reads what the kernel shows this process. Inside a container, DMI and NUMA
sysfs are usually the host's (so a container on EC2 says "aws"), and a runtime that hides them
makes the answers poorer (``"unknown"``), never wrong in a way that fails the daemon. The
``io_uring_setup`` probe runs only on the real root (a fixture tree cannot answer a syscall), and
runs in a forked child when a seccomp filter is active, so a filter whose action is "kill" ends
the child, not the caller. On any platform other than Linux the module imports (no Linux-only
imports at module level) and :func:`probe` answers ``supported=False`` with the reason.
"""

from __future__ import annotations

import errno
import importlib
import os
import platform as _stdlib_platform
import re
import signal
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import msgspec

if TYPE_CHECKING:
    from daemon.config import Config

__all__ = [
    "UNSUPPORTED_REASON",
    "Container",
    "Cpus",
    "IoUring",
    "IoUringState",
    "Kernel",
    "NumaNode",
    "Platform",
    "Shm",
    "Simd",
    "Vendor",
    "Virtualization",
    "format_cpulist",
    "parse_cpulist",
    "parse_kernel_version",
    "probe",
    "shm_bytes_needed",
]

UNSUPPORTED_REASON = (
    "asrd needs Linux: eventfd, POSIX shm in /dev/shm, sched_setaffinity, SO_PEERCRED"
)

IoUringState = Literal[
    "usable",
    "disabled by sysctl",
    "blocked (seccomp/EPERM)",
    "kernel too old",
    "unsupported platform",
    "unknown",
]
# "hyperv" is Hyper-V outside Azure (on-premises, WSL2): same DMI as Azure but no Azure tag.
Vendor = Literal[
    "aws",
    "gcp",
    "azure",
    "hyperv",
    "kvm",
    "qemu",
    "vmware",
    "xen",
    "firecracker",
    "unknown",
    "none",
]
CLOUD_VENDORS = frozenset({"aws", "gcp", "azure", "firecracker"})

# --- result types -------------------------------------------------------------------------------


class Kernel(msgspec.Struct, kw_only=True):
    release: str  # e.g. "6.8.0-45-generic"; "" when unknown
    version: tuple[int, int, int] | None  # (major, minor, patch) parsed from release
    source: str


class NumaNode(msgspec.Struct, kw_only=True):
    id: int
    cpus: list[int]  # online CPUs of the node that this process may use
    all_cpus: list[int]  # every CPU the node lists (cpulist)
    memory_total_bytes: int | None
    memory_free_bytes: int | None
    source: str


class Cpus(msgspec.Struct, kw_only=True):
    allowed: list[int]  # this process's affinity (cgroup cpuset and taskset included)
    online: list[int]
    offline: list[int]
    isolated: list[int]  # isolcpus: no scheduler load balancing onto these
    # Groups of hardware threads sharing a core (thread_siblings_list), one group per core.
    smt_siblings: list[list[int]]
    source: str


class Virtualization(msgspec.Struct, kw_only=True):
    hypervisor_flag: bool  # the x86 "hypervisor" CPUID bit, as /proc/cpuinfo shows it
    vendor: Vendor
    cloud: bool  # aws, gcp, azure, firecracker
    evidence: list[str]  # the facts the vendor was decided on, each naming its file
    source: str


class Container(msgspec.Struct, kw_only=True):
    detected: bool  # only from hints that a runtime leaves (not from a narrow cpuset alone)
    hints: list[str]
    source: str


class IoUring(msgspec.Struct, kw_only=True):
    state: IoUringState
    detail: str  # why, and what to do about it
    io_uring_disabled: int | None  # the sysctl's value; None where absent (kernel < 6.6)
    source: str


class Simd(msgspec.Struct, kw_only=True):
    # Of sse4_2, avx2, fma, avx512f, avx512bw, avx512vl, avx512_vnni, neon, asimd, sve: those
    # the CPU has (AArch64 names NEON "asimd").
    cpu_flags: list[str]
    numpy_baseline: list[str]  # targets numpy was compiled for (always used)
    numpy_dispatch: list[str]  # runtime-dispatched targets this CPU supports
    source: str


class Shm(msgspec.Struct, kw_only=True):
    path: str
    total_bytes: int | None
    free_bytes: int | None
    fstype: str | None  # "tmpfs" normally; from /proc/self/mounts
    source: str


class Platform(msgspec.Struct, kw_only=True):
    system: str  # platform.system()
    root: str  # the tree probed ("/" in production)
    supported: bool
    unsupported_reason: str  # "" when supported
    kernel: Kernel
    cpus: Cpus
    numa_nodes: list[NumaNode]
    virtualization: Virtualization
    container: Container
    io_uring: IoUring
    simd: Simd
    shm: Shm
    warnings: list[str]


# --- small parsers ------------------------------------------------------------------------------

# Linux's NR_CPUS tops out at 8192; a list beyond this is garbage, and expanding "0-4294967295"
# would exhaust memory, so refuse it.
MAX_CPUS = 65536
_ISOLCPUS_FLAGS = frozenset({"nohz", "domain", "managed_irq"})


def parse_cpulist(text: str, *, last: int | None = None) -> list[int]:
    """Parse a kernel CPU list (``"0-3,8-11"``, ``"0-15:2/4"``, ``"1-N"``, ``"0-7,^3"``).

    ``a-b:u/g`` takes the first ``u`` CPUs of every group of ``g`` (bitmap_parselist), ``N`` is
    the last CPU (needs ``last``), ``^x`` or ``^a-b`` removes CPUs listed before it. An empty or
    blank string is no CPUs. Raises :class:`ValueError` on anything else.
    """
    cpus: set[int] = set()
    for raw in text.strip().split(","):
        item = raw.strip()
        if not item:
            continue
        exclude = item.startswith("^")
        if exclude:
            item = item[1:].strip()
        stride_used, stride_group = 1, 1
        if ":" in item:
            item, _, stride = item.partition(":")
            used, sep, group = stride.partition("/")
            if not sep:
                raise ValueError(f"bad stride {stride!r} in CPU list {text!r}")
            stride_used, stride_group = _cpu_number(used, None), _cpu_number(group, None)
            if not 0 < stride_used <= stride_group:
                raise ValueError(f"bad stride {stride!r} in CPU list {text!r}")
        lo_text, dash, hi_text = item.partition("-")
        lo = _cpu_number(lo_text, last)
        hi = _cpu_number(hi_text, last) if dash else lo
        if hi < lo:
            raise ValueError(f"descending range {item!r} in CPU list {text!r}")
        span = {c for c in range(lo, hi + 1) if (c - lo) % stride_group < stride_used}
        if exclude:
            cpus -= span
        else:
            cpus |= span
    return sorted(cpus)


def _cpu_number(text: str, last: int | None) -> int:
    text = text.strip()
    if text == "N" and last is not None:
        return last
    if not text.isdigit():
        raise ValueError(f"not a CPU number: {text!r}")
    value = int(text)
    if value >= MAX_CPUS:
        raise ValueError(f"CPU number {value} beyond {MAX_CPUS - 1}")
    return value


def format_cpulist(cpus: list[int] | set[int]) -> str:
    """The kernel's compact form: ``[0, 1, 2, 3, 8]`` -> ``"0-3,8"``; ``[]`` -> ``""``."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(set(cpus)):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(_run_text(run))
        run = [c]
    if run:
        out.append(_run_text(run))
    return ",".join(out)


def _run_text(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


_VERSION_RE = re.compile(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?")


def parse_kernel_version(release: str) -> tuple[int, int, int] | None:
    """``"6.8.0-45-generic"`` -> ``(6, 8, 0)``; ``"4.19"`` -> ``(4, 19, 0)``; garbage -> None."""
    m = _VERSION_RE.match(release)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


# --- reading a tree safely ----------------------------------------------------------------------

# Bigger than /proc/cpuinfo of a 512-thread machine (about 1.5 KiB per CPU), small enough that
# a wrong file (a huge regular file put where a sysfs attribute belongs) costs little.
_READ_LIMIT = 4 * 1024 * 1024


class _Tree:
    """Reads files below ``root`` (the real ``/`` or a fixture) and never raises.

    A missing file is ``None`` without a warning (callers know which files are optional); any
    other failure is ``None`` and a warning naming the file and the reason.
    """

    def __init__(self, root: Path, warnings: list[str]) -> None:
        self.root = root
        self.warnings = warnings

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    @staticmethod
    def label(rel: str) -> str:
        # Sources name the file as it is on the probed system, not its place in a fixture.
        return "/" + rel.lstrip("/")

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def read(self, rel: str, *, quiet: bool = False) -> str | None:
        """The file's text (undecodable bytes replaced), or None; ``quiet``: no warning for
        a permission error (files that only root may read, e.g. ``/proc/1/environ``)."""
        try:
            # O_NONBLOCK: opening a FIFO put where a file is expected must not wait for a writer.
            fd = os.open(self.path(rel), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if not (quiet and isinstance(exc, PermissionError)):
                self.warn(f"{self.label(rel)}: unreadable ({exc.strerror or exc})")
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                self.warn(f"{self.label(rel)}: not a regular file; ignored")
                return None
            # procfs and sysfs report size 0 and may return less than asked per read: loop.
            chunks: list[bytes] = []
            size = 0
            while size < _READ_LIMIT:
                chunk = os.read(fd, min(65536, _READ_LIMIT - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks).decode("utf-8", "replace")
        except OSError as exc:
            if not (quiet and isinstance(exc, PermissionError)):
                self.warn(f"{self.label(rel)}: unreadable ({exc.strerror or exc})")
            return None
        finally:
            os.close(fd)

    def line(self, rel: str) -> str | None:
        """The first line, stripped (DMI and sysctl files hold one value)."""
        text = self.read(rel)
        if text is None:
            return None
        lines = text.strip().splitlines()
        return lines[0].strip() if lines else ""

    def exists(self, rel: str) -> bool:
        return os.path.lexists(self.path(rel))  # never raises

    def listdir(self, rel: str) -> list[str] | None:
        try:
            return sorted(os.listdir(self.path(rel)))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            self.warn(f"{self.label(rel)}: cannot list ({exc.strerror or exc})")
            return None

    def cpulist(self, rel: str) -> list[int] | None:
        """A CPU-list file, or None when it is missing or garbled (with a warning)."""
        text = self.read(rel)
        if text is None:
            return None
        try:
            return parse_cpulist(text)
        except ValueError as exc:
            self.warn(f"{self.label(rel)}: cannot parse a CPU list ({exc}); ignored")
            return None

    def integer(self, rel: str) -> int | None:
        text = self.line(rel)
        if text is None:
            return None
        try:
            return int(text)
        except ValueError:
            self.warn(f"{self.label(rel)}: not an integer ({text[:40]!r}); ignored")
            return None


T = TypeVar("T")


def _guarded(part: str, warnings: list[str], fn: Callable[[], T], fallback: Callable[[], T]) -> T:
    """Run one part of the probe; a bug or a surprise in it costs that part, not the probe."""
    try:
        return fn()
    except Exception as exc:  # the probe's promise: nothing raises
        warnings.append(f"{part}: probe failed ({type(exc).__name__}: {exc}); safe default used")
        return fallback()


# --- kernel -------------------------------------------------------------------------------------


def _kernel(tree: _Tree, real: bool) -> Kernel:
    rel = "proc/sys/kernel/osrelease"
    text = tree.line(rel)
    if text:
        release, source = text, tree.label(rel)
    elif real:
        release, source = os.uname().release, "uname"
    else:
        release, source = "", f"{tree.label(rel)}: unavailable"
    version = parse_kernel_version(release)
    if release and version is None:
        tree.warn(f"kernel release {release[:40]!r} ({source}): no version number in it")
    return Kernel(release=release, version=version, source=source)


# --- CPUs ---------------------------------------------------------------------------------------

_CPU = "sys/devices/system/cpu"


def _cpus(tree: _Tree, real: bool, affinity: set[int] | None) -> tuple[Cpus, _Cpuset | None]:
    sources: list[str] = []

    online = tree.cpulist(f"{_CPU}/online")
    if online is not None:
        sources.append(f"online: {tree.label(_CPU + '/online')}")
    else:
        online, how = _online_fallback(tree, real)
        sources.append(f"online: {how}")

    offline = tree.cpulist(f"{_CPU}/offline")
    if offline is not None:
        sources.append(f"offline: {tree.label(_CPU + '/offline')}")
    else:
        possible = tree.cpulist(f"{_CPU}/possible")
        if possible is not None:
            offline = sorted(set(possible) - set(online))
            sources.append(f"offline: {tree.label(_CPU + '/possible')} minus online")
        else:
            offline = []
            sources.append("offline: unavailable")

    isolated, how = _isolated(tree, online)
    sources.append(f"isolated: {how}")

    cpuset = _cgroup_cpuset(tree)
    if affinity is not None:
        allowed = sorted(affinity)
        sources.append("allowed: affinity argument")
    elif real:
        try:
            allowed = sorted(os.sched_getaffinity(0))
            sources.append("allowed: os.sched_getaffinity(0)")
        except (AttributeError, OSError) as exc:
            allowed = list(online)
            tree.warn(f"os.sched_getaffinity(0) failed ({exc}); assuming every online CPU")
            sources.append("allowed: online CPUs (os.sched_getaffinity(0) failed)")
    elif cpuset is not None:
        # A fixture has no process to ask; its cgroup cpuset is what the affinity would be.
        allowed = cpuset.cpus
        sources.append(f"allowed: {cpuset.source}")
    else:
        allowed = list(online)
        sources.append("allowed: online CPUs (not the real root and no affinity given)")

    siblings: set[tuple[int, ...]] = set()
    for c in online:
        rel = f"{_CPU}/cpu{c}/topology/thread_siblings_list"
        group = tree.cpulist(rel)
        if group is None:
            group = tree.cpulist(f"{_CPU}/cpu{c}/topology/core_cpus_list")
        if group:
            siblings.add(tuple(group))
    if siblings:
        sources.append(f"smt_siblings: {tree.label(_CPU)}/cpuN/topology/thread_siblings_list")
    else:
        sources.append("smt_siblings: unavailable")

    cpus = Cpus(
        allowed=allowed,
        online=online,
        offline=offline,
        isolated=isolated,
        smt_siblings=[list(g) for g in sorted(siblings)],
        source="; ".join(sources),
    )
    return cpus, cpuset


def _online_fallback(tree: _Tree, real: bool) -> tuple[list[int], str]:
    present = tree.cpulist(f"{_CPU}/present")
    if present is not None:
        return present, f"{tree.label(_CPU + '/present')} (no online file)"
    names = tree.listdir(_CPU) or []
    numbered = sorted(int(n[3:]) for n in names if re.fullmatch(r"cpu\d+", n))
    if numbered:
        return numbered, f"{tree.label(_CPU)}/cpuN directories (no online file)"
    if real:
        count = os.cpu_count() or 1
        return list(range(count)), "os.cpu_count() (no CPU sysfs)"
    tree.warn(f"{tree.label(_CPU)}: no CPU list found; assuming one CPU")
    return [0], "unavailable (one CPU assumed)"


def _isolated(tree: _Tree, online: list[int]) -> tuple[list[int], str]:
    rel = f"{_CPU}/isolated"
    isolated = tree.cpulist(rel)
    if isolated is not None:
        return isolated, tree.label(rel)
    cmdline = tree.read("proc/cmdline")
    for arg in (cmdline or "").split():
        if not arg.startswith("isolcpus="):
            continue
        # isolcpus=[flag,...,]cpulist: flags (nohz, domain, managed_irq) come first.
        parts = arg.removeprefix("isolcpus=").split(",")
        while parts and parts[0] in _ISOLCPUS_FLAGS:
            parts.pop(0)
        try:
            cpus = parse_cpulist(",".join(parts), last=max(online, default=0))
        except ValueError as exc:
            tree.warn(f"/proc/cmdline: cannot parse {arg!r} ({exc}); ignored")
            continue
        return cpus, "/proc/cmdline isolcpus= (no sysfs isolated file)"
    return [], "unavailable" if cmdline is None else "none (no isolated file, no isolcpus=)"


class _Cpuset(msgspec.Struct, kw_only=True):
    cpus: list[int]
    source: str


def _cgroup_cpuset(tree: _Tree) -> _Cpuset | None:
    """The effective cpuset of this process's cgroup, v2 or v1, where the tree shows it."""
    candidates: list[str] = []
    for line in (tree.read("proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or ".." in parts[2]:  # ".." would climb out of the tree: garbage
            continue
        hid, controllers, path = parts
        path = path.strip().rstrip("/")
        if hid == "0" and controllers == "":
            candidates.append(f"sys/fs/cgroup{path}/cpuset.cpus.effective")
        elif "cpuset" in controllers.split(","):
            candidates.append(f"sys/fs/cgroup/cpuset{path}/cpuset.effective_cpus")
            candidates.append(f"sys/fs/cgroup/cpuset{path}/cpuset.cpus")
    # With a cgroup namespace (Docker on cgroup v2) the container's own cgroup is the root.
    candidates += [
        "sys/fs/cgroup/cpuset.cpus.effective",
        "sys/fs/cgroup/cpuset/cpuset.effective_cpus",
        "sys/fs/cgroup/cpuset/cpuset.cpus",
    ]
    for rel in dict.fromkeys(candidates):
        text = tree.read(rel)
        if text is None or not text.strip():
            continue
        try:
            return _Cpuset(cpus=parse_cpulist(text), source=tree.label(rel))
        except ValueError as exc:
            tree.warn(f"{tree.label(rel)}: cannot parse a CPU list ({exc}); ignored")
    return None


# --- NUMA ---------------------------------------------------------------------------------------

_NODE = "sys/devices/system/node"
_NODE_MEM_RE = re.compile(r"^Node\s+\d+\s+(\w+):\s+(\d+)\s*kB", re.MULTILINE)
_MEM_RE = re.compile(r"^(\w+):\s+(\d+)\s*kB", re.MULTILINE)


def _numa(tree: _Tree, cpus: Cpus) -> list[NumaNode]:
    usable = set(cpus.online) & set(cpus.allowed)
    names = tree.listdir(_NODE) or []
    ids = sorted(int(n[4:]) for n in names if re.fullmatch(r"node\d+", n))
    if not ids:
        # A kernel without CONFIG_NUMA (or a sysfs that hides it) is one node by definition.
        mem = _kb_fields(tree.read("proc/meminfo"), _MEM_RE)
        return [
            NumaNode(
                id=0,
                cpus=sorted(usable),
                all_cpus=list(cpus.online),
                memory_total_bytes=mem.get("MemTotal"),
                memory_free_bytes=mem.get("MemFree"),
                source=f"{tree.label(_NODE)}: unavailable, one node assumed; memory: "
                + ("/proc/meminfo" if mem else "unavailable"),
            )
        ]
    nodes = []
    for i in ids:
        base = f"{_NODE}/node{i}"
        all_cpus = tree.cpulist(f"{base}/cpulist")
        cpu_source = tree.label(f"{base}/cpulist")
        if all_cpus is None:
            # The node directory links its CPUs as cpuN entries.
            entries = tree.listdir(base) or []
            all_cpus = sorted(int(n[3:]) for n in entries if re.fullmatch(r"cpu\d+", n))
            cpu_source = f"{tree.label(base)}/cpuN entries"
        mem = _kb_fields(tree.read(f"{base}/meminfo"), _NODE_MEM_RE)
        mem_source = tree.label(f"{base}/meminfo") if mem else "memory unavailable"
        nodes.append(
            NumaNode(
                id=i,
                cpus=[c for c in all_cpus if c in usable],
                all_cpus=all_cpus,
                memory_total_bytes=mem.get("MemTotal"),
                memory_free_bytes=mem.get("MemFree"),
                source=f"{cpu_source}, {mem_source}",
            )
        )
    return nodes


def _kb_fields(text: str | None, pattern: re.Pattern[str]) -> dict[str, int]:
    if not text:
        return {}
    return {m.group(1): int(m.group(2)) * 1024 for m in pattern.finditer(text)}


# --- virtualization -----------------------------------------------------------------------------

_DMI_DIRS = ("sys/class/dmi/id", "sys/devices/virtual/dmi/id")
_DMI_FIELDS = (
    "sys_vendor",
    "product_name",
    "bios_vendor",
    "board_vendor",
    "bios_version",
    "chassis_asset_tag",
)
# Azure writes this chassis asset tag into every VM's SMBIOS; on-premises Hyper-V does not.
AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"


def _cpuinfo_flags(tree: _Tree) -> tuple[set[str] | None, str]:
    """The first CPU's feature flags (x86 ``flags``, Arm ``Features``) or None."""
    text = tree.read("proc/cpuinfo")
    if text is None:
        return None, "/proc/cpuinfo: unavailable"
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(value.split()), "/proc/cpuinfo"
    return set(), "/proc/cpuinfo (no flags line)"


def _virtualization(tree: _Tree, kernel: Kernel) -> Virtualization:
    flags, flags_source = _cpuinfo_flags(tree)
    dmi: dict[str, str] = {}
    dmi_dir: str | None = None
    for d in _DMI_DIRS:
        if tree.listdir(d) is None:
            continue
        dmi_dir = d
        for name in _DMI_FIELDS:
            value = tree.line(f"{d}/{name}")
            if value:
                dmi[name] = value
        break
    extra = {
        "hypervisor_type": tree.line("sys/hypervisor/type") or "",
        "hypervisor_uuid": tree.line("sys/hypervisor/uuid") or "",
        "clocksources": tree.line(
            "sys/devices/system/clocksource/clocksource0/available_clocksource"
        )
        or "",
        "cmdline": tree.line("proc/cmdline") or "",
    }
    hypervisor_flag = flags is not None and "hypervisor" in flags
    vendor, evidence = _classify(
        hypervisor_flag=hypervisor_flag,
        flags_known=bool(flags),
        dmi=dmi,
        dmi_label=tree.label(dmi_dir) if dmi_dir else None,
        release=kernel.release,
        **extra,
    )
    sources = [flags_source, tree.label(dmi_dir) if dmi_dir else "DMI: unavailable"]
    return Virtualization(
        hypervisor_flag=hypervisor_flag,
        vendor=vendor,
        cloud=vendor in CLOUD_VENDORS,
        evidence=evidence,
        source=", ".join(sources),
    )


def _classify(
    *,
    hypervisor_flag: bool,
    flags_known: bool,
    dmi: dict[str, str],
    dmi_label: str | None,
    release: str,
    hypervisor_type: str,
    hypervisor_uuid: str,
    clocksources: str,
    cmdline: str,
) -> tuple[Vendor, list[str]]:
    """Decide the vendor. The rules, first match wins:

    1. aws: DMI sys_vendor/bios_vendor/board_vendor "Amazon EC2" (Nitro), a BIOS version with
       "amazon" or /sys/hypervisor/uuid starting with "ec2" (the older Xen instances).
    2. gcp: sys_vendor/bios_vendor "Google" or product "Google Compute Engine".
    3. azure: sys_vendor "Microsoft Corporation" + product "Virtual Machine" + Azure's chassis
       asset tag; the same without the tag is "hyperv" (unreadable tag: assumed Azure). A WSL2
       kernel (release "...microsoft-standard-WSL2") is "hyperv" too.
    4. vmware: "VMware" in sys_vendor or product.
    5. xen: sys_vendor "Xen", product "HVM domU" or /sys/hypervisor/type "xen".
    6. kvm/qemu: sys_vendor "QEMU", product "Standard PC (...)" or "KVM", bios "SeaBIOS", or
       OpenStack/Red Hat; "kvm" when the product says KVM or the kvm-clock clock source exists,
       else "qemu" (emulation).
    7. firecracker: the hypervisor flag set and no DMI at all (Firecracker has no SMBIOS).
    8. otherwise "unknown" with the flag set or without DMI, "none" (bare metal) without it.
    """
    evidence: list[str] = []

    def dmi_says(field: str) -> str:
        return f"{dmi_label}/{field} = {dmi[field]!r}"

    def has(field: str, *words: str, exact: bool = False) -> bool:
        value = dmi.get(field, "")
        hit = value in words if exact else any(w.lower() in value.lower() for w in words if value)
        if hit:
            evidence.append(dmi_says(field))
        return hit

    if hypervisor_flag:
        evidence.append("/proc/cpuinfo: hypervisor flag")
    kvm_clock = "kvm-clock" in clocksources.split()

    aws = [has(f, "Amazon EC2", exact=True) for f in ("sys_vendor", "bios_vendor", "board_vendor")]
    if has("bios_version", "amazon"):
        aws.append(True)
    if hypervisor_uuid.lower().startswith("ec2"):
        evidence.append(f"/sys/hypervisor/uuid = {hypervisor_uuid!r}")
        aws.append(True)
    if any(aws):
        if not hypervisor_flag and flags_known and dmi.get("product_name", "").endswith(".metal"):
            evidence.append("EC2 bare-metal instance: no hypervisor")
        return "aws", evidence

    gcp = [
        has("sys_vendor", "Google"),
        has("bios_vendor", "Google"),
        has("product_name", "Google Compute Engine"),
    ]
    if any(gcp):
        return "gcp", evidence

    if "microsoft" in release.lower() and "wsl" in release.lower():
        evidence.append(f"kernel release {release!r}: WSL2")
        return "hyperv", evidence
    if has("sys_vendor", "Microsoft Corporation", exact=True) and has(
        "product_name", "Virtual Machine", exact=True
    ):
        tag = dmi.get("chassis_asset_tag")
        if tag == AZURE_ASSET_TAG:
            evidence.append(dmi_says("chassis_asset_tag") + " (Azure's tag)")
            return "azure", evidence
        if tag is None:
            evidence.append("chassis_asset_tag unreadable: assumed Azure (could be Hyper-V)")
            return "azure", evidence
        evidence.append(dmi_says("chassis_asset_tag") + " (not Azure's tag: Hyper-V)")
        return "hyperv", evidence

    if any([has("sys_vendor", "VMware"), has("product_name", "VMware")]):
        return "vmware", evidence

    xen = [has("sys_vendor", "Xen", exact=True), has("product_name", "HVM domU")]
    if hypervisor_type.lower() == "xen":
        evidence.append("/sys/hypervisor/type = 'xen'")
        xen.append(True)
    if any(xen):
        return "xen", evidence

    product_kvm = has("product_name", "KVM") or has("sys_vendor", "KVM")
    qemu_like = [
        product_kvm,
        has("sys_vendor", "QEMU", "OpenStack", "Red Hat"),
        has("product_name", "Standard PC", "OpenStack"),
        has("bios_vendor", "SeaBIOS"),
    ]
    if any(qemu_like):
        if kvm_clock:
            evidence.append("clocksource kvm-clock available")
        return ("kvm" if product_kvm or kvm_clock else "qemu"), evidence

    if dmi_label is None and hypervisor_flag:
        evidence.append("no DMI (/sys/class/dmi/id absent): Firecracker has no SMBIOS")
        if "virtio_mmio.device=" in cmdline:
            evidence.append("/proc/cmdline: virtio_mmio.device= (Firecracker's devices)")
        if kvm_clock:
            evidence.append("clocksource kvm-clock available")
        return "firecracker", evidence

    if hypervisor_flag:
        evidence.append("hypervisor flag set but DMI names no known hypervisor")
        for field in ("sys_vendor", "product_name"):
            if field in dmi:
                evidence.append(dmi_says(field))
        return "unknown", evidence
    if dmi_label is None or not dmi:
        evidence.append("no DMI and no hypervisor flag: cannot tell")
        return "unknown", evidence
    evidence.append("no hypervisor flag and no virtual-machine DMI")
    for field in ("sys_vendor", "product_name"):
        if field in dmi:
            evidence.append(dmi_says(field))
    return "none", evidence


# --- containers ---------------------------------------------------------------------------------

_RUNTIME_IN_CGROUP = re.compile(
    r"docker|kubepods|containerd|libpod|podman|crio|cri-o|lxc|garden|buildkit", re.IGNORECASE
)


def _container(tree: _Tree, cpus: Cpus, cpuset: _Cpuset | None) -> Container:
    strong: list[str] = []
    if tree.exists(".dockerenv"):
        strong.append("/.dockerenv exists (Docker)")
    if tree.exists("run/.containerenv"):
        strong.append("/run/.containerenv exists (Podman)")
    manager = tree.line("run/systemd/container")
    if manager:
        strong.append(f"/run/systemd/container = {manager!r}")
    environ = tree.read("proc/1/environ", quiet=True)  # root-only on most systems
    for item in (environ or "").split("\0"):
        if item.startswith("container="):
            strong.append(f"/proc/1/environ: {item}")
    for line in (tree.read("proc/self/cgroup") or "").splitlines():
        path = line.split(":", 2)[-1]
        m = _RUNTIME_IN_CGROUP.search(path)
        if m:
            strong.append(f"/proc/self/cgroup: {line.strip()} ({m.group(0)})")
            break
    weak: list[str] = []
    if cpuset is not None and set(cpuset.cpus) < set(cpus.online):
        # Also what a systemd AllowedCPUs= does, so it hints but does not decide.
        weak.append(
            f"{cpuset.source} = {format_cpulist(cpuset.cpus)}: narrower than the online CPUs "
            f"({format_cpulist(cpus.online)})"
        )
    return Container(
        detected=bool(strong),
        hints=strong + weak,
        source="/.dockerenv, /run/.containerenv, /run/systemd/container, /proc/1/environ, "
        "/proc/self/cgroup, cgroup cpuset",
    )


# --- io_uring -----------------------------------------------------------------------------------

# io_uring_setup is 425 in the unified syscall table every architecture added since 5.1 uses
# (alpha, ia64 and MIPS differ; asrd does not run there).
_IO_URING_SETUP = 425
_NR_425_MACHINES = frozenset(
    {
        "x86_64",
        "amd64",
        "i386",
        "i686",
        "aarch64",
        "arm64",
        "armv7l",
        "armv8l",
        "riscv64",
        "ppc64",
        "ppc64le",
        "s390x",
        "loongarch64",
    }
)
_IO_URING_PARAMS_BYTES = 120  # sizeof(struct io_uring_params)
_CHILD_TIMEOUT_S = 5.0


class _SyscallResult(msgspec.Struct, kw_only=True):
    errno: int | None = None  # 0 = success
    signal: int | None = None  # the child was killed by this signal
    note: str = ""


def _io_uring(tree: _Tree, real: bool, kernel: Kernel) -> IoUring:
    sources: list[str] = []
    sysctl_rel = "proc/sys/kernel/io_uring_disabled"
    sysctl = tree.integer(sysctl_rel)
    if sysctl is not None:
        sources.append(tree.label(sysctl_rel))
    group = tree.integer("proc/sys/kernel/io_uring_group") if sysctl == 1 else None
    sources.append(kernel.source)

    def result(state: IoUringState, detail: str) -> IoUring:
        return IoUring(
            state=state, detail=detail, io_uring_disabled=sysctl, source=", ".join(sources)
        )

    if kernel.version is not None and kernel.version < (5, 1, 0):
        return result(
            "kernel too old",
            f"kernel {kernel.release} is older than 5.1, which added io_uring; asrd uses epoll",
        )
    if not real:
        if sysctl in (1, 2):
            return result("disabled by sysctl", _sysctl_detail(sysctl, group))
        return result(
            "unknown",
            "kernel and sysctl allow io_uring (kernel "
            f"{kernel.release or 'unknown'}, io_uring_disabled "
            f"{'absent' if sysctl is None else sysctl}); io_uring_setup(2) is only tried on "
            "the real root",
        )

    seccomp = _seccomp_mode(tree)
    outcome = _run_io_uring_setup(fork=seccomp != 0)
    sources.append("io_uring_setup(2)" + (" in a child (seccomp filter)" if seccomp else ""))
    state, detail = _interpret(outcome, sysctl=sysctl, group=group, seccomp=seccomp, kernel=kernel)
    return result(state, detail)


def _sysctl_detail(sysctl: int, group: int | None) -> str:
    if sysctl == 2:
        return (
            "kernel.io_uring_disabled = 2: io_uring is off for every process; set it to 0 "
            "(sysctl -w kernel.io_uring_disabled=0) to allow it, or keep epoll"
        )
    who = (
        "only processes with CAP_SYS_ADMIN (io_uring_group = -1)"
        if group in (None, -1)
        else f"only members of io_uring_group (gid {group}) and CAP_SYS_ADMIN"
    )
    return (
        f"kernel.io_uring_disabled = 1: {who} may create rings; add asrd's user to that group "
        "(SupplementaryGroups=) or set the sysctl to 0"
    )


def _seccomp_mode(tree: _Tree) -> int | None:
    m = re.search(r"^Seccomp:\s+(\d+)", tree.read("proc/self/status") or "", re.MULTILINE)
    return int(m.group(1)) if m else None


def _run_io_uring_setup(*, fork: bool) -> _SyscallResult:
    """Create and close a one-entry ring; in a forked child when ``fork`` (a seccomp filter
    may kill the caller instead of failing the call)."""
    machine = os.uname().machine
    if machine not in _NR_425_MACHINES:
        return _SyscallResult(note=f"io_uring_setup's syscall number on {machine} is not known")
    import ctypes  # here, not at module level: the module must import anywhere

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syscall = libc.syscall
    except (OSError, AttributeError) as exc:
        return _SyscallResult(note=f"no syscall() in libc ({exc})")
    syscall.restype = ctypes.c_long
    syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p]
    # Zeroed params: no flags, the kernel fills in the ring sizes and offsets.
    params = ctypes.create_string_buffer(_IO_URING_PARAMS_BYTES)

    def attempt() -> int:
        ctypes.set_errno(0)
        fd = int(syscall(_IO_URING_SETUP, 1, ctypes.addressof(params)))
        if fd < 0:
            return ctypes.get_errno() or errno.EIO
        os.close(fd)
        return 0

    if not fork:
        return _SyscallResult(errno=attempt())
    return _in_child(attempt)


def _in_child(attempt: Callable[[], int]) -> _SyscallResult:
    # Everything the child runs (libc, the function, the buffer) is set up before fork, so the
    # child takes no lock another thread might hold; it reports through its exit status.
    try:
        pid = os.fork()
    except OSError as exc:
        return _SyscallResult(note=f"fork failed ({exc.strerror})")
    if pid == 0:  # child: never return into the caller's code
        code = 255
        try:
            code = min(attempt(), 254)
        finally:
            os._exit(code)
    deadline = time.monotonic() + _CHILD_TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)  # our own child, by its pid
            os.waitpid(pid, 0)
            return _SyscallResult(note=f"the probe child hung for {_CHILD_TIMEOUT_S:g} s")
        time.sleep(0.005)
    if os.WIFSIGNALED(status):
        return _SyscallResult(signal=os.WTERMSIG(status))
    code = os.WEXITSTATUS(status)
    if code == 255:
        return _SyscallResult(note="the probe child failed before the syscall")
    return _SyscallResult(errno=code)


def _interpret(
    outcome: _SyscallResult,
    *,
    sysctl: int | None,
    group: int | None,
    seccomp: int | None,
    kernel: Kernel,
) -> tuple[IoUringState, str]:
    """Turn the syscall's outcome and what the files said into a state and advice."""
    release = kernel.release or "unknown"
    if outcome.signal is not None:
        return (
            "blocked (seccomp/EPERM)",
            f"io_uring_setup(2) killed the probe child with signal {outcome.signal} "
            "(SIGSYS is a seccomp filter's kill action): allow io_uring_setup, io_uring_enter "
            "and io_uring_register in the filter, or keep epoll",
        )
    code = outcome.errno
    if code is None:
        return "unknown", outcome.note or "io_uring_setup(2) could not be run"
    if code == 0:
        detail = "io_uring_setup(2) created a ring (1 entry) and it was closed"
        if sysctl == 1:
            detail += (
                "; kernel.io_uring_disabled = 1 restricts it to io_uring_group and "
                "CAP_SYS_ADMIN, and this process qualifies (asrd's service user may not)"
            )
        return "usable", detail
    name = errno.errorcode.get(code, str(code))
    if code in (errno.EPERM, errno.EACCES):
        if sysctl in (1, 2):
            return "disabled by sysctl", f"{name} from io_uring_setup(2); " + _sysctl_detail(
                sysctl, group
            )
        return (
            "blocked (seccomp/EPERM)",
            f"{name} from io_uring_setup(2) with kernel.io_uring_disabled "
            f"{'absent' if sysctl is None else '= ' + str(sysctl)}: a seccomp filter (container "
            "runtimes' default profiles, Docker's since 25.0, block io_uring) or an LSM policy "
            "refuses it; allow the io_uring syscalls (e.g. --security-opt seccomp=...) or keep "
            "epoll",
        )
    if code == errno.ENOSYS:
        if seccomp and kernel.version is not None and kernel.version >= (5, 1, 0):
            return (
                "blocked (seccomp/EPERM)",
                f"ENOSYS from io_uring_setup(2) on kernel {release} (>= 5.1) under a seccomp "
                "filter: the filter most likely answers ENOSYS for syscalls it does not know; "
                "allow the io_uring syscalls or keep epoll",
            )
        return (
            "kernel too old",
            f"ENOSYS from io_uring_setup(2): kernel {release} is older than 5.1 or built "
            "without CONFIG_IO_URING; asrd uses epoll",
        )
    if code == errno.ENOMEM:
        return (
            "unknown",
            "ENOMEM from io_uring_setup(2): before Linux 5.12 rings count against "
            "RLIMIT_MEMLOCK; raise it (LimitMEMLOCK=) or keep epoll",
        )
    return "unknown", f"io_uring_setup(2) failed with {name} ({os.strerror(code)})"


# --- SIMD ---------------------------------------------------------------------------------------

SIMD_FLAGS = (
    "sse4_2",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "neon",
    "asimd",
    "sve",
)
# numpy's feature names for the same capabilities: the fallback where /proc/cpuinfo is not.
_NUMPY_FEATURE_FLAGS = {
    "SSE42": "sse4_2",
    "AVX2": "avx2",
    "FMA3": "fma",
    "AVX512F": "avx512f",
    "AVX512BW": "avx512bw",
    "AVX512VL": "avx512vl",
    "AVX512VNNI": "avx512_vnni",
    "NEON": "neon",
    "ASIMD": "asimd",
    "SVE": "sve",
}


def _simd(tree: _Tree | None) -> Simd:
    baseline, dispatch, features, numpy_source = _numpy_simd()
    flags: set[str] | None = None
    flags_source = "/proc/cpuinfo: not read"
    if tree is not None:
        flags, flags_source = _cpuinfo_flags(tree)
    if flags:
        cpu_flags = [f for f in SIMD_FLAGS if f in flags]
    elif features:
        cpu_flags = [
            flag
            for flag in SIMD_FLAGS
            for name, mapped in _NUMPY_FEATURE_FLAGS.items()
            if mapped == flag and features.get(name)
        ]
        flags_source = f"{flags_source}; flags from numpy's CPU feature detection"
    else:
        cpu_flags = []
    return Simd(
        cpu_flags=cpu_flags,
        numpy_baseline=baseline,
        numpy_dispatch=dispatch,
        source=f"{flags_source}; {numpy_source}",
    )


def _numpy_simd() -> tuple[list[str], list[str], dict[str, bool], str]:
    """numpy's compiled-in baseline, the dispatch targets this CPU runs, and its feature map."""
    for name in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        features = {str(k): bool(v) for k, v in dict(getattr(mod, "__cpu_features__", {})).items()}
        baseline = [str(t) for t in getattr(mod, "__cpu_baseline__", [])]
        dispatch = [str(t) for t in getattr(mod, "__cpu_dispatch__", []) if features.get(str(t))]
        return baseline, dispatch, features, f"{name}.__cpu_baseline__/__cpu_dispatch__"
    return [], [], {}, "numpy: unavailable"


# --- /dev/shm -----------------------------------------------------------------------------------

SHM_SMALL_BYTES = 256 * 1024 * 1024  # below this, say so: Docker's default is 64 MiB


def _shm(tree: _Tree) -> Shm:
    rel = "dev/shm"
    label = tree.label(rel)
    fstype = None
    mounts_rel = "proc/self/mounts"
    for line in (tree.read(mounts_rel) or "").splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == "/dev/shm":
            fstype = fields[2]  # the last mount on a path is the visible one
    try:
        st = os.statvfs(tree.path(rel))
    except OSError as exc:
        return Shm(
            path=label,
            total_bytes=None,
            free_bytes=None,
            fstype=fstype,
            source=f"{label}: unavailable ({exc.strerror or exc})",
        )
    source = f"os.statvfs({label})" + (f", {tree.label(mounts_rel)}" if fstype else "")
    return Shm(
        path=label,
        total_bytes=st.f_blocks * st.f_frsize,
        free_bytes=st.f_bavail * st.f_frsize,
        fstype=fstype,
        source=source,
    )


def shm_bytes_needed(config: Config, lanes: int) -> int:
    """Bytes of /dev/shm a daemon running ``config`` with ``lanes`` lanes allocates.

    Per lane: the audio and result rings (``ring.*_bytes`` plus the ring header each), plus one
    Triton region of ``backend.triton.shm_bytes`` per endpoint when the backend is Triton with
    system shared memory; plus the heartbeat table (two slots per lane). tmpfs allocates whole
    pages, so each segment is rounded up to the page size. ``lanes`` is taken as given because
    ``config.lanes`` may be ``"auto"``, which depends on the affinity.
    """
    import mmap

    from ipc.heartbeat import HeartbeatTable
    from ipc.ring import HEADER_SIZE

    page = mmap.PAGESIZE

    def segment(size: int) -> int:
        return -(-size // page) * page

    per_lane = segment(HEADER_SIZE + config.ring.audio_bytes) + segment(
        HEADER_SIZE + config.ring.result_bytes
    )
    triton = config.backend.triton
    if config.backend.kind == "triton" and triton.shared_memory == "system":
        per_lane += len(triton.endpoints) * segment(triton.shm_bytes)
    return lanes * per_lane + segment(HeartbeatTable.size_for(lanes * 2))


# --- the probe ----------------------------------------------------------------------------------


def probe(
    root: Path | str = Path("/"),
    *,
    affinity: set[int] | None = None,
    shm_needed_bytes: int | None = None,
) -> Platform:
    """Probe the machine (or the fake sysfs/procfs tree at ``root``); never raises.

    ``affinity`` replaces ``os.sched_getaffinity(0)`` (a fixture has no process to ask; without
    it a fixture's cgroup cpuset, else its online CPUs, stands in). ``shm_needed_bytes`` (see
    :func:`shm_bytes_needed`) adds a warning when /dev/shm has less free space.
    """
    root = Path(root)
    warnings: list[str] = []
    system = _stdlib_platform.system()
    if sys.platform != "linux":
        return _unsupported(system, root, warnings)
    try:
        real = root.resolve() == Path("/")
    except (OSError, RuntimeError):
        real = False
    tree = _Tree(root, warnings)

    kernel = _guarded(
        "kernel", warnings, lambda: _kernel(tree, real), lambda: _unknown_kernel(real)
    )
    cpus, cpuset = _guarded(
        "cpus",
        warnings,
        lambda: _cpus(tree, real, affinity),
        lambda: (_fallback_cpus(affinity), None),
    )
    numa_nodes = _guarded("numa", warnings, lambda: _numa(tree, cpus), lambda: [])
    virtualization = _guarded(
        "virtualization",
        warnings,
        lambda: _virtualization(tree, kernel),
        lambda: _unknown_virtualization("probe failed"),
    )
    container = _guarded(
        "container",
        warnings,
        lambda: _container(tree, cpus, cpuset),
        lambda: Container(detected=False, hints=[], source="probe failed"),
    )
    io_uring = _guarded(
        "io_uring",
        warnings,
        lambda: _io_uring(tree, real, kernel),
        lambda: IoUring(
            state="unknown", detail="probe failed", io_uring_disabled=None, source="none"
        ),
    )
    simd = _guarded("simd", warnings, lambda: _simd(tree), lambda: _empty_simd("probe failed"))
    shm = _guarded(
        "shm",
        warnings,
        lambda: _shm(tree),
        lambda: Shm(path="/dev/shm", total_bytes=None, free_bytes=None, fstype=None, source="-"),
    )
    _derived_warnings(warnings, cpus, shm, shm_needed_bytes)
    return Platform(
        system=system,
        root=str(root),
        supported=True,
        unsupported_reason="",
        kernel=kernel,
        cpus=cpus,
        numa_nodes=numa_nodes,
        virtualization=virtualization,
        container=container,
        io_uring=io_uring,
        simd=simd,
        shm=shm,
        warnings=warnings,
    )


def _derived_warnings(
    warnings: list[str], cpus: Cpus, shm: Shm, shm_needed_bytes: int | None
) -> None:
    if cpus.offline:
        warnings.append(f"CPUs {format_cpulist(cpus.offline)} are offline")
    usable = set(cpus.allowed) & set(cpus.online)
    if cpus.online and usable and usable < set(cpus.online):
        warnings.append(
            f"this process may use {len(usable)} of {len(cpus.online)} online CPUs "
            f"({format_cpulist(usable)}: a cgroup cpuset or taskset); lanes = 'auto' follows it"
        )
    isolated_allowed = usable & set(cpus.isolated)
    if isolated_allowed:
        warnings.append(
            f"isolated CPUs (isolcpus) {format_cpulist(isolated_allowed)} are in this process's "
            "affinity: the scheduler does not balance work onto them"
        )
    if shm.fstype is not None and shm.fstype not in ("tmpfs", "ramfs"):
        warnings.append(f"{shm.path} is {shm.fstype}, not tmpfs: rings would live on disk")
    if shm.total_bytes is not None and shm.total_bytes < SHM_SMALL_BYTES:
        warnings.append(
            f"{shm.path} is only {shm.total_bytes >> 20} MiB (Docker's default is 64 MiB; "
            "docker run --shm-size, or a bigger tmpfs)"
        )
    if (
        shm_needed_bytes is not None
        and shm.free_bytes is not None
        and shm.free_bytes < shm_needed_bytes
    ):
        warnings.append(
            f"{shm.path} has {shm.free_bytes >> 20} MiB free; the config needs "
            f"{-(-shm_needed_bytes >> 20)} MiB of shared memory"
        )


# --- fallbacks and the non-Linux answer ---------------------------------------------------------


def _unknown_kernel(real: bool) -> Kernel:
    release = os.uname().release if real and hasattr(os, "uname") else ""
    return Kernel(
        release=release,
        version=parse_kernel_version(release),
        source="uname" if release else "unavailable",
    )


def _fallback_cpus(affinity: set[int] | None) -> Cpus:
    count = os.cpu_count() or 1
    allowed = sorted(affinity) if affinity is not None else list(range(count))
    return Cpus(
        allowed=allowed,
        online=list(range(count)) if affinity is None else allowed,
        offline=[],
        isolated=[],
        smt_siblings=[],
        source="os.cpu_count() (no CPU topology)",
    )


def _unknown_virtualization(why: str) -> Virtualization:
    return Virtualization(
        hypervisor_flag=False, vendor="unknown", cloud=False, evidence=[], source=why
    )


def _empty_simd(why: str) -> Simd:
    return Simd(cpu_flags=[], numpy_baseline=[], numpy_dispatch=[], source=why)


def _unsupported(system: str, root: Path, warnings: list[str]) -> Platform:
    """The answer on macOS and every other non-Linux system: what is portable, and why not."""
    unsupported = f"unsupported platform ({sys.platform})"
    try:
        release = os.uname().release
        kernel = Kernel(release=release, version=parse_kernel_version(release), source="uname")
    except (AttributeError, OSError):
        kernel = Kernel(release="", version=None, source="unavailable")
    simd = _guarded("simd", warnings, lambda: _simd(None), lambda: _empty_simd("probe failed"))
    return Platform(
        system=system,
        root=str(root),
        supported=False,
        unsupported_reason=UNSUPPORTED_REASON,
        kernel=kernel,
        cpus=_fallback_cpus(None),
        numa_nodes=[],
        virtualization=_unknown_virtualization(unsupported),
        container=Container(detected=False, hints=[], source=unsupported),
        io_uring=IoUring(
            state="unsupported platform",
            detail=f"io_uring is a Linux interface; {sys.platform} has none (kqueue instead)",
            io_uring_disabled=None,
            source=unsupported,
        ),
        simd=simd,
        shm=Shm(
            path="/dev/shm",
            total_bytes=None,
            free_bytes=None,
            fstype=None,
            source=f"{unsupported}: POSIX shm has no filesystem view here",
        ),
        warnings=warnings,
    )


if __name__ == "__main__":  # python -m daemon.platform: the probe as JSON
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(probe()).decode()) + "\n")
