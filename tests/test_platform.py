"""The platform probe: fake sysfs/procfs trees per case, garbage that must not raise, this
machine, the non-Linux answer, and the /dev/shm budget of a config."""

from __future__ import annotations

import errno
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

import daemon.platform as plat
from daemon.config import parse_config
from daemon.platform import (
    UNSUPPORTED_REASON,
    Kernel,
    Platform,
    format_cpulist,
    parse_cpulist,
    parse_kernel_version,
    probe,
    shm_bytes_needed,
)
from ipc.heartbeat import HeartbeatTable
from ipc.ring import HEADER_SIZE

pytestmark = pytest.mark.timeout(30)

TREES = Path(__file__).resolve().parent / "platform_trees"
REPO = Path(__file__).resolve().parent.parent
STATES = {
    "usable",
    "disabled by sysctl",
    "blocked (seccomp/EPERM)",
    "kernel too old",
    "unsupported platform",
    "unknown",
}
KIB = 1024


def _probe(case: str, **kwargs: object) -> Platform:
    p = probe(TREES / case, **kwargs)  # type: ignore[arg-type]
    # Every answer must survive the trip `asrd doctor --json` makes.
    assert msgspec.json.decode(msgspec.json.encode(p), type=Platform) == p
    return p


def _copy(case: str, tmp_path: Path) -> Path:
    root = tmp_path / case
    shutil.copytree(TREES / case, root)
    return root


# --- parsers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("\n", []),
        ("0", [0]),
        ("0-3\n", [0, 1, 2, 3]),
        ("0-3,8-11", [0, 1, 2, 3, 8, 9, 10, 11]),
        (" 2 , 5-6 ", [2, 5, 6]),
        ("0,0,1", [0, 1]),
        ("0-7,^3", [0, 1, 2, 4, 5, 6, 7]),
        ("0-7,^2-5", [0, 1, 6, 7]),
        ("0-15:2/4", [0, 1, 4, 5, 8, 9, 12, 13]),
    ],
)
def test_parse_cpulist(text: str, expected: list[int]) -> None:
    assert parse_cpulist(text) == expected


def test_parse_cpulist_last_cpu() -> None:
    assert parse_cpulist("1-N", last=3) == [1, 2, 3]


@pytest.mark.parametrize(
    "text", ["a", "3-1", "0-99999999", "1-N", "0-3:5/4", "0-3:2", "1--2", "0x3", "-1"]
)
def test_parse_cpulist_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpulist(text)


def test_format_cpulist() -> None:
    assert format_cpulist([]) == ""
    assert format_cpulist([3, 0, 1, 2, 8, 10, 11]) == "0-3,8,10-11"
    for cpus in ([0], [0, 2, 4], list(range(64)), [1, 2, 3, 9]):
        assert parse_cpulist(format_cpulist(cpus)) == cpus


@pytest.mark.parametrize(
    ("release", "expected"),
    [
        ("6.8.0-45-generic", (6, 8, 0)),
        ("6.18.44-fc-v782", (6, 18, 44)),
        ("4.19", (4, 19, 0)),
        ("5.15.153.1-microsoft-standard-WSL2", (5, 15, 153)),
        ("", None),
        ("banana", None),
    ],
)
def test_parse_kernel_version(release: str, expected: tuple[int, int, int] | None) -> None:
    assert parse_kernel_version(release) == expected


# --- one fixture tree per case ------------------------------------------------------------------


