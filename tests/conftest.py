"""Shared fixtures: a real database (an SQLite file of its own, or the session's PostgreSQL database
emptied, when PLUNKD_TEST_DATABASE_URL is set; either migrated once per session), the real app through
aiohttp's test client, and a project."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web_app as aiohttp_web_app
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import create_async_engine

from api.context import DB
from core.config import Config
from core.keys import new_key
from pipeline.projects import create_project
from plunkd.app import create_app
from storage.db import Database
from storage.models import Base
from storage.secrets import KeyRing, use_keyring
from tests.webhook_receiver import Receiver, start_receiver

PG_URL = os.environ.get("PLUNKD_TEST_DATABASE_URL", "")


async def _postgres_admin(*statements: str) -> None:
    admin = create_async_engine(PG_URL, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        for statement in statements:
            await conn.execute(text(statement))
    await admin.dispose()


def _database_at(name: str) -> str:
    return PG_URL.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(autouse=True)
def _forget_finished_apps() -> Iterator[None]:
    """aiohttp caches each handler's middleware chain keyed by its application, up to 1,024 of them: in a
    process that makes an app per test that keeps every finished test's app (routes, templates, engine)
    alive, and the test process grew past a gigabyte with garbage collections slowing every test."""
    yield
    aiohttp_web_app._cached_build_middleware.cache_clear()


@pytest.fixture(autouse=True)
def _umask_kept() -> Iterator[None]:
    """`plunkd.cli.main` sets plunkd's private umask (077) for the rest of its process; a test that calls it
    would otherwise hand it to every later test of its worker (a private Postfix then cannot read its own
    queue)."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield
    os.umask(previous)


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory) -> Path | None:
    """An SQLite file migrated once per session (None on PostgreSQL); each SQLite test starts from a copy of
    it (`database_url`): a copy takes a millisecond where running every migration takes a tenth of a second."""
    if PG_URL:
        return None
    path = tmp_path_factory.mktemp("migrated") / "template.sqlite3"

    async def migrate() -> None:
        db = Database(f"sqlite+aiosqlite:///{path}")
        await db.migrate()
        await db.dispose()

    asyncio.run(migrate())
    return path


@pytest.fixture(scope="session")
def migrated_database() -> Iterator[str | None]:
    """On PostgreSQL, one database migrated once per session; each test starts from it emptied
    (`database_url`), which costs a fraction of creating and migrating a database per test."""
    if not PG_URL:
        yield None
        return
    name = f"plunkd_t_{uuid.uuid4().hex[:12]}"

    async def migrate() -> None:
        await _postgres_admin(f'CREATE DATABASE "{name}"')
        db = Database(_database_at(name), 2)
        await db.migrate()
        await db.dispose()

    asyncio.run(migrate())
    yield _database_at(name)
    asyncio.run(_postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def database_url(tmp_path, migrated_sqlite, migrated_database):
    """A database for one test: a copy of the session's migrated SQLite file, or the session's PostgreSQL
    database with every row deleted (a server a previous test left connected is cut off first, so
    nothing can hold a lock)."""
    if migrated_sqlite is not None:
        path = tmp_path / "test.sqlite3"
        shutil.copyfile(migrated_sqlite, path)
        path.chmod(0o600)
        yield f"sqlite+aiosqlite:///{path}"
        return
    assert migrated_database is not None
    name = migrated_database.rsplit("/", 1)[1]
    await _postgres_admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          f"WHERE datname = '{name}' AND pid <> pg_backend_pid()")
    engine = create_async_engine(migrated_database)
    async with engine.begin() as conn:
        await conn.execute(text("SET LOCAL lock_timeout = '10s'"))
        for table in reversed(Base.metadata.sorted_tables):  # a test's few rows: DELETE is 3× faster than TRUNCATE
            await conn.execute(table.delete())
    await engine.dispose()
    yield migrated_database


