"""Sending domains: generate the DKIM key, say what to publish, check it in DNS."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.resolver
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy.orm import Session

from pipeline.errors import Conflict, FieldError, NotFound, ValidationFailed
from pipeline.events import record_event
from storage import domains as domain_store
from storage.db import Database
from storage.domains import sender_domain
from storage.models import Domain, iso, utcnow

DOMAIN_NAME = r"([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}\.?"
"""A domain name as given (any case, optional trailing dot); also the API's JSON-schema pattern."""
DOMAIN_PATTERN = re.compile(DOMAIN_NAME)
"""Use with `fullmatch`: `$` would let a trailing newline through."""
MAX_DOMAIN_LENGTH = 253
KeyPair = tuple[str, str]
log = logging.getLogger("plunkd.domains")


def generate_key() -> KeyPair:
    """A new RSA-2048 pair: (PKCS#1 PEM private key, base64 DER public key for the DNS `p=` tag)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption()).decode()
    public_der = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return private_pem, base64.b64encode(public_der).decode()


def dkim_txt(public_key_b64: str) -> str:
    return f"v=DKIM1; k=rsa; p={public_key_b64}"


@dataclass
class DnsRecord:
    purpose: str
    type: str
    name: str
    value: str

    def as_dict(self) -> dict[str, str]:
        return {"purpose": self.purpose, "type": self.type, "name": self.name, "value": self.value}


def normalize_domain(name: str) -> str:
    """The stored form: lower case, without the trailing dot. Exactly what DOMAIN_NAME says is accepted
    (no surrounding spaces, ASCII letters only), so the API's schema and its checks agree."""
    domain = name.removesuffix(".").lower()
    if not DOMAIN_PATTERN.fullmatch(name) or len(domain) > MAX_DOMAIN_LENGTH:
        raise ValidationFailed([FieldError("domain", f"'{name}' is not a domain name", "invalid_string")])
    return domain


def spf_value(transport: str) -> str:
    return "v=spf1 include:amazonses.com ~all" if transport == "ses" else "v=spf1 a mx ~all"


def inbound_host(config: Any) -> str:
    """The MX a return path points at: plunkd's inbound SMTP host."""
    return (config.server.inbound_host or config.smtp.hostname).removesuffix(".").lower()


def records(domain: Domain, transport: str, mx_host: str = "") -> list[DnsRecord]:
    """What to publish; with a return path, also its MX (`mx_host`, plunkd's inbound SMTP) and SPF."""
    published = [
        DnsRecord("dkim", "TXT", f"{domain.dkim_selector}._domainkey.{domain.name}", dkim_txt(domain.dkim_public_key)),
        DnsRecord("spf", "TXT", domain.name, spf_value(transport)),
        DnsRecord("dmarc", "TXT", f"_dmarc.{domain.name}", f"v=DMARC1; p=none; rua=mailto:dmarc@{domain.name}"),
    ]
    if domain.return_path:
        published += [DnsRecord("return_path_mx", "MX", domain.return_path, f"10 {mx_host}."),
                      DnsRecord("return_path_spf", "TXT", domain.return_path, spf_value(transport))]
    return published


def normalize_return_path(name: str, domain_name: str) -> str:
    """A return path is a subdomain of its domain (so SPF aligns with the From domain for DMARC)."""
    return_path = name.removesuffix(".").lower()
    if (not DOMAIN_PATTERN.fullmatch(name) or len(return_path) > MAX_DOMAIN_LENGTH
            or not return_path.endswith(f".{domain_name}")):
        problem = f"'{name}' is not a subdomain of {domain_name}"
        raise ValidationFailed([FieldError("returnPath", problem, "invalid_string")],
                               message=f"The return path {problem}",
                               suggestion=f"Use a subdomain such as bounces.{domain_name} (SPF then aligns for DMARC).")
    return return_path


def check_addable(session: Session, project_id: str, domain_name: str, max_domains: int | None) -> None:
    if domain_store.get_domain(session, project_id, domain_name) is not None:
        raise Conflict(f"Domain {domain_name} is already added to this project")
    if max_domains is not None and domain_store.count_domains(session, project_id) >= max_domains:
        raise TooManyDomains(max_domains)


def add_domain(session: Session, project_id: str, name: str, selector: str, key: KeyPair | None = None,
               max_domains: int | None = None, return_path: str | None = None) -> Domain:
    """Insert the domain with its DKIM key pair `key`. Made here when not given, which takes 50-300 ms:
    inside the shared write batch that stalls every write of the server, so the API and the CLI use
    `add_new_domain`, which makes it beforehand in a thread."""
    domain_name = normalize_domain(name)
    domain_store.lock_project_domains(session, project_id)
    check_addable(session, project_id, domain_name, max_domains)
    private_pem, public_b64 = key or generate_key()
    domain = domain_store.insert_domain(session, project_id, domain_name, selector, private_pem, public_b64)
    domain.return_path = None if return_path is None else normalize_return_path(return_path, domain_name)
    return domain