def test_two_node_bare_metal() -> None:
    p = _probe("two_node_bare_metal")
    assert p.supported and p.unsupported_reason == ""
    assert p.kernel == Kernel(
        release="6.8.0-45-generic", version=(6, 8, 0), source="/proc/sys/kernel/osrelease"
    )
    assert p.cpus.online == list(range(16)) and p.cpus.offline == [] and p.cpus.isolated == []
    assert p.cpus.allowed == list(range(16))
    assert p.cpus.smt_siblings == [[c, c + 8] for c in range(8)]
    assert [n.id for n in p.numa_nodes] == [0, 1]
    n0, n1 = p.numa_nodes
    assert n0.cpus == n0.all_cpus == [0, 1, 2, 3, 8, 9, 10, 11]
    assert n1.cpus == [4, 5, 6, 7, 12, 13, 14, 15]
    assert n0.memory_total_bytes == 65_682_636 * KIB
    assert n1.memory_free_bytes == 63_981_020 * KIB
    assert "/sys/devices/system/node/node1/cpulist" in n1.source
    assert "/sys/devices/system/node/node1/meminfo" in n1.source
    v = p.virtualization
    assert (v.hypervisor_flag, v.vendor, v.cloud) == (False, "none", False)
    assert "/sys/class/dmi/id/sys_vendor = 'Dell Inc.'" in v.evidence
    assert not p.container.detected and p.container.hints == []
    assert {"sse4_2", "avx2", "avx512f", "avx512bw", "avx512vl"} <= set(p.simd.cpu_flags)
    assert "neon" not in p.simd.cpu_flags and "asimd" not in p.simd.cpu_flags
    # A fixture cannot answer a syscall: the static checks pass, the verdict stays open.
    assert p.io_uring.state == "unknown" and p.io_uring.io_uring_disabled == 0
    assert "only tried on the real root" in p.io_uring.detail
    assert p.warnings == []


def test_two_node_affinity_narrows_nodes() -> None:
    p = _probe("two_node_bare_metal", affinity={0, 1, 4})
    assert p.cpus.allowed == [0, 1, 4]
    assert "allowed: affinity argument" in p.cpus.source
    assert [n.cpus for n in p.numa_nodes] == [[0, 1], [4]]
    assert p.numa_nodes[1].all_cpus == [4, 5, 6, 7, 12, 13, 14, 15]
    assert any("3 of 16 online CPUs" in w for w in p.warnings)


def test_ec2_vm() -> None:
    p = _probe("ec2_vm")
    assert p.kernel.version == (6, 1, 109)
    v = p.virtualization
    assert (v.hypervisor_flag, v.vendor, v.cloud) == (True, "aws", True)
    assert "/sys/class/dmi/id/sys_vendor = 'Amazon EC2'" in v.evidence
    assert p.cpus.smt_siblings == [[0, 2], [1, 3]]
    assert [n.cpus for n in p.numa_nodes] == [[0, 1, 2, 3]]
    assert "avx512_vnni" in p.simd.cpu_flags
    # Linux 6.1 has no kernel.io_uring_disabled.
    assert p.io_uring.io_uring_disabled is None and p.io_uring.state == "unknown"
    assert not p.container.detected


def test_gce_vm() -> None:
    v = _probe("gce_vm").virtualization
    assert (v.hypervisor_flag, v.vendor, v.cloud) == (True, "gcp", True)
    assert "/sys/class/dmi/id/product_name = 'Google Compute Engine'" in v.evidence


def test_azure_vm() -> None:
    p = _probe("azure_vm")
    v = p.virtualization
    assert (v.hypervisor_flag, v.vendor, v.cloud) == (True, "azure", True)
    assert any("Azure's tag" in e for e in v.evidence)
    assert p.cpus.smt_siblings == [[0, 1]]


def test_hyperv_is_azure_without_the_asset_tag(tmp_path: Path) -> None:
    root = _copy("azure_vm", tmp_path)
    tag = root / "sys/class/dmi/id/chassis_asset_tag"
    tag.write_text("3051-2294-1538-1234-5678-9012-34\n")
    v = probe(root).virtualization
    assert (v.vendor, v.cloud) == ("hyperv", False)
    tag.unlink()  # unreadable or absent: Azure is the likelier answer, and it says so
    v = probe(root).virtualization
    assert v.vendor == "azure" and any("assumed Azure" in e for e in v.evidence)


