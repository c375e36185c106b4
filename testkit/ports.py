"""Picking a loopback port for a test or benchmark server (tests/servers.py and bench/common.py each take
ports from a range of their own)."""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from pathlib import Path

CLAIMS_DIR = Path(tempfile.gettempdir()) / "plunkd-port-claims"
"""One lock file per claimed port, shared by every process of this machine that claims ports here."""

_held: dict[int, int] = {}
"""This process's claims: port → the open lock file's descriptor, kept until the process ends."""


def nothing_listens_on(port: int) -> bool:
    """Whether 127.0.0.1:`port` can be bound now (the probe's socket is closed again at once)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def claim_port(port: int) -> bool:
    """Whether this process now holds `port` for the rest of its life and nothing listens on it. Between a
    pick and a server's bind another process could pick the same free port: a benchmark run inside a test
    and one of `.ci/run`'s benchmarks beside it once did (the second got another's 404). An exclusive lock
    on the port's file settles it; the kernel releases it when this process ends, however it ends."""
    if port in _held:
        return False
    CLAIMS_DIR.mkdir(mode=0o1777, exist_ok=True)
    fd = os.open(CLAIMS_DIR / f"{port}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    if not nothing_listens_on(port):
        os.close(fd)
        return False
    _held[port] = fd
    return True
