"""Configuration: a TOML file, then `PLUNKD_<SECTION>_<KEY>` environment variables on top.

Every key has a typed default here; `config.example.toml` documents the same keys. A bad value
raises `ConfigError` whose message is one line naming the key, which the CLI prints as is.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A configuration value is missing or malformed; the message names the key."""


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    http_port: int = 8080
    data_dir: str = "./data"
    public_url: str = "http://127.0.0.1:8080"
    """The base of links in emails. Left at its default, it follows `host` and `http_port` when they are set
    (`load_config`); behind a proxy or on a public host, set it."""
    log_level: str = "INFO"
    max_connections: int = 1000
    """Concurrent HTTP connections; more get 503 TOO_MANY_CONNECTIONS and the close. Lowered at start-up
    with smtp.max_sessions when both do not fit the open-file limit (`core.connections`)."""
    max_connections_per_ip: int = 100
    """Concurrent HTTP connections from one client address (behind a reverse proxy: the proxy's)."""
    header_timeout_seconds: float = 10.0
    """A connection whose next request's headers are not complete this long after it opened (or after
    the previous response) is closed: 408 if part of a request came, silently if it sat idle."""
    body_timeout_seconds: float = 60.0
    """A request's body must be in this long after its headers (408 and the close otherwise)."""
    link_secret: str = ""
    """Signs unsubscribe/preferences links and open/click tracking links (32+ characters); empty: one generated
    into data_dir on first start."""
    heartbeat_seconds: float = 5.0
    """How often each process writes its row in the node registry (the system page's node list)."""
    node_stale_seconds: float = 30.0
    """A process without a heartbeat for this long is shown as stale (its row is pruned after a day)."""
    processes: int = 0
    """Acceptor processes (API + SMTP relay) sharing the ports with SO_REUSEPORT; 0: one per core beyond the
    first, at least one (`acceptor_processes`)."""
    inbound_host: str = ""
    """The host name of plunkd's inbound SMTP, the MX a domain's return path publishes; empty: smtp.hostname."""


def fanout_chunk_for(delivery: DeliveryConfig, postgres: bool) -> int:
    """`delivery.fanout_chunk`, or with 0: 1,000 on SQLite, whose one writer makes a request wait for the chunk
    being committed (a 2,000 chunk took about 60 ms, a 1,000 one about 35), and 2,000 on PostgreSQL, where a
    chunk commits on a connection of its own and API writes do not wait for it."""
    return delivery.fanout_chunk or (2000 if postgres else 1000)


def acceptor_processes(server: ServerConfig) -> int:
    """`server.processes`, or with 0 one per core this process may run on beyond the first (the dispatcher's),
    at least one."""
    return server.processes or max(1, len(os.sched_getaffinity(0)) - 1)


@dataclass
class DatabaseConfig:
    url: str = ""
    """Empty means `sqlite+aiosqlite:///<data_dir>/plunkd.sqlite3`."""
    pool_size: int = 10


@dataclass
class ApiConfig:
    rate_limit_per_minute: int = 1000
    max_body_bytes: int = 15 * 1024 * 1024
    idempotency_hours: int = 24
    max_data_bytes: int = 64 * 1024
    """The JSON size of `data` one call may carry (track, contacts, send)."""
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    """Origins allowed to call /v1/track from a browser; ["*"] = any. No other route serves CORS."""
    max_domains_per_project: int = 50
    """Sending domains one project may add (POST /domains and `plunkd domain add`); 422 beyond."""
    metrics_token: str = ""
    """When set, GET /metrics wants `Authorization: Bearer <metrics_token>` (401 otherwise); empty: open."""


