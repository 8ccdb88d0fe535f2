"""Fault tests: the real daemon (``asrd run``) through worker and supervisor kills and misbehaving
clients, with exact accounting of what every stream's client receives."""
