"""Development Triton Inference Server for asrd: build its environment, start, check, stop.

    python scripts/triton_server.py setup     # once: .venv-triton (about 1 min, 400 MB)
    python scripts/triton_server.py start     # background, returns when the models are ready
    python scripts/triton_server.py status
    python scripts/triton_server.py stop
    python scripts/triton_server.py run       # setup + start in the foreground until Ctrl-C

The server is the real ``tritonserver`` from the ``nvidia-pytriton`` wheel, running on the CPU,
serving the model repository ``configs/triton/`` (Python backend). It lives in its own
environment, ``.venv-triton`` at the repository root, as a separate Triton deployment would:
nvidia-pytriton needs numpy < 2 (Python-backend models answer with empty outputs under numpy 2)
while asrd's own environment uses numpy 2. Standard library only, so it runs with any Python 3.11+
(the system's or asrd's venv). See docs/triton.md.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = ROOT / ".venv-triton"
MODEL_REPOSITORY = ROOT / "configs" / "triton"
DEFAULT_MODELS = "asr_streaming,asr_light"
# pocketsphinx in the same range as asrd's (pyproject.toml), so transcripts match the embedded
# backend's; numpy < 2: see the module docstring.
REQUIREMENTS = ["nvidia-pytriton==0.7.*", "pocketsphinx>=5.0.3,<6", "numpy<2"]
STAMP_NAME = ".asrd-triton-setup.json"
STAMP_VERSION = 1
PYTHON_VERSION = "3.11"  # the Python-backend stub (python_backend_stubs/<version>) must match
EXIT_TIMEOUT_S = 10  # tritonserver's --exit-timeout-secs: in-flight requests get this long

# Run in the server's environment by setup: checks it and reports the paths start needs.
_PROBE = r"""
import json, pathlib, sys, sysconfig
import numpy, pocketsphinx, pytriton
if int(numpy.__version__.split(".")[0]) >= 2:
    sys.exit(f"numpy {numpy.__version__} in the Triton environment: the Python backend needs < 2")
root = pathlib.Path(pytriton.__file__).resolve().parent
soname = sysconfig.get_config_var("INSTSONAME") or ""
libdir = sysconfig.get_config_var("LIBDIR") or ""
dirs = [libdir, str(pathlib.Path(libdir, sysconfig.get_config_var("MULTIARCH") or "")),
        sysconfig.get_config_var("LIBPL") or ""]