def test_firecracker_without_dmi_or_numa() -> None:
    p = _probe("firecracker")
    v = p.virtualization
    assert (v.hypervisor_flag, v.vendor, v.cloud) == (True, "firecracker", True)
    assert "DMI: unavailable" in v.source
    assert any("virtio_mmio" in e for e in v.evidence)
    # The guest kernel has no NUMA sysfs: one node with every CPU, memory from /proc/meminfo.
    (node,) = p.numa_nodes
    assert node.id == 0 and node.cpus == [0, 1]
    assert node.memory_total_bytes == 2_035_484 * KIB
    assert "one node assumed" in node.source and "/proc/meminfo" in node.source
    assert p.warnings == []


def test_container_narrow_cpuset_with_affinity() -> None:
    p = _probe("container_narrow_cpuset", affinity={2, 3})
    assert p.cpus.online == [0, 1, 2, 3]
    assert p.cpus.allowed == [2, 3]
    (node,) = p.numa_nodes
    assert node.cpus == [2, 3] and node.all_cpus == [0, 1, 2, 3]
    c = p.container
    assert c.detected
    assert "/.dockerenv exists (Docker)" in c.hints
    assert any(h.startswith("/sys/fs/cgroup/cpuset.cpus.effective = 2-3") for h in c.hints)
    assert any("2 of 4 online CPUs" in w for w in p.warnings)
    assert p.virtualization.vendor == "none"


def test_container_narrow_cpuset_from_the_tree() -> None:
    # Without an affinity, a fixture's cgroup cpuset stands in for sched_getaffinity.
    p = _probe("container_narrow_cpuset")
    assert p.cpus.allowed == [2, 3]
    assert "allowed: /sys/fs/cgroup/cpuset.cpus.effective" in p.cpus.source


def test_container_small_shm(monkeypatch: pytest.MonkeyPatch) -> None:
    # Docker's default /dev/shm is 64 MiB; statvfs cannot be faked by files, so by a stub.
    def statvfs(path: object) -> os.statvfs_result:
        assert str(path).endswith("container_narrow_cpuset/dev/shm")
        blocks = 64 * 1024 * 1024 // 4096
        return os.statvfs_result((4096, 4096, blocks, blocks - 10, blocks - 10, 0, 0, 0, 0, 255))

    monkeypatch.setattr(os, "statvfs", statvfs)
    p = probe(TREES / "container_narrow_cpuset", shm_needed_bytes=100 * 1024 * 1024)
    assert p.shm.total_bytes == 64 * 1024 * 1024 and p.shm.fstype == "tmpfs"
    assert any("only 64 MiB" in w for w in p.warnings)
    assert any("the config needs 100 MiB" in w for w in p.warnings)


def test_io_uring_disabled_by_sysctl() -> None:
    p = _probe("io_uring_disabled")
    assert p.io_uring.state == "disabled by sysctl"
    assert p.io_uring.io_uring_disabled == 2
    assert "/proc/sys/kernel/io_uring_disabled" in p.io_uring.source
    v = p.virtualization
    assert (v.vendor, v.cloud) == ("kvm", False)
    assert "clocksource kvm-clock available" in v.evidence


def test_offline_and_isolated_cpus() -> None:
    p = _probe("offline_isolated")
    assert p.cpus.online == [0, 1, 2, 3, 4, 5]
    assert p.cpus.offline == [6, 7]
    assert p.cpus.isolated == [4, 5]
    assert "isolated: /sys/devices/system/cpu/isolated" in p.cpus.source
    assert [n.cpus for n in p.numa_nodes] == [[0, 1, 2, 3, 4, 5]]
    assert "CPUs 6-7 are offline" in p.warnings
    assert any("isolated CPUs (isolcpus) 4-5" in w for w in p.warnings)
    # io_uring_disabled = 1: only a group may create rings, and the detail names it.
    assert p.io_uring.state == "disabled by sysctl"
    assert "gid 1001" in p.io_uring.detail


