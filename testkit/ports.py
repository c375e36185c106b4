"""Picking a loopback port for a test or benchmark server (tests/servers.py and bench/common.py each take
ports from a range of their own)."""

from __future__ import annotations

import socket


def nothing_listens_on(port: int) -> bool:
    """Whether 127.0.0.1:`port` can be bound now (the probe's socket is closed again at once)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