async def add_new_domain(db: Database, project_id: str, name: str, selector: str, max_domains: int,
                         return_path: str | None = None) -> Domain:
    """Check, generate the key pair in a thread (off the event loop and outside any transaction), then
    write. The checks are made again in the write, which a concurrent add may have overtaken; the first
    round only spares a key generation for a request that would be refused."""
    domain_name = normalize_domain(name)
    if return_path is not None:
        normalize_return_path(return_path, domain_name)
    await db.read(check_addable, project_id, domain_name, max_domains)
    key = await asyncio.to_thread(generate_key)
    return await db.write(lambda s: add_domain(s, project_id, domain_name, selector, key, max_domains, return_path))


def delete_domain(session: Session, project_id: str, id_or_name: str) -> Domain:
    """Delete the domain unless emails from it are still queued: the dispatcher needs its key to sign them."""
    domain = require_domain(session, project_id, id_or_name)
    queued = domain_store.queued_email_count(session, project_id, domain.name)
    if queued:
        raise Conflict(f"Domain {domain.name} has {queued} queued email(s) not yet sent; "
                       "it cannot be deleted until they are",
                       "Wait until the queued emails are delivered (or have failed), then delete the domain.")
    domain_store.delete_domain(session, domain)
    return domain


def require_domain(session: Session, project_id: str, id_or_name: str) -> Domain:
    domain = domain_store.get_domain(session, project_id, id_or_name)
    if domain is None:
        raise NotFound(f"Domain {id_or_name} not found")
    return domain


def make_resolver(nameservers: list[str], port: int, timeout: float,
                  kind: type[dns.resolver.BaseResolver] = dns.asyncresolver.Resolver) -> Any:
    """A resolver of `kind` (the asyncio one, or `dns.resolver.Resolver` for libraries that block, run in a
    thread) on the configured name servers (none: the system's), each lookup bounded by `timeout`."""
    resolver = kind(configure=not nameservers)
    if nameservers:
        resolver.nameservers = nameservers
        resolver.port = port
    resolver.lifetime = timeout
    return resolver


