"""Roles and processes. `plunkd serve` runs acceptance (API + SMTP relay) in its own process and, by
default, delivery (the dispatcher: DKIM signing, transports) in a child process it starts and watches,
so signing and writing files never take acceptance's core.

The two share the database (the outbox is the hand-over; a killed process loses nothing, its leased
rows come back when the lease ends) and one pipe: the parent writes a byte when mail is queued, so the
child dispatches at once instead of at its next poll, and the child sees end-of-file on the pipe when
the parent is gone, and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable

log = logging.getLogger("plunkd")
ROLES = ("api", "relay", "dispatcher")
WAKE_FD_ENV = "PLUNKD_WAKE_FD"
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
"""Seconds before restarting a dispatcher process that died, by how many times in a row it died early."""
STABLE_SECONDS = 60.0
"""A dispatcher process that ran this long before dying is restarted after the shortest delay again."""


def parse_roles(text: str) -> set[str]:
    """`api,relay,dispatcher` (or `all`) → the set of roles; an unknown name is an error naming it."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    if names == {"all"}:
        return set(ROLES)
    unknown = names - set(ROLES)
    if unknown or not names:
        raise ValueError(f"--role: expected a comma-separated list of {', '.join(ROLES)} (or all), got {text!r}")
    return names


class WakePipe:
    """The parent's end: `notify()` never blocks; a full pipe already holds a pending wake-up."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)

    def notify(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self.write_fd, b"\x01")

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def watch_parent(fd: int, on_wake: Callable[[], None], on_parent_gone: Callable[[], None]) -> None:
    """Child side: call `on_wake` for each burst of wake-ups, `on_parent_gone` at end-of-file."""
    os.set_blocking(fd, False)
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        if data:
            on_wake()
            return
        loop.remove_reader(fd)
        on_parent_gone()

    loop.add_reader(fd, readable)


def dispatcher_command(config_path: str | None) -> list[str]:
    command = [sys.executable, "-m", "plunkd.cli"]
    if config_path:
        command += ["--config", config_path]
    return [*command, "serve", "--role", "dispatcher"]


@contextlib.asynccontextmanager
async def supervise_dispatcher(command: list[str], wake: WakePipe) -> AsyncIterator[None]:
    """Run the dispatcher process for as long as the caller's context lasts; restart it when it dies."""
    stopping = asyncio.Event()
    current: asyncio.subprocess.Process | None = None

    async def keep_running() -> None:
        nonlocal current
        failures = 0
        while not stopping.is_set():
            started = time.monotonic()
            current = await asyncio.create_subprocess_exec(
                *command, pass_fds=(wake.read_fd,), env={**os.environ, WAKE_FD_ENV: str(wake.read_fd)})
            log.info("dispatcher process %d started", current.pid)
            code = await current.wait()
            from core.metrics import process_ended  # not at the top: see `core.multiproc.share_metrics`

            process_ended(current.pid)
            if stopping.is_set():
                return
            failures = 0 if time.monotonic() - started > STABLE_SECONDS else failures + 1
            delay = RESTART_DELAYS[min(max(failures - 1, 0), len(RESTART_DELAYS) - 1)]
            log.error("dispatcher process %d exited with %s; starting another in %.0f s (its leased emails "
                      "are taken again when their lease ends)", current.pid, code, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)

    task = asyncio.create_task(keep_running(), name="dispatcher-supervisor")
    try:
        yield
    finally:
        stopping.set()
        if current is not None and current.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                current.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(current.wait(), 20)
            except TimeoutError:
                log.error("dispatcher process %d did not stop within 20 s; killing it", current.pid)
                current.kill()
                await current.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        wake.close()
