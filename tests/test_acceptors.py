"""`server.processes` = 2: two acceptor processes of one `plunkd serve` on the same HTTP and SMTP ports
(SO_REUSEPORT), one dispatcher. Real processes on real ports, real clients, the test's database (SQLite
file or PostgreSQL); which process serves a connection is read from /proc (the process holding the
server's end of it)."""

from __future__ import annotations

import base64
import http.client
import json
import multiprocessing
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from email import message_from_bytes
from hashlib import blake2b
from pathlib import Path

import aiohttp
import pytest

from api.ratelimit import WindowRateLimiter
from core import host_counts
from core.config import ServerConfig, acceptor_processes
from core.host_counts import PROBES, HostCounts
from tests.dashboard_kit import PASSWORD, Browser
from tests.servers import ROOT, ServedPlunkd, children, served_plunkd
from tests.test_cli_and_config import project_with_domain
from tests.test_processes import command_line, wait_until

TLS = ssl.create_default_context()
TLS.check_hostname = False
TLS.verify_mode = ssl.CERT_NONE  # the relay's self-signed certificate (TLS itself is tested in test_relay_tls)


def acceptor_children(server: ServedPlunkd) -> list[int]:
    return [pid for pid in children(server.proc.pid) if "--role api,relay" in command_line(pid)]


def serving_pid(server: ServedPlunkd, client: socket.socket, seconds: float = 30) -> int:
    """The process (the main one or an acceptor child) that accepted `client`'s connection: the one whose
    descriptors hold the socket /proc/net/tcp lists for it."""
    server_port = client.getpeername()[1]
    ends = f"0100007F:{server_port:04X} 0100007F:{client.getsockname()[1]:04X}"

    def holder() -> int | None:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
        inodes = {fields[9] for fields in map(str.split, lines) if f"{fields[1]} {fields[2]}" == ends}
        for pid in [server.proc.pid, *children(server.proc.pid)]:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except FileNotFoundError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except FileNotFoundError:
                    continue
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return pid
        return None

    return wait_until(holder, seconds, "the process that accepted the connection")


def http_connection(server: ServedPlunkd) -> tuple[http.client.HTTPConnection, int]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.connect()
    return connection, serving_pid(server, connection.sock)


