"""Sending domains and their DKIM keys."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from storage import fastpath
from storage.holds import HOLD_DKIM, PARKED, release
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


_VERIFIED_DOMAIN_ID = select(Domain.id).where(Domain.project_id == bindparam("p"), Domain.name == bindparam("n"),
                                              Domain.verified.is_(True))


def verified_domain_id(session: Session, project_id: str, name: str) -> str | None:
    """The id of the project's verified domain `name`. Every send asks, so a verified answer is kept in
    `session.info` for the rest of the session (one write batch or one request)."""
    key = ("verified_domain", project_id, name)
    found = session.info.get(key)
    if found is None:
        rows = fastpath.fetch(session, _VERIFIED_DOMAIN_ID, {"p": project_id, "n": name})
        found = rows[0][0] if rows else None
        if found is not None:
            session.info[key] = found
    return found


def domain_for_update(session: Session, domain_id: str) -> Domain:
    domain = session.execute(select(Domain).where(Domain.id == domain_id).with_for_update()).scalar_one()
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
