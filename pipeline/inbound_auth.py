"""SPF, DKIM and DMARC of an inbound message: recorded in `email.received`, never used to refuse it.

* SPF: pyspf's `check2` on the client IP, MAIL FROM (or the HELO name for a null sender) and HELO.
* DKIM: dkimpy's verify of each DKIM-Signature (the first MAX_SIGNATURES).
* DMARC: the policy record at `_dmarc.<From domain>` (else at its organizational domain); `pass` when SPF
  passed for a domain aligned with the From domain or a valid signature's d= is aligned (relaxed alignment:
  the same organizational domain).

Every lookup goes through the configured resolver (`dns.nameservers`, `dns.port`), each bounded by
`dns.timeout_seconds`, and the whole check by `routes.auth_timeout_seconds`: what has not finished then is
`temperror`. pyspf and dkimpy block, so they run on a small pool of their own (AUTH_THREADS), never on the
loop's default executor that the rest of the server uses; a lookup still running past the deadline ends by
its own DNS lifetime.

Organizational domain: without a public suffix list, the last two labels, or three when the last is a
two-letter country code and the one before it is a short second-level label (`co.uk`, `com.au`). This is
an approximation (a DMARC `pass` between `a.example.pvt.k12.ma.us` and another k12 domain is possible);
it decides only what is recorded.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dkim
import dns.exception
import dns.resolver
import spf

from pipeline.domains import make_resolver, txt_values

MAX_SIGNATURES = 3
AUTH_THREADS = 4
_POOL = ThreadPoolExecutor(max_workers=AUTH_THREADS, thread_name_prefix="inbound-auth")
_worker = threading.local()
"""The blocking resolver of the check running on this pool thread (pyspf looks up through a module function)."""
_PYSPF_LOOKUP = spf.DNSLookup


def _spf_lookup(name: str, qtype: str, strict: bool = True, timeout: float = 30) -> list[tuple[Any, Any]]:
    """pyspf's DNS lookup through the resolver of the check running on this thread (pyspf's own format)."""
    resolver = getattr(_worker, "resolver", None)
    if resolver is None:
        return _PYSPF_LOOKUP(name, qtype, strict, timeout)
    found: list[tuple[Any, Any]] = []
    try:
        answer = resolver.resolve(name, qtype, lifetime=min(timeout, resolver.lifetime), search=False)
    except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
        return found
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
        raise spf.TempError(f"DNS {exc.__class__.__name__}") from None
    for rdata in answer:
        if qtype in ("A", "AAAA"):
            found.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            found.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            found.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            found.append(((name, qtype), rdata.strings))
    return found


spf.DNSLookup = _spf_lookup


def check_spf(resolver: dns.resolver.Resolver, client_ip: str, envelope_from: str, helo: str,
              budget: float) -> dict[str, Any]:
    """SPF on this thread: `{result, domain, explanation}`; `domain` is the one checked (for alignment)."""
    domain = (envelope_from.rpartition("@")[2] if "@" in envelope_from else helo).lower().rstrip(".")
    _worker.resolver = resolver
    try:
        result, explanation = spf.check2(i=client_ip, s=envelope_from, h=helo, timeout=budget, querytime=budget)
    except Exception as exc:  # pyspf raises for addresses and names it cannot read
        result, explanation = "permerror", f"{exc.__class__.__name__}: {exc}"[:200]
    finally:
        _worker.resolver = None
    return {"result": result, "domain": domain, "explanation": str(explanation)[:200]}


def check_dkim(resolver: dns.resolver.Resolver, raw: bytes, budget: float) -> dict[str, Any]:
    """DKIM on this thread: `{result, signatures: [{domain, selector, result}]}`; `result` is pass when one
    signature verifies, none without signatures, fail otherwise (temperror when a key lookup timed out)."""

    def key_txt(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode("ascii", "replace"), "TXT", search=False,
                                      lifetime=min(timeout, budget, resolver.lifetime))
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN, dns.resolver.NoNameservers):
            return None
        except dns.exception.Timeout as exc:
            raise dkim.DnsTimeoutError(str(exc)) from None
        return next((b"".join(rdata.strings) for rdata in answer), None)

    signatures = []
    try:
        verifier = dkim.DKIM(raw)
        count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    except Exception:  # dkimpy raises for messages it cannot split into headers and body
        return {"result": "permerror", "signatures": []}
    for index in range(min(count, MAX_SIGNATURES)):
        verifier = dkim.DKIM(raw)
        try:
            outcome = "pass" if verifier.verify(idx=index, dnsfunc=key_txt) else "fail"
        except dkim.DnsTimeoutError:
            outcome = "temperror"
        except Exception:  # a malformed signature or key (dkimpy's errors and others)
            outcome = "permerror"
        signatures.append({"domain": _text(verifier.domain), "selector": _text(verifier.selector),
                           "result": outcome})
    results = {s["result"] for s in signatures}
    summary = ("none" if not signatures else "pass" if "pass" in results
               else "temperror" if results == {"temperror"} else "fail")
    return {"result": summary, "signatures": signatures}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return (value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)).lower()[:253]


def organizational_domain(domain: str) -> str:
    labels = domain.lower().rstrip(".").split(".")
    keep = 3 if len(labels) >= 3 and len(labels[-1]) == 2 and len(labels[-2]) <= 3 else 2
    return ".".join(labels[-keep:])


def aligned(one: str | None, other: str | None) -> bool:
    if not one or not other:
        return False
    return organizational_domain(one) == organizational_domain(other)


async def dmarc_policy(resolver: Any, from_domain: str) -> str | None:
    """The `p=` of the DMARC record for `from_domain` (or its organizational domain's `sp=`/`p=`)."""
    for name, subdomain in ((from_domain, False), (organizational_domain(from_domain), True)):
        if subdomain and name == from_domain:
            break
        for record in await txt_values(resolver, f"_dmarc.{name}"):
            if record.strip().upper().startswith("V=DMARC1"):
                tags = dict(tag.strip().split("=", 1) for tag in record.split(";") if "=" in tag)
                tags = {key.strip().lower(): value.strip().lower() for key, value in tags.items()}
                return tags.get("sp", tags.get("p")) if subdomain else tags.get("p")
    return None


def dmarc_result(from_domain: str | None, spf_result: dict[str, Any], dkim_result: dict[str, Any],
                 policy: str | None) -> dict[str, Any]:
    spf_aligned = spf_result["result"] == "pass" and aligned(spf_result.get("domain"), from_domain)
    dkim_aligned = any(s["result"] == "pass" and aligned(s["domain"], from_domain)
                       for s in dkim_result.get("signatures", []))
    if from_domain is None:
        outcome = "permerror"
    elif policy is None:
        outcome = "none"
    else:
        outcome = "pass" if spf_aligned or dkim_aligned else "fail"
    return {"result": outcome, "policy": policy, "fromDomain": from_domain, "spfAligned": spf_aligned,
            "dkimAligned": dkim_aligned}


TIMED_OUT = {"result": "temperror", "explanation": "the check did not finish in time"}


async def authenticate(raw: bytes, envelope_from: str, client_ip: str, helo: str, from_domain: str | None,
                       dns_config: Any, timeout: float) -> dict[str, dict[str, Any]]:
    """`{spf, dkim, dmarc}` of the message, within `timeout` seconds."""
    loop = asyncio.get_running_loop()
    blocking = make_resolver(dns_config.nameservers, dns_config.port, dns_config.timeout_seconds,
                             dns.resolver.Resolver)
    resolver = make_resolver(dns_config.nameservers, dns_config.port, dns_config.timeout_seconds)
    spf_task = loop.run_in_executor(_POOL, functools.partial(check_spf, blocking, client_ip, envelope_from,
                                                             helo, timeout))
    dkim_task = loop.run_in_executor(_POOL, functools.partial(check_dkim, blocking, raw, timeout))
    policy_task = asyncio.ensure_future(_policy_or_none(resolver, from_domain))
    checks: list[asyncio.Future[Any]] = [spf_task, dkim_task, policy_task]
    done, pending = await asyncio.wait(checks, timeout=timeout)
    for task in pending:
        task.cancel()
    spf_result = spf_task.result() if spf_task in done else {**TIMED_OUT, "domain": None}
    dkim_result = dkim_task.result() if dkim_task in done else {**TIMED_OUT, "signatures": []}
    policy, looked_up = policy_task.result() if policy_task in done else (None, False)
    dmarc = dmarc_result(from_domain, spf_result, dkim_result, policy)
    if not looked_up:
        dmarc = {**dmarc, **TIMED_OUT}
    return {"spf": spf_result, "dkim": dkim_result, "dmarc": dmarc}


async def _policy_or_none(resolver: Any, from_domain: str | None) -> tuple[str | None, bool]:
    """(the DMARC policy, whether the lookup was made): a DNS failure is recorded as a temperror."""
    if from_domain is None:
        return None, True
    try:
        return await dmarc_policy(resolver, from_domain), True
    except dns.exception.DNSException:
        return None, False
