"""SMTP acceptance throughput of Postfix, plunkd and a bare aiosmtpd, side by side in one run.

Five servers on 127.0.0.1, each with STARTTLS required before AUTH PLAIN, all using the same
self-signed certificate (EC P-256, like plunkd's own):

  postfix-dkim     what a self-hoster would run instead of plunkd: Debian's Postfix 3.7 from a private
                   configuration in a temp folder (never /etc/postfix's instance, never port 25), Cyrus SASL
                   PLAIN against a sasldb, OpenDKIM as smtpd's milter (its own config file and socket in
                   the temp folder, never the system's service) signing with plunkd's RSA-2048 key, selector
                   and domain, the queue file fsynced before 250, then the `virtual` agent delivering every
                   message to one catch-all Maildir on the same disk (written to tmp/, fsynced, moved to new/);
  postfix-discard  the same Postfix without OpenDKIM, its deliveries handed to the `discard` transport;
  plunkd-off       plunkd with its dispatcher off (delivery.enabled=false): the relay's durable accept only;
  plunkd-on        plunkd with its dispatcher on (file transport, DKIM signing, rate limit off), so it
                   delivers while it accepts;
  aiosmtpd         a bare aiosmtpd whose handler answers 250 at once and which accepts any password.

One load client (aiosmtplib: connect, STARTTLS, EHLO, AUTH PLAIN, then MAIL/RCPT/DATA) drives every
server the same way, in cells of message size × sessions × connection use: `2k-20-b2b` is 2 KB
messages over 20 concurrent sessions, each sending back to back on one connection; `-new` opens a
new connection (TLS handshake and AUTH included) per message. One cell of one server stops at
--seconds or --max-messages, whichever comes first. Every cell of every server runs once per rep, the
servers interleaved and their order rotated each rep; the tables show medians. After each cell the
benchmark waits (at most --settle-cap s) for the server to go idle, so work it queued (Postfix's
deliveries, plunkd-on's dispatcher) does not land in the next server's cell.

Once per run, after the warm-up, one file delivered by postfix-dkim and one by plunkd-on must carry a
DKIM-Signature for the bench's domain and selector (Postfix's with OpenDKIM's DKIM-Filter header) that
dkimpy's `dkim.verify` accepts with the bench's public key (a DNS stub answers the TXT record); the run
stops otherwise. The report ends with what the check found and how many files each delivered.

How to read it: plunkd-on / postfix-dkim (the `(/PFdkim)` columns) is the comparison that matters: the
same accept-sign-deliver work, fsync before 250 and for the delivered file, on the same machine; issue
24's aim is >= 1.00 in every cell with no more CPU per 1,000 messages (the "goal" lines). plunkd-off /
postfix-discard (`(/PFdis)`) compares accepting only. aiosmtpd is the ceiling for anything built on
this Python SMTP stack, so plunkd-off / aiosmtpd is what plunkd's own work costs (auth lookup, checks,
database commit); Postfix can beat that ceiling (aiosmtpd reads DATA line by line in Python). plunkd-on
vs plunkd-off is the price of delivering (DKIM, file write, outcome commit) on the same cores while
accepting. The client runs on the same machine, so the CPU table (server CPU seconds per 1,000
accepted messages, counted from the cell's start until the server is idle again, so deliveries done
after the cell are included; summed over all processes of the server: plunkd's dispatcher child if it
has one; Postfix's master, smtpd, cleanup, qmgr, trivial-rewrite, virtual or discard, postlogd, ...
and OpenDKIM) is the fairer per-message comparison on a small, shared box. Postfix needs root and
apt-get (packages: postfix sasl2-bin libsasl2-modules opendkim, installed if missing, no system
service started); without them the run fails unless given `--skip-postfix`.

    python -m bench.postfix [--cells 2k-20-b2b,2k-20-new,...] [--reps 3] [--seconds 5]
                            [--max-messages 20000] [--settle-cap 20] [--quick] [--skip-postfix]
                            [--database-url URL]

--quick is a smoke run for CI (one 2k-20-b2b cell, one rep, 2 s caps; under a minute); its exit code is
0 only if every server ran without errors and the DKIM checks passed, not whether plunkd met the goal.
--database-url postgresql+asyncpg://USER:PASSWORD@127.0.0.1:5432/NAME runs both plunkd servers on
PostgreSQL: two fresh databases NAME_<time>_off and NAME_<time>_on are created and dropped again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import email.parser
import email.policy
import glob
import ipaddress
import logging
import os
import pwd
import re
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
import dkim

from bench.common import (
    create_project,
    free_port,
    fresh_database,
    plunkd_env,
    process_table,
    process_tree,
    server_process,
    stop_process,
    temp_dir,
    tree_cpu_seconds,
    wait_for_port,
)
from bench.setup_sender import SELECTOR, verify_offline
from bench.smtp import insecure_client_tls, message
from pipeline.domains import KeyPair, dkim_txt, generate_key

DEFAULT_CELLS = "2k-20-b2b,2k-20-new,2k-1-b2b,100k-20-b2b,100k-20-new,100k-1-b2b"
SENDER_DOMAIN = "bench.example"
"""plunkd's verified sending domain and OpenDKIM's `Domain`: both sign for it with the same key pair."""
SENDER = f"bounce@{SENDER_DOMAIN}"
RECIPIENT_DOMAIN = "example.org"
MAILDIR = "catchall"
MAILDIR_USER = "nobody"
"""The owner of Postfix's Maildir deliveries (a dedicated vmail user on a real server)."""
SMTP_USER = "plunk"
POSTFIX_HOSTNAME = "plunkd-bench.localhost"
IDLE_CPU_SECONDS = 0.05
"""A server counts as idle once it uses less than this much CPU in half a second."""
SETTLE_CAP_SECONDS = 20.0
WARM_UP_MESSAGES = 20
SERVER_NAMES = ("postfix-dkim", "postfix-discard", "plunkd-off", "plunkd-on", "aiosmtpd")


