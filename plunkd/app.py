"""`create_app(config)`: the HTTP app plus every resource the config asks for, each owned by one
cleanup context (database, group-commit writer, dispatcher, SMTP relay)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from api.app import build_api
from api.context import KEYS, LINKS, ON_QUEUED, RATE_LIMITER
from api.ratelimit import EveryLimit, WindowRateLimiter
from core.config import Config, fanout_chunk_for
from core.connections import AcceptFailureLog, ConnectionCaps, SessionLimiter, connection_caps, raise_open_file_limit
from core.files import private_dir
from core.host_counts import HostCounts, SharedGeneration
from pipeline import reputation
from plunkd.atrest import make_private, open_secrets
from plunkd.processes import (
    ROLES,
    WAKE_FD_ENV,
    Acceptors,
    Handover,
    PipeWaker,
    WakePipe,
    supervise,
    supervise_dispatcher,
    watch_parent,
)
from storage.db import Database

if TYPE_CHECKING:
    from relay.server import Relay

log = logging.getLogger("plunkd")
RELAY: web.AppKey[Relay] = web.AppKey("relay")
"""The running relay (its actual ports), for tests and logs."""
INBOUND: web.AppKey[Any] = web.AppKey("inbound")
"""The running inbound SMTP listener (its actual port), for tests and logs."""
CONNECTION_CAPS = web.AppKey("connection_caps", ConnectionCaps)
"""The HTTP connection and SMTP session caps in force: the configured ones, or both lowered to fit the
open-file limit (`core.connections.connection_caps`)."""


@dataclass(frozen=True)
class AcceptorPlan:
    """The main process's acceptor children (`server.processes` - 1): the command each runs, how many, and
    the HTTP listening socket whose address they share (the relay's are `create_app`'s `relay_sockets`)."""

    command: list[str]
    children: int
    http_socket: Any


ACCEPTOR_COUNTS_FILE = "acceptors.counts"


def create_app(config: Config, db: Database | None = None, roles: set[str] | None = None,
               dispatcher_command: list[str] | None = None, relay_sockets: Any = None,
               acceptors: AcceptorPlan | None = None, handover: Handover | None = None) -> web.Application:
    """The app for `roles` (default all, in this process). With `dispatcher_command`, delivery runs in
    that child process instead (see `plunkd.processes`), woken through a pipe when mail is queued.
    `relay_sockets`: the relay's listening sockets, bound before (`relay.server.bind_relay`); none: the
    relay binds them when it starts. `acceptors`: start these acceptor children beside this process;
    `handover`: this process is one of them. Either way the API limit and the SMTP AUTH lockout count in
    the table all acceptors share, and the campaign fan-out runs in the main process only (once per server)."""
    roles = set(ROLES) if roles is None else roles
    reputation.configure(config.reputation)
    db = db or Database(config.database_url, config.database.pool_size, sync_every_commit=roles != {"dispatcher"})
    app = build_api(config, db)
    serves_smtp = "relay" in roles and config.smtp.enabled
    app[CONNECTION_CAPS] = connection_caps(config.server.max_connections if "api" in roles else 0,
                                           config.smtp.max_sessions if serves_smtp else 0,
                                           ("api" in roles) + 2 * serves_smtp, raise_open_file_limit())

    async def storage_ctx(_app: web.Application) -> AsyncIterator[None]:
        make_private(config)
        await db.migrate()
        db.writer.start()
        try:
            await open_secrets(db, config)
        except BaseException:
            await db.dispose()
            raise
        yield
        await db.dispose()

    app.cleanup_ctx.append(storage_ctx)
    if "api" in roles and config.dashboard.enabled:
        from dashboard.app import install

        install(app, config, db, app[KEYS], app[LINKS], app[ON_QUEUED])
        app.cleanup_ctx.append(lambda _app: imports_ctx(app))
    if db.is_postgres and roles & {"api", "relay"}:
        app.cleanup_ctx.append(lambda _app: key_changes_ctx(app, db))
    counts = None
    if acceptors is not None:
        counts = HostCounts(private_dir(config.data_path) / ACCEPTOR_COUNTS_FILE, fresh=True)
    elif handover is not None:
        counts = HostCounts(Path(handover.counts_path))
    if counts is not None and "api" in roles:
        app[RATE_LIMITER] = WindowRateLimiter(config.api.rate_limit_per_minute, counts=counts)
    if counts is not None and not db.is_postgres:
        app[KEYS].share_changes(SharedGeneration(counts, "keys"))
    if db.is_postgres and "api" in roles:
        limiter = shared_request_limit(db, config.api.rate_limit_per_minute)
        app[RATE_LIMITER] = limiter if counts is None else EveryLimit(app[RATE_LIMITER], limiter)
        app.cleanup_ctx.append(lambda _app: running(limiter.run, "api-usage-sync"))
    wake: WakePipe | None = None
    if dispatcher_command is not None:
        pipe = wake = WakePipe()
        app.cleanup_ctx.append(lambda _app: dispatcher_process_ctx(app, dispatcher_command, pipe))
    elif "dispatcher" in roles and config.delivery.enabled:
        app.cleanup_ctx.append(lambda _app: delivery_ctx(app, config, db))
    if handover is not None:
        app.cleanup_ctx.append(lambda _app: handed_over_ctx(app, handover))
    if serves_smtp:
        from relay.limits import AuthLimiter

        auth_limits = counts and AuthLimiter(config.smtp.auth_failure_limit, config.smtp.lockout_seconds, counts)
        app.cleanup_ctx.append(lambda _app: relay_ctx(app, config, db, relay_sockets, auth_limits))
    if "relay" in roles and config.inbound.enabled and handover is None:
        app.cleanup_ctx.append(lambda _app: inbound_ctx(app, config, db))
    if "api" in roles and config.delivery.enabled and handover is None:
        app.cleanup_ctx.append(lambda _app: fanout_ctx(app, config, db))
    if acceptors is not None and counts is not None:
        children = Acceptors(acceptors.command, acceptors.http_socket, relay_sockets, wake, str(counts.path))
        app.cleanup_ctx.append(lambda _app: acceptors_ctx(children, acceptors.children))
    serves = [role for role, runs in (("api", "api" in roles), ("relay", serves_smtp),
                                      ("dispatcher", dispatcher_command is None and "dispatcher" in roles
                                       and config.delivery.enabled)) if runs]
    app.cleanup_ctx.append(lambda _app: heartbeat_ctx(db, serves, config.server.heartbeat_seconds))
    return app


async def heartbeat_ctx(db: Database, roles: list[str], every_seconds: float) -> AsyncIterator[None]:
    """This process's row in the node registry (the dashboard's system page), for as long as it runs."""
    from maintenance.heartbeat import Heartbeat

    heartbeat = Heartbeat(db, roles, every_seconds)
    task = asyncio.create_task(heartbeat.run(), name="heartbeat")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await heartbeat.leave()


async def fanout_ctx(app: web.Application, config: Config, db: Database) -> AsyncIterator[None]:
    """The campaign fan-out, in the acceptance process: its chunks then queue in the same write batcher
    as API and SMTP writes (first come, first served) instead of contending for SQLite's lock from
    another process, where a waiting writer backs off for up to 100 ms at a time."""
    from marketing.fanout import CampaignFanOut

    def queued() -> None:
        for wake in app[ON_QUEUED]:
            wake()

    campaigns = CampaignFanOut(db, app[LINKS], queued, config.delivery.poll_seconds,
                               fanout_chunk_for(config.delivery, db.is_postgres))
    app[ON_QUEUED].append(campaigns.wake)
    task = asyncio.create_task(campaigns.run(), name="campaign-fanout")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def imports_ctx(app: web.Application) -> AsyncIterator[None]:
    """The dashboard's CSV import jobs: at start, those a process that ended left RUNNING are marked FAILED
    (`pipeline.import_jobs`); at shutdown, the ones still running here stop and are marked FAILED."""
    from dashboard.context import IMPORTS

    runner = app[IMPORTS]
    await runner.sweep()
    yield
    await runner.stop()


async def dispatcher_process_ctx(app: web.Application, command: list[str], wake: WakePipe) -> AsyncIterator[None]:
    app[ON_QUEUED].append(wake.notify)
    async with supervise_dispatcher(command, wake):
        yield


async def acceptors_ctx(acceptors: Acceptors, children: int) -> AsyncIterator[None]:
    """The acceptor children, started once this process has migrated the database and made the relay's
    certificate (they use both), restarted when one dies, stopped before the dispatcher."""
    try:
        async with supervise({f"acceptor {index}": acceptors.start for index in range(1, children + 1)},
                             "the connections it held are cut; what it acknowledged is stored"):
            yield
    finally:
        acceptors.close()


async def handed_over_ctx(app: web.Application, handover: Handover) -> AsyncIterator[None]:
    """An acceptor child: queued mail wakes the dispatcher through the main process's pipe; the main
    process gone (end-of-file on the lifeline), this one stops as on SIGTERM."""
    if handover.wake_fd is not None:
        app[ON_QUEUED].append(PipeWaker(handover.wake_fd))
    watch_parent(handover.lifeline_fd, lambda: None, lambda: os.kill(os.getpid(), signal.SIGTERM))
    yield


def smtp_tls(config: Config) -> Any:
    """The TLS context of both SMTP faces: smtp.cert_file / key_file, or a self-signed pair made once."""
    from relay.tls import RelayTls, ensure_self_signed

    if config.smtp.cert_file:
        cert, key = Path(config.smtp.cert_file), Path(config.smtp.key_file)
    else:
        cert, key = ensure_self_signed(config.data_path / "tls", config.smtp.hostname)
    return RelayTls(cert, key)


async def inbound_ctx(app: web.Application, config: Config, db: Database) -> AsyncIterator[None]:
    """Inbound SMTP (bounces and complaint reports to VERP addresses, mail to the projects' inbound routes), in
    this event loop."""
    from inbound.server import Inbound
    from pipeline.inbound_routes import RouteBook
    from pipeline.links import make_signer
    from pipeline.return_path import VerpSigner

    links = make_signer(config.server.link_secret, config.data_path, config.server.public_url)
    inbound = Inbound(db, VerpSigner(links, config.inbound.verp_days), config.inbound, smtp_tls(config).context,
                      routes=RouteBook(db, config))
    await inbound.start()
    app[INBOUND] = inbound
    yield
    await inbound.stop()


async def relay_ctx(app: web.Application, config: Config, db: Database, sockets: Any,
                    auth_limits: Any = None) -> AsyncIterator[None]:
    """The SMTP relay on both ports, in this event loop; SIGHUP reloads its certificate."""
    from relay.server import Relay

    tls = smtp_tls(config)

    def queued() -> None:
        for wake in app[ON_QUEUED]:
            wake()

    relay = Relay(db, app[KEYS], config.smtp, tls, config.api.idempotency_hours, queued,
                  max_sessions=app[CONNECTION_CAPS].smtp, auth_limits=auth_limits)
    await relay.start(sockets)
    app[RELAY] = relay
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, tls.reload)
    yield
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.remove_signal_handler(signal.SIGHUP)
    await relay.stop()


async def delivery_ctx(app: web.Application, config: Config, db: Database) -> AsyncIterator[None]:
    """The dispatcher and its transport, for as long as the server runs, and beside it the pruner, the
    workflow scheduler, the domain re-check and the webhook sender (so one process per node prunes, runs
    workflow steps, re-checks domains and posts webhooks)."""
    from automation.scheduler import WorkflowScheduler
    from delivery.dispatcher import Dispatcher
    from delivery.ses import ses_identity_verified
    from delivery.transports import make_transport
    from domaincheck.rechecker import DomainRechecker
    from feedback.effects import smtp_bounce
    from maintenance.pruner import Pruner
    from pipeline.deferred import DeferredComposer
    from pipeline.links import make_signer
    from pipeline.return_path import VerpSigner
    from pipeline.tracking.links import MessageTracker, TrackingSigner
    from webhooks.sender import WebhookSender

    transport = make_transport(config)
    rate = config.delivery.rate_per_second
    if config.delivery.transport == "ses":
        from delivery.ses import SesTransport

        assert isinstance(transport, SesTransport)  # what make_transport builds for "ses"
        ses_rate = await transport.max_send_rate()
        if ses_rate and (rate <= 0 or ses_rate < rate):
            log.info("using SES's send quota of %.1f/s instead of the configured %.1f/s", ses_rate, rate)
            rate = ses_rate
    links = make_signer(config.server.link_secret, config.data_path, config.server.public_url)
    composer = DeferredComposer(db.read, links, config.smtp.max_message_bytes)
    dispatcher = Dispatcher(db, transport, send_rate_limiter(db, rate), config.delivery,
                            compose_deferred=composer, record_bounce=smtp_bounce,
                            track=MessageTracker(TrackingSigner(links)),
                            verp=VerpSigner(links, config.inbound.verp_days))
    workflows = WorkflowScheduler(db, links, dispatcher.wake, min(config.delivery.poll_seconds, 0.2),
                                  webhooks=config.webhooks, max_bytes=config.smtp.max_message_bytes)
    webhooks = WebhookSender(db, config.webhooks)

    def domain_changed(project_id: str, name: str) -> None:
        dispatcher.forget_domain(project_id, name)
        dispatcher.wake()

    rechecker = DomainRechecker(db, config, ses_identity_verified if config.delivery.transport == "ses" else None,
                                domain_changed)

    def wake() -> None:
        dispatcher.wake()
        workflows.wake()
        webhooks.wake()

    app[ON_QUEUED].append(wake)
    wake_fd = os.environ.get(WAKE_FD_ENV)
    if wake_fd:
        watch_parent(int(wake_fd), wake, lambda: os.kill(os.getpid(), signal.SIGTERM))
    task = asyncio.create_task(dispatcher.run(), name="dispatcher")
    log.info("dispatcher %s started: transport %s, %.1f recipients/s", dispatcher.worker, transport.name, rate)
    pruner = asyncio.create_task(Pruner(db, config.delivery, dashboard=config.dashboard).run(), name="pruner")
    scheduler = asyncio.create_task(workflows.run(), name="workflow-scheduler")
    domains = asyncio.create_task(rechecker.run(), name="domain-recheck")
    senders = [asyncio.create_task(webhooks.run(), name="webhook-sender")] if config.webhooks.enabled else []
    yield
    for background in (pruner, task, scheduler, domains, *senders):
        background.cancel()
    await asyncio.gather(task, pruner, scheduler, domains, *senders, return_exceptions=True)
    await dispatcher.drain()
    await transport.close()


RESERVATION_LEAD = 0.005
"""Seconds ahead of the database's clock a node's send slots begin when the schedule has fallen behind it:
the reply has that long to arrive before them (with `delivery.bucket.CLOCK_SLACK`, 10 ms of event-loop
delay in all), so they are not found passed; each such restart leaves at most this much unused."""


def send_rate_limiter(db: Database, rate: float) -> Any:
    """One node (SQLite): the process's own bucket. PostgreSQL: the schedule every node shares, so N nodes
    together send at `rate`, not N × `rate` (set the same rate on every node)."""
    from delivery.bucket import SharedBucket, TokenBucket
    from storage import cluster

    if not db.is_postgres:
        return TokenBucket(rate)

    async def reserve(span: float) -> cluster.Reservation:
        return await db.write(lambda s: cluster.reserve_slots(s, "send", span, RESERVATION_LEAD), alone=True)

    return SharedBucket(reserve, rate)


async def key_changes_ctx(app: web.Application, db: Database) -> AsyncIterator[None]:
    """PostgreSQL: drop cached keys of a project the moment any process changes them (LISTEN/NOTIFY), so
    a rotated key stops working on every node at once, not after the cache's TTL."""
    from storage import cluster

    keys = app[KEYS]

    def changed(project_id: str | None) -> None:
        if project_id is None:
            keys.forget()
        else:
            keys.forget_project(project_id)
            log.info("keys of project %s changed elsewhere: forgotten here", project_id)

    async with cluster.listening(db.url, cluster.KEYS_CHANNEL, changed):
        yield


def shared_request_limit(db: Database, limit: int) -> Any:
    """PostgreSQL: the per-project API limit summed over every node (see `api.ratelimit`)."""
    from api.ratelimit import Counts, SharedWindowLimiter
    from storage import cluster

    async def sync(counts: Counts, prune_before: int) -> Counts:
        return await db.write(lambda s: cluster.add_api_usage(s, counts, prune_before), alone=True)

    return SharedWindowLimiter(limit, sync)


async def running(work: Callable[[], Coroutine[Any, Any, None]], name: str) -> AsyncIterator[None]:
    """Run `work()` for as long as the app runs."""
    task = asyncio.create_task(work(), name=name)
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def setup_logging(level: str) -> None:
    """The process's log: one line per record on stderr, each passed through `CLIENT_TEXT_FILTER` on the
    root handler, so nothing a client sent can forge a line or reach the log from aiosmtpd."""
    from core.redaction import CLIENT_TEXT_FILTER

    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(CLIENT_TEXT_FILTER)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if level.upper() != "DEBUG":
        logging.getLogger("mail.log").setLevel(logging.WARNING)


def http_site(runner: web.AppRunner, config: Config, sock: Any) -> Any:
    """The HTTP listener on `sock`, with the connection caps and the header timeout (`plunkd.http_server`)."""
    from plunkd.http_server import GuardedSite

    connections = SessionLimiter(runner.app[CONNECTION_CAPS].http, config.server.max_connections_per_ip,
                                 what="http", keys="server.max_connections, server.max_connections_per_ip")
    return GuardedSite(runner, sock, connections, config.server.header_timeout_seconds,
                       config.server.body_timeout_seconds, access_log=None)


SHUTDOWN_SECONDS = 8.0
"""How long a stop may take (requests and deliveries in flight finishing, the database closing). Past it the
process exits at once: a delivery whose outcome was not recorded is sent again after its lease, at most
`delivery.concurrency` of them (as after kill -9)."""


GC_YOUNG_THRESHOLD = 10_000
"""Allocations (less frees) of container objects between two collections of the youngest generation; Python's
default is 700. A write batch of a dozen requests holds more than 700 new objects at once (rows, dicts, parsed
bodies) and frees them at its commit, so at 700 the collector ran about 14 times per 1,000 `/v1/send` and found
nothing to free: 0.22-0.33 s of 20,000 requests' 6.5 s of acceptor CPU on PostgreSQL (3-5 %), and 0.003 s at
10,000."""


def settle_heap() -> None:
    """Once a serving process has started: collect, then move every object alive now (modules, the app, SQLAlchemy's
    compiled statements: about 170,000) out of the collector's sight (`gc.freeze`), so a full collection scans
    what serving made since (about 13,000), not everything; and collect the youngest generation less often
    (`GC_YOUNG_THRESHOLD`)."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)


async def serve(app: web.Application, config: Config, http_socket: Any = None, name: str = "plunkd") -> None:
    """Run `app` until SIGTERM or SIGINT: its resources (database, relay on its bound sockets, dispatcher),
    then the HTTP API on `http_socket` (None: no HTTP listener). Logs where the API listens, and one line
    (naming the process by `name`) when a signal stopped it cleanly."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(AcceptFailureLog(raise_open_file_limit()))
    stop = asyncio.Event()
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        if http_socket is not None:
            site = http_site(runner, config, http_socket)
            await site.start()
            log.info("plunkd API listening on %s (public URL, the base of links in emails: %s)", site.name,
                     config.server.public_url)
        settle_heap()
        await stop.wait()
    finally:
        try:
            await asyncio.wait_for(runner.cleanup(), SHUTDOWN_SECONDS)
        except TimeoutError:
            log.error("%s did not stop within %.0f s; exiting with its work in flight (retried after its lease)",
                      name, SHUTDOWN_SECONDS)
            logging.shutdown()
            os._exit(1)
    log.info("%s stopped cleanly on %s", name, received[0].name)