def test_old_kernel_and_isolcpus_from_cmdline() -> None:
    p = _probe("old_kernel")
    assert p.kernel.version == (4, 18, 0)
    assert p.io_uring.state == "kernel too old"
    assert "5.1" in p.io_uring.detail
    # No sysfs "isolated" file: the command line's isolcpus=nohz,domain,3,7 is used.
    assert p.cpus.isolated == [3, 7]
    assert "/proc/cmdline isolcpus=" in p.cpus.source
    # cgroup v1 cpuset of the service covers every CPU: nothing narrower to report.
    assert p.container.hints == []
    assert p.cpus.smt_siblings == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_ec2_graviton_arm64() -> None:
    p = _probe("ec2_graviton")
    v = p.virtualization
    # Arm has no hypervisor CPU flag; DMI alone says EC2.
    assert (v.hypervisor_flag, v.vendor, v.cloud) == (False, "aws", True)
    assert p.simd.cpu_flags == ["asimd", "sve"]


# --- more vendor rules, on small synthesized trees ----------------------------------------------

X86_GUEST_FLAGS = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma hypervisor"
X86_HOST_FLAGS = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma"


def _vm_tree(
    root: Path, dmi: dict[str, str] | None, flags: str = X86_GUEST_FLAGS, **files: str
) -> Path:
    def write(rel: str, text: str) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    write("proc/cpuinfo", f"processor\t: 0\nflags\t\t: {flags}\n\n")
    write("sys/devices/system/cpu/online", "0-1\n")
    for name, value in (dmi or {}).items():
        write(f"sys/class/dmi/id/{name}", value + "\n")
    for rel, text in files.items():
        write(rel.replace("__", "/"), text)
    return root


@pytest.mark.parametrize(
    ("dmi", "files", "vendor", "cloud"),
    [
        ({"sys_vendor": "VMware, Inc.", "product_name": "VMware7,1"}, {}, "vmware", False),
        (
            {"sys_vendor": "Xen", "product_name": "HVM domU", "bios_vendor": "Xen"},
            {"sys__hypervisor__type": "xen\n"},
            "xen",
            False,
        ),
        # Older EC2 instances run on Xen: the BIOS version and hypervisor uuid give them away.
        (
            {"sys_vendor": "Xen", "product_name": "HVM domU", "bios_version": "4.11.amazon"},
            {"sys__hypervisor__uuid": "ec2e1916-9099-7caf-fd21-012345abcdef\n"},
            "aws",
            True,
        ),
        # QEMU without kvm-clock: emulation (TCG), not KVM.
        (
            {"sys_vendor": "QEMU", "product_name": "Standard PC (i440FX + PIIX, 1996)"},
            {},
            "qemu",
            False,
        ),
        ({"sys_vendor": "Red Hat", "product_name": "KVM"}, {}, "kvm", False),
        ({"sys_vendor": "Acme Hypervisors", "product_name": "vm"}, {}, "unknown", False),
    ],
)
def test_vendor_rules(
    tmp_path: Path, dmi: dict[str, str], files: dict[str, str], vendor: str, cloud: bool
) -> None:
    v = probe(_vm_tree(tmp_path, dmi, **files)).virtualization
    assert (v.vendor, v.cloud) == (vendor, cloud), v.evidence


def test_ec2_metal_has_no_hypervisor(tmp_path: Path) -> None:
    dmi = {"sys_vendor": "Amazon EC2", "product_name": "m5.metal"}
    v = probe(_vm_tree(tmp_path, dmi, flags=X86_HOST_FLAGS)).virtualization
    assert (v.hypervisor_flag, v.vendor, v.cloud) == (False, "aws", True)
    assert any("bare-metal instance" in e for e in v.evidence)


