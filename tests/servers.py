"""Real servers the tests talk to on loopback: a DNS server answering from a dict, an aiosmtpd sink,
moto's SES in server mode (AWS itself is on the internet, which tests cannot reach), and `plunkd serve`
itself as a user runs it (`served_plunkd`)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from aiosmtpd.smtp import SMTP, Envelope

from testkit.ports import nothing_listens_on


class DnsServer(asyncio.DatagramProtocol):
    """Answers TXT queries from `records` (name → list of strings), MX queries from `mx` (name → list of
    "preference host." strings) and A queries from `addresses` (name → IPv4 addresses, what SPF's `a`
    mechanism looks up); an empty answer for a name with only other types; NXDOMAIN for a name in none."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.mx: dict[str, list[str]] = {}
        self.addresses: dict[str, list[str]] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        query = dns.message.from_wire(data)
        reply = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        values = self.records.get(name)
        exchanges = self.mx.get(name)
        addresses = self.addresses.get(name)
        if values and question.rdtype == dns.rdatatype.TXT:
            texts = [" ".join(f'"{chunk}"' for chunk in _chunks(v)) for v in values]
            reply.answer.append(dns.rrset.from_text_list(question.name, 60, dns.rdataclass.IN,
                                                         dns.rdatatype.TXT, texts))
        elif exchanges and question.rdtype == dns.rdatatype.MX:
            reply.answer.append(dns.rrset.from_text_list(question.name, 60, dns.rdataclass.IN,
                                                         dns.rdatatype.MX, exchanges))
        elif addresses and question.rdtype == dns.rdatatype.A:
            reply.answer.append(dns.rrset.from_text_list(question.name, 60, dns.rdataclass.IN,
                                                         dns.rdatatype.A, addresses))
        elif not values and not exchanges and not addresses:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(reply.to_wire(), addr)

    def publish(self, records: list[dict[str, str]]) -> None:
        for record in records:
            published = self.mx if record.get("type") == "MX" else self.records
            published.setdefault(record["name"].lower(), []).append(record["value"])


def _chunks(value: str) -> list[str]:
    return [value[i:i + 255] for i in range(0, len(value), 255)] or [""]


async def start_dns() -> DnsServer:
    loop = asyncio.get_running_loop()
    _, server = await loop.create_datagram_endpoint(DnsServer, local_addr=("127.0.0.1", 0))
    server.port = server.transport.get_extra_info("sockname")[1]
    return server