@dataclass
class SmtpConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    """Like server.host, loopback unless set: "0.0.0.0" serves every interface."""
    tls_port: int = 465
    starttls_port: int = 587
    hostname: str = "localhost"
    cert_file: str = ""
    key_file: str = ""
    max_recipients: int = 50
    max_message_bytes: int = 10 * 1024 * 1024
    """The relay's SIZE, and the most a templated send (API, campaign, workflow) may render and compose to."""
    auth_failure_limit: int = 5
    lockout_seconds: int = 300
    max_sessions: int = 1000
    """Concurrent SMTP sessions over both ports; more connections get 421 4.7.0 (465: closed before TLS).
    Lowered at start-up when it does not fit the open-file limit with room for the HTTP API."""
    max_sessions_per_ip: int = 50
    """Concurrent SMTP sessions from one client address (Postfix's default for the same limit)."""
    idle_timeout_seconds: float = 60.0
    """A session that sends nothing for this long is closed (also the bound on the TLS handshake). Before
    AUTH only progress counts: the first EHLO/HELO (again after STARTTLS) and STARTTLS, not NOOP, RSET,
    HELP, VRFY or a repeated EHLO."""
    unauthenticated_lifetime_seconds: float = 60.0
    """A session not authenticated this long after it began gets `421 4.4.2` and the close."""
    max_unauthenticated_percent: int = 50
    """Share of max_sessions that sessions not (yet) authenticated may hold; the rest is kept for
    sessions that logged in."""


@dataclass
class InboundConfig:
    """Inbound SMTP (`inbound.server`): bounces (DSNs) and complaint reports (ARF) to VERP addresses, routed mail."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 25
    """Falls back to 2525 for a user who may not bind 25."""
    hostname: str = "localhost"
    max_message_bytes: int = 10 * 1024 * 1024
    max_recipients: int = 50
    max_sessions: int = 200
    max_sessions_per_ip: int = 20
    idle_timeout_seconds: float = 60.0
    session_lifetime_seconds: float = 600.0
    """A session is closed (`421 4.4.2`) this long after it began, whatever it sends."""
    verp_days: int = 30
    """A VERP address is accepted this many days after the email was sent; a later bounce is refused at RCPT."""


@dataclass
class SmarthostConfig:
    host: str = "127.0.0.1"
    port: int = 25
    starttls: bool = False
    use_tls: bool = False
    username: str = ""
    password: str = ""
    timeout_seconds: float = 30.0
    ca_file: str = ""


@dataclass
class SesConfig:
    region: str = "us-east-1"
    endpoint_url: str = ""
    access_key_id: str = ""
    secret_access_key: str = ""
    configuration_set: str = ""


@dataclass
class DeliveryConfig:
    enabled: bool = True
    own_process: bool = True
    """`plunkd serve` runs the dispatcher in a child process it watches, so delivery never takes the
    acceptance process's core; false runs it in the serving process."""
    transport: str = "file"
    rate_per_second: float = 14.0
    """0 turns the limit off. With the SES transport, SES's own quota wins when it is lower."""
    lease_seconds: int = 120
    max_attempts: int = 8
    retry_base_seconds: float = 30.0
    batch_size: int = 50
    concurrency: int = 8
    poll_seconds: float = 0.5
    fanout_chunk: int = 0
    """Campaign recipients queued per transaction (bigger: a campaign queues sooner; smaller: the write
    lock is held for less time while API and SMTP mail wait); 0: `fanout_chunk_for` the database."""
    outbox_dir: str = ""
    """Empty means `<data_dir>/outbox` (file transport)."""
    dkim_selector: str = "plunkd"
    keep_content_days: int = 7
    """Days the MIME bytes of a settled email (sent, failed, suppressed) are kept; 0 = forever."""
    keep_days: int = 90
    """Days email rows are kept (their events stay); 0 = forever."""
    smtp: SmarthostConfig = field(default_factory=SmarthostConfig)
    ses: SesConfig = field(default_factory=SesConfig)


@dataclass
class DnsConfig:
    nameservers: list[str] = field(default_factory=list)
    """Empty means the system resolver."""
    port: int = 53
    timeout_seconds: float = 5.0
    recheck_hours: float = 6.0
    """Every verified (or held) domain's records are checked again this often (`domaincheck/`); 0: never."""


@dataclass
class ReputationConfig:
    """The reputation guard (`pipeline.reputation`): a project's bounce and complaint rates over 7 days."""

    min_sends: int = 500
    """Fewer sends in the window: no rate is judged."""
    complaint_warn: float = 0.001
    bounce_warn: float = 0.02
    """Above a warning level: `reputation.warning` (event and webhook), once per crossing."""
    complaint_pause: float = 0.003
    bounce_pause: float = 0.05
    """Above a pause level: the project's campaigns and workflow sends pause (transactional mail goes on)."""