found = next((d for d in dirs if d and soname and pathlib.Path(d, soname).is_file()), "")
print(json.dumps({
    "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
    "python_full": sys.version.split()[0],
    "numpy": numpy.__version__,
    "pytriton_root": str(root),
    "libs": str(root.parent / "nvidia_pytriton.libs"),
    "libpython": soname,
    "libpython_dir": found,
}))
"""


class Failure(Exception):
    """An error with a message for the user; no traceback."""


def log(message: str) -> None:
    print(f"[triton] {message}", flush=True)


# --- setup -----------------------------------------------------------------------------------


def _stamp_path(venv: Path) -> Path:
    return venv / STAMP_NAME


def read_setup(venv: Path) -> dict[str, Any]:
    """What setup recorded, or a Failure saying to run it."""
    try:
        info: dict[str, Any] = json.loads(_stamp_path(venv).read_text())
    except (OSError, ValueError):
        raise Failure(
            f"the Triton environment {venv} is not set up: run "
            f"`python3 scripts/triton_server.py setup` first (about a minute, once)"
        ) from None
    if info.get("version") != STAMP_VERSION or info.get("requirements") != REQUIREMENTS:
        raise Failure(f"{venv} was set up by another version of this script: run setup again")
    return info


def _base_python(requested: str | None) -> str:
    if requested:
        return requested
    if sys.version_info[:2] == (3, 11):
        # The interpreter behind a venv, so .venv-triton does not depend on asrd's venv.
        return getattr(sys, "_base_executable", None) or sys.executable
    found = shutil.which("python" + PYTHON_VERSION)
    if not found:
        raise Failure(f"python{PYTHON_VERSION} not found on PATH (give one with --python)")
    return found


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise setups (two test sessions may start at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], what: str) -> None:
    log(f"{what}: {' '.join(cmd)}")
    rc = subprocess.call(cmd, stdin=subprocess.DEVNULL)
    if rc != 0:
        raise Failure(f"{what} failed (exit {rc})")


def setup(venv: Path, python: str | None = None, force: bool = False) -> dict[str, Any]:
    """Create the server environment once; cheap when the stamp says it is done."""
    with _locked(venv / ".setup.lock"):
        if not force:
            with contextlib.suppress(Failure):
                done = read_setup(venv)
                if Path(done["tritonserver"]).is_file() and Path(done["backend_dir"]).is_dir():
                    log(f"{venv} is set up (Triton environment, numpy {done['numpy']})")
                    return done
        t0 = time.monotonic()
        _stamp_path(venv).unlink(missing_ok=True)
        vpython = venv / "bin" / "python"
        if not vpython.exists():
            base = _base_python(python)
            log(f"creating {venv} with {base}")
            _run([base, "-m", "venv", str(venv)], "python -m venv")
        log("installing nvidia-pytriton (Triton 2.51 server), pocketsphinx and numpy < 2")
        log("first time: about a minute and 400 MB; pip's progress follows")
        _run(
            [str(vpython), "-m", "pip", "install", "--disable-pip-version-check", *REQUIREMENTS],
            "pip install",
        )
        out = subprocess.run(
            [str(vpython), "-c", _PROBE], capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            raise Failure(f"the Triton environment is unusable: {out.stderr.strip()}")
        info: dict[str, Any] = json.loads(out.stdout)
        if info["python"] != PYTHON_VERSION:
            raise Failure(
                f"{venv} runs Python {info['python']}, need {PYTHON_VERSION}: "
                f"remove it and run setup with --python python{PYTHON_VERSION}"
            )
        info.update(_build_backend_dir(venv, Path(info["pytriton_root"]), info["python"]))
        if not info["libpython_dir"]:
            log(
                f"warning: no shared {info['libpython'] or 'libpython'} beside the base Python; "
                "the backend stub will load the system's libpython3.11"
            )
        info.update(version=STAMP_VERSION, requirements=REQUIREMENTS, venv=str(venv))
        tmp = _stamp_path(venv).with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(_stamp_path(venv))
        log(f"set up in {time.monotonic() - t0:.0f} s: {venv}")
        return info


def _build_backend_dir(venv: Path, pytriton_root: Path, pyver: str) -> dict[str, str]:
    """The --backend-directory: python/ = the wheel's backend plus the stub for our Python.

    Triton runs ``<backend dir>/python/triton_python_backend_stub``; a stub beside a model is
    not picked up, and the wheel keeps the stubs apart (python_backend_stubs/<version>/).
    """
    server = pytriton_root / "tritonserver"
    sources = [
        server / "backends" / "python" / "libtriton_python.so",
        server / "backends" / "python" / "triton_python_backend_utils.py",
        server / "python_backend_stubs" / pyver / "triton_python_backend_stub",
    ]
    for src in sources:
        if not src.is_file():
            raise Failure(f"the nvidia-pytriton wheel lacks {src}")
    backends = venv / "triton-backends"
    dest = backends / "python"
    dest.mkdir(parents=True, exist_ok=True)
    for src in sources:
        shutil.copy2(src, dest / src.name)  # copies keep the stub's execute bit
    tritonserver = server / "bin" / "tritonserver"
    if not tritonserver.is_file():
        raise Failure(f"the nvidia-pytriton wheel lacks {tritonserver}")
    return {"tritonserver": str(tritonserver), "backend_dir": str(backends)}


# --- processes -------------------------------------------------------------------------------


def _proc_state(pid: int) -> str | None:
    """The state letter of a process (R, S, Z...), or None when there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2]


def is_tritonserver(pid: int) -> bool:
    """Alive (not a zombie) and a tritonserver: a recycled pid is never signalled."""
    state = _proc_state(pid)
    if state is None or state in "ZX":
        return False
    argv = _argv(pid)
    return bool(argv) and argv[0].endswith("tritonserver")


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")


