"""SMTP acceptance throughput of Postfix, plunkd and a bare aiosmtpd, side by side in one run.

Four servers on 127.0.0.1, each with STARTTLS required before AUTH PLAIN, all using the same
self-signed certificate (EC P-256, like plunkd's own):

  postfix     Debian's Postfix 3.7 from a private configuration in a temp folder (never /etc/postfix's
              instance, never port 25): Cyrus SASL PLAIN against a sasldb, the normal smtpd → cleanup →
              queue path (the queue file is fsynced before 250), then the `discard` transport;
  plunkd-off  plunkd with its dispatcher off (delivery.enabled=false): the relay's durable accept only;
  plunkd-on   plunkd with its dispatcher on (file transport, DKIM signing, rate limit off), so it
              delivers while it accepts;
  aiosmtpd    a bare aiosmtpd whose handler answers 250 at once and which accepts any password.

One load client (aiosmtplib: connect, STARTTLS, EHLO, AUTH PLAIN, then MAIL/RCPT/DATA) drives every
server the same way, in cells of message size × sessions × connection use: `2k-20-b2b` is 2 KB
messages over 20 concurrent sessions, each sending back to back on one connection; `-new` opens a
new connection (TLS handshake and AUTH included) per message. One cell of one server stops at
--seconds or --max-messages, whichever comes first. Every cell of every server runs once per rep, the
servers interleaved and their order rotated each rep; the tables show medians. After each cell the
benchmark waits (at most 20 s) for the server to go idle, so work it queued (Postfix's discard
deliveries, plunkd-on's dispatcher) does not land in the next server's cell.

How to read it: plunkd / Postfix is the share of a C MTA's acceptance rate plunkd reaches on the same
machine with the same TLS, AUTH and fsync-before-250 work. aiosmtpd is the ceiling for anything built
on this Python SMTP stack, so plunkd-off / aiosmtpd is what plunkd's own work costs (auth lookup,
checks, database commit); Postfix can beat that ceiling (aiosmtpd reads DATA line by line in Python).
plunkd-on vs plunkd-off is the price of delivering (DKIM, file write, outcome commit) on the same
cores while accepting. The client runs on the same machine, so the CPU table (server CPU seconds per
1,000 accepted messages, summed over all processes of the server: plunkd's dispatcher child if it
has one; Postfix's master, smtpd, cleanup, qmgr, trivial-rewrite, discard, postlogd, ...) is the
fairer per-message comparison on a small, shared box. Not run in CI; Postfix needs root and apt
(`--skip-postfix` otherwise).

    python -m bench.postfix [--cells 2k-20-b2b,2k-20-new,...] [--reps 3] [--seconds 5]
                            [--max-messages 20000] [--skip-postfix] [--database-url URL]

--database-url postgresql+asyncpg://USER:PASSWORD@127.0.0.1:5432/NAME runs both plunkd servers on
PostgreSQL: two fresh databases NAME_<time>_off and NAME_<time>_on are created and dropped again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import glob
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib

from bench.common import (
    create_project,
    free_port,
    fresh_database,
    plunkd_env,
    server_process,
    temp_dir,
    wait_for_port,
)
from bench.setup_sender import verify_offline
from bench.smtp import insecure_client_tls, message

DEFAULT_CELLS = "2k-20-b2b,2k-20-new,2k-1-b2b,100k-20-b2b,100k-20-new,100k-1-b2b"
SENDER = "bounce@bench.example"
SMTP_USER = "plunk"
POSTFIX_HOSTNAME = "plunkd-bench.localhost"
IDLE_CPU_SECONDS = 0.05
"""A server counts as idle once it uses less than this much CPU in half a second."""
SETTLE_CAP_SECONDS = 20.0
WARM_UP_MESSAGES = 20


# ---- the packages ---------------------------------------------------------------------------

POSTFIX_PACKAGES = ["postfix", "sasl2-bin", "libsasl2-modules"]
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


def postfix_installed() -> bool:
    tools = all(shutil.which(tool) for tool in ("postfix", "postconf", "saslpasswd2"))
    return tools and bool(glob.glob("/usr/lib/*/sasl2/libplain.so*"))


@contextlib.contextmanager
def services_kept_down() -> Iterator[None]:
    """Debian's policy-rc.d answer 101 keeps maintainer scripts from starting services; put one in
    place for the install unless the machine already has one (containers usually do)."""
    if POLICY_RC_D.exists():
        yield
        return
    POLICY_RC_D.write_text("#!/bin/sh\nexit 101\n")
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink(missing_ok=True)


def install_postfix() -> None:
    """apt-get install Postfix and Cyrus SASL with debconf's "No configuration": no /etc/postfix/main.cf
    is written and no system instance is started (the benchmark only runs its private one)."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    preseed = (f"postfix postfix/main_mailer_type select No configuration\n"
               f"postfix postfix/mailname string {POSTFIX_HOSTNAME}\n")
    subprocess.run(["debconf-set-selections"], input=preseed, text=True, check=True)
    install = ["apt-get", "install", "-y", "--no-install-recommends", *POSTFIX_PACKAGES]
    print("installing", " ".join(POSTFIX_PACKAGES), "with apt-get", flush=True)
    with services_kept_down():
        if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL, check=True)
            subprocess.run(install, env=env, stdout=subprocess.DEVNULL, check=True)
    if not postfix_installed():
        raise RuntimeError("apt-get ran, but postfix, postconf, saslpasswd2 or the SASL PLAIN plugin is missing")