# ---- the packages ---------------------------------------------------------------------------

POSTFIX_PACKAGES = ["postfix", "sasl2-bin", "libsasl2-modules", "opendkim"]
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


class SetupError(RuntimeError):
    """The Postfix columns cannot run here (not root, no apt-get, the install failed)."""


def postfix_installed() -> bool:
    tools = all(shutil.which(tool) for tool in ("postfix", "postconf", "saslpasswd2", "opendkim"))
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
    """apt-get install Postfix, Cyrus SASL and OpenDKIM with debconf's "No configuration": no
    /etc/postfix/main.cf is written and no system Postfix or OpenDKIM is started (the benchmark only runs
    its private ones)."""
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
        raise RuntimeError("apt-get ran, but postfix, postconf, saslpasswd2, opendkim or the SASL PLAIN plugin "
                           "is missing")


def ensure_postfix() -> None:
    """Postfix runs as root (its master, the postfix and opendkim users); install it unless present."""
    hint = f"install {' '.join(POSTFIX_PACKAGES)} as root, or pass --skip-postfix"
    if os.geteuid() != 0:
        raise SetupError(f"the Postfix columns need root (Postfix's master, its own users); {hint}")
    if postfix_installed():
        return
    if not shutil.which("apt-get"):
        raise SetupError(f"postfix or opendkim is missing and there is no apt-get; {hint}")
    try:
        install_postfix()
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        raise SetupError(f"postfix or opendkim is missing and installing it failed ({exc}); {hint}") from exc


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

DISCARD = """\
# every recipient domain is remote, and every remote delivery is discarded
default_transport = discard
relay_transport = discard
local_transport = discard
virtual_transport = discard
"""


def dkim_maildir(folder: Path, socket: Path) -> str:
    """Signed by OpenDKIM as a milter of smtpd (the signature is in the queue file fsynced before 250), then
    delivered by the `virtual` agent to one catch-all Maildir (tmp/ → fsync → new/) as `nobody`."""
    vmail = pwd.getpwnam(MAILDIR_USER)
    return f"""\
# every bench recipient (@{RECIPIENT_DOMAIN}) is a virtual mailbox: one catch-all Maildir
virtual_mailbox_domains = {RECIPIENT_DOMAIN}
virtual_mailbox_base = {folder}/mail
virtual_mailbox_maps = static:{MAILDIR}/
virtual_uid_maps = static:{vmail.pw_uid}
virtual_gid_maps = static:{vmail.pw_gid}
virtual_transport = virtual
default_transport = discard
relay_transport = discard
local_transport = discard
# DKIM signing in OpenDKIM; no signature (milter down) means no 250
smtpd_milters = unix:{socket}
non_smtpd_milters =
milter_default_action = tempfail
"""


