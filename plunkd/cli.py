"""The `plunkd` command. Every failure is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from plunkd.atrest import PRIVATE_UMASK
from plunkd.config import Config, ConfigError, load_config


def _config(args: argparse.Namespace) -> Config:
    path = args.config or os.environ.get("PLUNKD_CONFIG")
    if not path and Path("plunkd.toml").exists():
        path = "plunkd.toml"
    return load_config(path)


async def _with_db(config: Config, work: Callable[[Any], Awaitable[int]], open_keys: bool = True) -> int:
    """Run `work(db)` on the migrated database; `open_keys`: with the key ring checked and in use, and every
    secret sealed with its current key (`plunkd.atrest.open_secrets`), as at the server's start."""
    from plunkd.atrest import make_private, open_secrets
    from storage.db import Database

    make_private(config)
    db = Database(config.database_url, config.database.pool_size)
    try:
        await db.migrate()
        if open_keys:
            await open_secrets(db, config)
        return await work(db)
    finally:
        await db.dispose()


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    from plunkd.processes import dispatcher_command, parse_roles, share_metrics

    share_metrics(str(config.data_path))  # before anything imports prometheus_client

    from aiohttp import web

    from plunkd.app import create_app, run_without_http, setup_logging

    roles = parse_roles(args.role)
    setup_logging(config.server.log_level)
    child = None
    if "dispatcher" in roles and roles != {"dispatcher"} and config.delivery.enabled and config.delivery.own_process:
        roles.discard("dispatcher")
        child = dispatcher_command(args.config or os.environ.get("PLUNKD_CONFIG"))
    app = create_app(config, roles=roles, dispatcher_command=child)
    if "api" in roles:
        web.run_app(app, host=config.server.host, port=config.server.http_port, access_log=None,
                    print=lambda msg: None)
    else:
        asyncio.run(run_without_http(app))
    return 0


def cmd_migrate(args: argparse.Namespace, config: Config) -> int:
    async def work(db) -> int:
        print(f"database at the latest schema: {db.url.split('@')[-1]}")
        return 0

    return asyncio.run(_with_db(config, work))


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

    return asyncio.run(_with_db(config, work))


def cmd_project_create(args: argparse.Namespace, config: Config) -> int:
    from api.validation import normalize_email
    from pipeline.projects import create_project

    try:
        from_email = normalize_email(args.from_email)
    except Exception as exc:  # pydantic_core.PydanticCustomError
        raise ConfigError(f"--from-email: {exc}") from None

    async def work(db) -> int:
        issued = await db.write(lambda s: create_project(s, args.name, from_email, args.from_name or args.name))
        print(f"project {issued.project.name} ({issued.project.id})")
        print(f"secret key: {issued.secret_key}")
        print(f"public key: {issued.public_key}")
        print("Keep these now: plunkd stores only their digests and cannot show them again.")
        return 0

    return asyncio.run(_with_db(config, work))


def cmd_project_list(args: argparse.Namespace, config: Config) -> int:
    from storage.projects import list_projects

    async def work(db) -> int:
        projects = await db.read(list_projects)
        if not projects:
            print("no projects yet: plunkd project create --name NAME --from-email ADDRESS")
        for p in projects:
            print(f"{p.id}  {p.name}  from={p.from_email}  sk={p.secret_key_hint}  pk={p.public_key_hint}")
        return 0

    return asyncio.run(_with_db(config, work))


def cmd_keys_rotate(args: argparse.Namespace, config: Config) -> int:
    from pipeline.projects import rotate_keys

    async def work(db) -> int:
        issued = await db.write(lambda s: rotate_keys(s, args.project))
        print(f"new keys for {issued.project.name} ({issued.project.id}); the old ones stop working now")
        print(f"secret key: {issued.secret_key}")
        print(f"public key: {issued.public_key}")
        return 0

    return asyncio.run(_with_db(config, work))


def cmd_contacts_import(args: argparse.Namespace, config: Config) -> int:
    from tqdm import tqdm

    from pipeline.imports import count_rows, import_contacts
    from pipeline.projects import require_project

    if not Path(args.file).is_file():
        raise ConfigError(f"{args.file}: no such file")

    async def work(db) -> int:
        project = await db.read(require_project, args.project)
        total = count_rows(args.file)
        with tqdm(total=total, unit="row", desc="importing", file=sys.stderr) as bar:
            summary = await import_contacts(db, project.id, args.file, bar.update)
            bar.update(total - bar.n)
        print(f"imported into {project.name}: {summary.created} created, {summary.updated} updated, "
              f"{summary.skipped_total} skipped")
        for reason, count in summary.skipped.most_common():
            print(f"  skipped {count}: {reason}")
        return 0

    return asyncio.run(_with_db(config, work))


def _print_domain(domain, transport: str) -> None:
    from pipeline.domains import records

    state = "verified" if domain.verified else "NOT verified"
    print(f"{domain.name} ({domain.id}): {state}")
    for record in records(domain, transport):
        print(f"  {record.purpose:5} {record.type} {record.name}\n        {record.value}")


def cmd_domain_add(args: argparse.Namespace, config: Config) -> int:
    from pipeline.domains import add_new_domain
    from pipeline.projects import require_project

    async def work(db) -> int:
        project = await db.read(require_project, args.project)
        domain = await add_new_domain(db, project.id, args.domain, config.delivery.dkim_selector,
                                      config.api.max_domains_per_project)
        print("Publish these DNS records, then run: plunkd domain verify", domain.name, "--project", args.project)
        _print_domain(domain, config.delivery.transport)
        return 0

    return asyncio.run(_with_db(config, work))


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
            check = await verify(domain, config)
        domain = await db.write(lambda s: save_check(s, domain.id, check))
        _print_domain(domain, config.delivery.transport)
        print("checks:", ", ".join(f"{k}={v}" for k, v in check.items()))
        return 0 if domain.verified else 2

    return asyncio.run(_with_db(config, work))


def cmd_domain_list(args: argparse.Namespace, config: Config) -> int:
    from pipeline.projects import require_project
    from storage.domains import list_domains

    async def work(db) -> int:
        project = await db.read(require_project, args.project)
        for domain in await db.read(list_domains, project.id):
            _print_domain(domain, config.delivery.transport)
        return 0

    return asyncio.run(_with_db(config, work))


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

    return asyncio.run(_with_db(config, work, open_keys=False))


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
        if action == "verify":
            cmd.add_argument("--offline", action="store_true",
                             help="mark it verified without DNS; only with the file transport (for trying plunkd)")
    listing = domain.add_parser("list", help="list a project's domains and their records")
    listing.add_argument("--project", required=True, help="project id or name")
    listing.set_defaults(func=cmd_domain_list)

    contacts = sub.add_parser("contacts", help="manage contacts").add_subparsers(dest="action", required=True)
    imp = contacts.add_parser("import", help="import contacts from a CSV file with an 'email' column")
    imp.add_argument("file")
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
