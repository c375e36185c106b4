"""Where outbound webhooks may go, one set of rules for endpoint webhooks (`pipeline.webhooks`) and workflow
webhook steps (`pipeline.workflows.definitions`): the URL's form (`url_problem`), and unless
`webhooks.allow_private_targets`, only globally routable addresses.

The decision is made on addresses, never on how a host is spelt: `check_target` (when a URL is saved)
resolves the host with getaddrinfo, in a small pool of its own and within `RESOLVE_SECONDS`, so
`2130706433`, `0x7f000001`, `0177.0.0.1`, `127.1` and names from /etc/hosts come back as the 127.0.0.1 they
are; IPv6 forms that carry an IPv4 address (mapped, compatible `::a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4,
Teredo) are judged by that IPv4 address (`public_address`). The client (`webhooks.client`) decides
again on every address it connects to, so a name that resolved to a public address when it was saved and
to a private one later (DNS rebinding) is refused too. A name that does not resolve when it is saved is
accepted: it may exist later, and the connect-time check is the one that holds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from pipeline.errors import FieldError, ValidationFailed

MAX_URL = 2048
URL = re.compile(r"[Hh][Tt][Tt][Pp][Ss]?://[^\s/?#]+([/?#]\S*)?")
URL_PATTERN = "^[Hh][Tt][Tt][Pp][Ss]?://[^\\s/?#]+([/?#]\\S*)?$"
RESOLVE_SECONDS = 5.0
"""How long a lookup may take when a URL is saved (after which the name counts as not resolving)."""
RESOLVER_THREADS = 4
"""Lookups at once; a lookup that hangs holds its thread, so they get a pool of their own, not the
event loop's default executor (DKIM signing, tracking)."""
_LOCAL_NAMES = ("localhost", "localhost.", "localhost.localdomain")
_EMBEDS_IPV4 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("::/96"))
"""NAT64's well-known prefix and IPv4-compatible addresses: the last 32 bits are the IPv4 address reached."""
_NOT_GLOBAL_V6 = tuple(ipaddress.ip_network(net) for net in ("64:ff9b:1::/48", "fec0::/10", "5f00::/16",
                                                               "3fff::/20"))
"""Not globally routable, though Python 3.11's `is_global` says they are: NAT64 for local use (RFC 8215),
the old site-local block, SRv6 SIDs and the second documentation block."""
_resolver_pool: ThreadPoolExecutor | None = None


def reached_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address
                    ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address a connection to `ip` ends up at: the IPv4 address inside an IPv4-mapped, IPv4-compatible,
    NAT64, 6to4 or Teredo (client) IPv6 address, else `ip` itself."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return ip
    for network in _EMBEDS_IPV4:
        if ip in network:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None) or ip


def public_address(address: str) -> bool:
    """Whether `address` (an IP literal, optionally with a %scope) is globally routable: not loopback,
    private, link-local, shared (CGNAT), multicast, reserved or unspecified, judged on the IPv4 address an
    IPv6 one carries."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and any(ip in network for network in _NOT_GLOBAL_V6):
        return False
    ip = reached_address(ip)
    return ip.is_global and not ip.is_multicast


def private_host(host: str) -> bool:
    """A host that names this machine (localhost names, RFC 6761) or is a non-public address literally
    (other names, and other spellings of addresses, are decided on what they resolve to)."""
    host = host.lower().strip("[]")
    if host in _LOCAL_NAMES or host.endswith((".localhost", ".localhost.")):
        return True
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return not public_address(host)


def url_host(url: str) -> str:
    """The host of `url` (what logs may show of it: the path and query can carry secrets), or ''."""
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


def _private_target(field: str, host: str, address: str | None = None) -> FieldError:
    what = f"{host} resolves to {address}, a" if address else f"{host} is a"
    return FieldError(field, f"{what} loopback or private address (webhooks.allow_private_targets is off)",
                      "private_target")


def url_problem(url: str, allow_private: bool, field: str = "url") -> FieldError | None:
    """Why `url` cannot be a webhook's, or None: http(s) with a host, a valid port, no user or password
    (they would show in logs and the API), at most MAX_URL characters, and (unless `allow_private`) no
    localhost name or non-public address literal. Names are judged by `check_target`."""
    if len(url) > MAX_URL:
        return FieldError(field, f"At most {MAX_URL} characters", "too_big")
    if not URL.fullmatch(url) or any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return FieldError(field, "Expected an http:// or https:// URL with a host", "invalid_url")
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port
    except ValueError:
        return FieldError(field, "Expected an http:// or https:// URL with a host and a valid port", "invalid_url")
    if not host:
        return FieldError(field, "Expected an http:// or https:// URL with a host", "invalid_url")
    if parts.username is not None or parts.password is not None:
        return FieldError(field, "The URL may not carry a user name or password; authenticate the request by "
                                 "its signature", "invalid_url")
    if not allow_private and private_host(host):
        return _private_target(field, host)
    return None


async def resolve(host: str, port: int, family: int = socket.AF_UNSPEC) -> list[tuple[socket.AddressFamily, int, str]]:
    """(family, proto, address) for each TCP address `host` resolves to; OSError when it does not resolve
    within RESOLVE_SECONDS (the lookup's thread is left to finish on its own)."""
    global _resolver_pool
    if _resolver_pool is None:
        _resolver_pool = ThreadPoolExecutor(RESOLVER_THREADS, thread_name_prefix="webhook-dns")
    lookup = asyncio.get_running_loop().run_in_executor(
        _resolver_pool, socket.getaddrinfo, host, port, family, socket.SOCK_STREAM)
    try:
        found = await asyncio.wait_for(lookup, RESOLVE_SECONDS)
    except TimeoutError:
        raise OSError(f"{host} did not resolve within {RESOLVE_SECONDS:g} s") from None
    except UnicodeError as exc:
        raise OSError(f"{host} is not a valid host name") from exc
    return [(family, proto, str(sockaddr[0])) for family, _, proto, _, sockaddr in found]


async def target_problem(url: str, allow_private: bool, field: str = "url") -> FieldError | None:
    """`url_problem`, then (unless `allow_private`) the first non-public address the host resolves to."""
    problem = url_problem(url, allow_private, field)
    if problem is not None or allow_private:
        return problem
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        found = await resolve(host, parts.port or (443 if parts.scheme.lower() == "https" else 80))
    except OSError:
        return None
    for _, _, address in found:
        if not public_address(address):
            return _private_target(field, host, address)
    return None


async def check_target(url: str, allow_private: bool, field: str = "url") -> None:
    """422 unless `url` may be a webhook's (`target_problem`)."""
    problem = await target_problem(url, allow_private, field)
    if problem is not None:
        raise ValidationFailed([problem])
