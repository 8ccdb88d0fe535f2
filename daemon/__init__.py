"""asrd: the supervisor, configuration, CLI and systemd glue."""

__version__ = "0.1.0"