# ---- TLS ------------------------------------------------------------------------------------

def self_signed_pair(folder: Path) -> tuple[Path, Path]:
    """One EC P-256 certificate for 127.0.0.1 (what plunkd generates for itself), used by all four."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, POSTFIX_HOSTNAME)])
    now = dt.datetime.now(dt.UTC)
    alt_names = x509.SubjectAlternativeName([x509.DNSName(POSTFIX_HOSTNAME),
                                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30)).add_extension(alt_names, critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


# ---- the private Postfix --------------------------------------------------------------------

def main_cf(folder: Path, cert: Path, key: Path) -> str:
    return f"""\
compatibility_level = 3.6
queue_directory = {folder}/queue
data_directory = {folder}/data
maillog_file = {folder}/maillog
maillog_file_prefixes = {folder}
mail_owner = postfix
setgid_group = postdrop
myhostname = {POSTFIX_HOSTNAME}
mydomain = localhost
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
relay_domains =
local_recipient_maps =
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
message_size_limit = 10485760
smtpd_recipient_limit = 50
# every recipient domain is remote, and every remote delivery is discarded
default_transport = discard
relay_transport = discard
local_transport = discard
virtual_transport = discard
# STARTTLS required, AUTH only after it, relaying only for authenticated clients
smtpd_tls_security_level = encrypt
smtpd_tls_auth_only = yes
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = {folder}/etc/sasl
smtpd_sasl_local_domain = $myhostname
smtpd_sasl_security_options = noanonymous
smtpd_sasl_tls_security_options = noanonymous
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions =
"""


def master_cf(port: int) -> str:
    """Only the listener and the internal services that accepting and discarding need; nothing chrooted."""
    return f"""\
