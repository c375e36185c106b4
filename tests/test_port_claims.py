"""testkit.ports.claim_port: a benchmark's port is its own until it ends, whatever else picks ports beside it
(.ci/run runs the benchmarks beside both test passes, and tests/test_bench_dashboard.py runs one inside them)."""

from __future__ import annotations

import socket
import subprocess
import sys

from testkit.ports import claim_port
from tests.servers import free_port

HOLD_AND_WAIT = """
import sys
from testkit.ports import claim_port
print(claim_port(int(sys.argv[1])), flush=True)
sys.stdin.read()
"""


def test_a_port_another_process_claimed_is_refused_until_that_process_ends():
    port = free_port()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_WAIT, str(port)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        assert claim_port(port) is False
    finally:
        holder.communicate("", timeout=30)
    assert claim_port(port) is True
    assert claim_port(port) is False, "claimed twice by the same process"


def test_a_port_something_listens_on_is_not_claimed():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert claim_port(listener.getsockname()[1]) is False