@contextlib.contextmanager
def dns_in_thread() -> Iterator[DnsServer]:
    """`start_dns` on an event loop of its own thread, for a synchronous test (Playwright's sync API holds
    the test's loop) and the `plunkd serve` it starts (point `dns.nameservers` / `dns.port` at it)."""
    import threading

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-dns", daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(start_dns(), loop).result(10)
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(server.transport.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@dataclass
class SinkHandler:
    """An upstream SMTP server that stores what it receives, or answers with a set reply."""

    messages: list[Envelope] = field(default_factory=list)
    reply: str = "250 2.0.0 OK queued as SINK{n}"

    async def handle_DATA(self, server, session, envelope: Envelope) -> str:
        if self.reply.startswith("250"):
            self.messages.append(envelope)
        return self.reply.format(n=len(self.messages))


async def start_sink(handler: SinkHandler) -> tuple[asyncio.AbstractServer, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler, decode_data=False, enable_SMTPUTF8=True,
                                                   data_size_limit=64 * 1024 * 1024), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


PORTS_PER_PROCESS = 1500
FIRST_PORT = 20000
"""Test ports lie below Linux's ephemeral range (32768-60999), so no client connection holds one."""


def _own_ports() -> range:
    """This test process's slice of ports. Test processes run side by side (CI's two passes, each with
    pytest-xdist workers): a port the kernel picked for one could be taken by another between picking and
    binding, and a test then talked to another test's server (a 401 from a stranger's database)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    slot = (int(worker) if worker.isdigit() else 0) * 2 + (1 if os.environ.get("PLUNKD_TEST_DATABASE_URL") else 0)
    start = FIRST_PORT + slot % 8 * PORTS_PER_PROCESS
    return range(start, start + PORTS_PER_PROCESS)


_turn = itertools.count(random.randrange(PORTS_PER_PROCESS))


def free_port() -> int:
    """A port of this process's slice that nothing listens on now, each in turn."""
    ports = _own_ports()
    for _ in ports:
        port = ports[next(_turn) % len(ports)]
        if nothing_listens_on(port):
            return port
    raise RuntimeError(f"no free port in {ports}")


class MotoServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto server did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


ROOT = Path(__file__).resolve().parent.parent
"""This checkout: the `plunkd serve` subprocesses run its code (PYTHONPATH), even where another checkout is
the installed one."""


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def api_up(base: str) -> bool:
    try:
        urllib.request.urlopen(f"{base}/health", timeout=1).close()
        return True
    except OSError:
        return False


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@dataclass
class ServedPlunkd:
    """A running `plunkd serve` subprocess, its HTTP port and the file its output goes to."""

    proc: subprocess.Popen
    port: int
    log_path: Path
    tls_port: int | None = None
    starttls_port: int | None = None
    """The relay's ports, when it was started with `relay=True`."""

    @property
    def http_port(self) -> int:
        return self.port

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, ready, seconds: float, what: str) -> None:
        """Until `ready()` is true; fail naming `what`, with the log's tail, on a timeout or when the
        process exits first."""
        deadline = time.monotonic() + seconds
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                ended = f"exited with {self.proc.returncode}" if self.proc.poll() is not None else "timed out"
                raise AssertionError(f"plunkd serve {ended} waiting for {what}:\n{self.log()[-5000:]}")
            time.sleep(0.1)

    def stop(self, graceful: bool = False) -> None:
        """`graceful`: SIGTERM and wait for a clean exit; else SIGKILL the process and its children."""
        if graceful:
            self.proc.terminate()
            self.proc.wait(timeout=15)
            return
        for pid in children(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def served_plunkd(workdir: Path, env: dict[str, str] | None = None, *, port: int | None = None,
                  config_only: bool = False, args: Sequence[str] = (), prefix: Sequence[str] = (),
                  log_name: str = "serve.log", wait_for: str | None = "api", graceful: bool = False,
                  relay: bool = False, open_files: int | None = None) -> Iterator[ServedPlunkd]:
    """Run `python -m plunkd.cli [args] serve` in `workdir` with this checkout's code, its output appended
    to `workdir/log_name`, and stop it on the way out (`graceful`: SIGTERM and a clean exit; else SIGKILL
    to it and its children, as a crash would).

    The environment is the test's, without PLUNKD_CONFIG, with the data dir `workdir/data`, the HTTP port
    (`port`, else a free one) and one acceptor process (the default, one per core beyond the first, would make
    the caps and counts a test sees depend on the machine) set, then `env` on top. `config_only`: no PLUNKD_*
    variable but `env`'s (the config file decides; give its HTTP port as `port`). `prefix`: words before the
    command (`setpriv`).
    `wait_for`: "api" (GET /health answers), "port" (the HTTP port accepts) or None (the caller waits).
    `relay`: the SMTP relay on 127.0.0.1 on two free ports (`tls_port`, `starttls_port`). `open_files`: the
    process's RLIMIT_NOFILE, soft and hard (so plunkd cannot raise it). A value None in `env` unsets it."""
    port = port or free_port()
    full_env: dict[str, str | None] = {**os.environ, "PYTHONPATH": str(ROOT)}
    if config_only:
        for name in [name for name in full_env if name.startswith("PLUNKD_")]:
            full_env.pop(name)
    else:
        full_env.pop("PLUNKD_CONFIG", None)
        full_env.update({"PLUNKD_SERVER_DATA_DIR": str(workdir / "data"), "PLUNKD_SERVER_HTTP_PORT": str(port),
                         "PLUNKD_SERVER_PROCESSES": "1"})
    tls_port = starttls_port = None
    if relay:
        tls_port, starttls_port = free_port(), free_port()
        full_env.update({"PLUNKD_SMTP_HOST": "127.0.0.1", "PLUNKD_SMTP_TLS_PORT": str(tls_port),
                         "PLUNKD_SMTP_STARTTLS_PORT": str(starttls_port)})
    full_env.update(env or {})

    def limit_open_files() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    log_path = workdir / log_name
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "plunkd.cli", *args, "serve"], cwd=workdir,
                                env={name: value for name, value in full_env.items() if value is not None},
                                stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit_open_files)
    served = ServedPlunkd(proc, port, log_path, tls_port, starttls_port)
    try:
        if wait_for == "api":
            served.wait(lambda: api_up(served.base), 30, "the API")
        elif wait_for == "port":
            served.wait(lambda: port_open(port), 30, f"port {port}")
        yield served
    finally:
        served.stop(graceful)


def health(base: str, source: str = "127.0.0.1", timeout: float = 5) -> int | None:
    """GET /health over a connection from `source`: the status, or None when nothing answered."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout, source_address=(source, 0))
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()