def call(connection: http.client.HTTPConnection, key: str, method: str = "POST", path: str = "/v1/send",
         body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    connection.request(method, path, body=data, headers={"Authorization": f"Bearer {key}",
                                                         "Content-Type": "application/json"})
    reply = connection.getresponse()
    return reply.status, json.loads(reply.read() or b"{}")


def smtp_message(to: str) -> str:
    return f"From: hello@example.com\r\nTo: {to}\r\nSubject: Acceptors\r\n\r\nHello {to}\r\n"


def delivered(outbox: Path) -> Counter:
    """Recipients of the files the file transport wrote, counted."""
    return Counter(message_from_bytes(path.read_bytes())["To"] for path in outbox.glob("*.eml"))


def start(tmp_path: Path, database_url: str, **extra: str):
    key, _, serving = start_with_project(tmp_path, database_url, **extra)
    return key, serving


def start_with_project(tmp_path: Path, database_url: str, **extra: str):
    """The project's secret key and id, and `plunkd serve` with two acceptors to enter (not yet started)."""
    env = {"PLUNKD_DATABASE_URL": database_url, "PLUNKD_DELIVERY_TRANSPORT": "file"}
    project = project_with_domain(tmp_path, "p", "hello@example.com", env)
    env.update({"PLUNKD_SERVER_PROCESSES": "2", "PLUNKD_API_RATE_LIMIT_PER_MINUTE": "100000", **extra})
    return project.secret_key, project.id, served_plunkd(tmp_path, env, relay=True)


def both_acceptors_up(server: ServedPlunkd, started: int = 2) -> int:
    """The acceptor child, once `started` acceptors in all (the main one, the child and any replaced) said
    their API and their relay listen."""
    server.wait(lambda: acceptor_children(server), 30, "the acceptor child")
    server.wait(lambda: server.log().count("plunkd API listening on") >= started
                and server.log().count("smtp relay on") >= started, 60, "both acceptors")
    return acceptor_children(server)[0]


def pids_answering(server: ServedPlunkd, tries: int = 40) -> tuple[set[int], set[int]]:
    """Which processes served `tries` HTTP connections (each GET /health answered 200) and `tries` SMTP
    sessions (each EHLO answered 250)."""
    http_pids, smtp_pids = set(), set()
    for _ in range(tries):
        connection, pid = http_connection(server)
        connection.request("GET", "/health")
        assert connection.getresponse().status == 200
        connection.close()
        http_pids.add(pid)
        with smtplib.SMTP_SSL("127.0.0.1", server.tls_port, context=TLS, timeout=30) as client:
            assert client.ehlo()[0] == 250
            smtp_pids.add(serving_pid(server, client.sock))
    return http_pids, smtp_pids


@pytest.mark.long
@pytest.mark.timeout(240)
def test_two_acceptors_both_answer_http_and_smtp_and_every_message_is_delivered_once(tmp_path, database_url):
    key, serving = start(tmp_path, database_url)
    with serving as server:
        child = both_acceptors_up(server)
        http_pids, smtp_pids = pids_answering(server)
        assert http_pids == smtp_pids == {server.proc.pid, child}

        api_to = [f"api{i}@example.org" for i in range(100)]
        smtp_to = [f"smtp{i}@example.org" for i in range(100)]

        def by_api(recipients: list[str]) -> None:
            for to in recipients:
                connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
                assert call(connection, key, body={"to": to, "subject": "Hi", "body": "Hello"})[0] == 200
                connection.close()

        def by_smtp(recipients: list[str]) -> None:
            for to in recipients:  # a session per message, so the kernel spreads them over both acceptors
                with smtplib.SMTP_SSL("127.0.0.1", server.tls_port, context=TLS, timeout=30) as client:
                    client.login("plunk", key)
                    assert client.sendmail("hello@example.com", [to], smtp_message(to)) == {}

        with ThreadPoolExecutor(8) as pool:
            for done in [pool.submit(by_api, api_to[i::4]) for i in range(4)] + \
                        [pool.submit(by_smtp, smtp_to[i::4]) for i in range(4)]:
                done.result()
        outbox = tmp_path / "data" / "outbox"
        wait_until(lambda: sum(delivered(outbox).values()) >= 200, 60, "200 deliveries", server.log_path)
        time.sleep(1)  # a duplicate would come right after
        assert delivered(outbox) == Counter(api_to + smtp_to)


@pytest.mark.long
@pytest.mark.timeout(240)
def test_an_acceptor_killed_while_clients_send_loses_nothing_acknowledged_and_is_replaced(tmp_path, database_url):
    key, serving = start(tmp_path, database_url)
    with serving as server:
        child = both_acceptors_up(server)
        acknowledged: list[str] = []
        refused: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def keep_sending(kind: str, worker: int) -> None:
            index = 0
            while not stop.is_set():
                to = f"{kind}{worker}-{index}@example.org"
                index += 1
                try:
                    if kind == "api":
                        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
                        ok = call(connection, key, body={"to": to, "subject": "Hi", "body": "Hello"})[0] == 200
                        connection.close()
                    else:
                        with smtplib.SMTP_SSL("127.0.0.1", server.tls_port, context=TLS, timeout=30) as client:
                            client.login("plunk", key)
                            ok = client.sendmail("hello@example.com", [to], smtp_message(to)) == {}
                except (OSError, smtplib.SMTPException, http.client.HTTPException):
                    ok = False  # cut by the kill: not acknowledged, so the client would send it again
                with lock:
                    (acknowledged if ok else refused).append(to)

        threads = [threading.Thread(target=keep_sending, args=(kind, worker))
                   for kind in ("api", "smtp") for worker in range(3)]
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: len(acknowledged) >= 60, 60, "60 acknowledged messages", server.log_path)
            os.kill(child, signal.SIGKILL)
            replacement = wait_until(lambda: [pid for pid in acceptor_children(server) if pid != child], 30,
                                     "a new acceptor process", server.log_path)[0]
            sent_at_kill = len(acknowledged)
            wait_until(lambda: len(acknowledged) >= sent_at_kill + 60, 60, "60 more acknowledged messages",
                       server.log_path)
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        assert f"acceptor 1 process {child} exited with -9" in server.log()
        http_pids, smtp_pids = pids_answering(server, 20)
        assert http_pids == smtp_pids == {server.proc.pid, replacement}

        outbox = tmp_path / "data" / "outbox"
        wait_until(lambda: set(delivered(outbox)) >= set(acknowledged), 60, "every acknowledged message delivered",
                   server.log_path)
        time.sleep(1)
        counts = delivered(outbox)
        assert max(counts.values()) == 1
        assert set(counts) <= set(acknowledged) | set(refused)


