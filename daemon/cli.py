"""``asrd``: run the daemon and its admin commands."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from daemon import __version__
from daemon.config import Config, load_config
from daemon.errors import AsrdError, BootError, ConfigError

DESCRIPTION = """\
asrd: streaming speech recognition over a Unix socket.

Clients stream PCM audio and get partial and final transcripts back (see docs/protocol.md;
`asrctl transcribe FILE.wav` is the bundled client). The supervisor runs one ingress and one
infer worker per lane and talks to systemd when started by it.
"""

EPILOG = """\
exit codes: 0 stopped cleanly, 2 usage error, 69 every lane failed in a crash loop (a restart
may help), 70 boot failure, 71 shared memory unavailable, 75 socket already in use (another asrd
runs), 78 invalid configuration.

examples:
  asrd run                              # defaults: embedded recognizer, lanes = CPU count
  asrd run --config configs/asrd.toml
  asrd check-config configs/asrd.toml
  asrd doctor                           # the machine, the placement plan, warnings
  asrctl transcribe samples/*.wav       # in another terminal
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asrd",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"asrd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run the daemon in the foreground (logs to stderr; SIGTERM/Ctrl-C drains)",
        description="Run the daemon in the foreground until SIGTERM or SIGINT, which drain it: "
        "open utterances get their finals, then it exits 0.",
    )
    run.add_argument("--config", "-c", metavar="FILE", help="TOML config (default: built-in)")
    run.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="override log_level"
    )
    check = sub.add_parser(
        "check-config",
        help="validate a config file without starting",
        description="Validate a config file; on error print the field, the value and what is "
        "allowed, and exit 78.",
    )
    check.add_argument("file", metavar="FILE")
    check.add_argument("--print", action="store_true", help="print the resolved config as JSON")
    doctor = sub.add_parser(
        "doctor",
        help="show what asrd sees on this machine and the placement it would choose",
        description="Probe the machine (kernel, CPUs, NUMA nodes, virtualization, container, "
        "io_uring, SIMD, /dev/shm) and print the plan a config would get here (lanes, CPUs, "
        "NUMA nodes, pinning, io backend, each with the reason) and warnings. Starts nothing. "
        "Exit 0 if the config can start here, 78 if it cannot.",
    )
    doctor.add_argument("--config", "-c", metavar="FILE", help="TOML config (default: built-in)")
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    status = sub.add_parser("status", help="show lanes, workers and counters (asrctl status)")
    status.add_argument("--json", action="store_true")
    status.add_argument("--control-socket", metavar="PATH")
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s asrd[{os.getpid()}] supervisor %(levelname)s %(message)s",
    )


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.supervisor import Supervisor

    cfg: Config = load_config(args.config)
    if args.log_level:
        import msgspec

        cfg = msgspec.structs.replace(cfg, log_level=args.log_level)
    setup_logging(cfg.log_level)
    return Supervisor(cfg, config_path=args.config).run()


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.file)
    if args.print:
        import msgspec

        print(msgspec.json.format(msgspec.json.encode(cfg)).decode())
    else:
        from daemon.placement import plan
        from daemon.platform import probe

        placement = plan(cfg, probe())
        print(f"{args.file}: ok ({cfg.backend.kind} backend; {placement.summary()})")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import msgspec

    from daemon.doctor import diagnose, format_report

    cfg = load_config(args.config)
    report = diagnose(cfg)
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(report)).decode())
    else:
        print(format_report(report, cfg))
    return 0 if report.error is None else ConfigError.exit_code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "check-config":
            return cmd_check_config(args)
        if args.command == "doctor":
            return cmd_doctor(args)
        if args.command == "status":
            from daemon import asrctl

            extra = ["--json"] if args.json else []
            if args.control_socket:
                extra += ["--control-socket", args.control_socket]
            return asrctl.main(["status", *extra])
    except ConfigError as exc:
        print(f"asrd: invalid configuration: {exc}", file=sys.stderr)
        return exc.exit_code
    except BootError as exc:
        print(f"asrd: cannot start: {exc}", file=sys.stderr)
        return exc.exit_code
    except AsrdError as exc:
        print(f"asrd: {exc}", file=sys.stderr)
        return exc.exit_code
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