@dataclass
class RoutesConfig:
    """Inbound routes (`/inbound/routes`) and the `email.received` of the mail they receive."""

    max_per_project: int = 100
    auth_timeout_seconds: float = 10.0
    """The whole SPF + DKIM + DMARC check of one message; what has not finished is recorded `temperror`."""
    event_body_chars: int = 65536
    """Characters of the text and of the HTML body copied into the event (the raw message keeps all)."""


SNS_HOST_PATTERN = r"^sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$"
"""Amazon SNS's own hosts, where signing certificates and subscription confirmations live."""


@dataclass
class FeedbackConfig:
    """SES delivery feedback through SNS (`POST /webhooks/incoming/sns`)."""

    sns_topic_arns: list[str] = field(default_factory=list)
    """The SNS topics whose messages are accepted; none: every message is refused (403)."""
    sns_host_pattern: str = SNS_HOST_PATTERN
    """Regex the host (and port, if any) of a signing certificate URL or a SubscribeURL must match fully;
    both must be https. Only tests and private SNS emulators change it."""
    sns_ca_file: str = ""
    """CA bundle trusted when fetching signing certificates and SubscribeURLs; "" = the system's."""
    sns_max_age_seconds: int = 3600
    """A message whose Timestamp is older than this is refused (SNS stops retrying within an hour)."""
    sns_max_body_bytes: int = 1024 * 1024
    sns_fetch_timeout_seconds: float = 10.0
    """Bound on fetching a signing certificate or confirming a subscription."""


@dataclass
class WebhooksConfig:
    """Outbound webhooks (`webhooks.sender`): signed POSTs of a project's events to its endpoints. Workflow
    webhook steps POST under the same rules, through the same client (`webhooks.client`)."""

    enabled: bool = True
    """Run the sender beside the dispatcher (deliveries are queued whatever this says)."""
    allow_private_targets: bool = False
    """Allow endpoints and workflow webhook steps on loopback, private, link-local and other non-public
    addresses (tests, a private network); false refuses them at the API (after DNS) and again at every
    connection (`pipeline.webhook_targets`)."""
    max_endpoints_per_project: int = 20
    timeout_seconds: float = 10.0
    """A POST's whole time (connect, send, the reply's head and the read of its body)."""
    max_response_bytes: int = 65536
    """Bytes of a reply's body read at most; the rest is not read."""
    retry_base_seconds: float = 10.0
    """Delay before the second attempt; doubles each attempt (with jitter) up to `retry_max_seconds`."""
    retry_max_seconds: float = 14400.0
    give_up_after_seconds: float = 86400.0
    """A delivery not answered with a 2xx within this time of its event FAILS."""
    disable_after_failures: int = 20
    """An endpoint whose last attempts all failed, at least this many of them over at least
    `disable_after_seconds`, is disabled (with the reason)."""
    disable_after_seconds: float = 86400.0
    concurrency: int = 16
    """POSTs in flight at once (per process)."""
    batch_size: int = 50
    lease_seconds: float = 60.0
    """A claimed delivery whose outcome is not recorded in this time (its sender died) is sent again."""
    poll_seconds: float = 0.5
    keep_days: int = 30
    """Days delivered and failed deliveries (and their attempt logs) are kept; 0 = forever."""


@dataclass
class SecurityConfig:
    """The key that seals DKIM private keys and webhook secrets in the database (`storage.secrets`)."""

    encryption_key: str = ""
    """Base64 of 32 random bytes (`openssl rand -base64 32`); empty: the key file. Nodes sharing a database
    need the same key."""
    previous_encryption_keys: list[str] = field(default_factory=list)
    """Keys that still open secrets sealed before a rotation (start-up seals them again with encryption_key)."""
    key_file: str = ""
    """Used when encryption_key is empty; empty means `<data_dir>/encryption.key`, made (0600) on first start."""