@pytest.mark.long
@pytest.mark.timeout(180)
def test_the_api_limit_and_the_smtp_lockout_hold_over_both_acceptors(tmp_path, database_url):
    key, serving = start(tmp_path, database_url, PLUNKD_API_RATE_LIMIT_PER_MINUTE="10",
                         PLUNKD_SMTP_AUTH_FAILURE_LIMIT="5")
    with serving as server:
        child = both_acceptors_up(server)
        if time.time() % 60 > 40:  # the window is a calendar minute: all of the test's requests in one
            time.sleep(61 - time.time() % 60)
        connections: dict[int, list[http.client.HTTPConnection]] = {server.proc.pid: [], child: []}
        while min(len(held) for held in connections.values()) < 6:
            connection, pid = http_connection(server)
            connections[pid].append(connection)
        first, second = connections[server.proc.pid], connections[child]
        for connection in first[:5] + second[:5]:
            assert call(connection, key, "GET", "/v1/contacts")[0] == 200
        for connection in (first[5], second[5]):
            status, body = call(connection, key, "GET", "/v1/contacts")
            assert status == 429 and body["error"]["code"] == "RATE_LIMIT_EXCEEDED"

        sessions: dict[int, list[smtplib.SMTP_SSL]] = {server.proc.pid: [], child: []}
        while min(len(held) for held in sessions.values()) < 3:
            client = smtplib.SMTP_SSL("127.0.0.1", server.tls_port, context=TLS, timeout=30)
            client.ehlo()
            sessions[serving_pid(server, client.sock)].append(client)
        wrong = base64.b64encode(b"\0plunk\0sk_wrong").decode()
        attempts = sessions[server.proc.pid][:3] + sessions[child][:2]
        for client in attempts:
            assert client.docmd("AUTH", f"PLAIN {wrong}")[0] == 535
        right = base64.b64encode(f"\0plunk\0{key}".encode()).decode()
        for client in (sessions[server.proc.pid][2], sessions[child][2]):
            code, text = client.docmd("AUTH", f"PLAIN {right}")
            assert (code, text.decode()) == (454, "4.7.0 Too many failed authentications from your address; "
                                                  "try again later")


