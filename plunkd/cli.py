"""The `plunkd` command. Every failure is one line on stderr and a non-zero exit. A command that uses the
database first says which one on stderr (`database: ...`); only `serve`, `migrate`, `vacuum` and
`project create` make a new one, every other command refuses to run on a database that is not there."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from core.config import Config, ConfigError, load_config, sqlite_file
from core.files import PRIVATE_UMASK


def _config_path(args: argparse.Namespace) -> str | None:
    """The config file every command reads, `plunkd serve` included: --config, else $PLUNKD_CONFIG, else
    ./plunkd.toml when there is one (None: defaults and PLUNKD_* environment variables only)."""
    path = args.config or os.environ.get("PLUNKD_CONFIG")
    if not path and Path("plunkd.toml").exists():
        path = "plunkd.toml"
    return path or None


def _config(args: argparse.Namespace) -> Config:
    return load_config(_config_path(args))


def _sqlite_file(url: str) -> Path | None:
    """The file an SQLite URL names, absolute (None: not an SQLite file)."""
    path = sqlite_file(url)
    return Path(path).resolve() if path else None


def database_label(url: str) -> str:
    """The database a URL names, for people: an SQLite file by its absolute path, any other URL with its
    password masked."""
    from sqlalchemy.engine import make_url

    sqlite_file = _sqlite_file(url)
    return f"SQLite file {sqlite_file}" if sqlite_file else make_url(url).render_as_string(hide_password=True)


def say_storage(args: argparse.Namespace, config: Config) -> None:
    """One line on stderr: the database this command uses, the data dir, and the config that chose them."""
    path = _config_path(args)
    source = f"config {Path(path).resolve()}" if path else "no config file, defaults and PLUNKD_* environment"
    print(f"database: {database_label(config.database_url)} (data dir {config.data_path.resolve()}; {source})",
          file=sys.stderr)


WHERE_TO_POINT = ("run this where plunkd serve runs (with its config), or point at its database with --config FILE, "
                  "PLUNKD_CONFIG, PLUNKD_DATABASE_URL or PLUNKD_SERVER_DATA_DIR; `plunkd migrate` makes a new one "
                  "here")


async def _has_schema(db: Any, url: str) -> bool:
    """Whether the database holds plunkd's schema, creating nothing; a database that cannot be reached is a
    ConfigError naming it (password masked) with the driver's reason."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import DBAPIError

    try:
        async with db.engine.connect() as conn:
            return await conn.run_sync(lambda sync: inspect(sync).has_table("alembic_version"))
    except (DBAPIError, OSError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ConfigError(f"cannot open the database {database_label(url)}: {reason}") from None


async def _with_db(args: argparse.Namespace, config: Config, work: Callable[[Any], Awaitable[int]],
                   create: bool = False, open_keys: bool = True) -> int:
    """Run `work` on the configured database, brought to the latest schema. Unless `create`, the database
    must exist already with plunkd's schema: a command that needs one must not leave an empty database
    behind wherever it happened to run. `open_keys`: with the key ring checked and in use, and every secret
    sealed with its current key (`plunkd.atrest.open_secrets`), as at the server's start."""
    from plunkd.atrest import make_private, open_secrets
    from storage.db import Database

    say_storage(args, config)
    url = config.database_url
    sqlite_file = _sqlite_file(url)
    if not create and url.startswith("sqlite") and not (sqlite_file and sqlite_file.is_file()):
        raise ConfigError(f"no plunkd database at {database_label(url)}: {WHERE_TO_POINT}")
    make_private(config)
    db = Database(url, config.database.pool_size)
    try:
        if not await _has_schema(db, url) and not create:
            raise ConfigError(f"no plunkd database at {database_label(url)}: {WHERE_TO_POINT}")
        await db.migrate()
        if open_keys:
            await open_secrets(db, config)
        return await work(db)
    finally:
        await db.dispose()


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    from core.multiproc import share_metrics
    from plunkd.processes import Handover, acceptor_command, dispatcher_command, parse_roles

    share_metrics(str(config.data_path))  # before anything imports prometheus_client

    from core.config import acceptor_processes
    from core.connections import listening_socket
    from plunkd.app import AcceptorPlan, create_app, serve, setup_logging

    roles = parse_roles(args.role)
    handover = Handover.from_environment()
    say_storage(args, config)
    setup_logging(config.server.log_level)
    if handover is not None:
        http_socket, relay_sockets = _handed_over_sockets(handover)
        app = create_app(config, roles=roles, relay_sockets=relay_sockets, handover=handover)
        asyncio.run(serve(app, config, http_socket, f"plunkd acceptor ({', '.join(sorted(roles))})"))
        return 0
    accepting = roles & {"api", "relay"}
    processes = acceptor_processes(config.server) if accepting else 1
    # Every listening socket first: a port in use ends start-up here, before anything (the dispatcher
    # process, migrations) has started.
    http_socket = (listening_socket(config.server.host, config.server.http_port, reuse_port=processes > 1)
                   if "api" in roles else None)
    relay_sockets = None
    if "relay" in roles and config.smtp.enabled:
        from relay.server import bind_relay

        try:
            relay_sockets = bind_relay(config.smtp, reuse_port=processes > 1)
        except OSError:
            if http_socket is not None:
                http_socket.close()
            raise
    if http_socket is None and relay_sockets is None:
        processes = 1  # nothing to accept on (e.g. --role relay with smtp.enabled = false)
    child = None
    config_path = args.config or os.environ.get("PLUNKD_CONFIG")
    if "dispatcher" in roles and roles != {"dispatcher"} and config.delivery.enabled and config.delivery.own_process:
        roles.discard("dispatcher")
        child = dispatcher_command(config_path)
    plan = (AcceptorPlan(acceptor_command(config_path, accepting), processes - 1, http_socket) if processes > 1
            else None)
    app = create_app(config, roles=roles, dispatcher_command=child, relay_sockets=relay_sockets, acceptors=plan)
    asyncio.run(serve(app, config, http_socket, f"plunkd ({', '.join(sorted(roles))})"))
    return 0


def _handed_over_sockets(handover: Any) -> tuple[Any, Any]:
    """An acceptor child's listening sockets, from the descriptors the main process handed it."""
    import socket

    sockets = {fd: socket.socket(fileno=fd) for fd in (handover.http_fd, *(handover.relay_fds or ())) if fd is not None}
    for sock in sockets.values():
        sock.setblocking(False)
    relay = tuple(sockets[fd] for fd in handover.relay_fds) if handover.relay_fds else None
    return sockets.get(handover.http_fd), relay


def cmd_migrate(args: argparse.Namespace, config: Config) -> int:
    async def work(db) -> int:
        print(f"database at the latest schema: {database_label(db.url)}")
        return 0

    return asyncio.run(_with_db(args, config, work, create=True))


def cmd_vacuum(args: argparse.Namespace, config: Config) -> int:
    from storage.retention import AUTO_VACUUM_INCREMENTAL, sqlite_file_bytes, vacuum_to_incremental

    async def work(db) -> int:
        if db.is_postgres:
            print("PostgreSQL: nothing to do (autovacuum makes the space pruning frees reusable)")
            return 0
        before = sqlite_file_bytes(db.sync_engine)
        mode = await asyncio.to_thread(vacuum_to_incremental, db.sync_engine)
        after = sqlite_file_bytes(db.sync_engine)
        print(f"vacuumed {db.sync_engine.url.database}: {before:,} bytes before, {after:,} bytes after")
        if mode != AUTO_VACUUM_INCREMENTAL:
            print(f"auto_vacuum is still {mode}, not incremental", file=sys.stderr)
            return 1
        print("auto_vacuum is incremental: pruning now shrinks the file")
        return 0

    return asyncio.run(_with_db(args, config, work, create=True))


def cmd_project_create(args: argparse.Namespace, config: Config) -> int:
    from pipeline.errors import ValidationFailed
    from pipeline.projects import create_project, project_settings

    try:
        settings = project_settings(args.name, args.from_email, args.from_name or args.name)
    except ValidationFailed as exc:
        options = {"name": "--name", "fromEmail": "--from-email", "fromName": "--from-name"}
        raise ConfigError("; ".join(f"{options.get(e.field, e.field)}: {e.message}" for e in exc.errors)) from None

    async def work(db) -> int:
        issued = await db.write(lambda s: create_project(s, settings.name, settings.from_email, settings.from_name))
        print(f"project {issued.project.name} ({issued.project.id})")
        print(f"secret key: {issued.secret_key}")
        print(f"public key: {issued.public_key}")
        print("Keep these now: plunkd stores only their digests and cannot show them again.")
        return 0

    return asyncio.run(_with_db(args, config, work, create=True))


def cmd_project_list(args: argparse.Namespace, config: Config) -> int:
    from storage.projects import list_projects

    async def work(db) -> int:
        projects = await db.read(list_projects)
        if not projects:
            print("no projects yet: plunkd project create --name NAME --from-email ADDRESS")
        for p in projects:
            print(f"{p.id}  {p.name}  from={p.from_email}  pk={p.public_key_hint}")
        return 0

    return asyncio.run(_with_db(args, config, work))


def read_password(args: argparse.Namespace) -> str:
    """The new password: one line on stdin with --password-stdin, else asked twice at the terminal."""
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    import getpass

    first = getpass.getpass("password (10 characters or more): ")
    if getpass.getpass("again: ") != first:
        raise ConfigError("the two passwords differ")
    return first


def cmd_user_create(args: argparse.Namespace, config: Config) -> int:
    from pipeline import accounts
    from pipeline.errors import PipelineError
    from pipeline.projects import require_project
    from storage import accounts as account_store

    password = read_password(args)

    async def work(db) -> int:
        try:
            role = accounts.role_of(args.role)
            project = await db.read(require_project, args.project) if args.project else None
            if project is None and role != "owner":
                raise ConfigError("--role other than owner needs --project (the project to join)")
            user = await accounts.create_user(db, args.email, password, instance_owner=project is None)
            if project is not None:
                await db.write(lambda s: account_store.put_membership(s, project.id, user.id, role))
        except PipelineError as exc:
            raise ConfigError(f"{exc.message}; {'; '.join(e.message for e in getattr(exc, 'errors', []))}"
                              .rstrip("; ")) from None
        where = f"{role} of {project.name}" if project else "owner of this plunkd (every project, the system page)"
        print(f"user {user.email} ({user.id}): {where}; sign in at {config.server.public_url.rstrip('/')}/login")
        return 0

    return asyncio.run(_with_db(args, config, work, create=True))


def cmd_user_password(args: argparse.Namespace, config: Config) -> int:
    from pipeline import accounts
    from pipeline.errors import PipelineError

    password = read_password(args)

    async def work(db) -> int:
        try:
            user = await accounts.set_password_by_email(db, args.email, password)
        except PipelineError as exc:
            raise ConfigError(f"{exc.message}; {'; '.join(e.message for e in getattr(exc, 'errors', []))}"
                              .rstrip("; ")) from None
        print(f"new password for {user.email}; every session of it is signed out")
        return 0

    return asyncio.run(_with_db(args, config, work))


def cmd_keys_rotate(args: argparse.Namespace, config: Config) -> int:
    from pipeline.projects import rotate_keys

    async def work(db) -> int:
        issued = await db.write(lambda s: rotate_keys(s, args.project))
        print(f"new keys for {issued.project.name} ({issued.project.id}); the old ones stop working now")
        print(f"secret key: {issued.secret_key}")
        print(f"public key: {issued.public_key}")
        return 0

    return asyncio.run(_with_db(args, config, work))


def cmd_contacts_import(args: argparse.Namespace, config: Config) -> int:
    from tqdm import tqdm

    from pipeline.imports import import_contacts, survey
    from pipeline.projects import require_project

    if not Path(args.file).is_file():
        raise ConfigError(f"{args.file}: no such file")

    async def work(db) -> int:
        project = await db.read(require_project, args.project)
        columns = await asyncio.to_thread(survey, args.file, args.strings)
        with tqdm(total=columns.rows, unit="row", desc="importing", file=sys.stderr) as bar:
            summary = await import_contacts(db, project.id, args.file, columns.types, bar.update,
                                            config.api.max_data_bytes)
            bar.update(columns.rows - bar.n)
        if columns.types:
            print("columns: " + ", ".join(f"{name} {'empty (left out)' if kind == 'empty' else kind}"
                                          for name, kind in columns.types.items()))
        print(f"imported into {project.name}: {summary.created} created, {summary.updated} updated, "
              f"{summary.skipped_total} skipped")
        for reason, count in summary.skipped.most_common():
            print(f"  skipped {count}: {reason}")
        for line, reason in summary.failures:
            print(f"  line {line}: {reason}")
        if summary.skipped_total > len(summary.failures):
            print(f"  ... and {summary.skipped_total - len(summary.failures)} more rows not imported")
        return 0

    return asyncio.run(_with_db(args, config, work))


def _print_domain(domain, config: Config) -> None:
    from pipeline.domains import inbound_host, records

    state = "verified" if domain.verified else "NOT verified"
    print(f"{domain.name} ({domain.id}): {state}")
    if domain.return_path:
        print(f"  return path {domain.return_path}: {'verified' if domain.return_path_verified else 'NOT verified'}")
    for record in records(domain, config.delivery.transport, inbound_host(config)):
        print(f"  {record.purpose:5} {record.type} {record.name}\n        {record.value}")


def cmd_domain_add(args: argparse.Namespace, config: Config) -> int:
    from pipeline.domains import add_new_domain
    from pipeline.projects import require_project

    async def work(db) -> int:
        project = await db.read(require_project, args.project)
        domain = await add_new_domain(db, project.id, args.domain, config.delivery.dkim_selector,
                                      config.api.max_domains_per_project, args.return_path)
        print("Publish these DNS records, then run: plunkd domain verify", domain.name, "--project", args.project)
        _print_domain(domain, config)
        return 0

    return asyncio.run(_with_db(args, config, work))


def cmd_domain_verify(args: argparse.Namespace, config: Config) -> int:
    from pipeline.domains import normalize_domain, require_domain, save_check, verify
    from pipeline.projects import require_project

    if args.offline and config.delivery.transport != "file":
        raise ValueError(f"--offline is only for the file transport (nothing leaves this machine); "
                         f"delivery.transport is {config.delivery.transport!r}, so publish the records")

    async def work(db) -> int:
        project = await db.read(require_project, args.project)
        domain = await db.read(require_domain, project.id, normalize_domain(args.domain))
        if args.offline:
            check = {"verified": True, "method": "offline (file transport)"}
        else:
            from delivery.ses import ses_identity_verified

            check = await verify(domain, config, ses_identity_verified)
        domain = await db.write(lambda s: save_check(s, domain.id, check))
        _print_domain(domain, config)
        print("checks:", ", ".join(f"{k}={v}" for k, v in check.items()))
        return 0 if domain.verified else 2

    return asyncio.run(_with_db(args, config, work))


def cmd_domain_list(args: argparse.Namespace, config: Config) -> int:
    from pipeline.projects import require_project
    from storage.domains import list_domains

    async def work(db) -> int:
        project = await db.read(require_project, args.project)
        for domain in await db.read(list_domains, project.id):
            _print_domain(domain, config)
        return 0

    return asyncio.run(_with_db(args, config, work))


def cmd_secrets_rotate(args: argparse.Namespace, config: Config) -> int:
    from tqdm import tqdm

    from plunkd.atrest import rotate

    async def work(db) -> int:
        with tqdm(unit="secret", desc="sealing", file=sys.stderr, disable=None) as bar:  # None: only on a terminal
            def counted(total: int) -> None:
                bar.total = total
                bar.refresh()

            done = await rotate(db, config, counted, bar.update)
        print(done)
        return 0

    return asyncio.run(_with_db(args, config, work, open_keys=False))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plunkd", description="Self-hosted, Plunk-compatible email server")
    parser.add_argument("--config", help="TOML config file (default: $PLUNKD_CONFIG or ./plunkd.toml)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP API, the SMTP relay and the dispatcher")
    serve.add_argument("--role", default="all",
                       help="what this process runs: a comma-separated list of api, relay, dispatcher (default all; "
                            "the dispatcher then runs in a child process unless delivery.own_process = false)")
    serve.set_defaults(func=cmd_serve)
    sub.add_parser("migrate", help="bring the database schema up to date").set_defaults(func=cmd_migrate)
    sub.add_parser("vacuum", help="SQLite: rewrite the file once so that pruning can shrink it (incremental "
                                  "auto-vacuum). Stop plunkd first: it holds the write lock throughout and needs "
                                  "free disk as large as the database").set_defaults(func=cmd_vacuum)

    project = sub.add_parser("project", help="create and list projects").add_subparsers(
        dest="action", required=True)
    create = project.add_parser("create", help="create a project and print its keys once")
    create.add_argument("--name", required=True)
    create.add_argument("--from-email", required=True, help="default sender address")
    create.add_argument("--from-name", default="", help="default sender name (default: the project name)")
    create.set_defaults(func=cmd_project_create)
    project.add_parser("list", help="list projects").set_defaults(func=cmd_project_list)

    user = sub.add_parser("user", help="dashboard users").add_subparsers(dest="action", required=True)
    make_user = user.add_parser("create", help="create a dashboard user (the first: --role owner)")
    make_user.add_argument("--email", required=True)
    make_user.add_argument("--role", default="owner", help="owner (without --project: owner of this plunkd), "
                                                             "or with --project: owner, admin, editor or viewer")
    make_user.add_argument("--project", default="", help="project id or name to join with --role")
    make_user.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    make_user.set_defaults(func=cmd_user_create)
    password = user.add_parser("password", help="set a user's password (signs out all their sessions)")
    password.add_argument("--email", required=True)
    password.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    password.set_defaults(func=cmd_user_password)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    rotate = keys.add_parser("rotate", help="replace a project's keys and print the new ones once")
    rotate.add_argument("--project", required=True, help="project id or name")
    rotate.set_defaults(func=cmd_keys_rotate)

    secrets = sub.add_parser("secrets", help="the key that seals DKIM keys and webhook secrets in the database")
    secrets.add_subparsers(dest="action", required=True).add_parser(
        "rotate", help="seal every secret with a new key (key file: made now, the old one dropped when done; "
                       "security.encryption_key: the configured one). Stop plunkd first, start it after: it "
                       "holds the old key until then. Resumable: run it again if it was interrupted"
    ).set_defaults(func=cmd_secrets_rotate)

    domain = sub.add_parser("domain", help="sending domains").add_subparsers(dest="action", required=True)
    for action, func, text in (("add", cmd_domain_add, "add a domain: make its DKIM key, print the DNS records"),
                               ("verify", cmd_domain_verify, "check the domain's DNS records (exit 2 if not yet)")):
        cmd = domain.add_parser(action, help=text)
        cmd.add_argument("domain")
        cmd.add_argument("--project", required=True, help="project id or name")
        cmd.set_defaults(func=func)
        if action == "add":
            cmd.add_argument("--return-path", metavar="SUBDOMAIN",
                             help="MAIL FROM subdomain (e.g. bounces.example.com): bounces come back to plunkd")
        if action == "verify":
            cmd.add_argument("--offline", action="store_true",
                             help="mark it verified without DNS; only with the file transport (for trying plunkd)")
    listing = domain.add_parser("list", help="list a project's domains and their records")
    listing.add_argument("--project", required=True, help="project id or name")
    listing.set_defaults(func=cmd_domain_list)

    contacts = sub.add_parser("contacts", help="manage contacts").add_subparsers(dest="action", required=True)
    imp = contacts.add_parser("import", help="import contacts from a CSV file with an 'email' column; each other "
                                             "column is typed from its values (integer, decimal, true/false, ISO "
                                             "date, else text), empty cells are left out")
    imp.add_argument("file")
    imp.add_argument("--strings", action="store_true", help="keep every value as text (no type inference)")
    imp.add_argument("--project", required=True, help="project id or name")
    imp.set_defaults(func=cmd_contacts_import)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipeline.errors import PipelineError

    os.umask(PRIVATE_UMASK)  # what plunkd makes (database, outbox, keys) is readable by its user only
    args = build_parser().parse_args(argv)
    try:
        config = _config(args)
        return args.func(args, config)
    except (ConfigError, PipelineError, ValueError, OSError) as exc:
        print(f"plunkd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
