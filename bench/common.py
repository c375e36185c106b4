"""Helpers shared by the benchmarks: start a server process on a free loopback port, load it over
HTTP with a bounded number of requests and a time cap, and print rates side by side."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import Table, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session

from core.keys import format_key, new_key, parse_key
from storage.secrets import KeyRing, use_keyring
from testkit.ports import claim_port

ROOT = Path(__file__).resolve().parent.parent
ENCRYPTION_KEY = format_key(new_key())
"""One key for every plunkd process a benchmark run starts (their data dirs differ) and for the benchmark's
own writes of DKIM keys and webhook secrets (`use_bench_key`)."""


def use_bench_key() -> None:
    """Seal and open secrets in this process with the run's key, as the servers it starts do."""
    use_keyring(KeyRing([parse_key(ENCRYPTION_KEY)], "the benchmark's key"))


def insert_into(table: Table, rows: list[dict[str, Any]]) -> Callable[[Session], None]:
    """A `Database.write` function inserting `rows` into `table` (one per batch: each binds its own rows)."""
    def write(session: Session) -> None:
        session.connection().execute(table.insert(), rows)

    return write


BENCH_PORTS = range(10000, 20000)
"""Benchmark servers' ports: below the test processes' slices (tests/servers.py, from 20000) and Linux's
ephemeral range (32768-60999), so neither a test beside a benchmark (CI runs them side by side) nor a client
connection takes a port between its pick and the server's bind."""


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


def process_tree(roots: tuple[int, ...], table: dict[int, tuple[int, int]]) -> list[int]:
    """`roots` and all their living descendants."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    tree, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def tree_cpu_seconds(roots: tuple[int, ...]) -> float:
    """CPU seconds of `roots` and all their descendants, including those that already exited and were
    reaped (their time is in the parent's cutime/cstime). Only differences of two calls mean anything."""
    table = process_table()
    return sum(table.get(pid, (0, 0))[1] for pid in process_tree(roots, table)) / TICK


def machine_busy_seconds() -> float:
    """CPU seconds all of this machine's cores spent on anything but idling (or waiting for the disk) since it
    started, from /proc/stat. Only differences of two calls mean anything."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK


def free_port() -> int:
    """A port of `BENCH_PORTS` that nothing listens on now, claimed by this process (`claim_port`): no other
    benchmark picks it while this one runs."""
    for port in random.sample(BENCH_PORTS, len(BENCH_PORTS)):
        if claim_port(port):
            return port
    raise RuntimeError(f"no free port in {BENCH_PORTS}")


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listened on port {port} within {timeout}s")


def wait_for_health(port: int, timeout: float = 30.0) -> None:
    """Until plunkd's GET /health answers 200: it binds its ports before it starts (migrations, the relay's
    certificate), so a port that accepts does not yet mean a server that answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"plunkd on port {port} did not answer /health within {timeout}s")


def wait_for_every_acceptor(port: int, timeout: float = 60.0) -> None:
    """Until 20 GET /health in a row, each on a new connection, answer within a second: with several
    acceptor processes (`--processes`), a connection the kernel gave to one still starting waits in its
    backlog, so the run would begin with part of the server."""
    deadline = time.monotonic() + timeout
    answered = 0
    while answered < 20:
        if time.monotonic() > deadline:
            raise RuntimeError(f"plunkd's acceptors on port {port} did not all answer within {timeout}s")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
            answered += 1
        except OSError:
            answered = 0