127.0.0.1:{port} inet n - n - - smtpd
cleanup    unix  n - n - 0 cleanup
qmgr       unix  n - n 300 1 qmgr
tlsmgr     unix  - - n 1000? 1 tlsmgr
rewrite    unix  - - n - - trivial-rewrite
bounce     unix  - - n - 0 bounce
defer      unix  - - n - 0 bounce
trace      unix  - - n - 0 bounce
flush      unix  n - n 1000? 0 flush
anvil      unix  - - n - 1 anvil
discard    unix  - - n - - discard
error      unix  - - n - - error
retry      unix  - - n - - error
postlog    unix-dgram n - n - 1 postlogd
"""


def write_sasldb(sasl: Path, password: str) -> None:
    """Cyrus SASL for the `smtpd` application: PLAIN only, checked against a sasldb (auxprop)."""
    sasldb = sasl / "sasldb2"
    (sasl / "smtpd.conf").write_text(f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN\n"
                                     f"sasldb_path: {sasldb}\n")
    subprocess.run(["saslpasswd2", "-p", "-c", "-f", str(sasldb), "-u", POSTFIX_HOSTNAME, SMTP_USER],
                   input=password, text=True, check=True)
    shutil.chown(sasldb, "root", "postfix")  # smtpd reads it as the postfix user
    sasldb.chmod(0o640)


def postfix_command(config: Path, action: str) -> subprocess.CompletedProcess:
    return subprocess.run(["postfix", "-c", str(config), action], capture_output=True, text=True)


def master_pid(folder: Path, timeout: float = 15.0) -> int:
    pid_file = folder / "queue" / "pid" / "master.pid"
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            return int(pid_file.read_text().strip())
        if time.monotonic() > deadline:
            raise RuntimeError(f"the private Postfix wrote no {pid_file}")
        time.sleep(0.1)


@contextlib.contextmanager
def private_postfix(folder: Path, port: int, cert: Path, key: Path, password: str) -> Iterator[int]:
    """Start Postfix from a configuration in `folder` (yields its master's pid); always stopped again
    with `postfix -c DIR stop`."""
    config = folder / "etc"
    sasl = config / "sasl"  # Debian's smtpd reads $config_directory/sasl/smtpd.conf
    for path in (config, sasl, folder / "queue", folder / "data"):
        path.mkdir(parents=True)
    folder.parent.chmod(0o711)  # the postfix user must reach its queue and data folders
    folder.chmod(0o755)
    shutil.chown(folder / "data", "postfix", "postfix")
    (config / "main.cf").write_text(main_cf(folder, cert, key))
    (config / "master.cf").write_text(master_cf(port))
    write_sasldb(sasl, password)
    try:
        started = postfix_command(config, "start")
        if started.returncode != 0:
            raise RuntimeError(f"postfix -c {config} start failed: {started.stdout}{started.stderr}")
        pid = master_pid(folder)
        wait_for_port(port)
        yield pid
    except BaseException:
        log = folder / "maillog"
        if log.exists():
            sys.stderr.write(log.read_text(errors="replace")[-4000:])
        raise
    finally:
        stop_postfix(folder, config)


def running(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: the master's parent is init, which may be slow to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def stop_postfix(folder: Path, config: Path) -> None:
    """`postfix -c DIR stop`; if our master still runs after 10 s, kill that one pid."""
    try:
        pid = master_pid(folder, timeout=0)
    except RuntimeError:
        pid = None
    postfix_command(config, "stop")
    deadline = time.monotonic() + 10
    while pid and running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid and running(pid):
        os.kill(pid, signal.SIGKILL)


# ---- process accounting ---------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def process_table() -> dict[int, tuple[int, int]]:
    """pid → (parent pid, CPU ticks: own utime+stime and reaped children's cutime+cstime)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(entry.path, "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            table[int(entry.name)] = (int(fields[1]), sum(int(value) for value in fields[11:15]))
    return table


def process_tree(root: int, table: dict[int, tuple[int, int]]) -> list[int]:
    """`root` and all its living descendants."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of `root` and all its descendants, including those that already exited and were
    reaped (their time is in the parent's cutime/cstime). Only differences of two calls mean anything."""
    table = process_table()
    return sum(table.get(pid, (0, 0))[1] for pid in process_tree(root, table)) / TICK


def tree_rss_mb(root: int) -> float:
    """Resident memory of `root` and its descendants (plunkd may run its dispatcher in a child)."""
    total = 0
    for pid in process_tree(root, process_table()):
        with contextlib.suppress(OSError):
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            total += sum(int(line.split()[1]) for line in lines if line.startswith("VmRSS:"))
    return total / 1024


def wait_idle(root: int, cap: float) -> float:
    """Wait until the server's process tree stops using CPU (at most `cap` seconds); returns the wait."""
    started = time.monotonic()
    before = tree_cpu_seconds(root)
    while time.monotonic() - started < cap:
        time.sleep(0.5)
        now = tree_cpu_seconds(root)
        if now - before < IDLE_CPU_SECONDS:
            break
        before = now
    return time.monotonic() - started


# ---- the servers ----------------------------------------------------------------------------

@dataclass
class Server:
    name: str
    port: int
    """Its STARTTLS port."""
    password: str
    pid: int
    """The root of its process tree (plunkd, the aiosmtpd process, Postfix's master)."""
    rss: bool = False
    """Whether its resident memory is reported."""
    outbox: Path | None = None
    """Where it delivers to (plunkd-on's file transport), to count what it delivered."""


BARE_SINK = "import sys; from bench.postfix import serve_bare_sink; serve_bare_sink(*sys.argv[1:])"


def serve_bare_sink(port: str, cert: str, key: str) -> None:
    """The bare server: aiosmtpd with STARTTLS required, AUTH accepting any password, 250 at once."""
    from aiosmtpd.smtp import SMTP, AuthResult

    from bench.sink_server import Sink

    # aiosmtpd 1.4 logs a deprecation warning on every AUTH; plunkd's relay filters it out too
    logging.getLogger("mail.log").addFilter(lambda record: "login_data is deprecated" not in record.getMessage())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    def any_password(server, session, envelope, mechanism, auth_data) -> AuthResult:
        return AuthResult(success=True)

    def protocol() -> SMTP:
        return SMTP(Sink(), decode_data=False, data_size_limit=10 * 1024 * 1024, tls_context=context,
                    require_starttls=True, auth_required=True, authenticator=any_password)

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", int(port))
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def start_bare(stack: contextlib.ExitStack, cert: Path, key: Path) -> Server:
    port = free_port()
    proc = stack.enter_context(server_process(["-c", BARE_SINK, str(port), str(cert), str(key)], port))
    return Server("aiosmtpd", port, "anything", proc.pid)


def start_plunkd(stack: contextlib.ExitStack, name: str, data: Path, cert: Path, key: Path, delivery: bool,
                 database_url: str) -> Server:
    data.mkdir()
    http_port, tls_port, starttls_port = free_port(), free_port(), free_port()
    env = plunkd_env(str(data), http_port, PLUNKD_DATABASE_URL=database_url, PLUNKD_SMTP_ENABLED="true",
                     PLUNKD_SMTP_HOST="127.0.0.1", PLUNKD_SMTP_TLS_PORT=str(tls_port),
                     PLUNKD_SMTP_STARTTLS_PORT=str(starttls_port), PLUNKD_SMTP_CERT_FILE=str(cert),
                     PLUNKD_SMTP_KEY_FILE=str(key), PLUNKD_DELIVERY_ENABLED=str(delivery).lower(),
                     PLUNKD_DELIVERY_TRANSPORT="file", PLUNKD_DELIVERY_RATE_PER_SECOND="0")
    secret = create_project(str(data), env)
    asyncio.run(verify_offline(database_url, "bench", "bench.example"))
    proc = stack.enter_context(server_process(["-m", "plunkd.cli", "serve"], starttls_port, env))
    return Server(name, starttls_port, secret, proc.pid, rss=True, outbox=data / "outbox" if delivery else None)


def start_postfix(stack: contextlib.ExitStack, folder: Path, cert: Path, key: Path) -> Server:
    if not postfix_installed():
        install_postfix()
    port, password = free_port(), f"sk_{secrets.token_hex(24)}"
    pid = stack.enter_context(private_postfix(folder, port, cert, key, password))
    return Server("postfix", port, password, pid)


def plunkd_database(stack: contextlib.ExitStack, data: Path, database_url: str, tag: str) -> str:
    if not database_url:
        return f"sqlite+aiosqlite:///{data}/plunkd-{tag}/plunkd.sqlite3"
    return stack.enter_context(fresh_database(database_url))


def start_servers(stack: contextlib.ExitStack, folder: Path, args: argparse.Namespace) -> list[Server]:
    cert, key = self_signed_pair(folder)
    servers = [] if args.skip_postfix else [start_postfix(stack, folder / "postfix", cert, key)]
    for tag, delivery in (("off", False), ("on", True)):
        url = plunkd_database(stack, folder, args.database_url, tag)
        servers.append(start_plunkd(stack, f"plunkd-{tag}", folder / f"plunkd-{tag}", cert, key, delivery, url))
    servers.append(start_bare(stack, cert, key))
    return servers


# ---- the load -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    name: str
    size: int
    sessions: int
    reconnect: bool

    @property
    def label(self) -> str:
        mode = "new conn/msg" if self.reconnect else "back to back"
        return f"{self.size // 1000:>3} KB x{self.sessions:<2} {mode}"


def parse_cell(name: str) -> Cell:
    """`<size>k-<sessions>-<b2b|new>`, e.g. 100k-20-new."""
    try:
        size, sessions, mode = name.split("-")
        if not size.endswith("k") or mode not in ("b2b", "new"):
            raise ValueError
        return Cell(name, int(size[:-1]) * 1000, int(sessions), mode == "new")
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad cell {name!r}: want <size>k-<sessions>-<b2b|new>") from None


@dataclass
class Load:
    ok: int = 0
    errors: int = 0
    elapsed: float = 0.0
    first_error: str = ""


async def open_session(server: Server, tls: ssl.SSLContext) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port, start_tls=True, tls_context=tls, timeout=30)
    await client.connect()
    if client.is_ehlo_or_helo_needed:  # connect() did EHLO, STARTTLS, but not the EHLO after it
        await client.ehlo()
    await client.auth_plain(SMTP_USER, server.password)
    return client


def close_quietly(client: aiosmtplib.SMTP | None) -> None:
    if client is not None:
        client.close()


async def drive(server: Server, cell: Cell, seconds: float, max_messages: int) -> Load:
    """`cell.sessions` concurrent sessions send until `seconds` pass or `max_messages` were started."""
    bodies = [message(cell.size, i) for i in range(64)]
    tls = insecure_client_tls()  # one context for all connections: making one loads the CA store (ms of CPU)
    load = Load()
    started = 0
    deadline = time.monotonic() + seconds

    async def session(worker: int) -> None:
        nonlocal started
        client = None
        while time.monotonic() < deadline and started < max_messages:
            index = started
            started += 1
            try:
                if client is None:
                    client = await open_session(server, tls)
                await client.sendmail(SENDER, [f"user{index % 500}@example.org"], bodies[(index + worker) % 64])
                load.ok += 1
                if cell.reconnect:
                    await client.quit()
                    client = None
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                load.errors += 1
                load.first_error = load.first_error or f"{type(exc).__name__}: {exc}"
                close_quietly(client)
                client = None
        if client is not None:
            await client.quit()

    began = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*[session(i) for i in range(cell.sessions)]), seconds + 120)
    load.elapsed = time.perf_counter() - began
    return load