def _wait_pid_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _proc_state(pid) not in (None, "Z", "X") and time.monotonic() < deadline:
        time.sleep(0.02)


def _group_members(pgid: int) -> list[int]:
    """Live processes in a process group (the server and its backend stubs)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] not in "ZX" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _wait_gone(pid: int, timeout: float, proc: subprocess.Popen[bytes] | None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return True
        if proc is None and not is_tritonserver(pid):
            return True
        time.sleep(0.05)
    return False


def stop_pid(pid: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> str:
    """SIGTERM (Triton unloads its models and exits), SIGKILL the group after ``timeout``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    how = "stopped"
    if not _wait_gone(pid, timeout, proc):
        how = f"killed (no exit {timeout:g} s after SIGTERM)"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        _wait_gone(pid, 5.0, proc)
    # start_new_session made the server a group leader: backend stubs still in its group
    # after it exited are orphans.
    deadline = time.monotonic() + 5.0
    while _group_members(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    for member in _group_members(pid):
        argv = _argv(member)
        if not argv or not argv[0].endswith(("triton_python_backend_stub", "tritonserver")):
            continue  # another group on a reused pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
        # A stub killed before its own cleanup leaves its region (argv[2]) in /dev/shm.
        if argv[0].endswith("_stub") and len(argv) > 2 and "/" not in argv[2]:
            _wait_pid_gone(member, 2.0)
            Path("/dev/shm", argv[2]).unlink(missing_ok=True)
    if proc is not None:
        proc.wait()
    return how


# --- HTTP ------------------------------------------------------------------------------------


def _http_status(url: str, method: str = "GET", timeout: float = 2.0) -> int | None:
    """The HTTP status of a request (urllib closes the connection), None if unreachable."""
    request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def _http_json(url: str, method: str = "GET", timeout: float = 2.0) -> Any:
    request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def server_ready(http_port: int, models: list[str]) -> bool:
    base = f"http://127.0.0.1:{http_port}/v2"
    if _http_status(f"{base}/health/ready") != 200:
        return False
    return all(_http_status(f"{base}/models/{m}/ready") == 200 for m in models)


# --- start / stop / status -------------------------------------------------------------------


def _check_port(port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers bind: a port in TIME_WAIT is free, one with a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise Failure(
                    f"port {port} ({what}) on 127.0.0.1 is in use: another tritonserver? "
                    f"(`python3 scripts/triton_server.py status`), or pick another --{what}-port"
                ) from None
            raise Failure(f"cannot use port {port} ({what}): {exc}") from None


def _model_list(text: str, repository: Path = MODEL_REPOSITORY) -> list[str]:
    models = [m.strip() for m in text.split(",") if m.strip()]
    if not models:
        raise Failure("--models names no model")
    for model in models:
        if not (repository / model / "config.pbtxt").is_file():
            known = sorted(p.parent.name for p in repository.glob("*/config.pbtxt"))
            raise Failure(f"no model {model!r} in {repository} (there: {', '.join(known)})")
    return models


def server_env(info: dict[str, Any], venv: Path) -> dict[str, str]:
    """The server's environment, which is mostly the Python-backend stub's.

    The stub embeds Python and finds its prefix, hence its site-packages, through the
    ``python3`` first on PATH: the server environment's bin/ goes first. The stub links
    libpython3.11 by soname: LD_LIBRARY_PATH names the one this environment was built from
    (else the system's, another build, may load). The wheel's bundled libraries go after it
    (the copied backend's RPATH no longer points at them). PYTHONPATH/PYTHONHOME from the caller
    (asrd's numpy 2) must not leak into the stub.
    """
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONNOUSERSITE"):
        env.pop(name, None)
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "/usr/bin:/bin")])
    libs = [info["libpython_dir"], info["libs"], env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    return env


def server_command(
    info: dict[str, Any],
    models: list[str],
    ports: dict[str, int],
    shm_prefix: str,
    repository: Path = MODEL_REPOSITORY,
) -> list[str]:
    cmd = [
        info["tritonserver"],
        f"--model-repository={repository}",
        f"--backend-directory={info['backend_dir']}",
        "--model-control-mode=explicit",
        *(f"--load-model={m}" for m in models),
        # Our configs are complete; auto-complete costs about 2 s of startup per model.
        "--disable-auto-complete-config",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={ports['grpc']}",
        "--http-address=127.0.0.1",
        f"--http-port={ports['http']}",
        "--metrics-address=127.0.0.1",
        f"--metrics-port={ports['metrics']}",
        "--allow-gpu-metrics=false",
        # No CUDA here: skip the pinned pool (its allocation fails with a warning).
        "--pinned-memory-pool-byte-size=0",
        f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
        # The backend's own /dev/shm regions get a per-server prefix, so leaks can be checked.
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
    ]
    return cmd


def _tail(path: Path | None, lines: int = 25) -> str:
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def launch(args: argparse.Namespace, info: dict[str, Any]) -> subprocess.Popen[bytes]:
    """Start tritonserver in its own session, write the pidfile, wait until all is ready."""
    venv: Path = args.venv
    pidfile: Path = args.pidfile or venv / "tritonserver.pid"
    logfile: Path = args.log or venv / "tritonserver.log"
    repository = Path(args.model_repository).resolve()
    models = _model_list(args.models, repository)
    pid = read_pid(pidfile)
    if pid is not None and is_tritonserver(pid):
        raise Failure(f"tritonserver already running (pid {pid}, {pidfile}): stop it first")
    pidfile.unlink(missing_ok=True)  # stale
    ports = {"grpc": args.grpc_port, "http": args.http_port, "metrics": args.metrics_port}
    if len(set(ports.values())) != len(ports):
        raise Failure(f"the ports must differ: {ports}")
    for what, port in ports.items():
        _check_port(port, what)
    shm_prefix = args.shm_prefix or f"asrd_triton_{args.http_port}_"
    cmd = server_command(info, models, ports, shm_prefix, repository)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with logfile.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=server_env(info, venv),
            cwd=ROOT,
            start_new_session=True,  # Ctrl-C in the caller's terminal does not reach it
        )
    tmp = pidfile.with_name(pidfile.name + ".tmp")
    tmp.write_text(f"{proc.pid}\n")
    tmp.replace(pidfile)
    log(f"tritonserver pid {proc.pid} starting (models {', '.join(models)}; log {logfile})")
    try:
        _wait_ready(proc, args, models, logfile, t0)
    except BaseException:  # not ready, or Ctrl-C: leave nothing running
        if proc.poll() is None:
            stop_pid(proc.pid, EXIT_TIMEOUT_S + 5, proc)
        pidfile.unlink(missing_ok=True)
        raise
    log(
        f"ready in {time.monotonic() - t0:.1f} s: grpc 127.0.0.1:{args.grpc_port}, "
        f"http 127.0.0.1:{args.http_port}, metrics 127.0.0.1:{args.metrics_port}, "
        f"pid {proc.pid} ({pidfile})"
    )
    return proc


