"""`plunkd serve` as a user runs it: acceptance in one process, the dispatcher in a child it starts,
wakes and restarts; the child stops when the parent is gone. Real processes, a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from plunkd.processes import WakePipe, parse_roles
from tests.servers import api_up, children, served_plunkd
from tests.test_cli_and_config import plunkd, project_with_domain


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def wait_until(check, seconds: float, what: str, log: Path | None = None):
    """`check()`'s first true value within `seconds`; else fail naming `what` (with the tail of `log`)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    tail = f"\n--- server log ---\n{log.read_text()[-5000:]}" if log is not None else ""
    raise AssertionError(f"timed out waiting for {what}{tail}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.fixture
def served(tmp_path):
    env = {"PLUNKD_SMTP_ENABLED": "false", "PLUNKD_DELIVERY_POLL_SECONDS": "30"}
    key = project_with_domain(tmp_path, "p", "hello@example.com", env).secret_key
    with served_plunkd(tmp_path, env) as server:
        yield server.proc, server.base, key, tmp_path / "data" / "outbox"


def send(base: str, key: str, to: str) -> None:
    request = urllib.request.Request(f"{base}/v1/send", method="POST", data=json.dumps(
        {"to": to, "subject": "Hi", "body": "Hello"}).encode(), headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 200


def dispatcher_child(proc) -> int | None:
    found = [pid for pid in children(proc.pid) if "--role dispatcher" in command_line(pid)]
    return found[0] if found else None


def delivered(outbox: Path) -> int:
    return len(list(outbox.glob("*.eml"))) if outbox.exists() else 0


@pytest.mark.long
def test_dispatcher_runs_in_a_child_woken_at_once_restarted_and_stopped_with_its_parent(served):
    proc, base, key, outbox = served
    wait_until(lambda: api_up(base), 30, "the API")
    child = wait_until(lambda: dispatcher_child(proc), 30, "the dispatcher process")
    wait_until(lambda: "dispatcher" in (Path(outbox).parent.parent / "serve.log").read_text()
               and "started: transport file" in (Path(outbox).parent.parent / "serve.log").read_text(), 30,
               "the dispatcher to start")
    started = time.monotonic()
    for index in range(5):
        send(base, key, f"user{index}@example.org")
    # poll_seconds is 30 here: only the wake-up through the pipe delivers this fast.
    wait_until(lambda: delivered(outbox) == 5, 5, "five deliveries")
    assert time.monotonic() - started < 5

    os.kill(child, signal.SIGKILL)
    replacement = wait_until(lambda: (pid := dispatcher_child(proc)) and pid != child and pid, 20,
                             "a new dispatcher process")
    send(base, key, "after-restart@example.org")
    wait_until(lambda: delivered(outbox) == 6, 15, "delivery by the restarted dispatcher")
    assert api_up(base)

    proc.kill()
    proc.wait(timeout=10)
    # the orphan stops as on SIGTERM, which takes at most SHUTDOWN_SECONDS (8)
    wait_until(lambda: not alive(replacement), 12, "the orphaned dispatcher to stop",
               Path(outbox).parent.parent / "serve.log")


def test_a_served_plunkd_that_cannot_start_fails_at_once_with_its_log(tmp_path):
    """`tests.servers.served_plunkd`, which every test of a real `plunkd serve` starts it with, does not wait
    out its 30 s for a process that already exited: it fails with the exit status and what the process said."""
    started = time.monotonic()
    with pytest.raises(AssertionError, match="plunkd serve exited with 1 waiting for the API") as failed, \
            served_plunkd(tmp_path, {"PLUNKD_SERVER_HTTP_PORT": "abc"}):
        pass
    assert "config key server.http_port (PLUNKD_SERVER_HTTP_PORT): expected int, got 'abc'" in str(failed.value)
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("text, roles", [("all", {"api", "relay", "dispatcher"}), ("api,relay", {"api", "relay"}),
                                         ("dispatcher", {"dispatcher"})])
def test_roles(text, roles):
    assert parse_roles(text) == roles


@pytest.mark.parametrize("text", ["", "api,mailer", "everything"])
def test_unknown_roles_are_refused_naming_them(text, tmp_path):
    with pytest.raises(ValueError, match="--role: expected a comma-separated list of api, relay, dispatcher"):
        parse_roles(text)
    done = plunkd(tmp_path, "serve", "--role", text or ",")
    assert done.returncode == 1 and done.stderr.startswith("plunkd: --role: expected")


async def test_the_wake_ups_of_one_turn_of_the_loop_write_one_byte_and_a_later_one_another():
    """A batch's commit answers many messages in one turn: the dispatcher gets one byte for all of them, and
    a message queued in a later turn wakes it again (a real pipe)."""
    pipe = WakePipe()
    try:
        os.set_blocking(pipe.read_fd, False)
        for _ in range(50):
            pipe.notify()
        with pytest.raises(BlockingIOError):
            os.read(pipe.read_fd, 100)  # nothing written yet: the byte goes out at the next turn
        await asyncio.sleep(0)
        assert os.read(pipe.read_fd, 100) == b"\x01"
        pipe.notify()
        await asyncio.sleep(0)
        assert os.read(pipe.read_fd, 100) == b"\x01"
    finally:
        pipe.close()
