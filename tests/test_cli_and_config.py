"""The CLI end to end (real processes on a real SQLite file) and configuration errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.config import ConfigError, load_config, sqlite_file
from tests.servers import ROOT, free_port, served_plunkd


def plunkd(tmp_path, *args, env=None):
    # PYTHONPATH: run this checkout's code even where another checkout is the installed one.
    full_env = {**os.environ, "PLUNKD_SERVER_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT),
                **(env or {})}
    full_env.pop("PLUNKD_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "plunkd.cli", *args], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=60)


@dataclass
class CliProject:
    id: str
    secret_key: str


def project_with_domain(tmp_path, name: str, from_email: str, env: dict[str, str]) -> CliProject:
    """A project made with the CLI, its sender's domain added and verified offline (the file transport's
    way), as an operator sets one up before `plunkd serve`."""
    made = plunkd(tmp_path, "project", "create", "--name", name, "--from-email", from_email, env=env)
    assert made.returncode == 0, made.stderr
    lines = made.stdout.splitlines()
    domain = from_email.rsplit("@", 1)[1]
    for step in (("domain", "add", domain, "--project", name), ("domain", "verify", domain, "--project", name,
                                                                 "--offline")):
        done = plunkd(tmp_path, *step, env=env)
        assert done.returncode == 0, done.stderr
    return CliProject(next(line.split()[-1] for line in lines if line.startswith("project")).strip("()"),
                      next(line.split()[-1] for line in lines if line.startswith("secret key")))


@pytest.fixture
def cli_env(database_url):
    return {"PLUNKD_DATABASE_URL": database_url}


def test_project_create_list_and_rotate(tmp_path, cli_env):
    made = plunkd(tmp_path, "project", "create", "--name", "shop", "--from-email", "Hi@Shop.example",
                  env=cli_env)
    assert made.returncode == 0, made.stderr
    sk = next(line.split()[-1] for line in made.stdout.splitlines() if line.startswith("secret key"))
    assert sk.startswith("sk_") and len(sk) >= 3 + 32
    listed = plunkd(tmp_path, "project", "list", env=cli_env)
    assert "shop" in listed.stdout and "from=hi@shop.example" in listed.stdout
    assert sk not in listed.stdout, "keys are shown only once"
    db_files = list((tmp_path / "data").glob("*.sqlite3*"))
    for path in db_files:
        assert sk.encode() not in path.read_bytes(), "no key in clear in the database"
    rotated = plunkd(tmp_path, "keys", "rotate", "--project", "shop", env=cli_env)
    assert rotated.returncode == 0 and "secret key: sk_" in rotated.stdout
    assert sk not in rotated.stdout


def failure_lines(stderr: str) -> list[str]:
    """stderr without the one `database: ...` line a command that uses the database starts with."""
    lines = stderr.strip().splitlines()
    assert sum(line.startswith("database: ") for line in lines) <= 1, lines
    return [line for line in lines if not line.startswith("database: ")]


def test_cli_errors_are_one_line(tmp_path, cli_env):
    for args in (["keys", "rotate", "--project", "ghost"],
                 ["project", "create", "--name", "x", "--from-email", "nope"],
                 ["contacts", "import", "missing.csv", "--project", "x"]):
        result = plunkd(tmp_path, *args, env=cli_env)
        assert result.returncode == 1
        failure = failure_lines(result.stderr)
        assert len(failure) == 1 and failure[0].startswith("plunkd: "), result.stderr
    bad = plunkd(tmp_path, "project", "list", env={"PLUNKD_DELIVERY_RATE_PER_SECOND": "fast"})
    assert bad.returncode == 1
    assert bad.stderr.strip() == ("plunkd: config key delivery.rate_per_second (PLUNKD_DELIVERY_RATE_PER_SECOND): "
                                  "expected float, got 'fast'")



def test_domain_add_then_offline_verify_only_with_the_file_transport(tmp_path, cli_env):
    made = plunkd(tmp_path, "project", "create", "--name", "shop", "--from-email", "hi@shop.example", env=cli_env)
    assert made.returncode == 0, made.stderr
    added = plunkd(tmp_path, "domain", "add", "Shop.Example", "--project", "shop", env=cli_env)
    assert added.returncode == 0, added.stderr
    assert "shop.example" in added.stdout and "NOT verified" in added.stdout
    assert "plunkd._domainkey.shop.example" in added.stdout and "v=DKIM1; k=rsa; p=" in added.stdout
    refused = plunkd(tmp_path, "domain", "verify", "shop.example", "--project", "shop", "--offline",
                     env={**cli_env, "PLUNKD_DELIVERY_TRANSPORT": "smtp"})
    assert refused.returncode == 1
    assert refused.stderr.strip() == ("plunkd: --offline is only for the file transport (nothing leaves this "
                                      "machine); delivery.transport is 'smtp', so publish the records")
    verified = plunkd(tmp_path, "domain", "verify", "shop.example", "--project", "shop", "--offline", env=cli_env)
    assert verified.returncode == 0, verified.stderr
    assert "shop.example" in verified.stdout and "): verified" in verified.stdout

def test_contacts_import_with_summary(tmp_path, cli_env):
    assert plunkd(tmp_path, "project", "create", "--name", "shop", "--from-email", "a@shop.example",
                  env=cli_env).returncode == 0
    csv_path = tmp_path / "contacts.csv"
    csv_path.write_text("email,subscribed,firstName\n"
                        "Ann@Example.com,true,Ann\n"
                        "bob@example.com,no,Bob\n"
                        "ann@example.com,true,Dup\n"
                        ",true,Nobody\n"
                        "not-an-email,true,X\n"
                        "carl@example.com,perhaps,Carl\n"
                        "dee@example.com,,Dee\n")
    result = plunkd(tmp_path, "contacts", "import", str(csv_path), "--project", "shop", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "3 created, 0 updated, 4 skipped" in result.stdout
    for reason in ("duplicate in file", "no email", "invalid email", "bad subscribed value"):
        assert f"skipped 1: {reason}" in result.stdout
    assert "importing" in result.stderr and "7/7" in result.stderr, "a progress bar on stderr"
    again = plunkd(tmp_path, "contacts", "import", str(csv_path), "--project", "shop", env=cli_env)
    assert "0 created, 3 updated" in again.stdout


def test_config_file_and_env(tmp_path):
    path = tmp_path / "plunkd.toml"
    path.write_text('[server]\nhttp_port = 9000\n[delivery]\ntransport = "smtp"\n[delivery.smtp]\nport = 2525\n')
    cfg = load_config(path, env={"PLUNKD_SERVER_HTTP_PORT": "9100", "PLUNKD_DNS_NAMESERVERS": "127.0.0.1, ::1"})
    assert cfg.server.http_port == 9100 and cfg.delivery.transport == "smtp" and cfg.delivery.smtp.port == 2525
    assert cfg.dns.nameservers == ["127.0.0.1", "::1"]


def test_links_in_emails_follow_the_api_port_unless_the_public_url_is_set():
    """Left at its default, server.public_url followed no change of port: the unsubscribe and tracking
    links of a server moved to port 9100 pointed at 8080."""
    assert load_config(env={"PLUNKD_SERVER_HTTP_PORT": "9100"}).server.public_url == "http://127.0.0.1:9100"
    assert load_config(env={"PLUNKD_SERVER_HOST": "0.0.0.0"}).server.public_url == "http://127.0.0.1:8080"
    assert load_config(env={"PLUNKD_SERVER_HOST": "::1"}).server.public_url == "http://[::1]:8080"
    assert load_config(env={"PLUNKD_SERVER_HTTP_PORT": "9100", "PLUNKD_SERVER_PUBLIC_URL": "https://mail.example.org"}
                       ).server.public_url == "https://mail.example.org"


@pytest.mark.parametrize(("toml", "env", "message"), [
    ('[server]\nhttp_port = "80"\n', {}, "config key server.http_port: expected int, got '80'"),
    ("[server]\nhttp_port = 70000\n", {}, "config key server.http_port: expected a port number 0-65535"),
    ('[delivery]\ntransport = "pigeon"\n', {}, "config key delivery.transport: expected one of file, smtp, ses"),
    ("[server]\nnope = 1\n", {}, "config key server.nope: unknown key"),
    ("[database]\nurl = 'mysql://x'\n", {}, "config key database.url: expected a sqlite+aiosqlite:// or "
                                            "postgresql+asyncpg:// URL"),
    ("", {"PLUNKD_SMTP_ENABLED": "maybe"}, "config key smtp.enabled (PLUNKD_SMTP_ENABLED): expected bool, got "
                                           "'maybe'"),
    ("[server\n", {}, "config file"),
])
def test_bad_config_values_name_the_key(tmp_path, toml, env, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(path, env=env)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_example_config_loads_and_documents_every_key():
    import dataclasses

    from core.config import Config

    root = os.path.dirname(os.path.dirname(__file__))
    example = os.path.join(root, "config.example.toml")
    load_config(example, env={})
    text = open(example).read()

    def keys(section, prefix=""):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                yield from keys(value, f"{prefix}{f.name}.")
            else:
                yield prefix, f.name

    for prefix, name in keys(Config()):
        assert f"\n{name} =" in text or f"\n# {name} =" in text, f"{prefix}{name} is not documented"


def test_serve_without_privileged_ports_falls_back_and_says_so(tmp_path):
    """The default config asks for 465/587. A process that may not bind them (run here without
    CAP_NET_BIND_SERVICE, as any non-root user would be) listens on 2465/2587 and logs why."""
    if Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text().strip() != "1024":
        pytest.fail("this machine lets anyone bind ports below 1024; the fallback cannot be exercised")
    prefix = []
    if os.geteuid() == 0:
        prefix = ["setpriv", "--bounding-set=-net_bind_service", "--inh-caps=-net_bind_service"]
    env = {"PLUNKD_SMTP_HOST": "127.0.0.1", "PLUNKD_DELIVERY_ENABLED": "false"}
    with served_plunkd(tmp_path, env, prefix=prefix, wait_for=None, graceful=True) as server:
        banner = read_smtp_banner(2587, deadline=time.monotonic() + 30)
        assert banner.startswith(b"220 "), banner
        log = server.log()
        assert "smtp port 465 needs root or CAP_NET_BIND_SERVICE; listening on 2465 instead" in log
        assert "smtp port 587 needs root or CAP_NET_BIND_SERVICE; listening on 2587 instead" in log


def read_smtp_banner(port: int, deadline: float) -> bytes:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                return sock.recv(512)
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing answered on port {port}")


NO_CONFIG = "no config file, defaults and PLUNKD_* environment"
WHERE_TO_POINT = ("run this where plunkd serve runs (with its config), or point at its database with --config FILE, "
                  "PLUNKD_CONFIG, PLUNKD_DATABASE_URL or PLUNKD_SERVER_DATA_DIR; `plunkd migrate` makes a new one "
                  "here")


def label_of(url: str) -> str:
    """How the CLI names a database: an SQLite file by its path, a PostgreSQL URL with its password masked."""
    if url.startswith("sqlite"):
        return f"SQLite file {url.split(':///', 1)[1]}"
    user, rest = url.split("://", 1)[1].split("@", 1)
    return f"postgresql+asyncpg://{user.split(':')[0]}:***@{rest}"


async def has_tables(url: str) -> bool:
    from sqlalchemy import inspect
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return bool(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))
    finally:
        await engine.dispose()


@pytest.mark.parametrize("args", [["project", "list"], ["keys", "rotate", "--project", "shop"],
                                  ["domain", "list", "--project", "shop"],
                                  ["domain", "add", "shop.example", "--project", "shop"],
                                  ["domain", "verify", "shop.example", "--project", "shop", "--offline"],
                                  ["contacts", "import", "contacts.csv", "--project", "shop"]],
                         ids=lambda args: "-".join(args[:2]))
async def test_a_command_on_a_missing_database_creates_nothing_and_says_where_it_looked(tmp_path,
                                                                                        empty_database_url, args):
    """Each command but serve, migrate, vacuum and project create needs plunkd's database: where there is
    none (no SQLite file; a PostgreSQL database without the schema) it makes none and says how to point
    elsewhere, instead of making an empty one whose keys the server then answers with 401."""
    (tmp_path / "contacts.csv").write_text("email\nann@example.org\n")
    result = plunkd(tmp_path, *args, env={"PLUNKD_DATABASE_URL": empty_database_url})
    label = label_of(empty_database_url)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"database: {label} (data dir {tmp_path / 'data'}; {NO_CONFIG})",
        f"plunkd: no plunkd database at {label}: {WHERE_TO_POINT}"]
    assert result.stdout == ""
    if empty_database_url.startswith("sqlite"):
        assert sorted(path.name for path in tmp_path.iterdir()) == ["contacts.csv"], "no file, no data dir"
    else:
        assert not await has_tables(empty_database_url), "no schema was made in the empty database"


def test_in_an_empty_folder_project_list_makes_no_database_until_migrate(tmp_path):
    """The issue's case: no config, the default SQLite file under ./data."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in [n for n in env if n.startswith("PLUNKD_")]:
        env.pop(name)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "plunkd.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)

    listed = run("project", "list")
    default = tmp_path / "data" / "plunkd.sqlite3"
    assert listed.returncode == 1 and listed.stdout == ""
    assert listed.stderr.splitlines() == [
        f"database: SQLite file {default} (data dir {tmp_path / 'data'}; {NO_CONFIG})",
        f"plunkd: no plunkd database at SQLite file {default}: {WHERE_TO_POINT}"]
    assert list(tmp_path.iterdir()) == []
    migrated = run("migrate")
    assert migrated.returncode == 0 and migrated.stdout == f"database at the latest schema: SQLite file {default}\n"
    listed = run("project", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == "no projects yet: plunkd project create --name NAME --from-email ADDRESS\n"


@pytest.mark.parametrize("args", [["project", "list"], ["migrate"]], ids=["reading", "creating"])
def test_a_postgresql_password_is_never_shown(tmp_path, cli_env, args):
    """Nothing listens on the port: the command names the database it could not open, password masked."""
    port = free_port()
    url = f"postgresql+asyncpg://plunk:s3cret-pw@127.0.0.1:{port}/mail"
    result = plunkd(tmp_path, *args, env={"PLUNKD_DATABASE_URL": url})
    assert result.returncode == 1 and "s3cret-pw" not in result.stderr + result.stdout
    database, failure = result.stderr.splitlines()
    masked = f"postgresql+asyncpg://plunk:***@127.0.0.1:{port}/mail"
    assert database == f"database: {masked} (data dir {tmp_path / 'data'}; {NO_CONFIG})"
    assert failure.startswith(f"plunkd: cannot open the database {masked}: ")


def test_serve_says_where_its_data_is_and_the_cli_run_beside_it_uses_the_same(tmp_path, database_url):
    """`plunkd serve` and the CLI read the same config the same way (./plunkd.toml here): serve says on
    stderr which database and data dir it uses, the CLI says the same, and keys it makes work at once."""
    import json
    import urllib.request

    app = tmp_path / "app"
    app.mkdir()
    port = free_port()
    (app / "plunkd.toml").write_text(f'[server]\nhttp_port = {port}\ndata_dir = "var"\n'
                                     f'[database]\nurl = "{database_url}"\n'
                                     "[smtp]\nenabled = false\n[delivery]\nenabled = false\n")
    expected = f"database: {label_of(database_url)} (data dir {app / 'var'}; config {app / 'plunkd.toml'})"
    with served_plunkd(app, port=port, config_only=True, graceful=True) as server:
        assert expected in server.log().splitlines()
        env = {name: value for name, value in os.environ.items() if not name.startswith("PLUNKD_")}
        made = subprocess.run([sys.executable, "-m", "plunkd.cli", "project", "create", "--name", "shop",
                               "--from-email", "hi@shop.example"], cwd=app, env={**env, "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True, timeout=60)
        assert made.returncode == 0 and made.stderr.splitlines() == [expected], made.stderr
        key = next(line.split()[-1] for line in made.stdout.splitlines() if line.startswith("secret key"))
        request = urllib.request.Request(f"http://127.0.0.1:{port}/contacts",
                                         headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.status == 200 and "data" in json.loads(reply.read())


async def test_contacts_import_types_each_column_and_reports_failed_rows_by_line(tmp_path, cli_env):
    from pipeline.projects import require_project
    from storage import contacts as contact_store
    from storage.db import Database

    assert plunkd(tmp_path, "project", "create", "--name", "shop", "--from-email", "a@shop.example",
                  env=cli_env).returncode == 0
    csv_path = tmp_path / "contacts.csv"
    csv_path.write_text("email,age,score,vip,joined,zip,city,note\n"
                        "ann@example.com,69,1.5,true,2024-03-01,02134,Paris,\n"
                        "bob@example.com,42,2,FALSE,2024-03-01T10:00:00+02:00,12345,,\"two\nlines\"\n"
                        "not-an-email,1,1,true,2024-01-01,1,X,\n"
                        "carl@example.com,70,3.25,false,2024-01-01,00001,Oslo,a\x00b\n"
                        "Ann@example.com,1,1,true,2024-01-01,1,Dup,\n"
                        "dee@example.com,,,,,,,\n")
    result = plunkd(tmp_path, "contacts", "import", str(csv_path), "--project", "shop", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "columns: age integer, score decimal, vip boolean, joined date, zip text, city text, note text",
        "imported into shop: 3 created, 0 updated, 3 skipped",
        "  skipped 1: invalid email", "  skipped 1: unreadable row", "  skipped 1: duplicate in file",
        "  line 5: invalid email", "  line 6: unreadable row: a NUL character in a cell",
        "  line 7: duplicate in file (ann@example.com)"]

    strings = tmp_path / "strings.csv"
    strings.write_text("email,age,city\nann@example.com,70,\n")
    again = plunkd(tmp_path, "contacts", "import", str(strings), "--project", "shop", "--strings", env=cli_env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[:2] == ["columns: age text, city empty (left out)",
                                             "imported into shop: 0 created, 1 updated, 0 skipped"]

    db = Database(cli_env["PLUNKD_DATABASE_URL"])
    try:
        project = await db.read(require_project, "shop")
        data = {address: (await db.read(contact_store.get_contact_by_email, project.id, address)).data
                for address in ("ann@example.com", "bob@example.com", "dee@example.com")}
    finally:
        await db.dispose()
    assert data == {
        "ann@example.com": {"age": "70", "score": 1.5, "vip": True, "joined": "2024-03-01T00:00:00.000Z",
                            "zip": "02134", "city": "Paris"},
        "bob@example.com": {"age": 42, "score": 2.0, "vip": False, "joined": "2024-03-01T08:00:00.000Z",
                            "zip": "12345", "note": "two\nlines"},
        "dee@example.com": {}}, "an empty cell is left out: nothing new, an existing value kept"


@pytest.mark.parametrize("url, named", [
    ("sqlite+aiosqlite:///data/plunkd.sqlite3", "data/plunkd.sqlite3"),
    ("sqlite+aiosqlite:////srv/plunkd/db.sqlite3", "/srv/plunkd/db.sqlite3"),
    ("sqlite+aiosqlite:///db.sqlite3?timeout=5", "db.sqlite3"),
    ("sqlite+aiosqlite:///:memory:", ""),
    ("sqlite+aiosqlite://", ""),
    ("postgresql+asyncpg://plunkd:secret@db/plunkd", ""),
])
def test_the_sqlite_file_a_url_names_is_the_one_made_private_checked_and_locked(url, named):
    """One reading of the URL for the server's database, `plunkd.atrest`'s permissions and the CLI's
    "no plunkd database" check: a query string is SQLite's options, not part of the file's name."""
    assert sqlite_file(url) == named