@pytest.fixture
async def empty_database_url(tmp_path):
    """A database with no schema at all (for migration tests)."""
    if not PG_URL:
        yield f"sqlite+aiosqlite:///{tmp_path / 'test.sqlite3'}"
        return
    name = f"plunkd_t_{uuid.uuid4().hex[:12]}"
    await _postgres_admin(f'CREATE DATABASE "{name}"')
    yield _database_at(name)
    await _postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def db(database_url):
    """The test's database, migrated, without an app (storage-level tests), with a key to seal secrets."""
    use_keyring(KeyRing([new_key()], "the test's key"))
    database = Database(database_url)
    await database.migrate()
    yield database
    await database.dispose()


@pytest.fixture
def config(tmp_path, database_url) -> Config:
    cfg = Config()
    cfg.server.data_dir = str(tmp_path / "data")
    cfg.database.url = database_url
    cfg.smtp.enabled = False
    cfg.delivery.enabled = False
    # One heartbeat at start, none later: its writes every few seconds would show in the tests that count a
    # page's statements or compare every row before and after (a served plunkd's own heartbeats are tested).
    cfg.server.heartbeat_seconds = 3600
    cfg.server.node_stale_seconds = 7200
    return cfg


@dataclass
class Api:
    """The running app, a project in it and its keys, with request helpers."""

    client: Any
    db: Database
    project_id: str
    sk: str
    pk: str

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.sk}"}

    async def call(self, method: str, path: str, key: str | None = None, **kwargs) -> tuple[int, dict]:
        resp = await self.client.request(method, path, headers={**self.auth(key), **kwargs.pop("headers", {})},
                                         **kwargs)
        return resp.status, await resp.json()

    async def new_project(self, name: str = "other") -> tuple[str, str, str]:
        issued = await self.db.write(lambda s: create_project(s, name, f"hello@{name}.example", name))
        return issued.project.id, issued.secret_key, issued.public_key


@pytest.fixture
async def api(aiohttp_client, config) -> Api:
    app = create_app(config)
    client = await aiohttp_client(app)
    db = app[DB]
    issued = await db.write(lambda s: create_project(s, "test", "hello@example.com", "Test"))
    return Api(client, db, issued.project.id, issued.secret_key, issued.public_key)