@contextlib.contextmanager
def server_process(args: list[str], port: int,
                   env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Run a server for the benchmark (yields its process); its log goes to a file (a pipe nobody reads
    would fill and stall it) whose tail is printed when the benchmark fails."""
    with tempfile.TemporaryFile() as log_file:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, **(env or {})},
                                stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            wait_for_port(port)
            if "PLUNKD_SERVER_HTTP_PORT" in (env or {}):
                wait_for_health(int((env or {})["PLUNKD_SERVER_HTTP_PORT"]))
                if int((env or {}).get("PLUNKD_SERVER_PROCESSES", "1")) > 1:
                    wait_for_every_acceptor(int((env or {})["PLUNKD_SERVER_HTTP_PORT"]))
            yield proc
        except BaseException:
            log_file.seek(0)
            sys.stderr.write(log_file.read()[-4000:].decode("utf-8", "replace"))
            raise
        finally:
            stop_process(proc)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not ended within 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def plunkd_env(data_dir: str, port: int, **extra: str) -> dict[str, str]:
    return {"PLUNKD_SERVER_DATA_DIR": data_dir, "PLUNKD_SERVER_HTTP_PORT": str(port),
            "PLUNKD_SECURITY_ENCRYPTION_KEY": ENCRYPTION_KEY,
            "PLUNKD_SMTP_ENABLED": "false", "PLUNKD_DELIVERY_ENABLED": "false",
            "PLUNKD_SERVER_LOG_LEVEL": "WARNING", "PLUNKD_API_RATE_LIMIT_PER_MINUTE": "100000000", **extra}


def create_project(data_dir: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-m", "plunkd.cli", "project", "create", "--name", "bench",
                          "--from-email", "bench@bench.example"], cwd=ROOT,
                         env={**os.environ, "PLUNKD_SECURITY_ENCRYPTION_KEY": ENCRYPTION_KEY, **env},
                         capture_output=True, text=True, check=True).stdout
    return next(line.split()[-1] for line in out.splitlines() if line.startswith("secret key"))


async def http_load(url: str, make_body: Callable[[int], dict], headers: dict[str, str], concurrency: int,
                    count: int, max_seconds: float) -> tuple[float, int, int]:
    """POST `count` bodies with `concurrency` workers (stops at `max_seconds`); returns (rate, ok, errors)."""
    next_index = 0
    ok = errors = 0
    deadline = time.monotonic() + max_seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker() -> None:
            nonlocal next_index, ok, errors
            while next_index < count and time.monotonic() < deadline:
                index = next_index
                next_index += 1
                async with session.post(url, json=make_body(index), headers=headers) as resp:
                    await resp.read()
                    if resp.status == 200:
                        ok += 1
                    else:
                        errors += 1

        for warm in range(min(50, count)):
            async with session.post(url, json=make_body(-warm - 1), headers=headers) as resp:
                await resp.read()
        started = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        elapsed = time.perf_counter() - started
    return (ok + errors) / elapsed, ok, errors


def parse_with_quick(parser: argparse.ArgumentParser, **quick: Any) -> argparse.Namespace:
    """Parse a benchmark's options, with `--quick` added: a smoke run of seconds (CI runs every benchmark so and
    fails on a non-zero exit), in which the options named in `quick` take those values unless given."""
    shown = ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in quick.items())
    parser.add_argument("--quick", action="store_true", help=f"a smoke run of a few seconds ({shown})")
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args()
    return args


def http_bench_args(default_count: int) -> argparse.Namespace:
    """The options of the HTTP benchmarks (bench.track, bench.send)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=default_count)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--processes", type=int, default=1,
                        help="plunkd's acceptor processes (server.processes; default 1: acceptance in one process)")
    return parse_with_quick(parser, count=200, seconds=10.0)


def bare_databases(database_url: str, folder: str) -> list[tuple[str, list[str]]]:
    """The (database, options) of each run of a bare insert server (bench.bare_insert_server): on PostgreSQL one
    run in plunkd's database; on SQLite one with an fsync per commit (synchronous=FULL, plunkd's durability) and
    one without (NORMAL), each on a new file."""
    if database_url.startswith("postgresql"):
        return [(database_url, [])]
    return [(f"{folder}/bare-{mode.lower()}.sqlite3", ["--synchronous", mode]) for mode in ("FULL", "NORMAL")]


@contextlib.contextmanager
def bare_insert_servers(database_url: str, folder: str) -> Iterator[list[str]]:
    """The baseline: bare aiohttp handlers doing one insert per request (bench.bare_insert_server), one per
    `bare_databases` (plunkd's durability first), all running; yields their URLs in that order."""
    with contextlib.ExitStack() as servers:
        urls = []
        for database, options in bare_databases(database_url, folder):
            port = free_port()
            servers.enter_context(server_process(["-m", "bench.bare_insert_server", database, str(port), *options],
                                                 port))
            urls.append(f"http://127.0.0.1:{port}/insert")
        yield urls


INTERLEAVED_ROUNDS = 6


def _body_after(make_body: Callable[[int], dict], offset: int, index: int) -> dict:
    return make_body(offset + index)


