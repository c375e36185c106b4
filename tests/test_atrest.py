"""Data at rest, on the real app and database (SQLite, or PostgreSQL with PLUNKD_TEST_DATABASE_URL) and real
`plunkd` processes: DKIM private keys and webhook secrets are sealed in the database under a key kept outside
it (the stored bytes and rows hold neither), signing and webhook delivery work with the sealed values, plain
text from before is sealed at start, `plunkd secrets rotate` seals everything with a new key so the old one
is no longer needed, a wrong or missing key stops start-up with one line naming where the key came from, and
everything plunkd writes is readable by its own user only, whatever the umask. Nothing is mocked: DNS answers
come from the test's own lookup function, as in tests/test_delivery.py."""

from __future__ import annotations

import base64
import copy
import logging
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import dkim
import pytest
from sqlalchemy import text

from api.context import CONFIG, DB
from core.keys import format_key, new_key
from delivery.bucket import TokenBucket
from delivery.dispatcher import Dispatcher
from delivery.transports import FileTransport
from plunkd.app import create_app
from plunkd.atrest import key_file_text, open_secrets, read_key_file
from storage import emails as email_store
from storage.secrets import SecretsError, key_id, keyring
from tests.conftest import Api
from tests.test_cli_and_config import ROOT, free_port
from tests.test_delivery import dispatch_all, dns_for, send, settings
from tests.test_processes import api_up, children, wait_until
from tests.test_webhooks import create_endpoint, track_event
from webhooks.sender import WebhookSender

PEM_MARK = b"PRIVATE KEY"
WEBHOOK_MARK = b"whsec_"


@pytest.fixture
def config(config):
    """Webhooks to the loopback receiver."""
    config.webhooks.allow_private_targets = True
    config.webhooks.timeout_seconds, config.webhooks.lease_seconds = 2.0, 5.0
    return config


async def stored_secrets(db) -> list[str]:
    """The secret columns as the database holds them (read with plain SQL, nothing opened)."""
    async with db.engine.connect() as conn:
        keys = (await conn.execute(text("SELECT dkim_private_key FROM domains"))).scalars().all()
        hooks = (await conn.execute(text("SELECT secret, previous_secret FROM webhook_endpoints"))).all()
    return [*keys, *(value for row in hooks for value in row if value is not None)]


def sqlite_bytes(database_url: str) -> bytes | None:
    """Every byte of the SQLite database and its WAL, or None on PostgreSQL."""
    if not database_url.startswith("sqlite"):
        return None
    path = Path(database_url.split(":///", 1)[1])
    return b"".join(part.read_bytes() for part in (path, Path(f"{path}-wal")) if part.exists())


def assert_sealed_with(values: list[str], kid: str) -> None:
    assert values, "there are secrets to look at"
    for value in values:
        assert value.startswith(f"enc1:{kid}:"), value[:40]
        assert "PRIVATE KEY" not in value and "whsec_" not in value


def file_key_id(config) -> str:
    return key_id(read_key_file(config.key_file_path)[0])


async def deliver_and_verify_dkim(api: Api, db, domain: dict, folder: Path) -> None:
    await send(api, to="ann@example.org")
    await dispatch_all(Dispatcher(db, FileTransport(folder), TokenBucket(0), settings()))
    [eml] = list(folder.glob("*.eml"))
    assert dkim.verify(eml.read_bytes(), dnsfunc=dns_for(domain)), "signed with the sealed key, verifies"


async def post_webhooks(db, settings_) -> None:
    sender = WebhookSender(db, settings_)
    try:
        await sender.run_until_idle()
    finally:
        await sender.close()


async def test_the_database_holds_no_dkim_key_and_no_webhook_secret_in_clear(api, sender, receiver, database_url,
                                                                              tmp_path):
    hook = await create_endpoint(api, receiver, ["signed-up"])
    status, body = await api.call("POST", f"/webhooks/{hook['id']}/rotate-secret")
    assert status == 200, body
    receiver.secrets.append(body["data"]["secret"])

    stored = await stored_secrets(api.db)
    assert len(stored) == 3, "the DKIM key, the webhook secret and the one before its rotation"
    assert not [value for value in stored if "PRIVATE KEY" in value or "whsec_" in value], stored
    raw = sqlite_bytes(database_url)
    if raw is not None:
        assert PEM_MARK not in raw and WEBHOOK_MARK not in raw, "no secret anywhere in the database file"
        for secret in receiver.secrets:
            assert secret.encode() not in raw
    assert_sealed_with(stored, file_key_id(api.client.app[CONFIG]))

    await deliver_and_verify_dkim(api, api.db, sender, tmp_path / "outbox")
    opened = keyring().open.cache_info().misses
    await deliver_and_verify_dkim(api, api.db, sender, tmp_path / "outbox-of-a-new-dispatcher")
    assert keyring().open.cache_info().misses == opened, "a DKIM key is decrypted once per process, not per message"
    await track_event(api, "ann@example.org", "signed-up")
    await post_webhooks(api.db, api.client.app[CONFIG].webhooks)
    [request] = receiver.received
    assert request.verified == {secret: True for secret in receiver.secrets}, "signed with both secrets"