@dataclass
class Dash:
    """The app of `api` (with its project), and its dashboard seen by browsers: `owner` is signed in as the
    instance's owner; `browser()` is another visitor with cookies of its own."""

    api: Api
    owner: Any
    sessions: list[Any]

    async def browser(self, email: str | None = None, role: str = "viewer") -> Any:
        """A new visitor; with `email`, a member of the api's project with `role`, signed in."""
        import aiohttp

        from tests.dashboard_kit import Browser, make_user

        session = aiohttp.ClientSession(base_url=str(self.api.client.make_url("/")),
                                        cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.sessions.append(session)
        visitor = Browser(session)
        if email is not None:
            await make_user(self.api.db, email, project_id=self.api.project_id, role=role)
            await visitor.sign_in(email)
        return visitor


@pytest.fixture
async def dash(api) -> Any:
    from tests.dashboard_kit import Browser, make_user

    await make_user(api.db, "owner@example.com", instance_owner=True)
    owner = Browser(api.client)
    response = await owner.sign_in("owner@example.com")
    assert response.status == 303, await response.text()
    board = Dash(api, owner, [])
    yield board
    for session in board.sessions:
        await session.close()


@pytest.fixture
async def dns_server():
    from tests.servers import start_dns

    server = await start_dns()
    yield server
    server.transport.close()


@pytest.fixture
def dns_config(config, dns_server) -> Config:
    config.dns.nameservers = ["127.0.0.1"]
    config.dns.port = dns_server.port
    config.dns.timeout_seconds = 2.0
    return config


@pytest.fixture
async def sink():
    from tests.servers import SinkHandler, start_sink

    handler = SinkHandler()
    server, port = await start_sink(handler)
    handler.port = port
    yield handler
    server.close()
    await server.wait_closed()


@pytest.fixture(scope="session")
def moto_server():
    from tests.servers import MotoServer

    server = MotoServer()
    yield server
    server.stop()


@contextlib.contextmanager
def counted_commits(db: Database) -> Iterator[list[int]]:
    """The commits made on `db` while the block runs, one item each, counted at the engine its writer commits
    through (SQLite's own engine or PostgreSQL's async engine's)."""
    engine = db.sync_engine if db.sync_engine is not None else db.engine.sync_engine
    commits: list[int] = []

    def count(_conn) -> None:
        commits.append(1)

    event.listen(engine, "commit", count)
    try:
        yield commits
    finally:
        event.remove(engine, "commit", count)


async def add_verified_domain(api: Api, dns_server, name: str = "example.com") -> dict:
    """Add the domain over the API, publish its records in the test DNS server, verify it."""
    status, body = await api.call("POST", "/domains", json={"domain": name})
    assert status == 201, body
    dns_server.publish(body["data"]["records"])
    status, body = await api.call("POST", f"/domains/{body['data']['id']}/verify")
    assert status == 200 and body["data"]["verified"] is True, body
    return body["data"]


@pytest.fixture
async def sender(api, dns_config, dns_server) -> dict:
    """A project whose default sender domain example.com is verified; returns the domain JSON."""
    return await add_verified_domain(api, dns_server)


@dataclass
class RelayEnv:
    """The app with its SMTP relay on ephemeral loopback ports, a trusted test CA, a verified domain."""

    api: Api
    tls_port: int
    starttls_port: int
    client_tls: Any
    domain: dict
    config: Config
    app: Any


@pytest.fixture(scope="session")
def test_ca():
    import trustme

    return trustme.CA()


@pytest.fixture
async def relay(aiohttp_client, dns_config, dns_server, test_ca, tmp_path) -> RelayEnv:
    from plunkd.app import RELAY

    cert = test_ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "relay.pem"))
    dns_config.smtp.enabled = True
    dns_config.smtp.host = "127.0.0.1"
    dns_config.smtp.tls_port = 0
    dns_config.smtp.starttls_port = 0
    dns_config.smtp.cert_file = dns_config.smtp.key_file = str(tmp_path / "relay.pem")
    dns_config.smtp.max_message_bytes = 2 * 1024 * 1024
    dns_config.smtp.max_recipients = 50
    app = create_app(dns_config)
    client = await aiohttp_client(app)
    db = app[DB]
    issued = await db.write(lambda s: create_project(s, "relay", "hello@example.com", "Relay"))
    api = Api(client, db, issued.project.id, issued.secret_key, issued.public_key)
    domain = await add_verified_domain(api, dns_server)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies host and chain, trusting only the test CA
    test_ca.configure_trust(context)
    relay_server = app[RELAY]
    return RelayEnv(api, relay_server.tls_port, relay_server.starttls_port, context, domain, dns_config, app)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "postgres_only: needs PostgreSQL (several nodes sharing one server, the "
                                       "cluster; or a server-side sleep to cancel); run in the PostgreSQL pass "
                                       "(PLUNKD_TEST_DATABASE_URL), left out of the SQLite one")
    config.addinivalue_line("markers", "any_database: what it checks is the same on every database (it serves "
                                       "plunkd on the test's database only to have pages: the browser tests, whose "
                                       "pages' queries the HTTP tests of those pages run on both): SQLite pass only")
    config.addinivalue_line("markers", "long: takes ten seconds or more; started first, so that parallel workers "
                                       "(pytest -n) do not wait at the end for one of these")


DATABASE_FIXTURES = {"database_url", "empty_database_url", "migrated_database"}


def pytest_collection_modifyitems(config, items) -> None:
    """Two passes over one suite (CI runs both), each test where it can tell something:
    * without PLUNKD_TEST_DATABASE_URL, cluster tests (several nodes need PostgreSQL) are deselected;
    * with it, tests that use no database fixture are deselected: they make their own SQLite files (the
      subprocess and crash tests) or none at all, so they would run exactly as in the SQLite pass; so are
      those marked `any_database`.
    pytest's summary counts both as deselected. The tests marked `long` go first."""
    if PG_URL:
        kept = [item for item in items if DATABASE_FIXTURES & set(item.fixturenames)
                and item.get_closest_marker("any_database") is None]
    else:
        kept = [item for item in items if item.get_closest_marker("postgres_only") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = sorted(kept, key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A webhook receiving server on loopback (`tests.webhook_receiver`), stopped after the test."""
    got = Receiver()
    runner = await start_receiver(got)
    yield got
    await runner.cleanup()