@dataclass
class DashboardConfig:
    """The web dashboard's accounts and sessions (`dashboard/`, `pipeline/accounts.py`)."""

    enabled: bool = True
    session_idle_hours: float = 12.0
    """A session unused this long is ended (signed out)."""
    session_max_days: float = 14.0
    """A session ends this long after sign-in, used or not."""
    login_failure_limit: int = 5
    """Wrong passwords in a row, per account and per client address, before sign-in is refused..."""
    lockout_seconds: int = 300
    """...for this long after the first of them (the rule SMTP AUTH follows)."""
    mail_project: str = ""
    """The project (id or name) whose sender and pipeline mail invitations and password resets; empty: the
    dashboard shows the link to pass on instead of mailing it."""
    max_upload_bytes: int = 50 * 1024 * 1024
    """The largest CSV a contact import may upload."""
    max_form_bytes: int = 16 * 1024 * 1024
    """The largest form or JSON body a dashboard page accepts (uploads have `max_upload_bytes`); read before
    the CSRF check, so it bounds what a signed-out client makes the server parse."""


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    inbound: InboundConfig = field(default_factory=InboundConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    routes: RoutesConfig = field(default_factory=RoutesConfig)
    reputation: ReputationConfig = field(default_factory=ReputationConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)

    @property
    def data_path(self) -> Path:
        return Path(self.server.data_dir)

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite+aiosqlite:///{self.data_path / 'plunkd.sqlite3'}"

    @property
    def outbox_path(self) -> Path:
        return Path(self.delivery.outbox_dir) if self.delivery.outbox_dir else self.data_path / "outbox"

    @property
    def key_file_path(self) -> Path:
        return Path(self.security.key_file) if self.security.key_file else self.data_path / "encryption.key"


TRANSPORTS = ("file", "smtp", "ses")


def _coerce(key: str, kind: Any, value: Any, from_env: bool) -> Any:
    """Turn a TOML or environment value into the declared type, or raise naming the key."""
    kind_name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    try:
        if kind_name == "bool":
            if isinstance(value, bool):
                return value
            if from_env and str(value).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return str(value).lower() in ("1", "true", "yes", "on")
            raise ValueError
        if kind_name == "int":
            if isinstance(value, bool) or (not from_env and not isinstance(value, int)):
                raise ValueError
            return int(value)
        if kind_name == "float":
            if isinstance(value, bool) or (not from_env and not isinstance(value, int | float)):
                raise ValueError
            return float(value)
        if kind_name == "str":
            if not isinstance(value, str):
                raise ValueError
            return value
        if kind_name.startswith("list"):
            if from_env:
                return [part.strip() for part in str(value).split(",") if part.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return value
    except ValueError:
        expected = kind_name.replace("[str]", " of strings")
        raise ConfigError(f"config key {key}: expected {expected}, got {value!r}") from None
    raise ConfigError(f"config key {key}: unsupported type {kind_name}")


def _apply(section: Any, values: dict[str, Any], prefix: str) -> None:
    names = {f.name: f for f in dataclasses.fields(section)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"config key {dotted}: unknown key")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {dotted}: expected a table")
            _apply(current, value, f"{dotted}.")
        else:
            setattr(section, key, _coerce(dotted, names[key].type, value, from_env=False))


def _apply_env(section: Any, env: dict[str, str], prefix: str, dotted_prefix: str) -> None:
    for f in dataclasses.fields(section):
        current = getattr(section, f.name)
        env_name = f"{prefix}_{f.name.upper()}"
        if dataclasses.is_dataclass(current):
            _apply_env(current, env, env_name, f"{dotted_prefix}{f.name}.")
        elif env_name in env:
            setattr(section, f.name, _coerce(f"{dotted_prefix}{f.name} ({env_name})", f.type, env[env_name], True))


SNS_TOPIC_ARN = re.compile(r"arn:aws[a-z-]*:sns:[a-z0-9-]+:[0-9]{12}:[A-Za-z0-9_-]{1,256}(\.fifo)?")


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _validate(config: Config) -> None:
    checks = [
        (config.delivery.transport in TRANSPORTS, "delivery.transport", f"one of {', '.join(TRANSPORTS)}"),
        (config.delivery.rate_per_second >= 0, "delivery.rate_per_second", "a number >= 0"),
        (config.api.rate_limit_per_minute > 0, "api.rate_limit_per_minute", "a number > 0"),
        (config.api.max_data_bytes > 0, "api.max_data_bytes", "a number > 0"),
        (config.api.max_domains_per_project > 0, "api.max_domains_per_project", "a number > 0"),
        (config.routes.max_per_project > 0, "routes.max_per_project", "a number > 0"),
        (config.routes.auth_timeout_seconds > 0, "routes.auth_timeout_seconds", "a number > 0"),
        (config.routes.event_body_chars > 0, "routes.event_body_chars", "a number > 0"),
        (config.smtp.max_recipients > 0, "smtp.max_recipients", "a number > 0"),
        *((getattr(config.inbound, key) > 0, f"inbound.{key}", "a number > 0") for key in (
            "max_message_bytes", "max_recipients", "max_sessions", "max_sessions_per_ip", "idle_timeout_seconds",
            "session_lifetime_seconds", "verp_days")),
        (config.smtp.max_message_bytes > 0, "smtp.max_message_bytes", "a number > 0"),
        (config.smtp.unauthenticated_lifetime_seconds > 0, "smtp.unauthenticated_lifetime_seconds", "a number > 0"),
        (0 < config.smtp.max_unauthenticated_percent <= 100, "smtp.max_unauthenticated_percent",
         "a number from 1 to 100"),
        (config.server.max_connections > 0, "server.max_connections", "a number > 0"),
        (config.server.max_connections_per_ip > 0, "server.max_connections_per_ip", "a number > 0"),
        (config.server.header_timeout_seconds > 0, "server.header_timeout_seconds", "a number > 0"),
        (config.server.body_timeout_seconds > 0, "server.body_timeout_seconds", "a number > 0"),
        (config.server.heartbeat_seconds > 0, "server.heartbeat_seconds", "a number > 0"),
        (config.server.node_stale_seconds > config.server.heartbeat_seconds, "server.node_stale_seconds",
         "a number > server.heartbeat_seconds"),
        (config.delivery.max_attempts > 0, "delivery.max_attempts", "a number > 0"),
        (config.delivery.concurrency > 0, "delivery.concurrency", "a number > 0"),
        (0 <= config.delivery.fanout_chunk <= 50_000, "delivery.fanout_chunk", "a number from 0 (auto) to 50000"),
        (not config.server.link_secret or len(config.server.link_secret) >= 32, "server.link_secret",
         "at least 32 characters (or empty: one is generated into server.data_dir)"),
        (config.delivery.keep_content_days >= 0, "delivery.keep_content_days", "a number of days >= 0"),
        (config.delivery.keep_days >= 0, "delivery.keep_days", "a number of days >= 0"),
        (bool(config.smtp.cert_file) == bool(config.smtp.key_file), "smtp.cert_file",
         "set together with smtp.key_file"),
        (config.server.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "server.log_level",
         "DEBUG, INFO, WARNING or ERROR"),
        (0 <= config.server.processes <= 256, "server.processes", "a number from 0 (one per core) to 256"),
        *_webhook_checks(config.webhooks),
    ]
    checks += _security_checks(config.security)
    checks += [(config.dashboard.session_idle_hours > 0, "dashboard.session_idle_hours", "a number > 0"),
               (config.dashboard.session_max_days > 0, "dashboard.session_max_days", "a number > 0"),
               (config.dashboard.login_failure_limit > 0, "dashboard.login_failure_limit", "a number > 0"),
               (config.dashboard.lockout_seconds > 0, "dashboard.lockout_seconds", "a number > 0"),
               (config.dashboard.max_upload_bytes > 0, "dashboard.max_upload_bytes", "a number > 0"),
               (config.dashboard.max_form_bytes >= 4096, "dashboard.max_form_bytes", "a number >= 4096")]
    checks.append((_compiles(config.feedback.sns_host_pattern), "feedback.sns_host_pattern", "a valid regex"))
    checks += [(bool(SNS_TOPIC_ARN.fullmatch(arn)), "feedback.sns_topic_arns",
                f"SNS topic ARNs like arn:aws:sns:us-east-1:123456789012:ses-feedback, got {arn!r}")
               for arn in config.feedback.sns_topic_arns]
    checks += [(config.feedback.sns_max_age_seconds > 0, "feedback.sns_max_age_seconds", "a number > 0"),
               (config.feedback.sns_max_body_bytes > 0, "feedback.sns_max_body_bytes", "a number > 0"),
               (config.feedback.sns_fetch_timeout_seconds > 0, "feedback.sns_fetch_timeout_seconds", "a number > 0")]
    for port_key in ("server.http_port", "smtp.tls_port", "smtp.starttls_port", "inbound.port", "dns.port"):
        section, key = port_key.split(".")
        port = getattr(getattr(config, section), key)
        checks.append((0 <= port <= 65535, port_key, "a port number 0-65535"))
    url = config.database_url
    checks.append((url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")), "database.url",
                   "a sqlite+aiosqlite:// or postgresql+asyncpg:// URL"))
    for ok, key, expected in checks:
        if not ok:
            raise ConfigError(f"config key {key}: expected {expected}")


def sqlite_file(url: str) -> str:
    """The file an SQLite URL names, as written ("" for another database and for an in-memory one)."""
    if not url.startswith("sqlite") or ":///" not in url:
        return ""
    path = url.split(":///", 1)[1].split("?", 1)[0]
    return "" if path == ":memory:" else path


def _parses_as_key(text: str) -> bool:
    from core.keys import parse_key

    try:
        parse_key(text)
    except ValueError:
        return False
    return True


def _security_checks(security: SecurityConfig) -> list[tuple[bool, str, str]]:
    expected = "base64 of 32 random bytes (openssl rand -base64 32)"
    checks = [(not security.encryption_key or _parses_as_key(security.encryption_key), "security.encryption_key",
               f"{expected} or empty (the key file)"),
              (bool(security.encryption_key) or not security.previous_encryption_keys,
               "security.previous_encryption_keys", "empty unless security.encryption_key is set")]
    checks += [(_parses_as_key(key), "security.previous_encryption_keys", f"a list of {expected}")
               for key in security.previous_encryption_keys]
    return checks


def _webhook_checks(hooks: WebhooksConfig) -> list[tuple[bool, str, str]]:
    return [
        (hooks.max_endpoints_per_project > 0, "webhooks.max_endpoints_per_project", "a number > 0"),
        (0 < hooks.timeout_seconds <= 300, "webhooks.timeout_seconds", "a number of seconds from 0 to 300"),
        (hooks.max_response_bytes >= 0, "webhooks.max_response_bytes", "a number >= 0"),
        (hooks.retry_base_seconds > 0, "webhooks.retry_base_seconds", "a number > 0"),
        (hooks.retry_max_seconds >= hooks.retry_base_seconds, "webhooks.retry_max_seconds",
         "a number >= webhooks.retry_base_seconds"),
        (hooks.give_up_after_seconds > 0, "webhooks.give_up_after_seconds", "a number > 0"),
        (hooks.disable_after_failures > 0, "webhooks.disable_after_failures", "a number > 0"),
        (hooks.disable_after_seconds >= 0, "webhooks.disable_after_seconds", "a number >= 0"),
        (hooks.concurrency > 0, "webhooks.concurrency", "a number > 0"),
        (hooks.batch_size > 0, "webhooks.batch_size", "a number > 0"),
        (hooks.lease_seconds > hooks.timeout_seconds, "webhooks.lease_seconds",
         "a number of seconds > webhooks.timeout_seconds"),
        (hooks.poll_seconds > 0, "webhooks.poll_seconds", "a number > 0"),
        (hooks.keep_days >= 0, "webhooks.keep_days", "a number of days >= 0"),
    ]


def load_config(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> Config:
    """Load defaults, then the TOML file (if given), then environment variables."""
    config = Config()
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        _apply(config, data, "")
    _apply_env(config, dict(os.environ if env is None else env), "PLUNKD", "")
    server = config.server
    if server.public_url == ServerConfig.public_url:
        host = "127.0.0.1" if server.host in ("", "0.0.0.0", "::") else server.host
        server.public_url = f"http://{f'[{host}]' if ':' in host else host}:{server.http_port}"
    _validate(config)
    return config
