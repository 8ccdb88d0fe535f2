"""Configuration: defaults, the shipped files, and the wording of every kind of error."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from daemon.config import (
    Config,
    LimitsConfig,
    VadConfig,
    config_to_toml_dict,
    load_config,
    parse_config,
    vad_with_overrides,
)
from daemon.errors import ConfigError
from ipc.protocol import VadOverrides

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SRC = "configs/x.toml"


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source=SRC)
    return str(info.value)


def _keys(d: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _keys(v, f"{prefix}{k}.")
    return out


# --- what is valid --------------------------------------------------------------------------


def test_defaults_are_valid() -> None:
    cfg = Config()
    # The defaults pass the same checks as a file: an empty file gives exactly them.
    assert parse_config("", source=SRC) == cfg
    assert parse_config(b"", source=SRC) == cfg
    assert load_config(None) == cfg


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_asrd_toml_is_exactly_the_defaults() -> None:
    assert load_config(CONFIGS / "asrd.toml") == Config()


def test_asrd_toml_documents_every_key() -> None:
    raw = tomllib.loads((CONFIGS / "asrd.toml").read_text())
    # beam is None by default: TOML has no null, so asrd.toml shows it commented out.
    assert _keys(raw) == _keys(config_to_toml_dict(Config()))
    assert "# beam = " in (CONFIGS / "asrd.toml").read_text()


def test_null_toml() -> None:
    cfg = load_config(CONFIGS / "null.toml")
    assert cfg.backend.kind == "null"
    assert cfg.backend.interim_ms == 0
    # Otherwise the same daemon as the defaults.
    expected = msgspec.structs.replace(
        Config(), backend=msgspec.structs.replace(Config().backend, kind="null", interim_ms=0)
    )
    assert cfg == expected


def test_valid_overrides_of_every_kind() -> None:
    cfg = parse_config(
        """
        instance = "call_centre_2"
        socket_mode = 0o600
        lanes = 4
        log_level = "debug"
        heartbeat_interval_s = 1      # an integer is fine where a number is expected
        heartbeat_timeout_s = 2.5
        [vad]
        aggressiveness = 3
        frame_ms = 10
        start_window_ms = 10
        end_window_ms = 10
        [backend]
        kind = "null"
        embedded.decoders = 0
        embedded.beam = 1e-48
        """,
        source=SRC,
    )
    assert cfg.socket_mode == 0o600
    assert cfg.lanes == 4
    assert cfg.heartbeat_interval_s == 1.0
    assert cfg.vad.frame_ms == 10
    assert cfg.backend.embedded.beam == 1e-48


def test_bom_is_tolerated() -> None:
    assert parse_config(b"\xef\xbb\xbflanes = 2\n", source=SRC).lanes == 2


# --- single-field errors: path, value as written, what is allowed ---------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # out of range
        ("vad.aggressiveness = 7", "vad.aggressiveness = 7: must be an integer from 0 to 3"),
        ("vad.aggressiveness = -1", "vad.aggressiveness = -1: must be an integer from 0 to 3"),
        (
            "vad.start_threshold = 0",
            "vad.start_threshold = 0: must be a number > 0 and <= 1",
        ),
        (
            "vad.start_threshold = 1.5",
            "vad.start_threshold = 1.5: must be a number > 0 and <= 1",
        ),
        ("vad.end_threshold = nan", "vad.end_threshold = nan: must be a number > 0 and <= 1"),
        (
            "vad.max_utterance_s = inf",
            "vad.max_utterance_s = inf: must be a number > 0 and <= 600",
        ),
        (
            "limits.max_connections = 0",
            "limits.max_connections = 0: must be an integer >= 1",
        ),
        (
            "limits.max_frame_bytes = 100",
            "limits.max_frame_bytes = 100: must be an integer from 4096 to 67108864",
        ),
        (
            "ring.audio_bytes = 4096",
            "ring.audio_bytes = 4096: must be an integer from 65536 to 1073741824",
        ),
        (
            "backend.embedded.max_decoders = 0",
            "backend.embedded.max_decoders = 0: must be an integer from 1 to 256",
        ),
        (
            "restart.backoff_initial_s = -0.5",
            "restart.backoff_initial_s = -0.5: must be a number from 0 to 60",
        ),
        (
            "shutdown_timeout_s = 0.0",
            "shutdown_timeout_s = 0.0: must be a number > 0 and <= 3600",
        ),
        # octal field: value and bounds shown the way they are written
        ("socket_mode = 0o1000", "socket_mode = 0o1000: must be an integer from 0o0 to 0o777"),
        # wrong type
        ("vad.aggressiveness = 1.5", "vad.aggressiveness = 1.5: must be an integer from 0 to 3"),
        ("vad.aggressiveness = true", "vad.aggressiveness = true: must be an integer from 0 to"),
        ('vad.aggressiveness = "2"', 'vad.aggressiveness = "2": must be an integer from 0 to 3'),
        (
            "vad.aggressiveness = 1979-05-27",
            "vad.aggressiveness = 1979-05-27: must be an integer from 0 to 3",
        ),
        ('vad.enabled = "yes"', 'vad.enabled = "yes": must be true or false'),
        ("vad.enabled = 1", "vad.enabled = 1: must be true or false"),
        ("instance = 5", "instance = 5: must be a string matching ^[A-Za-z0-9_]{1,32}$"),
        ("runtime_dir = false", "runtime_dir = false: must be a string"),
        ('socket_mode = "0660"', 'socket_mode = "0660": must be an integer from 0o0 to 0o777'),
        ("heartbeat_interval_s = [1]", "heartbeat_interval_s = [1]: must be a number > 0"),
        (
            'backend.embedded.beam = "wide"',
            'backend.embedded.beam = "wide": must be a number (or left out)',
        ),
        ("vad = 3", "vad = 3: must be a table [vad]"),
        ('backend.embedded = "x"', 'backend.embedded = "x": must be a table [backend.embedded]'),
        # bad Literal
        (
            'backend.kind = "whisper"',
            'backend.kind = "whisper": must be one of "embedded", "null"',
        ),
        (
            'log_level = "verbose"',
            'log_level = "verbose": must be one of "debug", "error", "info", "warning"',
        ),
        (
            'io.client_loop = "trio"',
            'io.client_loop = "trio": must be one of "asyncio", "auto", "uvloop"',
        ),
        ("vad.frame_ms = 15", "vad.frame_ms = 15: must be one of 10, 20, 30"),
        ('vad.frame_ms = "30"', 'vad.frame_ms = "30": must be one of 10, 20, 30'),
        # Literal or integer
        ("lanes = 0", 'lanes = 0: must be "auto" or an integer from 1 to 256'),
        ("lanes = 300", 'lanes = 300: must be "auto" or an integer from 1 to 256'),
        ('lanes = "many"', 'lanes = "many": must be "auto" or an integer from 1 to 256'),
        # bad pattern
        (
            'instance = "my daemon"',
            'instance = "my daemon": must be a string matching ^[A-Za-z0-9_]{1,32}$',
        ),
        ('instance = ""', 'instance = "": must be a string matching ^[A-Za-z0-9_]{1,32}$'),
        (
            'instance = "' + "a" * 33 + '"',
            "must be a string matching ^[A-Za-z0-9_]{1,32}$",
        ),
    ],
)
def test_field_errors(text: str, expected: str) -> None:
    message = _error(text)
    assert message.startswith(f"{SRC}: ")
    assert expected in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "lanez = 4",
            "unknown field lanez (allowed: instance, runtime_dir, socket, control_socket, "
            "socket_mode, lanes, log_level,",
        ),
        ("lanez = 4", "did you mean lanes?"),
        (
            "[vad]\nagressiveness = 3",
            "unknown field vad.agressiveness (allowed in [vad]: enabled, aggressiveness, frame_ms,",
        ),
        ("[vad]\nagressiveness = 3", "did you mean vad.aggressiveness?"),
        (
            "[backend.embedded]\nbeam_width = 1e-40",
            "unknown field backend.embedded.beam_width (allowed in [backend.embedded]: "
            "decoders, max_decoders, threads, hmm, dict, lm, beam, cmn_init, fwdflat)",
        ),
        ("[triton]\nurl = 'x'", "unknown field triton (allowed: "),
        ('"odd key" = 1', 'unknown field "odd key" (allowed: '),
    ],
)
def test_unknown_fields(text: str, expected: str) -> None:
    message = _error(text)
    assert message.startswith(f"{SRC}: ")
    assert expected in message


def test_unknown_field_without_close_match_has_no_guess() -> None:
    assert "did you mean" not in _error("[vad]\nzzzzzz = 1")


def test_long_values_are_shortened() -> None:
    message = _error('instance = "' + "x" * 500 + '"')
    assert len(message) < 200
    assert "...: must be a string matching" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lanes = \nlog_level = 'info'\n", "Invalid value (at line 1, column 9)"),
        ("[vad\naggressiveness = 1\n", "Expected ']' at the end of a table declaration (at line 1"),
        ("lanes = 2\nlanes = 3\n", "Cannot overwrite a value (at line 2, column 10)"),
        ("[vad]\nenabled = True\n", "Invalid value (at line 2, column 11)"),
        ("lanes = 'unterminated", "(at end of document)"),
    ],
)
def test_toml_syntax_errors(text: str, expected: str) -> None:
    message = _error(text)
    assert message.startswith(f"{SRC}: not valid TOML: ")
    assert expected in message


def test_not_utf8() -> None:
    with pytest.raises(ConfigError, match=r"^configs/x.toml: not valid TOML: not UTF-8 \(byte 11"):
        parse_config(b"instance = \xff\xfe", source=SRC)


# --- cross-field rules ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "backend.embedded.decoders = 20",
            "backend.embedded.max_decoders = 16: must be >= backend.embedded.decoders (20)",
        ),
        (
            "heartbeat_interval_s = 0.5\nheartbeat_timeout_s = 1.0",
            "heartbeat_timeout_s = 1.0: must be more than 2 * heartbeat_interval_s (2 * 0.5)",
        ),
        (
            'heartbeat_timeout_s = 8.0\nbackend.kind = "triton"\nbackend.triton.timeout_s = 6.0',
            "heartbeat_timeout_s = 8.0: must be more than backend.triton.timeout_s + 2 (6 + 2), "
            "or the supervisor would kill an infer worker waiting on a slow server",
        ),
        (
            "restart.backoff_initial_s = 5\nrestart.backoff_max_s = 1",
            "restart.backoff_max_s = 1.0: must be >= restart.backoff_initial_s (5)",
        ),
        (
            "vad.start_window_ms = 20",
            "vad.start_window_ms = 20: must be >= vad.frame_ms (30)",
        ),
        (
            "vad.frame_ms = 30\nvad.end_window_ms = 10",
            "vad.end_window_ms = 10: must be >= vad.frame_ms (30)",
        ),
        (
            "vad.min_speech_ms = 2000\nvad.max_utterance_s = 1.5",
            "vad.min_speech_ms = 2000: must be <= vad.max_utterance_s * 1000 (1500)",
        ),
        (
            "vad.max_utterance_s = 300",
            "vad.max_utterance_s = 300.0: must be <= limits.max_pending_audio_s (120)",
        ),
        (
            "limits.max_streams = 100",
            "limits.max_streams_per_connection = 256: must be <= limits.max_streams (100)",
        ),
        ("ring.audio_bytes = 65540", "ring.audio_bytes = 65540: must be a multiple of 8"),
        ("ring.result_bytes = 100001", "ring.result_bytes = 100001: must be a multiple of 8"),
        (
            'socket = "/run/a.sock"\ncontrol_socket = "/run/a.sock"',
            'control_socket = "/run/a.sock": must differ from socket ("/run/a.sock")',
        ),
        (
            'runtime_dir = "/run/x"\nsocket = "/run/x/control.sock"',
            'control_socket = "": must differ from socket ("/run/x/control.sock")',
        ),
        (
            'socket = "/' + "s" * 120 + '"',
            "must be at most 107 bytes (a Unix socket path limit), is 121",
        ),
        (
            'runtime_dir = "/' + "r" * 100 + '"',
            "too long for the socket path <runtime_dir>/asrd.sock (111 bytes",
        ),
    ],
)
def test_cross_field_errors(text: str, expected: str) -> None:
    message = _error(text)
    assert message.startswith(f"{SRC}: ")
    assert expected in message


def test_cross_field_errors_are_all_reported() -> None:
    message = _error("backend.embedded.decoders = 20\nring.audio_bytes = 65540")
    lines = message.splitlines()
    assert len(lines) == 2
    assert all(line.startswith(f"{SRC}: ") for line in lines)


def test_cross_field_boundaries_are_valid() -> None:
    parse_config(
        """
        heartbeat_interval_s = 1.0
        heartbeat_timeout_s = 2.01
        vad.frame_ms = 20
        vad.start_window_ms = 20
        vad.end_window_ms = 20
        vad.min_speech_ms = 1000
        vad.max_utterance_s = 1.0
        limits.max_pending_audio_s = 1.0
        limits.max_streams = 256
        backend.embedded.decoders = 16
        restart.backoff_initial_s = 10.0
        ring.audio_bytes = 65536
        """,
        source=SRC,
    )


# --- per-stream VAD overrides -----------------------------------------------------------------


def test_overrides_none_or_empty_keep_base() -> None:
    base = VadConfig()
    assert vad_with_overrides(base, None) is base
    assert vad_with_overrides(base, VadOverrides()) is base


def test_overrides_apply_only_given_fields() -> None:
    base = VadConfig(aggressiveness=1)
    vad = vad_with_overrides(
        base, VadOverrides(aggressiveness=3, end_window_ms=900, start_threshold=1)
    )
    assert vad.aggressiveness == 3
    assert vad.end_window_ms == 900
    assert vad.start_threshold == 1.0
    assert vad.frame_ms == base.frame_ms
    assert vad.enabled is True
    assert vad_with_overrides(base, VadOverrides(enabled=False)).enabled is False


def test_overrides_decoded_from_the_wire() -> None:
    ov = msgspec.msgpack.decode(
        msgspec.msgpack.encode({"frame_ms": 10, "start_window_ms": 100}), type=VadOverrides
    )
    vad = vad_with_overrides(VadConfig(), ov)
    assert (vad.frame_ms, vad.start_window_ms) == (10, 100)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (VadOverrides(aggressiveness=9), "vad.aggressiveness = 9: must be an integer from 0 to 3"),
        (VadOverrides(frame_ms=25), "vad.frame_ms = 25: must be one of 10, 20, 30"),
        (
            VadOverrides(start_threshold=0.0),
            "vad.start_threshold = 0.0: must be a number > 0 and <= 1",
        ),
        (
            VadOverrides(max_utterance_s=-1.0),
            "vad.max_utterance_s = -1.0: must be a number > 0 and <= 600",
        ),
        # a cross-field rule between an override and a base value
        (
            VadOverrides(start_window_ms=20),
            "vad.start_window_ms = 20: must be >= vad.frame_ms (30)",
        ),
        (
            VadOverrides(min_speech_ms=5000, max_utterance_s=2.0),
            "vad.min_speech_ms = 5000: must be <= vad.max_utterance_s * 1000 (2000)",
        ),
    ],
)
def test_override_errors(overrides: VadOverrides, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        vad_with_overrides(VadConfig(), overrides)
    # No file name: the ingress worker puts this message on the wire as it is.
    assert str(info.value) == expected


def test_override_wrong_type_built_in_python() -> None:
    bad = VadOverrides(aggressiveness=1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^vad.aggressiveness = 1.5: must be an integer"):
        vad_with_overrides(VadConfig(), bad)


def test_override_checked_against_pending_audio_limit() -> None:
    ov = VadOverrides(max_utterance_s=200.0)
    assert vad_with_overrides(VadConfig(), ov).max_utterance_s == 200.0
    with pytest.raises(ConfigError) as info:
        vad_with_overrides(VadConfig(), ov, limits=LimitsConfig())
    assert str(info.value) == (
        "vad.max_utterance_s = 200.0: must be <= limits.max_pending_audio_s (120)"
    )


# --- files and printing -----------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"cannot read config .*nope\.toml: No such file"):
        load_config(missing)


def test_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path)


def test_load_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[vad]\nframe_ms = 15\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: vad.frame_ms = 15: must be one of 10, 20, 30"
    assert info.value.exit_code == 78


def test_config_to_toml_dict_round_trips() -> None:
    cfg = parse_config("lanes = 3\nbackend.embedded.beam = 1e-40\nvad.frame_ms = 20", SRC)
    data = config_to_toml_dict(cfg)
    assert data["lanes"] == 3
    assert data["backend"]["embedded"]["beam"] == 1e-40
    assert msgspec.convert(data, Config) == cfg
    # No None anywhere: TOML cannot hold it.
    default = config_to_toml_dict(Config())
    assert "beam" not in default["backend"]["embedded"]
    assert msgspec.convert(default, Config) == Config()
