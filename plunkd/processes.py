"""Roles and processes. `plunkd serve` runs acceptance (API + SMTP relay) in its own process and, by
default, delivery (the dispatcher: DKIM signing, transports) in a child process it starts and watches,
so signing and writing files never take acceptance's core. With `server.processes` = N > 1, N - 1 more
acceptor processes (`Acceptors`) serve the same ports beside it, each on its own SO_REUSEPORT socket (the
kernel spreads connections over them), all waking the one dispatcher.

The two share the database (the outbox is the hand-over; a killed process loses nothing, its leased
rows come back when the lease ends) and one pipe: the parent writes a byte when mail is queued, so the
child dispatches at once instead of at its next poll, and the child sees end-of-file on the pipe when
the parent is gone, and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("plunkd")
ROLES = ("api", "relay", "dispatcher")
WAKE_FD_ENV = "PLUNKD_WAKE_FD"
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
"""Seconds before restarting a dispatcher process that died, by how many times in a row it died early."""
STABLE_SECONDS = 60.0
"""A dispatcher process that ran this long before dying is restarted after the shortest delay again."""


ACCEPTOR_ENV = "PLUNKD_ACCEPTOR"
"""Set in an acceptor child's environment: its `Handover`, as JSON."""


def parse_roles(text: str) -> set[str]:
    """`api,relay,dispatcher` (or `all`) → the set of roles; an unknown name is an error naming it."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    if names == {"all"}:
        return set(ROLES)
    unknown = names - set(ROLES)
    if unknown or not names:
        raise ValueError(f"--role: expected a comma-separated list of {', '.join(ROLES)} (or all), got {text!r}")
    return names


def wake_through(fd: int) -> None:
    """One byte into a wake pipe's (non-blocking) write end; a full pipe already holds a pending wake-up."""
    with contextlib.suppress(BlockingIOError):
        os.write(fd, b"\x01")


class PipeWaker:
    """Wakes whoever reads a wake pipe, once for all the wake-ups of one turn of the event loop: a batch's
    commit answers its many messages in one turn, and each used to write its own byte (a system call, which
    also lets another thread take the GIL). The byte is written at the start of the next turn. Called from the
    event loop only."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._due = False

    def __call__(self) -> None:
        if not self._due:
            self._due = True
            asyncio.get_running_loop().call_soon(self._write)

    def _write(self) -> None:
        self._due = False
        wake_through(self.fd)


class WakePipe:
    """The parent's end: `notify()` never blocks."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self.notify = PipeWaker(self.write_fd)

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


async def start_dispatcher(command: list[str], wake: WakePipe) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(*command, pass_fds=(wake.read_fd,),
                                                env={**os.environ, WAKE_FD_ENV: str(wake.read_fd)})


@contextlib.asynccontextmanager
async def supervise_dispatcher(command: list[str], wake: WakePipe) -> AsyncIterator[None]:
    """Run the dispatcher process for as long as the caller's context lasts; restart it when it dies."""
    try:
        async with supervise({"dispatcher": lambda: start_dispatcher(command, wake)},
                             "its leased emails are taken again when their lease ends"):
            yield
    finally:
        wake.close()


@contextlib.asynccontextmanager
async def supervise(children: dict[str, Callable[[], Awaitable[asyncio.subprocess.Process]]],
                    when_dead: str) -> AsyncIterator[None]:
    """Run one process per entry of `children` (its name → how to start it) for as long as the caller's
    context lasts; restart each when it dies (after `RESTART_DELAYS`); at the end SIGTERM them all at once
    and wait for them. `when_dead`: what the log line about a dead one adds (what happens to its work)."""
    stopping = asyncio.Event()
    current: dict[str, asyncio.subprocess.Process] = {}

    async def keep_running(name: str, start: Callable[[], Awaitable[asyncio.subprocess.Process]]) -> None:
        failures = 0
        while not stopping.is_set():
            started = time.monotonic()
            process = current[name] = await start()
            log.info("%s process %d started", name, process.pid)
            code = await process.wait()
            from core.metrics import process_ended  # not at the top: see `core.multiproc.share_metrics`

            process_ended(process.pid)
            if stopping.is_set():
                return
            failures = 0 if time.monotonic() - started > STABLE_SECONDS else failures + 1
            delay = RESTART_DELAYS[min(max(failures - 1, 0), len(RESTART_DELAYS) - 1)]
            log.error("%s process %d exited with %s; starting another in %.0f s (%s)", name, process.pid, code,
                      delay, when_dead)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)

    tasks = [asyncio.create_task(keep_running(name, start), name=f"{name}-supervisor")
             for name, start in children.items()]
    try:
        yield
    finally:
        stopping.set()
        await asyncio.gather(*(_stop(name, process) for name, process in current.items()))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _stop(name: str, process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), 20)
    except TimeoutError:
        log.error("%s process %d did not stop within 20 s; killing it", name, process.pid)
        process.kill()
        await process.wait()