# ---- the run --------------------------------------------------------------------------------

@dataclass
class Sample:
    rate: float
    cpu_per_1000: float
    rss_mb: float
    errors: int


@dataclass
class Results:
    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    first_errors: dict[str, str] = field(default_factory=dict)
    settle_seconds: dict[str, float] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)
    delivered: dict[str, int] = field(default_factory=dict)

    def median(self, cell: Cell, server: str, attribute: str) -> float:
        values = [getattr(s, attribute) for s in self.samples.get((cell.name, server), [])]
        return statistics.median(values) if values else float("nan")


def measure(server: Server, cell: Cell, args: argparse.Namespace, results: Results) -> None:
    cpu_before = tree_cpu_seconds(server.pid)
    load = asyncio.run(drive(server, cell, args.seconds, args.max_messages))
    cpu = tree_cpu_seconds(server.pid) - cpu_before
    rss = tree_rss_mb(server.pid) if server.rss else float("nan")
    results.settle_seconds[server.name] = (results.settle_seconds.get(server.name, 0.0)
                                           + wait_idle(server.pid, SETTLE_CAP_SECONDS))
    sample = Sample(load.ok / load.elapsed, cpu / load.ok * 1000 if load.ok else float("nan"), rss, load.errors)
    results.samples.setdefault((cell.name, server.name), []).append(sample)
    results.errors[server.name] = results.errors.get(server.name, 0) + load.errors
    results.accepted[server.name] = results.accepted.get(server.name, 0) + load.ok
    if load.first_error:
        results.first_errors.setdefault(server.name, load.first_error)


