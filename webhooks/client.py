"""The one HTTP client of outbound webhooks: endpoint deliveries (`webhooks.sender`) and workflow webhook
steps (`automation.scheduler`) both POST through a `WebhookClient`, under `[webhooks]`'s rules:

* at most `concurrency` POSTs at once, each within `timeout_seconds` (connect, send, the reply's head and
  the read of its body), of which at most `max_response_bytes` of the body are read (the rest never is:
  the connection is dropped); redirects are not followed; no proxy from the environment;
* unless `allow_private_targets`: names are resolved by `PublicOnlyResolver`, which keeps only public
  addresses, and every socket is checked against the address it is about to connect to (`public_socket`,
  which also sees the IP literals aiohttp does not resolve), so no spelling of an address and no DNS
  answer (rebinding included) reaches a loopback, private, link-local or metadata address.

Errors name the URL's host at most, never its path or query, and are one printable line (they go to logs,
delivery records and run histories; a ClientResponseError's own text would carry the whole URL).
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from core.config import WebhooksConfig
from core.http_body import read_at_most
from pipeline.webhook_targets import public_address, resolve, url_host

ERROR_SNIPPET = 200
"""Characters of a failed reply's body kept in its error."""
_NUMERIC = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV


def body_of(payload: dict[str, Any]) -> str:
    """A payload as the JSON a webhook POSTs (and signs)."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


class PublicOnlyResolver(AbstractResolver):
    """DNS (`pipeline.webhook_targets.resolve`), keeping only public addresses: a name that resolves only
    inside (loopback, private, link-local…) fails to connect, whatever it resolved to when it was saved."""

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        found = await resolve(host, port, family)
        allowed = [ResolveResult(hostname=host, host=address, port=port, family=found_family, proto=proto,
                                 flags=_NUMERIC)
                   for found_family, proto, address in found if public_address(address)]
        if not allowed:
            raise OSError(errno.EACCES, f"{host} resolves only to non-public addresses and "
                                        "webhooks.allow_private_targets is off")
        return allowed

    async def close(self) -> None:
        pass


def public_socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """The socket for one address the connector is about to connect to, refused (OSError) unless the
    address is public: the last check, on the very address connected to, whatever resolved it."""
    family, kind, proto, _, sockaddr = addr_info
    if not public_address(str(sockaddr[0])):
        raise OSError(errno.EACCES, f"{sockaddr[0]} is not a public address and webhooks.allow_private_targets "
                                    "is off")
    return socket.socket(family, kind, proto)


class WebhookClient:
    def __init__(self, settings: WebhooksConfig, user_agent: str) -> None:
        self.settings = settings
        self.user_agent = user_agent
        self._http: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(settings.concurrency)
        """POSTs at once; a POST waiting for a slot has not started its `timeout_seconds` yet."""

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            private = self.settings.allow_private_targets
            connector = aiohttp.TCPConnector(limit=self.settings.concurrency,
                                             resolver=None if private else PublicOnlyResolver(),
                                             socket_factory=None if private else public_socket)
            self._http = aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False,
                                               timeout=aiohttp.ClientTimeout(total=self.settings.timeout_seconds))
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def post(self, url: str, body: str, headers: dict[str, str]) -> tuple[int | None, str | None]:
        """POST `body` (JSON) to `url`: the reply's status (None when there was none) and what went wrong
        (None on a 2xx). Never raises for the receiver's sake."""
        if not url_host(url):
            return None, "the URL is not valid"
        headers = {**headers, "Content-Type": "application/json", "User-Agent": self.user_agent,
                   "Accept-Encoding": "identity"}
        timeout = self.settings.timeout_seconds
        async with self._slots:
            try:
                async with self._session().post(url, data=body.encode(), headers=headers,
                                                allow_redirects=False) as reply:
                    text = await read_at_most(reply, self.settings.max_response_bytes)
                    status = reply.status
            except TimeoutError:
                return None, f"no reply within {timeout:g} s"
            except aiohttp.InvalidURL:
                return None, "the URL is not valid"
            except aiohttp.ClientResponseError as exc:
                return None, _printable(f"{type(exc).__name__}: {exc.message}")[:ERROR_SNIPPET]
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                return None, _printable(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        if 200 <= status < 300:
            return status, None
        if 300 <= status < 400:
            return status, f"HTTP {status} (redirects are not followed)"
        snippet = _printable(text.decode("utf-8", "replace"))[:ERROR_SNIPPET]
        return status, f"HTTP {status}: {snippet}" if snippet else f"HTTP {status}"


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text).strip()