def main_cf(folder: Path, cert: Path, key: Path, delivery: str) -> str:
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
{delivery}\
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


SMTP_CLIENT_SERVICES = """\
smtp       unix  - - n - - smtp
scache     unix  - - n - 1 scache
"""
"""master.cf lines for a private Postfix that also delivers over SMTP (tests/test_inbound_postfix.py)."""


def master_cf(port: int, extra_services: str = "") -> str:
    """Only the listener and the internal services that accepting and delivering need (and `extra_services`);
    nothing chrooted."""
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
virtual    unix  - n n - - virtual
error      unix  - - n - - error
retry      unix  - - n - - error
postlog    unix-dgram n - n - 1 postlogd
""" + extra_services


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


@contextlib.contextmanager
def shared_umask() -> Iterator[None]:
    """The umask Postfix's files and folders need (its own user reads the configuration and walks the queue),
    for as long as they are made: a process that ran `plunkd.cli.main` (a test's) holds plunkd's private 077."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


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
def private_postfix(folder: Path, port: int, cert: Path, key: Path, password: str,
                    delivery: str, extra_services: str = "") -> Iterator[int]:
    """Start Postfix from a configuration in `folder` (yields its master's pid); always stopped again
    with `postfix -c DIR stop`. `delivery` is the main.cf part that says where accepted mail goes."""
    config = folder / "etc"
    sasl = config / "sasl"  # Debian's smtpd reads $config_directory/sasl/smtpd.conf
    with shared_umask():
        for path in (config, sasl, folder / "queue", folder / "data"):
            path.mkdir(parents=True)
        folder.parent.chmod(0o711)  # the postfix user must reach its queue and data folders
        folder.chmod(0o755)
        shutil.chown(folder / "data", "postfix", "postfix")
        (config / "main.cf").write_text(main_cf(folder, cert, key, delivery))
        (config / "master.cf").write_text(master_cf(port, extra_services))
        write_sasldb(sasl, password)
    try:
        with shared_umask():
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


# ---- the private OpenDKIM -------------------------------------------------------------------

def opendkim_conf(folder: Path) -> str:
    """Signing only, for the bench's domain with plunkd's key and selector. Canonicalization and the
    oversigned From are Debian's /etc/opendkim.conf defaults; DKIM-Filter shows who signed. The key file
    is the opendkim user's, mode 0600, but under /tmp, which RequireSafeKeys refuses (any other user may
    write /tmp): hence `RequireSafeKeys no`, which is only checked when the key is loaded."""
    return f"""\
Mode                    s
Domain                  {SENDER_DOMAIN}
Selector                {SELECTOR}
KeyFile                 {folder}/key.pem
RequireSafeKeys         no
Canonicalization        relaxed/simple
SignatureAlgorithm      rsa-sha256
OversignHeaders         From
InternalHosts           127.0.0.1
SoftwareHeader          yes
Socket                  local:{folder}/opendkim.sock
PidFile                 {folder}/opendkim.pid
UserID                  opendkim:opendkim
UMask                   000
Syslog                  no
Background              no
"""


@contextlib.contextmanager
def private_opendkim(folder: Path, private_pem: str) -> Iterator[tuple[int, Path]]:
    """Run `opendkim -f -x FILE` from a configuration in `folder` (never /etc/opendkim.conf nor the system
    service); yields its pid and its socket, whose mode lets Postfix's smtpd (user postfix) connect."""
    folder.mkdir(parents=True)
    shutil.chown(folder, "opendkim", "opendkim")
    folder.chmod(0o755)
    key = folder / "key.pem"
    key.write_text(private_pem)
    shutil.chown(key, "opendkim", "opendkim")
    key.chmod(0o600)
    config, socket, log = folder / "opendkim.conf", folder / "opendkim.sock", folder / "opendkim.log"
    config.write_text(opendkim_conf(folder))
    with log.open("wb") as log_file:
        proc = subprocess.Popen(["opendkim", "-f", "-x", str(config)], stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the private OpenDKIM did not open {socket}")
            time.sleep(0.05)
        yield proc.pid, socket
    except BaseException:
        sys.stderr.write(log.read_text(errors="replace")[-4000:])
        raise
    finally:
        stop_process(proc)


# ---- process accounting ---------------------------------------------------------------------

def tree_rss_mb(roots: tuple[int, ...]) -> float:
    """Resident memory of `roots` and their descendants (plunkd may run its dispatcher in a child)."""
    total = 0
    for pid in process_tree(roots, process_table()):
        with contextlib.suppress(OSError):
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            total += sum(int(line.split()[1]) for line in lines if line.startswith("VmRSS:"))
    return total / 1024


def wait_idle(roots: tuple[int, ...], cap: float) -> float:
    """Wait until the server's processes stop using CPU (at most `cap` seconds); returns the wait."""
    started = time.monotonic()
    before = tree_cpu_seconds(roots)
    while time.monotonic() - started < cap:
        time.sleep(0.5)
        now = tree_cpu_seconds(roots)
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
    pids: tuple[int, ...]
    """The roots of its process trees (plunkd, the aiosmtpd process, Postfix's master, OpenDKIM)."""
    rss: bool = False
    """Whether its resident memory is reported."""
    deliveries: str = ""
    """A glob of the files it delivers (plunkd-on's file transport, Postfix's Maildir), to count them
    and to check one's DKIM signature."""


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
    return Server("aiosmtpd", port, "anything", (proc.pid,))


def start_plunkd(stack: contextlib.ExitStack, name: str, data: Path, cert: Path, key: Path, delivery: bool,
                 database_url: str, dkim_key: KeyPair) -> Server:
    data.mkdir()
    http_port, tls_port, starttls_port = free_port(), free_port(), free_port()
    env = plunkd_env(str(data), http_port, PLUNKD_DATABASE_URL=database_url, PLUNKD_SMTP_ENABLED="true",
                     PLUNKD_SMTP_HOST="127.0.0.1", PLUNKD_SMTP_TLS_PORT=str(tls_port),
                     PLUNKD_SMTP_STARTTLS_PORT=str(starttls_port), PLUNKD_SMTP_CERT_FILE=str(cert),
                     PLUNKD_SMTP_KEY_FILE=str(key), PLUNKD_DELIVERY_ENABLED=str(delivery).lower(),
                     PLUNKD_DELIVERY_TRANSPORT="file", PLUNKD_DELIVERY_RATE_PER_SECOND="0")
    secret = create_project(str(data), env)
    asyncio.run(verify_offline(database_url, "bench", SENDER_DOMAIN, dkim_key))
    proc = stack.enter_context(server_process(["-m", "plunkd.cli", "serve"], starttls_port, env))
    return Server(name, starttls_port, secret, (proc.pid,), rss=True,
                  deliveries=str(data / "outbox" / "*.eml") if delivery else "")


def start_postfix_discard(stack: contextlib.ExitStack, folder: Path, cert: Path, key: Path) -> Server:
    port, password = free_port(), f"sk_{secrets.token_hex(24)}"
    pid = stack.enter_context(private_postfix(folder, port, cert, key, password, DISCARD))
    return Server("postfix-discard", port, password, (pid,))


def start_postfix_dkim(stack: contextlib.ExitStack, folder: Path, cert: Path, key: Path,
                       dkim_key: KeyPair) -> Server:
    """Postfix with OpenDKIM signing (same key, selector and domain as plunkd) delivering to a Maildir."""
    folder.mkdir()
    folder.parent.chmod(0o711)  # the opendkim, postfix and nobody users must reach their folders
    folder.chmod(0o755)
    opendkim_pid, socket = stack.enter_context(private_opendkim(folder / "opendkim", dkim_key[0]))
    mail = folder / "mail"
    mail.mkdir()
    shutil.chown(mail, MAILDIR_USER, pwd.getpwnam(MAILDIR_USER).pw_gid)
    port, password = free_port(), f"sk_{secrets.token_hex(24)}"
    pid = stack.enter_context(private_postfix(folder, port, cert, key, password, dkim_maildir(folder, socket)))
    return Server("postfix-dkim", port, password, (pid, opendkim_pid), deliveries=str(mail / MAILDIR / "new" / "*"))


def plunkd_database(stack: contextlib.ExitStack, data: Path, database_url: str, tag: str) -> str:
    if not database_url:
        return f"sqlite+aiosqlite:///{data}/plunkd-{tag}/plunkd.sqlite3"
    return stack.enter_context(fresh_database(database_url))


def start_servers(stack: contextlib.ExitStack, folder: Path, args: argparse.Namespace,
                  dkim_key: KeyPair) -> list[Server]:
    cert, key = self_signed_pair(folder)
    servers = []
    if not args.skip_postfix:
        ensure_postfix()
        servers.append(start_postfix_dkim(stack, folder / "postfix-dkim", cert, key, dkim_key))
        servers.append(start_postfix_discard(stack, folder / "postfix-discard", cert, key))
    for tag, delivery in (("off", False), ("on", True)):
        url = plunkd_database(stack, folder, args.database_url, tag)
        servers.append(start_plunkd(stack, f"plunkd-{tag}", folder / f"plunkd-{tag}", cert, key, delivery, url,
                                    dkim_key))
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
                await client.sendmail(SENDER, [f"user{index % 500}@{RECIPIENT_DOMAIN}"], bodies[(index + worker) % 64])
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
    dkim: dict[str, str] = field(default_factory=dict)
    """Per delivering server: what the check of one delivered file's DKIM signature found."""

    def median(self, cell: Cell, server: str, attribute: str) -> float:
        values = [getattr(s, attribute) for s in self.samples.get((cell.name, server), [])]
        return statistics.median(values) if values else float("nan")


def measure(server: Server, cell: Cell, args: argparse.Namespace, results: Results) -> None:
    """One cell of one server. Its CPU is counted until the server is idle again, so work it put off
    (Postfix's deliveries, plunkd-on's dispatcher catching up) is paid by the messages that caused it."""
    cpu_before = tree_cpu_seconds(server.pids)
    load = asyncio.run(drive(server, cell, args.seconds, args.max_messages))
    rss = tree_rss_mb(server.pids) if server.rss else float("nan")
    results.settle_seconds[server.name] = (results.settle_seconds.get(server.name, 0.0)
                                           + wait_idle(server.pids, args.settle_cap))
    cpu = tree_cpu_seconds(server.pids) - cpu_before
    sample = Sample(load.ok / load.elapsed, cpu / load.ok * 1000 if load.ok else float("nan"), rss, load.errors)
    results.samples.setdefault((cell.name, server.name), []).append(sample)
    results.errors[server.name] = results.errors.get(server.name, 0) + load.errors
    results.accepted[server.name] = results.accepted.get(server.name, 0) + load.ok
    if load.first_error:
        results.first_errors.setdefault(server.name, load.first_error)


def warm_up(servers: list[Server], settle_cap: float) -> None:
    """A few messages each before timing: imports, first TLS handshakes, database caches."""
    cell = Cell("warm-up", 2000, 2, False)
    for server in servers:
        load = asyncio.run(drive(server, cell, 5.0, WARM_UP_MESSAGES))
        if load.errors:
            raise RuntimeError(f"{server.name} fails before the benchmark: {load.first_error}")
        wait_idle(server.pids, settle_cap)


SIGNER_MARKS = {"postfix-dkim": ("DKIM-Filter", "OpenDKIM Filter")}
"""A header (name, start of its value) that shows who signed: OpenDKIM's SoftwareHeader."""


def check_dkim(server: Server, public_b64: str, timeout: float = 15.0) -> str:
    """One file the server delivered must carry a DKIM-Signature for the bench's domain and selector that
    `dkim.verify` accepts with the bench's public key (a DNS stub answers the TXT record), and for
    Postfix the mark of OpenDKIM. Returns what was checked; raises if anything is missing."""
    deadline = time.monotonic() + timeout
    while not (files := sorted(glob.glob(server.deliveries))):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} delivered nothing to {server.deliveries} after the warm-up")
        time.sleep(0.2)
    data = Path(files[0]).read_bytes()
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
    signatures = [re.sub(r"\s+", "", value) for value in headers.get_all("DKIM-Signature", [])]
    wanted = (f"d={SENDER_DOMAIN}", f"s={SELECTOR}")
    if len(signatures) != 1 or not all(tag in signatures[0].split(";") for tag in wanted):
        raise RuntimeError(f"{server.name}: {files[0]} has no single DKIM-Signature with {' and '.join(wanted)}: "
                           f"{signatures}")
    mark = SIGNER_MARKS.get(server.name)
    if mark and not str(headers.get(mark[0], "")).startswith(mark[1]):
        raise RuntimeError(f"{server.name}: {files[0]} has no {mark[0]}: {mark[1]}… header")
    record = dkim_txt(public_b64).encode()

    def dns(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name.rstrip(b".") == f"{SELECTOR}._domainkey.{SENDER_DOMAIN}".encode() else None

    if not dkim.verify(data, dnsfunc=dns):
        raise RuntimeError(f"{server.name}: the DKIM signature of {files[0]} does not verify with the bench's key")
    signer = f", {mark[0]}: {headers[mark[0]]}" if mark else ""
    algorithm = next(tag for tag in signatures[0].split(";") if tag.startswith("a="))
    return f"d={SENDER_DOMAIN} s={SELECTOR} {algorithm} verified{signer}"


def run(servers: list[Server], cells: list[Cell], args: argparse.Namespace, public_b64: str) -> Results:
    results = Results()
    warm_up(servers, args.settle_cap)
    for server in servers:
        if server.deliveries:
            results.dkim[server.name] = check_dkim(server, public_b64)
    for rep in range(args.reps):
        order = servers[rep % len(servers):] + servers[:rep % len(servers)]
        print(f"rep {rep + 1}/{args.reps}: order {', '.join(s.name for s in order)}", flush=True)
        for cell in cells:
            for server in order:
                measure(server, cell, args, results)
    for server in servers:
        if server.deliveries:
            results.delivered[server.name] = len(glob.glob(server.deliveries))
    return results


# ---- the report -----------------------------------------------------------------------------

def ratio_text(value: float, base: float) -> str:
    if base != base or not base or value != value:
        return ""
    return f"({value / base:.2f})"


def print_rates(results: Results, cells: list[Cell]) -> None:
    print(f"{'cell':<26}{'PF dkim+Maildir':>16}{'PF discard':>11}{'plunkd off':>12}{'(/PFdis)':>9}"
          f"{'plunkd on':>11}{'(/PFdkim)':>10}{'aiosmtpd':>10}")
    for cell in cells:
        dkim_pf, discard, off, on, bare = (results.median(cell, name, "rate") for name in SERVER_NAMES)
        print(f"{cell.label:<26}{dkim_pf:>16,.0f}{discard:>11,.0f}{off:>12,.0f}{ratio_text(off, discard):>9}"
              f"{on:>11,.0f}{ratio_text(on, dkim_pf):>10}{bare:>10,.0f}")


def print_cpu_and_rss(results: Results, cells: list[Cell]) -> None:
    print(f"{'cell':<26}{'PF dkim+Maildir':>16}{'PF discard':>11}{'plunkd off':>12}{'plunkd on':>11}"
          f"{'(/PFdkim)':>10}{'aiosmtpd':>10}{'RSS off MB':>12}{'RSS on MB':>11}")
    for cell in cells:
        dkim_pf, discard, off, on, bare = (results.median(cell, name, "cpu_per_1000") for name in SERVER_NAMES)
        rss = [max((s.rss_mb for s in results.samples.get((cell.name, name), [])), default=float("nan"))
               for name in ("plunkd-off", "plunkd-on")]
        print(f"{cell.label:<26}{dkim_pf:>16.2f}{discard:>11.2f}{off:>12.2f}{on:>11.2f}{ratio_text(on, dkim_pf):>10}"
              f"{bare:>10.2f}{rss[0]:>12.0f}{rss[1]:>11.0f}")


def print_goal(results: Results, cells: list[Cell]) -> None:
    """Issue 24's aim: plunkd-on accepts at least as fast as postfix-dkim, with no more CPU per message."""
    for cell in cells:
        pf_rate, on_rate = (results.median(cell, name, "rate") for name in ("postfix-dkim", "plunkd-on"))
        pf_cpu, on_cpu = (results.median(cell, name, "cpu_per_1000") for name in ("postfix-dkim", "plunkd-on"))
        if pf_rate != pf_rate:
            return
        met = on_rate >= pf_rate and on_cpu <= pf_cpu
        print(f"{cell.label:<26}plunkd-on / postfix-dkim: rate {on_rate / pf_rate:.2f}x, CPU/1,000 "
              f"{on_cpu:.2f} s vs {pf_cpu:.2f} s: {'met' if met else 'MISSED'}")


def print_report(results: Results, cells: list[Cell], args: argparse.Namespace, servers: list[Server]) -> None:
    database = "PostgreSQL" if args.database_url else "SQLite"
    print(f"\naccepted msg/s, median of {args.reps} interleaved reps, {args.seconds:g} s per cell "
          f"(STARTTLS + AUTH PLAIN, 127.0.0.1, plunkd on {database}); (/PFdis) = ratio to Postfix discarding, "
          f"(/PFdkim) = ratio to Postfix + OpenDKIM + Maildir")
    print_rates(results, cells)
    print("\nserver CPU seconds per 1,000 accepted messages until idle again (median; all processes of the "
          "server, OpenDKIM's included), plunkd RSS (all its processes) at the end of the cell (max over reps)")
    print_cpu_and_rss(results, cells)
    print("\ngoal (issue 24): plunkd-on >= 1.0x postfix-dkim's rate with no more CPU per 1,000 messages")
    print_goal(results, cells)
    print("\nerrors (must be 0): " + ", ".join(f"{s.name} {results.errors.get(s.name, 0)}" for s in servers))
    for name, error in results.first_errors.items():
        print(f"  first error from {name}: {error}")
    print("waiting for idle after cells (s, total): "
          + ", ".join(f"{s.name} {results.settle_seconds.get(s.name, 0.0):.1f}" for s in servers))
    for name, delivered in results.delivered.items():
        print(f"{name} delivered {delivered:,} messages by the end; it accepted "
              f"{results.accepted.get(name, 0):,} in the cells (plus {WARM_UP_MESSAGES} in the warm-up)")
    for name, found in results.dkim.items():
        print(f"{name} DKIM check of one delivered file: {found}")


QUICK = {"cells": "2k-20-b2b", "reps": 1, "seconds": 2.0, "max_messages": 2000, "settle_cap": 5.0}
FULL = {"cells": DEFAULT_CELLS, "reps": 3, "seconds": 5.0, "max_messages": 20000, "settle_cap": SETTLE_CAP_SECONDS}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", help=f"comma-separated (default {DEFAULT_CELLS})")
    parser.add_argument("--reps", type=int, help=f"default {FULL['reps']}")
    parser.add_argument("--seconds", type=float, help=f"time cap of one cell of one server (default {FULL['seconds']})")
    parser.add_argument("--max-messages", type=int,
                        help=f"message cap of one cell of one server (default {FULL['max_messages']})")
    parser.add_argument("--settle-cap", type=float,
                        help=f"longest wait for a server to go idle after a cell (default {FULL['settle_cap']})")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run under a minute: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--skip-postfix", action="store_true", help="no Postfix columns (machines without apt)")
    parser.add_argument("--database-url", default="", help="run plunkd on PostgreSQL (postgresql+asyncpg://…)")
    args = parser.parse_args()
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.cell_list = [parse_cell(name) for name in args.cells.split(",") if name]
    return args


def main() -> int:
    args = parse_args()
    # SIGTERM unwinds like Ctrl-C, so every server started is stopped on the way out
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    began = time.monotonic()
    dkim_key = generate_key()  # plunkd's domain key, and OpenDKIM's
    try:
        with temp_dir() as folder, contextlib.ExitStack() as stack:
            servers = start_servers(stack, Path(folder), args, dkim_key)
            results = run(servers, args.cell_list, args, dkim_key[1])
    except KeyboardInterrupt:
        print("interrupted; the servers it started are stopped", file=sys.stderr)
        return 130
    except SetupError as exc:
        print(f"bench.postfix: {exc}", file=sys.stderr)
        return 2
    print_report(results, args.cell_list, args, servers)
    print(f"\nrun time {time.monotonic() - began:.0f} s")
    return 1 if any(results.errors.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