async def txt_values(resolver: dns.asyncresolver.Resolver, name: str) -> list[str]:
    try:
        answer = await resolver.resolve(name, "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
        return []
    return [b"".join(rdata.strings).decode("utf-8", "replace") for rdata in answer]


async def mx_hosts(resolver: dns.asyncresolver.Resolver, name: str) -> list[str]:
    try:
        answer = await resolver.resolve(name, "MX")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
        return []
    return [rdata.exchange.to_text().removesuffix(".").lower() for rdata in answer]


def _compact(value: str) -> str:
    return re.sub(r"\s+", "", value)


async def check_dns(domain: Domain, resolver: dns.asyncresolver.Resolver, mx_host: str = "") -> dict[str, Any]:
    """Look up the three records; DKIM (our exact key) and SPF are required, DMARC is advised. A return path
    (`returnPath` in the result) is verified when its MX names `mx_host` and it has an SPF record; without
    it the domain still sends, with its From address as the envelope sender."""
    try:
        dkim_found = await txt_values(resolver, f"{domain.dkim_selector}._domainkey.{domain.name}")
        spf_found = await txt_values(resolver, domain.name)
        dmarc_found = await txt_values(resolver, f"_dmarc.{domain.name}")
        if domain.return_path:
            return_path_mx = await mx_hosts(resolver, domain.return_path)
            return_path_spf = await txt_values(resolver, domain.return_path)
    except dns.exception.DNSException as exc:
        return {"verified": False, "error": f"DNS lookup failed: {exc.__class__.__name__}"}
    key_tag = f"p={domain.dkim_public_key}"
    result = {
        "dkim": any(key_tag in _compact(v) for v in dkim_found),
        "spf": any(v.lower().startswith("v=spf1") for v in spf_found),
        "dmarc": any(v.upper().startswith("V=DMARC1") for v in dmarc_found),
    }
    result["verified"] = result["dkim"] and result["spf"]
    if domain.return_path:
        result["returnPath"] = (mx_host in return_path_mx
                                and any(v.lower().startswith("v=spf1") for v in return_path_spf))
    return result


def save_check(session: Session, domain_id: str, check: dict[str, Any], recheck: bool = False) -> Domain:
    """Store the check (each record's result, by purpose) with the time it was made, `checkedAt`, and act on
    what changed, in this transaction: `domain.verified` / `domain.unverified` when the verdict of a domain
    verified before flips (`verified_at` stays the time it was last verified); the
    domain's queued mail held when the DKIM record of a domain once verified is missing (not sent unsigned,
    not failed), released when a check finds it again. A re-check (`recheck`) whose lookup failed changes
    nothing but the time: a resolver's hiccup does not unverify a domain."""
    now = utcnow()
    domain = domain_store.domain_for_update(session, domain_id)
    if recheck and "error" in check:
        return domain
    if not recheck:  # a re-check's claim moved it already
        domain.checked_at = now
    was_verified, verified_before = domain.verified, domain.verified_at is not None
    verified = bool(check.get("verified"))
    domain.verified = verified
    domain.return_path_verified = verified and bool(check.get("returnPath"))
    domain.last_check = {**check, "checkedAt": iso(now)}
    if verified and not was_verified:
        domain.verified_at = now
    dkim_missing = check.get("method") == "dns" and not check.get("dkim")
    if dkim_missing and domain.held_since is None and was_verified:
        domain.held_since = now
        held = domain_store.hold_queued(session, domain.project_id, domain.name)
        log.warning("domain %s: its DKIM record is missing; %d queued emails held", domain.name, held)
    elif not dkim_missing:
        # Released whenever the record is found, held or not: a dispatcher that read the domain held just
        # before a release may park an email after it; the next check lets it go.
        released = domain_store.release_held(session, domain.project_id, domain.name)
        if domain.held_since is not None or released:
            log.info("domain %s: its DKIM record is there; %d held emails released", domain.name, released)
        domain.held_since = None
    if verified != was_verified and verified_before:  # a first verification is no change of a verdict
        record_event(session, domain.project_id, None, "domain.verified" if verified else "domain.unverified",
                     {"domainId": domain.id, "domain": domain.name,
                      "check": {key: check[key] for key in ("dkim", "spf", "dmarc", "method") if key in check}})
    session.flush()
    return domain


def domain_status(domain: Domain) -> str:
    """VERIFIED, HELD (its DKIM record vanished: its queued mail waits for it) or UNVERIFIED."""
    return "VERIFIED" if domain.verified else "HELD" if domain.held_since is not None else "UNVERIFIED"


def held_counts(session: Session, domains: list[Domain]) -> dict[str, int]:
    """Held emails by domain id, counted for the held domains only (the others hold none)."""
    return {domain.id: domain_store.held_emails(session, domain.project_id, domain.name)
            for domain in domains if domain.held_since is not None}


def domain_json(domain: Domain, transport: str, mx_host: str = "", held_emails: int = 0) -> dict[str, Any]:
    """A domain as the API and the dashboard show it: the records to publish (the return path's MX pointing
    at `mx_host`), the last check, and its status with the emails it holds (`held_counts`)."""
    return {"id": domain.id, "domain": domain.name, "verified": domain.verified, "verifiedAt": domain.verified_at,
            "status": domain_status(domain), "heldEmails": held_emails, "heldSince": domain.held_since,
            "checkedAt": domain.checked_at, "selector": domain.dkim_selector, "returnPath": domain.return_path,
            "returnPathVerified": domain.return_path_verified,
            "records": [r.as_dict() for r in records(domain, transport, mx_host)],
            "lastCheck": domain.last_check or {}, "createdAt": domain.created_at}


def require_verified_sender(session: Session, project_id: str, address: str) -> str:
    """The sending rule for every path: the From address must be on a verified domain of the project.
    Returns the domain's id."""
    name = sender_domain(address)
    domain_id = domain_store.verified_domain_id(session, project_id, name)
    if domain_id is None:
        raise UnverifiedSender(name)
    return domain_id


class UnverifiedSender(ValidationFailed):
    def __init__(self, domain: str) -> None:
        super().__init__([FieldError("from", f"{domain} is not a verified domain of this project",
                                     "unverified_domain")],
                         message=f"Sender domain {domain} is not verified",
                         suggestion="Add it with POST /domains, publish the records, then POST /domains/:id/verify.")
        self.domain = domain


class TooManyDomains(ValidationFailed):
    def __init__(self, limit: int) -> None:
        domains = "domain" if limit == 1 else "domains"
        super().__init__([FieldError("domain", f"A project can have at most {limit} {domains} "
                                               "(api.max_domains_per_project)", "too_many_domains")],
                         message=f"This project has reached its limit of {limit} {domains}",
                         suggestion="Delete a domain the project no longer uses (DELETE /domains/:id), "
                                    "or raise api.max_domains_per_project.")


async def verify(domain: Domain, config: Any,
                 ses_verified: Callable[[Any, str], Awaitable[bool]] | None = None) -> dict[str, Any]:
    """Verify by DNS, or by SES's own identity check (`ses_verified`: `delivery.ses.ses_identity_verified`,
    handed in by the caller, as pipeline does not import the transports) when the SES transport is configured."""
    if config.delivery.transport == "ses":
        if ses_verified is None:
            raise ValueError("the SES transport is configured but no SES identity check was given")
        verified = await ses_verified(config.delivery.ses, domain.name)
        return {"verified": verified, "method": "ses"}
    resolver = make_resolver(config.dns.nameservers, config.dns.port, config.dns.timeout_seconds)
    return {**await check_dns(domain, resolver, inbound_host(config)), "method": "dns"}