async def test_plain_text_secrets_from_before_are_sealed_at_start(api, sender, receiver, config, aiohttp_client,
                                                                  tmp_path, caplog):
    """A database written before secrets were sealed: its rows hold the PEM key and the whsec_ secret as
    they are, and no key file exists yet. The first start makes the key and seals both; signing and webhooks
    go on with the same key and secret."""
    hook = await create_endpoint(api, receiver, ["signed-up"])
    pem = (await api.db.read(email_store.domain_key, api.project_id, "example.com")).dkim_private_key
    assert pem.startswith("-----BEGIN RSA PRIVATE KEY-----")

    def write_plain(session) -> None:
        session.execute(text("UPDATE domains SET dkim_private_key = :pem"), {"pem": pem})
        session.execute(text("UPDATE webhook_endpoints SET secret = :secret"), {"secret": receiver.secrets[0]})

    await api.db.write(write_plain)
    assert sorted(await stored_secrets(api.db)) == sorted([pem, receiver.secrets[0]])

    before = copy.deepcopy(config)
    before.server.data_dir = str(tmp_path / "data-from-before")
    assert not before.key_file_path.exists()
    caplog.set_level(logging.WARNING, "plunkd")
    client = await aiohttp_client(create_app(before))
    db = client.app[DB]
    assert_sealed_with(await stored_secrets(db), file_key_id(before))
    assert stat.S_IMODE(before.key_file_path.stat().st_mode) == 0o600
    assert any("sealed 2 secrets in the database" in record.getMessage() for record in caplog.records)

    started = Api(client, db, api.project_id, api.sk, api.pk)
    await deliver_and_verify_dkim(started, db, sender, tmp_path / "outbox")
    await track_event(started, "bob@example.org", "signed-up")
    await post_webhooks(db, before.webhooks)
    [request] = receiver.received
    assert request.verified == {receiver.secrets[0]: True}
    assert hook["id"] == (await db.read(lambda s: s.execute(text("SELECT id FROM webhook_endpoints")).scalar()))