def warm_up(servers: list[Server]) -> None:
    """A few messages each before timing: imports, first TLS handshakes, database caches."""
    cell = Cell("warm-up", 2000, 2, False)
    for server in servers:
        load = asyncio.run(drive(server, cell, 5.0, WARM_UP_MESSAGES))
        if load.errors:
            raise RuntimeError(f"{server.name} fails before the benchmark: {load.first_error}")
        wait_idle(server.pid, SETTLE_CAP_SECONDS)


def run(servers: list[Server], cells: list[Cell], args: argparse.Namespace) -> Results:
    results = Results()
    warm_up(servers)
    for rep in range(args.reps):
        order = servers[rep % len(servers):] + servers[:rep % len(servers)]
        print(f"rep {rep + 1}/{args.reps}: order {', '.join(s.name for s in order)}", flush=True)
        for cell in cells:
            for server in order:
                measure(server, cell, args, results)
    for server in servers:
        if server.outbox is not None:
            results.delivered[server.name] = len(list(server.outbox.glob("*.eml")))
    return results


# ---- the report -----------------------------------------------------------------------------

def ratio_text(value: float, postfix: float) -> str:
    if postfix != postfix or not postfix:
        return ""
    return f"({value / postfix:.2f})"


def print_rates(results: Results, cells: list[Cell]) -> None:
    print(f"{'cell':<26}{'Postfix':>9}{'plunkd off':>12}{'(/PF)':>7}{'plunkd on':>11}{'(/PF)':>7}{'aiosmtpd':>10}")
    for cell in cells:
        postfix, off, on, bare = (results.median(cell, name, "rate")
                                  for name in ("postfix", "plunkd-off", "plunkd-on", "aiosmtpd"))
        print(f"{cell.label:<26}{postfix:>9,.0f}{off:>12,.0f}{ratio_text(off, postfix):>7}"
              f"{on:>11,.0f}{ratio_text(on, postfix):>7}{bare:>10,.0f}")