def _wait_ready(
    proc: subprocess.Popen[bytes],
    args: argparse.Namespace,
    models: list[str],
    logfile: Path,
    t0: float,
) -> None:
    deadline = t0 + args.timeout
    while True:
        code = proc.poll()
        if code is not None:
            raise Failure(
                f"tritonserver exited with {code} while starting; end of {logfile}:\n"
                + _tail(logfile)
            )
        if server_ready(args.http_port, models):
            return
        if time.monotonic() > deadline:
            raise Failure(
                f"tritonserver not ready after {args.timeout:g} s (stopped it); end of "
                f"{logfile}:\n" + _tail(logfile)
            )
        time.sleep(0.1)


def cmd_setup(args: argparse.Namespace) -> int:
    setup(args.venv, args.python, args.force)
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    proc = launch(args, read_setup(args.venv))
    proc.returncode = 0  # it outlives us on purpose: no "still running" warning at exit
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    pidfile: Path = args.pidfile or args.venv / "tritonserver.pid"
    pid = read_pid(pidfile)
    if pid is None:
        log(f"not running (no pidfile {pidfile})")
        return 0
    if not is_tritonserver(pid):
        log(f"not running (stale pidfile {pidfile}: pid {pid} is gone); removed it")
        pidfile.unlink(missing_ok=True)
        return 0
    how = stop_pid(pid, args.timeout)
    pidfile.unlink(missing_ok=True)
    log(f"tritonserver pid {pid} {how}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Exit 0: running and ready; 1: running, not ready; 3: not running (as LSB's status)."""
    pidfile: Path = args.pidfile or args.venv / "tritonserver.pid"
    pid = read_pid(pidfile)
    running = pid is not None and is_tritonserver(pid)
    base = f"http://127.0.0.1:{args.http_port}/v2"
    ready = _http_status(f"{base}/health/ready") == 200
    print(f"pidfile {pidfile}: " + (f"tritonserver pid {pid}" if running else "not running"))
    print(f"http 127.0.0.1:{args.http_port}: " + ("ready" if ready else "not ready / no answer"))
    index = _http_json(f"{base}/repository/index", method="POST") if ready else None
    for model in index or []:
        state = model.get("state", "?")
        reason = f" ({model['reason']})" if model.get("reason") else ""
        print(f"  model {model.get('name')} v{model.get('version', '-')}: {state}{reason}")
    if not running and not ready:
        return 3
    return 0 if ready else 1


def cmd_run(args: argparse.Namespace) -> int:
    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Both, explicitly: a shell's background job starts with SIGINT ignored. Installed before
    # the server starts, so a signal while it loads still stops it (launch cleans up).
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    info = setup(args.venv, args.python)
    proc = launch(args, info)
    pidfile: Path = args.pidfile or args.venv / "tritonserver.pid"
    log("serving; Ctrl-C stops it")
    try:
        code = proc.wait()
        log(f"tritonserver exited with {code}; log {args.log or args.venv / 'tritonserver.log'}")
        return 1
    except KeyboardInterrupt:
        # A second Ctrl-C must not abandon the server half-stopped.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log("stopping")
        how = stop_pid(proc.pid, EXIT_TIMEOUT_S + 10.0, proc)
        log(f"tritonserver {how} (exit {proc.returncode})")
        return 0
    finally:
        pidfile.unlink(missing_ok=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="triton_server.py",
        description="Development Triton server for asrd (docs/triton.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="server environment")

    def server(p: argparse.ArgumentParser, stop_timeout: float) -> None:
        p.add_argument("--pidfile", type=Path, help="default: <venv>/tritonserver.pid")
        p.add_argument("--http-port", type=int, default=8000)
        p.add_argument(
            "--timeout", type=float, default=stop_timeout, help="seconds to wait (bounded)"
        )

    def launching(p: argparse.ArgumentParser) -> None:
        p.add_argument("--grpc-port", type=int, default=8001)
        p.add_argument("--metrics-port", type=int, default=8002)
        p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated, to load")
        p.add_argument(
            "--model-repository",
            default=str(MODEL_REPOSITORY),
            help="model repository (default: configs/triton)",
        )
        p.add_argument("--log", type=Path, help="server output; default <venv>/tritonserver.log")
        p.add_argument("--shm-prefix", help="Python backend's /dev/shm names; default per port")

    p = sub.add_parser("setup", help="create .venv-triton once (idempotent)")
    common(p)
    p.add_argument("--python", help=f"the python{PYTHON_VERSION} to build it from")
    p.add_argument("--force", action="store_true", help="reinstall even if set up")
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("start", help="start in the background, wait until ready")
    common(p)
    server(p, 120.0)
    launching(p)
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("stop", help="SIGTERM, then SIGKILL after --timeout")
    common(p)
    server(p, EXIT_TIMEOUT_S + 10.0)
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("status", help="pid, readiness and models")
    common(p)
    server(p, 2.0)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("run", help="setup + start in the foreground until Ctrl-C")
    common(p)
    server(p, 120.0)
    launching(p)
    p.add_argument("--python", help=f"the python{PYTHON_VERSION} to build the venv from")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.venv = args.venv.resolve()
    try:
        return int(args.func(args))
    except Failure as exc:
        print(f"triton_server.py {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"triton_server.py {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