@dataclass(frozen=True)
class Handover:
    """What the main process hands an acceptor child, as inherited descriptors: its own listening sockets
    (HTTP; the relay's implicit-TLS and STARTTLS), the write end of the dispatcher's wake pipe (None: the
    dispatcher runs in the main process and finds the child's mail at its next poll), the read end of the
    lifeline (end-of-file: the main process is gone, so the child stops too), and the file of the counters
    all acceptors share (`core.host_counts`)."""

    http_fd: int | None
    relay_fds: tuple[int, int] | None
    wake_fd: int | None
    lifeline_fd: int
    counts_path: str

    def fds(self) -> tuple[int, ...]:
        return tuple(fd for fd in (self.http_fd, *(self.relay_fds or ()), self.wake_fd, self.lifeline_fd)
                     if fd is not None)

    @classmethod
    def from_environment(cls) -> Handover | None:
        text = os.environ.get(ACCEPTOR_ENV)
        if not text:
            return None
        fields = json.loads(text)
        relay = fields["relay_fds"]
        return cls(fields["http_fd"], (relay[0], relay[1]) if relay else None, fields["wake_fd"],
                   fields["lifeline_fd"], fields["counts_path"])


class Acceptors:
    """The main process's side of the acceptor children: each start binds fresh sockets on the main
    process's addresses (`core.connections.another_listener`) and hands them over; the main process then
    closes its copies, so a child that dies takes its sockets (and the connections waiting in their
    backlog, which were never answered) with it, and the kernel sends new connections to the others."""

    def __init__(self, command: list[str], http_socket: socket.socket | None,
                 relay_sockets: tuple[socket.socket, socket.socket] | None, wake: WakePipe | None,
                 counts_path: str) -> None:
        self.command = command
        self.http_socket = http_socket
        self.relay_sockets = relay_sockets
        self.wake = wake
        self.counts_path = counts_path
        self.lifeline_read, self.lifeline_write = os.pipe()

    async def start(self) -> asyncio.subprocess.Process:
        from core.connections import another_listener

        sockets: list[socket.socket] = []
        try:
            http = self.http_socket and another_listener(self.http_socket)
            sockets += [http] if http else []
            relay = self.relay_sockets and tuple(another_listener(sock) for sock in self.relay_sockets)
            sockets += list(relay or ())
            handover = Handover(http.fileno() if http else None, (relay[0].fileno(), relay[1].fileno()) if relay
                                else None, self.wake.write_fd if self.wake else None, self.lifeline_read,
                                self.counts_path)
            return await asyncio.create_subprocess_exec(
                *self.command, pass_fds=handover.fds(),
                env={**os.environ, ACCEPTOR_ENV: json.dumps(dataclasses.asdict(handover))})
        finally:
            for sock in sockets:
                sock.close()

    def close(self) -> None:
        for fd in (self.lifeline_read, self.lifeline_write):
            with contextlib.suppress(OSError):
                os.close(fd)


def acceptor_command(config_path: str | None, roles: set[str]) -> list[str]:
    command = [sys.executable, "-m", "plunkd.cli"]
    if config_path:
        command += ["--config", config_path]
    return [*command, "serve", "--role", ",".join(sorted(roles))]