def print_cpu_and_rss(results: Results, cells: list[Cell]) -> None:
    print(f"{'cell':<26}{'Postfix':>9}{'plunkd off':>12}{'plunkd on':>11}{'aiosmtpd':>10}"
          f"{'RSS off MB':>12}{'RSS on MB':>11}")
    for cell in cells:
        cpu = [results.median(cell, name, "cpu_per_1000") for name in ("postfix", "plunkd-off", "plunkd-on",
                                                                        "aiosmtpd")]
        rss = [max((s.rss_mb for s in results.samples.get((cell.name, name), [])), default=float("nan"))
               for name in ("plunkd-off", "plunkd-on")]
        print(f"{cell.label:<26}{cpu[0]:>9.2f}{cpu[1]:>12.2f}{cpu[2]:>11.2f}{cpu[3]:>10.2f}"
              f"{rss[0]:>12.0f}{rss[1]:>11.0f}")


def print_report(results: Results, cells: list[Cell], args: argparse.Namespace, servers: list[Server]) -> None:
    database = "PostgreSQL" if args.database_url else "SQLite"
    print(f"\naccepted msg/s, median of {args.reps} interleaved reps, {args.seconds:g} s per cell "
          f"(STARTTLS + AUTH PLAIN, 127.0.0.1, plunkd on {database}); (/PF) = ratio to Postfix")
    print_rates(results, cells)
    print("\nserver CPU seconds per 1,000 accepted messages (median; all processes of the server), "
          "plunkd RSS (all its processes) at the end of the cell (max over reps)")
    print_cpu_and_rss(results, cells)
    print("\nerrors (must be 0): " + ", ".join(f"{s.name} {results.errors.get(s.name, 0)}" for s in servers))
    for name, error in results.first_errors.items():
        print(f"  first error from {name}: {error}")
    print("waiting for idle after cells (s, total): "
          + ", ".join(f"{s.name} {results.settle_seconds.get(s.name, 0.0):.1f}" for s in servers))
    for name, delivered in results.delivered.items():
        print(f"{name} delivered {delivered:,} messages by the end; it accepted "
              f"{results.accepted.get(name, 0):,} in the cells (plus {WARM_UP_MESSAGES} in the warm-up)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default=DEFAULT_CELLS, help=f"comma-separated (default {DEFAULT_CELLS})")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="time cap of one cell of one server")
    parser.add_argument("--max-messages", type=int, default=20000, help="message cap of one cell of one server")
    parser.add_argument("--skip-postfix", action="store_true", help="no Postfix column (machines without apt)")
    parser.add_argument("--database-url", default="", help="run plunkd on PostgreSQL (postgresql+asyncpg://…)")
    args = parser.parse_args()
    args.cell_list = [parse_cell(name) for name in args.cells.split(",") if name]
    return args


def main() -> int:
    args = parse_args()
    # SIGTERM unwinds like Ctrl-C, so every server started is stopped on the way out
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    began = time.monotonic()
    try:
        with temp_dir() as folder, contextlib.ExitStack() as stack:
            servers = start_servers(stack, Path(folder), args)
            results = run(servers, args.cell_list, args)
    except KeyboardInterrupt:
        print("interrupted; the servers it started are stopped", file=sys.stderr)
        return 130
    print_report(results, args.cell_list, args, servers)
    print(f"\nrun time {time.monotonic() - began:.0f} s")
    return 1 if any(results.errors.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