def test_wsl2_is_not_firecracker(tmp_path: Path) -> None:
    root = _vm_tree(
        tmp_path,
        None,
        proc__sys__kernel__osrelease="5.15.153.1-microsoft-standard-WSL2\n",
    )
    assert probe(root).virtualization.vendor == "hyperv"


def test_no_dmi_no_flag_is_unknown(tmp_path: Path) -> None:
    v = probe(_vm_tree(tmp_path, None, flags=X86_HOST_FLAGS)).virtualization
    assert (v.vendor, v.hypervisor_flag) == ("unknown", False)


def test_container_hints(tmp_path: Path) -> None:
    root = _vm_tree(
        tmp_path,
        None,
        run__systemd__container="podman\n",
        proc__1__environ="PATH=/usr/bin\0container=podman\0HOME=/\0",
        proc__self__cgroup="0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-ab12.scope\n",
    )
    (root / "run/.containerenv").write_text("")
    c = probe(root).container
    assert c.detected
    assert "/run/.containerenv exists (Podman)" in c.hints
    assert "/run/systemd/container = 'podman'" in c.hints
    assert "/proc/1/environ: container=podman" in c.hints
    assert any(h.startswith("/proc/self/cgroup: 0::/kubepods.slice") for h in c.hints)


# --- nothing may raise --------------------------------------------------------------------------


def test_empty_and_missing_roots(tmp_path: Path) -> None:
    for root in (tmp_path, tmp_path / "does-not-exist"):
        p = probe(root)
        assert p.supported
        assert p.kernel.release == "" and p.kernel.version is None
        assert "unavailable" in p.kernel.source
        assert p.cpus.online == [0]
        assert len(p.numa_nodes) == 1
        assert p.virtualization.vendor == "unknown"
        assert p.shm.total_bytes is None and "unavailable" in p.shm.source
        msgspec.json.encode(p)


def test_garbled_files_do_not_raise(tmp_path: Path) -> None:
    root = _copy("two_node_bare_metal", tmp_path)

    def replace_with_dir(rel: str) -> None:
        (root / rel).unlink()
        (root / rel).mkdir()

    replace_with_dir("sys/devices/system/cpu/online")
    replace_with_dir("sys/class/dmi/id/sys_vendor")
    (root / "sys/devices/system/node/node0/cpulist").write_text("zz-top\n")
    (root / "sys/devices/system/node/node1/meminfo").write_bytes(os.urandom(512))
    (root / "proc/sys/kernel/osrelease").write_bytes(b"\xff\xfe garbage\n")
    (root / "proc/sys/kernel/io_uring_disabled").write_text("banana\n")
    (root / "sys/devices/system/cpu/cpu3/topology/thread_siblings_list").write_text("0-99999999\n")
    (root / "proc/self/cgroup").write_text("0::/../../../etc\nnot a cgroup line\n")
    # A FIFO where /proc/cpuinfo belongs: opening it must not wait for a writer.
    (root / "proc/cpuinfo").unlink()
    os.mkfifo(root / "proc/cpuinfo")

    p = probe(root)
    text = "\n".join(p.warnings)
    assert "/sys/devices/system/cpu/online: not a regular file" in text
    assert "/sys/devices/system/node/node0/cpulist: cannot parse" in text
    assert "/proc/sys/kernel/io_uring_disabled: not an integer" in text
    assert "/proc/cpuinfo: not a regular file" in text
    assert "thread_siblings_list: cannot parse" in text
    assert "no version number" in text
    # Each part fell back to something usable.
    assert p.cpus.online == list(range(16))  # from the present file
    assert p.numa_nodes[1].memory_total_bytes is None
    assert p.kernel.version is None
    assert p.io_uring.io_uring_disabled is None
    assert p.virtualization.hypervisor_flag is False
    msgspec.json.encode(p)