async def test_a_key_rotated_on_one_acceptor_stops_working_on_the_other_at_once(tmp_path, database_url):
    """SQLite has no NOTIFY: the acceptors learn of a key change from the table they share (PostgreSQL's
    LISTEN/NOTIFY tells every process, as for several nodes)."""
    key, project_id, serving = start_with_project(tmp_path, database_url)
    made = subprocess.run([sys.executable, "-m", "plunkd.cli", "user", "create", "--email", "owner@example.com",
                           "--role", "owner", "--password-stdin"], input=PASSWORD + "\n", capture_output=True,
                          text=True, cwd=tmp_path, timeout=60,
                          env={**os.environ, "PLUNKD_SERVER_DATA_DIR": str(tmp_path / "data"),
                               "PLUNKD_DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)})
    assert made.returncode == 0, made.stderr
    with serving as server:
        child = both_acceptors_up(server)
        connections: dict[int, http.client.HTTPConnection] = {}
        while len(connections) < 2:
            connection, pid = http_connection(server)
            connections.setdefault(pid, connection)
        for connection in connections.values():  # the key now in both processes' key caches
            assert call(connection, key, "GET", "/v1/contacts")[0] == 200
        async with aiohttp.ClientSession(base_url=server.base, cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            owner = Browser(session)
            await owner.sign_in("owner@example.com")
            status, body = await owner.get_json(f"/projects/{project_id}/keys")
            assert status == 200, body
            key_id = body["data"]["secretKeys"][0]["id"]
            await owner.get(f"/projects/{project_id}/keys")
            rotated = await owner.post(f"/projects/{project_id}/keys/{key_id}/rotate")
            assert rotated.status == 200
        if database_url.startswith("postgresql"):  # the other process hears the NOTIFY a moment after the commit
            time.sleep(0.5)
        for pid in (server.proc.pid, child):
            status, body = call(connections[pid], key, "GET", "/v1/contacts")
            assert status == 401 and body["error"]["code"] == "UNAUTHORIZED", (pid, status, body)


def test_a_port_in_use_still_fails_start_up_and_one_process_runs_acceptance_alone(tmp_path, database_url):
    """With SO_REUSEPORT a second plunkd (same user) could join the ports of a running one unnoticed: the main
    process binds each port once without it first, so a port in use fails as before. And with
    processes = 1 acceptance stays in the main process, as before the option (the dispatcher its only child)."""
    env = {"PLUNKD_DATABASE_URL": database_url}
    with served_plunkd(tmp_path, {**env, "PLUNKD_SERVER_PROCESSES": "2"}, relay=True) as running:
        both_acceptors_up(running)
        second = served_plunkd(tmp_path, {**env, "PLUNKD_SERVER_PROCESSES": "2"}, port=running.port,
                               log_name="second.log", wait_for=None)
        with second as other:
            assert other.proc.wait(30) == 1
        assert f"cannot listen on 127.0.0.1:{running.port}: address already in use" in other.log()
    with served_plunkd(tmp_path, {**env, "PLUNKD_SERVER_PROCESSES": "1"}, relay=True, log_name="one.log") as alone:
        wait_until(lambda: children(alone.proc.pid), 30, "the dispatcher process")
        time.sleep(1)
        assert [command_line(pid).split("--role ")[-1].strip() for pid in children(alone.proc.pid)] == ["dispatcher"]
        for port in (alone.port, alone.tls_port, alone.starttls_port):
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
            assert serving_pid(alone, client) == alone.proc.pid
            client.close()


@pytest.mark.parametrize("cores, processes", [(1, 1), (2, 1), (4, 3), (16, 15)])
def test_processes_default_to_one_per_core_beyond_the_first(monkeypatch, cores, processes):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)))
    assert acceptor_processes(ServerConfig()) == processes
    assert acceptor_processes(ServerConfig(processes=2)) == 2


def _take_many(path: str, project: str, takes: int, admitted) -> None:
    limiter = WindowRateLimiter(2500, counts=HostCounts(Path(path)))
    admitted.put(sum(limiter.take(project).allowed for _ in range(takes)))


def test_the_shared_counts_admit_exactly_the_limit_over_four_processes(tmp_path):
    path = tmp_path / "counts"
    HostCounts(path, fresh=True)
    if time.time() % 60 > 50:
        time.sleep(61 - time.time() % 60)
    admitted = multiprocessing.get_context("spawn").Queue()
    workers = [multiprocessing.get_context("spawn").Process(target=_take_many, args=(str(path), "p", 1000, admitted))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    totals = [admitted.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(10)
    assert sum(totals) == 2500


def test_a_full_neighbourhood_gives_up_the_slot_expiring_first_and_a_lookup_takes_none(tmp_path, monkeypatch):
    monkeypatch.setattr(host_counts, "SLOTS", 32)
    counts = HostCounts(tmp_path / "counts", fresh=True)

    def home(name: str) -> int:
        return int.from_bytes(blake2b(name.encode(), digest_size=16).digest()[:8], "little") % 32

    names = (f"k{index}" for index in range(100_000))
    keys = [name for name in names if home(name) == 0][:PROBES + 1]
    for name in keys:  # a lookup of a key not counted stores nothing
        assert counts.update(name, lambda count, since, now: (count, since, now + 1)) == (0, 0.0)
    for offset, name in enumerate(keys[:PROBES]):
        counts.update(name, lambda count, since, now, offset=offset: (count + 1, now, now + 100 + offset))
    counts.update(keys[PROBES], lambda count, since, now: (count + 1, now, now + 500))
    still = [counts.update(name, lambda count, since, now: (count, since, now + 200))[0] for name in keys]
    assert still == [0] + [1] * PROBES