def interleaved_rates(targets: list[tuple[str, dict[str, str]]], make_body: Callable[[int], dict],
                      args: argparse.Namespace) -> list[float]:
    """The same load (`args.count` requests, `args.concurrency` at a time) on each (url, headers) target, in
    turns: `INTERLEAVED_ROUNDS` rounds, each giving every target its share one after the other; a target's rate
    is its requests over its own seconds. On these shared 2-core machines a server's throughput drifts by up to
    1.7x within minutes (the same code measured minutes apart), so loading plunkd and then the baseline put that
    drift into the ratio; in turns it falls on both alike. Every request must succeed."""
    share = max(1, args.count // INTERLEAVED_ROUNDS)
    requests, seconds = [0] * len(targets), [0.0] * len(targets)
    for round_index in range(INTERLEAVED_ROUNDS):
        bodies = functools.partial(_body_after, make_body, round_index * share)
        for index, (url, headers) in enumerate(targets):
            rate, ok, errors = asyncio.run(http_load(url, bodies, headers, args.concurrency, share,
                                                     args.seconds / INTERLEAVED_ROUNDS))
            assert errors == 0, f"{errors} of {ok + errors} requests to {url} failed"
            requests[index] += ok
            seconds[index] += ok / rate
    return [done / spent for done, spent in zip(requests, seconds, strict=True)]


def temp_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="plunkd-bench-")


def report(title: str, ours: float, baseline: float, unit: str, aim: float | None = None,
           unsynced: float | None = None) -> None:
    """Print our rate, the baseline's and the ratio; `unsynced`, when given, is the same baseline without an fsync
    per commit (SQLite synchronous=NORMAL), printed with its ratio on a second line."""
    aim_text = f"  (aim >= {aim})" if aim is not None else ""
    print(f"{title}: plunkd {ours:,.0f} {unit}, baseline {baseline:,.0f} {unit}, ratio {ratio(ours, baseline):.2f}"
          f"{aim_text}")
    if unsynced is not None:
        print(f"    beside the baseline with synchronous=NORMAL (no fsync per commit): {unsynced:,.0f} {unit}, "
              f"ratio {ratio(ours, unsynced):.2f}")


def ratio(ours: float, baseline: float) -> float:
    return ours / baseline if baseline else float("nan")


DURABILITY_SETTINGS = ("fsync", "synchronous_commit", "full_page_writes")
"""PostgreSQL settings a production server keeps on: with any of them off, a commit costs the server less than it
does for a user, for plunkd and for the baselines alike."""


async def settings_off(server_url: str) -> list[str]:
    """Which of `DURABILITY_SETTINGS` the server runs with off, each as `name=off`."""
    engine = create_async_engine(server_url)
    async with engine.connect() as conn:
        shown = {name: (await conn.execute(text(f"SHOW {name}"))).scalar_one() for name in DURABILITY_SETTINGS}
    await engine.dispose()
    return [f"{name}={value}" for name, value in shown.items() if value == "off"]


@contextlib.contextmanager
def fresh_database(server_url: str, icu_locale: str = "") -> Iterator[str]:
    """A new, empty PostgreSQL database on `server_url`'s server for this run, dropped afterwards (the
    database named in the URL is only used to connect). The one way every benchmark gets a PostgreSQL database
    (`bench_database` chooses between it and an SQLite file). `icu_locale` (such as en-US): the database's
    text compares by that ICU locale, as on a server initialized with a language's locale (the postgres
    image's default is en_US), instead of by the server's default."""
    name = f"plunkd_bench_{uuid.uuid4().hex[:10]}"
    if icu_locale and not re.fullmatch(r"[A-Za-z0-9_-]+", icu_locale):
        raise ValueError(f"not an ICU locale name: {icu_locale!r}")
    made_with = f" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE '{icu_locale}'" if icu_locale else ""

    async def admin(statement: str) -> None:
        engine = create_async_engine(server_url, isolation_level="AUTOCOMMIT")
        async with engine.connect() as conn:
            await conn.execute(text(statement))
        await engine.dispose()

    asyncio.run(admin(f'CREATE DATABASE "{name}"{made_with}'))
    off = asyncio.run(settings_off(server_url))
    if off:
        print(f"warning: this PostgreSQL server runs with {', '.join(off)} (as .ci/run sets its own): its commits "
              "are not made durable as a production server's are, so these figures are not comparable with one's",
              file=sys.stderr)
    try:
        yield server_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def bench_database(server_url: str, folder: str, icu_locale: str = "") -> Iterator[str]:
    """plunkd's database for a run: a fresh PostgreSQL database on `server_url`'s server (`fresh_database`), or
    without one a new SQLite file in `folder`."""
    if server_url:
        with fresh_database(server_url, icu_locale) as url:
            yield url
    else:
        yield f"sqlite+aiosqlite:///{folder}/plunkd.sqlite3"