@pytest.mark.parametrize("seed", range(4))
def test_random_bytes_everywhere(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    root = _copy("offline_isolated", tmp_path)
    for path in root.rglob("*"):
        if path.is_file():
            path.write_bytes(rng.randbytes(rng.randrange(0, 300)))
    msgspec.json.encode(probe(root))


def test_every_file_a_directory(tmp_path: Path) -> None:
    root = _copy("container_narrow_cpuset", tmp_path)
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            path.unlink()
            path.mkdir()
    p = probe(root)
    assert p.warnings  # each one names a file
    msgspec.json.encode(p)


def test_a_part_that_raises_costs_only_that_part(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(plat, "_numa", boom)
    p = probe(TREES / "two_node_bare_metal")
    assert p.numa_nodes == []
    assert any(w.startswith("numa: probe failed (RuntimeError: bug)") for w in p.warnings)
    assert p.virtualization.vendor == "none"


# --- io_uring: what each outcome of the syscall means --------------------------------------------

K6 = Kernel(release="6.8.0", version=(6, 8, 0), source="x")


@pytest.mark.parametrize(
    ("outcome", "sysctl", "seccomp", "state", "words"),
    [
        (plat._SyscallResult(errno=0), 0, 0, "usable", "created a ring"),
        (plat._SyscallResult(errno=0), 1, 0, "usable", "io_uring_group"),
        (plat._SyscallResult(errno=errno.EPERM), 2, 0, "disabled by sysctl", "= 2"),
        (plat._SyscallResult(errno=errno.EPERM), 1, 0, "disabled by sysctl", "CAP_SYS_ADMIN"),
        (plat._SyscallResult(errno=errno.EPERM), None, 2, "blocked (seccomp/EPERM)", "seccomp"),
        (plat._SyscallResult(errno=errno.EPERM), 0, 2, "blocked (seccomp/EPERM)", "seccomp"),
        (plat._SyscallResult(errno=errno.ENOSYS), None, 2, "blocked (seccomp/EPERM)", "ENOSYS"),
        (plat._SyscallResult(errno=errno.ENOSYS), None, 0, "kernel too old", "CONFIG_IO_URING"),
        (plat._SyscallResult(signal=signal.SIGSYS), None, 2, "blocked (seccomp/EPERM)", "kill"),
        (plat._SyscallResult(errno=errno.ENOMEM), None, 0, "unknown", "RLIMIT_MEMLOCK"),
        (plat._SyscallResult(errno=errno.EINVAL), None, 0, "unknown", "EINVAL"),
        (plat._SyscallResult(note="no syscall"), None, 0, "unknown", "no syscall"),
    ],
)
def test_interpret_io_uring_setup(
    outcome: plat._SyscallResult,
    sysctl: int | None,
    seccomp: int,
    state: str,
    words: str,
) -> None:
    got_state, detail = plat._interpret(
        outcome, sysctl=sysctl, group=None, seccomp=seccomp, kernel=K6
    )
    assert got_state == state
    assert words in detail


# --- this machine --------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="the real probe's Linux parts")
def test_this_machine() -> None:
    p = probe()
    assert p.supported and p.root == "/"
    assert p.kernel.version is not None and p.kernel.version >= (3, 10, 0)
    assert p.kernel.release == os.uname().release
    assert p.cpus.allowed == sorted(os.sched_getaffinity(0))
    assert "os.sched_getaffinity(0)" in p.cpus.source
    assert p.cpus.online and set(p.cpus.allowed) <= set(p.cpus.online)
    assert len(p.numa_nodes) >= 1
    in_nodes = {c for n in p.numa_nodes for c in n.cpus}
    assert set(p.cpus.allowed) <= in_nodes
    assert all(n.memory_total_bytes is None or n.memory_total_bytes > 0 for n in p.numa_nodes)
    assert p.virtualization.vendor in {
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
    }
    assert p.io_uring.state in STATES - {"unsupported platform"}
    assert "io_uring_setup(2)" in p.io_uring.source or p.io_uring.state == "kernel too old"
    assert p.simd.numpy_baseline  # numpy always has a baseline on x86-64 and aarch64
    if os.path.isdir("/dev/shm"):
        assert p.shm.total_bytes is not None and p.shm.total_bytes > 0
        assert p.shm.free_bytes is not None
    assert msgspec.json.decode(msgspec.json.encode(p), type=Platform) == p


@pytest.mark.skipif(sys.platform != "linux", reason="io_uring is Linux")
def test_io_uring_probe_in_a_child_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under a seccomp filter the syscall runs in a forked child; both paths must agree.
    direct = probe().io_uring
    monkeypatch.setattr(plat, "_seccomp_mode", lambda tree: 2)
    forked = probe().io_uring
    assert "in a child" in forked.source
    if direct.state != "blocked (seccomp/EPERM)":  # ENOSYS reads differently under a filter
        assert forked.state == direct.state


@pytest.mark.skipif(sys.platform != "linux", reason="/dev/shm is Linux")
def test_shm_budget_warning_on_this_machine() -> None:
    p = probe(shm_needed_bytes=1 << 60)
    assert any("the config needs" in w for w in p.warnings)


# --- other platforms ----------------------------------------------------------------------------


def test_non_linux_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    p = probe()
    assert not p.supported
    assert p.unsupported_reason == UNSUPPORTED_REASON
    assert p.io_uring.state == "unsupported platform"
    assert p.numa_nodes == []
    assert p.shm.total_bytes is None and "unsupported platform" in p.shm.source
    assert p.virtualization.vendor == "unknown" and not p.container.detected
    assert p.cpus.allowed  # os.cpu_count() still answers
    assert msgspec.json.decode(msgspec.json.encode(p), type=Platform) == p


def test_imports_without_linux_only_functions() -> None:
    # As close to macOS as this machine gets: the Linux-only calls are gone before the import.
    code = (
        "import os, sys\n"
        "for name in ('sched_getaffinity', 'sched_setaffinity', 'eventfd', 'posix_fallocate'):\n"
        "    if hasattr(os, name): delattr(os, name)\n"
        "sys.platform = 'darwin'\n"
        "import daemon.platform as p\n"
        "r = p.probe()\n"
        "assert not r.supported and r.io_uring.state == 'unsupported platform', r\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=25
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --- the shared memory a config needs -----------------------------------------------------------


def _segment(size: int) -> int:
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


def test_shm_bytes_needed_default_config() -> None:
    cfg = parse_config("")
    lanes = 2
    ring = _segment(HEADER_SIZE + 8 * 1024 * 1024) + _segment(HEADER_SIZE + 2 * 1024 * 1024)
    heartbeat = _segment(HeartbeatTable.size_for(2 * lanes))
    assert shm_bytes_needed(cfg, lanes) == lanes * ring + heartbeat
    # Roughly 10 MiB a lane: 7 lanes no longer fit Docker's default 64 MiB /dev/shm.
    assert shm_bytes_needed(cfg, 6) < 64 * 1024 * 1024 < shm_bytes_needed(cfg, 7)


def test_shm_bytes_needed_triton() -> None:
    toml = (
        "[ring]\naudio_bytes = 1048576\nresult_bytes = 262144\n"
        "[backend]\nkind = 'triton'\n"
        "[backend.triton]\nendpoints = ['127.0.0.1:8001', '127.0.0.1:9001']\n"
        "shm_bytes = 4194304\n"
    )
    lanes = 3
    ring = _segment(HEADER_SIZE + 1048576) + _segment(HEADER_SIZE + 262144)
    regions = 2 * 4194304
    heartbeat = _segment(HeartbeatTable.size_for(2 * lanes))
    assert shm_bytes_needed(parse_config(toml), lanes) == lanes * (ring + regions) + heartbeat
    # Tensors in the requests: no regions.
    remote = parse_config(toml + "shared_memory = 'none'\n")
    assert shm_bytes_needed(remote, lanes) == lanes * ring + heartbeat