def run_plunkd(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess:
    """`plunkd ARGS` as an operator runs it, from a shell whose umask is the usual 022."""
    full_env = {**os.environ, "PLUNKD_SERVER_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT),
                "PLUNKD_SMTP_ENABLED": "false", **(env or {})}
    full_env.pop("PLUNKD_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "plunkd.cli", *args], cwd=tmp_path, env=full_env, umask=0o022,
                          capture_output=True, text=True, timeout=timeout)


def domain_added(tmp_path: Path, env: dict[str, str]) -> str:
    """Project p with the domain example.com (its DKIM key sealed), through the CLI; p's secret key."""
    made = run_plunkd(tmp_path, "project", "create", "--name", "p", "--from-email", "hello@example.com", env=env)
    assert made.returncode == 0, made.stderr
    added = run_plunkd(tmp_path, "domain", "add", "example.com", "--project", "p", env=env)
    assert added.returncode == 0, added.stderr
    return next(line.split()[-1] for line in made.stdout.splitlines() if line.startswith("secret key"))


async def test_rotation_seals_every_secret_with_a_new_key_and_the_old_one_is_no_longer_needed(
        api, sender, receiver, config, aiohttp_client, database_url, tmp_path):
    hook = await create_endpoint(api, receiver, ["signed-up"])
    pem = (await api.db.read(email_store.domain_key, api.project_id, "example.com")).dkim_private_key
    old_key_text = config.key_file_path.read_text()
    old_kid = file_key_id(config)
    assert_sealed_with(await stored_secrets(api.db), old_kid)

    rotated = run_plunkd(tmp_path, "secrets", "rotate", env={"PLUNKD_DATABASE_URL": database_url,
                                                             "PLUNKD_SERVER_DATA_DIR": config.server.data_dir})
    assert rotated.returncode == 0, rotated.stderr
    new_kid = file_key_id(config)
    assert new_kid != old_kid
    assert rotated.stdout.strip() == (f"sealed 2 secrets with key id {new_kid} (key file {config.key_file_path}); "
                                      f"key id {old_kid} removed from {config.key_file_path}")
    assert len(read_key_file(config.key_file_path)) == 1, "the old key is gone from the key file"
    assert stat.S_IMODE(config.key_file_path.stat().st_mode) == 0o600
    assert_sealed_with(await stored_secrets(api.db), new_kid)

    client = await aiohttp_client(create_app(config))  # the new key alone opens everything
    db = client.app[DB]
    assert (await db.read(email_store.domain_key, api.project_id, "example.com")).dkim_private_key == pem
    started = Api(client, db, api.project_id, api.sk, api.pk)
    await deliver_and_verify_dkim(started, db, sender, tmp_path / "outbox")
    await track_event(started, "ann@example.org", "signed-up")
    await post_webhooks(db, config.webhooks)
    assert [request.verified for request in receiver.received] == [{receiver.secrets[0]: True}]
    assert receiver.received[0].payload["type"] == "signed-up" and hook["secret"] == receiver.secrets[0]

    old_only = copy.deepcopy(config)
    old_only.server.data_dir = str(tmp_path / "old-key")
    old_only.key_file_path.parent.mkdir()
    old_only.key_file_path.write_text(old_key_text)
    with pytest.raises(SecretsError) as refused:
        await open_secrets(db, old_only)
    assert str(refused.value) == (f"the database holds secrets sealed with key id {new_kid}, which key file "
                                  f"{old_only.key_file_path} does not hold (it holds key id {old_kid}): start "
                                  "plunkd with the key they were sealed with")


async def test_a_configured_key_takes_over_with_the_old_one_as_a_previous_key(api, sender, receiver, config,
                                                                             aiohttp_client, tmp_path):
    """The rotation a cluster makes through its config: security.encryption_key = the new key, the old one in
    previous_encryption_keys. Start-up seals everything with the new key; from then on the old one can go."""
    await create_endpoint(api, receiver, ["signed-up"])
    [old] = read_key_file(config.key_file_path)
    new = new_key()
    both = copy.deepcopy(config)
    both.security.encryption_key, both.security.previous_encryption_keys = format_key(new), [format_key(old)]
    client = await aiohttp_client(create_app(both))
    assert_sealed_with(await stored_secrets(client.app[DB]), key_id(new))

    only_new = copy.deepcopy(both)
    only_new.security.previous_encryption_keys = []
    only_new.server.data_dir = str(tmp_path / "no-key-file-here")
    client = await aiohttp_client(create_app(only_new))
    started = Api(client, client.app[DB], api.project_id, api.sk, api.pk)
    await deliver_and_verify_dkim(started, started.db, sender, tmp_path / "outbox")
    assert not only_new.key_file_path.exists(), "a configured key makes no key file"


@pytest.mark.long
def test_an_interrupted_rotation_is_finished_with_its_new_key(tmp_path, database_url):
    """A rotation stopped after it wrote the new key (first) beside the old one: running it again finishes
    with that key instead of making a third."""
    env = {"PLUNKD_DATABASE_URL": database_url}
    domain_added(tmp_path, env)
    key_file = tmp_path / "data" / "encryption.key"
    [old] = read_key_file(key_file)
    new = new_key()
    key_file.write_text(key_file_text([new, old]))
    rotated = run_plunkd(tmp_path, "secrets", "rotate", env=env)
    assert rotated.returncode == 0, rotated.stderr
    assert read_key_file(key_file) == [new]
    assert f"sealed 1 secrets with key id {key_id(new)}" in rotated.stdout
    listed = run_plunkd(tmp_path, "domain", "list", "--project", "p", env=env)
    assert listed.returncode == 0 and "example.com" in listed.stdout, listed.stderr


@pytest.mark.long
def test_a_missing_or_wrong_key_stops_start_up_with_one_line_naming_its_source(tmp_path, database_url):
    env = {"PLUNKD_DATABASE_URL": database_url, "PLUNKD_SERVER_HTTP_PORT": str(free_port())}
    domain_added(tmp_path, env)
    key_file = tmp_path / "data" / "encryption.key"
    right = key_file.read_text()
    kid = key_id(read_key_file(key_file)[0])

    def refused(result: subprocess.CompletedProcess) -> str:
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        return result.stderr.strip().splitlines()[-1]

    key_file.unlink()
    assert refused(run_plunkd(tmp_path, "serve", env=env)) == (
        f"plunkd: the database holds secrets sealed with key id {kid}, but the key file {key_file} does not exist: "
        "restore it from your backup (or set security.encryption_key); no new key was made")
    assert not key_file.exists()

    other = new_key()
    key_file.write_text(key_file_text([other]))
    assert refused(run_plunkd(tmp_path, "serve", env=env)) == (
        f"plunkd: the database holds secrets sealed with key id {kid}, which key file {key_file} does not hold "
        f"(it holds key id {key_id(other)}): start plunkd with the key they were sealed with")

    configured = {**env, "PLUNKD_SECURITY_ENCRYPTION_KEY": format_key(new_key())}
    assert refused(run_plunkd(tmp_path, "domain", "list", "--project", "p", env=configured)).startswith(
        f"plunkd: the database holds secrets sealed with key id {kid}, which security.encryption_key "
        "(PLUNKD_SECURITY_ENCRYPTION_KEY) does not hold")
    assert refused(run_plunkd(tmp_path, "serve", env={**env, "PLUNKD_SECURITY_ENCRYPTION_KEY": "not-a-key"})) == (
        "plunkd: config key security.encryption_key: expected base64 of 32 random bytes (openssl rand -base64 32) "
        "or empty (the key file)")

    key_file.write_text(right)
    from_config = {**env, "PLUNKD_SECURITY_ENCRYPTION_KEY": base64.b64encode(read_key_file(key_file)[0]).decode()}
    listed = run_plunkd(tmp_path, "domain", "list", "--project", "p", env=from_config)
    assert listed.returncode == 0 and "example.com" in listed.stdout, listed.stderr


def modes(folder: Path) -> dict[str, int]:
    """Every file and directory under `folder` (itself included) → its permission bits."""
    found = {".": stat.S_IMODE(folder.stat().st_mode)}
    for path in folder.rglob("*"):
        found[str(path.relative_to(folder))] = stat.S_IMODE(path.lstat().st_mode)
    return found


@pytest.mark.long
@pytest.mark.timeout(120)
def test_serve_keeps_every_file_private_and_fixes_readable_ones_with_one_warning(tmp_path, database_url):
    """An install from before: the data dir 0755 and its files 0644, as a umask of 022 made them. `plunkd
    serve` (umask 022 in its shell) makes them private with one warning naming them, and what it makes from
    then on (the WAL, the TLS key, metrics, each delivered .eml) is private from the start."""
    data = tmp_path / "data"
    http = free_port()
    sqlite = database_url.startswith("sqlite")
    env = {"PLUNKD_DELIVERY_TRANSPORT": "file"} if sqlite else {"PLUNKD_DATABASE_URL": database_url,
                                                                "PLUNKD_DELIVERY_TRANSPORT": "file"}
    key = domain_added(tmp_path, env)
    verified = run_plunkd(tmp_path, "domain", "verify", "example.com", "--project", "p", "--offline", env=env)
    assert verified.returncode == 0, verified.stderr
    for path in [data, *data.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    loosened = modes(data)

    env.update({"PLUNKD_SERVER_HTTP_PORT": str(http), "PLUNKD_DELIVERY_POLL_SECONDS": "0.1",
                "PLUNKD_SMTP_ENABLED": "true", "PLUNKD_SMTP_HOST": "127.0.0.1",
                "PLUNKD_SMTP_TLS_PORT": str(free_port()), "PLUNKD_SMTP_STARTTLS_PORT": str(free_port())})
    full_env = {**os.environ, "PLUNKD_SERVER_DATA_DIR": str(data), "PYTHONPATH": str(ROOT), **env}
    full_env.pop("PLUNKD_CONFIG", None)
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "plunkd.cli", "serve"], cwd=tmp_path, env=full_env,
                                umask=0o022, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{http}"
            wait_until(lambda: api_up(base), 60, "the API", log_path)
            send_over_http(base, key)
            outbox = data / "outbox"
            wait_until(lambda: list(outbox.glob("*.eml")), 30, "the delivered .eml", log_path)
            after = modes(data)
        finally:
            for pid in children(proc.pid):
                os.kill(pid, signal.SIGTERM)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)

    made = {"tls/relay-key.pem", "tls", "metrics", "outbox"}
    assert made <= set(after) and any(name.endswith(".eml") for name in after), sorted(after)
    assert {name: mode for name, mode in after.items() if mode & 0o077} == {}, "nothing readable by others"
    assert {name for name, mode in after.items() if mode & 0o700 == 0o700 and (data / name).is_dir()} == {
        name for name in after if (data / name).is_dir()}
    assert after["."] == 0o700 and after["encryption.key"] == 0o600
    assert all(mode == 0o600 for name, mode in after.items() if name.endswith(".eml"))
    if sqlite:  # the default database, in the data dir
        assert after["plunkd.sqlite3"] == 0o600 and after.get("plunkd.sqlite3-wal", 0o600) == 0o600

    warnings = [line for line in log_path.read_text().splitlines() if "made private" in line]
    assert len(warnings) == 1, warnings
    assert f"{data} (was 0755)" in warnings[0] and f"{data / 'encryption.key'} (was 0644)" in warnings[0]
    changed = sum(1 for name, mode in loosened.items() if mode & 0o077)
    named = warnings[0].count("(was 0")
    assert named == changed or warnings[0].endswith(f"and {changed - named} more"), warnings[0]


def send_over_http(base: str, key: str) -> None:
    from tests.test_processes import send as send_one

    send_one(base, key, "ann@example.org")
