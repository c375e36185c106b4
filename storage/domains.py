"""Sending domains and their DKIM keys."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from storage import fastpath
from storage.holds import HOLD_DKIM, PARKED, release
from storage.interest import ProjectInterest
from storage.models import Domain, Email, OutboxItem, Project
from storage.pagination import Page, paginate


def sender_domain(address: str) -> str:
    """The domain of a From address, as domains are stored (lower case)."""
    return address.rsplit("@", 1)[-1].lower()


def insert_domain(session: Session, project_id: str, name: str, selector: str, private_key: str,
                  public_key: str) -> Domain:
    domain = Domain(project_id=project_id, name=name, dkim_selector=selector, dkim_private_key=private_key,
                    dkim_public_key=public_key, verified=False, last_check={})
    session.add(domain)
    session.flush()
    return domain


def lock_project_domains(session: Session, project_id: str) -> None:
    """Serialize domain changes of one project until the transaction ends, so two concurrent adds cannot
    both pass the duplicate and cap checks. On PostgreSQL, FOR NO KEY UPDATE of the project row, which
    does not wait for inserts that merely reference the project; SQLite's writer is already alone."""
    session.execute(select(Project.id).where(Project.id == project_id).with_for_update(key_share=True))


def count_domains(session: Session, project_id: str) -> int:
    return session.execute(select(func.count()).select_from(Domain).where(Domain.project_id == project_id)).scalar_one()


def queued_email_count(session: Session, project_id: str, domain_name: str) -> int:
    """The project's emails from `domain_name` still in the outbox: due, leased to a dispatcher, or
    waiting for a retry. The dispatcher signs each with the domain's key when it sends it."""
    stmt = (select(func.count()).select_from(OutboxItem).join(Email, Email.id == OutboxItem.email_id)
            .where(Email.project_id == project_id, Email.sender.endswith(f"@{domain_name}", autoescape=True)))
    return session.execute(stmt).scalar_one()


def delete_domain(session: Session, domain: Domain) -> None:
    _verified.changed(session, domain.project_id)
    session.delete(domain)
    session.flush()


def get_domain(session: Session, project_id: str, id_or_name: str) -> Domain | None:
    stmt = select(Domain).where(Domain.project_id == project_id,
                                (Domain.id == id_or_name) | (Domain.name == id_or_name))
    return session.execute(stmt).scalar_one_or_none()


def list_domains(session: Session, project_id: str) -> list[Domain]:
    stmt = select(Domain).where(Domain.project_id == project_id).order_by(Domain.id.desc())
    return list(session.execute(stmt).scalars())


def page_domains(session: Session, project_id: str, limit: int, cursor: str | None) -> Page:
    return paginate(session, select(Domain).where(Domain.project_id == project_id), Domain.id, limit, cursor)


VERIFIED_TTL = 2.0
"""Seconds another process (an acceptor, another node, the delivery process's re-check) may still accept sends
from a domain it read as verified after it was unverified or deleted; the process that made the change refuses
them at once. A sender not found verified is always read again, so a verification is used at once everywhere."""
_VERIFIED_DOMAINS = select(Domain.id, Domain.name).where(Domain.project_id == bindparam("p"),
                                                         Domain.verified.is_(True))
_verified: ProjectInterest[dict[str, str]] = ProjectInterest("verified_domains", VERIFIED_TTL)


def verified_domain_id(session: Session, project_id: str, name: str) -> str | None:
    """The id of the project's verified domain `name`. Every send asks, so the project's verified domains are kept
    per process (`storage.interest`): a write batch of sends on PostgreSQL spent a round trip on this, one of six
    it waits on in turn, and `/v1/send` took 9-11 % more requests a second without it and the tracking defaults'."""
    read_now = False

    def load() -> dict[str, str]:
        nonlocal read_now
        read_now = True
        return {domain_name: domain_id for domain_id, domain_name in
                fastpath.fetch(session, _VERIFIED_DOMAINS, {"p": project_id})}

    found = _verified.get(session, project_id, load).get(name)
    if found is None and not read_now:  # a kept copy: a domain another process has just verified is used at once
        _verified.forget(project_id)
        found = _verified.get(session, project_id, load).get(name)
    return found


def domain_for_update(session: Session, domain_id: str) -> Domain:
    """The domain, locked for a change (which may verify or unverify it: the verified domains are read anew)."""
    domain = session.execute(select(Domain).where(Domain.id == domain_id).with_for_update()).scalar_one()
    _verified.changed(session, domain.project_id)
    return domain


def claim_rechecks(session: Session, now: datetime, checked_before: datetime, limit: int,
                   postgres: bool) -> list[Domain]:
    """Up to `limit` domains due for a re-check (verified, or holding mail, and not looked up since
    `checked_before`), their `checked_at` moved to `now` in this transaction: on PostgreSQL with SKIP LOCKED,
    so nodes re-checking at once take different domains, and a claimed domain is not due again for a whole
    interval even when its lookup then fails."""
    stmt = (select(Domain).where(or_(Domain.verified.is_(True), Domain.held_since.is_not(None)),
                                 or_(Domain.checked_at.is_(None), Domain.checked_at <= checked_before))
            .order_by(Domain.checked_at).limit(limit))
    domains = list(session.execute(stmt.with_for_update(skip_locked=True) if postgres else stmt).scalars())
    for domain in domains:
        domain.checked_at = now
    session.flush()
    return domains


def _domain_mail(project_id: str, domain_name: str) -> Any:
    """Outbox rows whose email is the project's, from `domain_name` (a probe of the email per outbox row)."""
    return select(Email.id).where(Email.id == OutboxItem.email_id, Email.project_id == project_id,
                                  Email.sender.endswith(f"@{domain_name}", autoescape=True)).exists()


def hold_queued(session: Session, project_id: str, domain_name: str) -> int:
    """Park the domain's queued emails that no dispatcher holds (`HOLD_DKIM`); a dispatcher parks the others
    itself when it reads the domain. Returns how many."""
    return session.connection().execute(update(OutboxItem).where(
        OutboxItem.hold.is_(None), OutboxItem.claimed_by.is_(None), _domain_mail(project_id, domain_name)).values(
        due_at=PARKED, hold=HOLD_DKIM)).rowcount


def release_held(session: Session, project_id: str, domain_name: str) -> int:
    return release(session, HOLD_DKIM, _domain_mail(project_id, domain_name))


def held_emails(session: Session, project_id: str, domain_name: str) -> int:
    """The domain's emails held for its missing DKIM record (the partial index of parked rows)."""
    stmt = select(func.count()).select_from(OutboxItem).where(OutboxItem.hold == HOLD_DKIM,
                                                              _domain_mail(project_id, domain_name))
    return session.execute(stmt).scalar_one()
