"""Dashboard accounts: users, sessions, memberships, invitations and the shared sign-in failure counts."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import case, delete, func, literal, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from storage.fastpath import insert_for
from storage.models import DashboardSession, Invitation, LoginFailure, Membership, Project, Role, User


def affected(session: Session, statement: Any) -> int:
    """The rows an UPDATE or DELETE changed (Session.execute's stubs say Result; it is a CursorResult)."""
    return cast(CursorResult[Any], session.execute(statement)).rowcount or 0


def count_users(session: Session) -> int:
    return session.execute(select(func.count()).select_from(User)).scalar_one()


def insert_user(session: Session, email: str, password_hash: str, instance_owner: bool) -> User:
    user = User(email=email, password_hash=password_hash, instance_owner=instance_owner)
    session.add(user)
    session.flush()
    return user


def find_user_by_email(session: Session, email: str) -> User | None:
    return session.execute(select(User).where(User.email == email)).scalar_one_or_none()


def get_user(session: Session, user_id: str) -> User | None:
    return session.get(User, user_id)


def set_password(session: Session, user_id: str, password_hash: str, now: datetime) -> None:
    session.execute(update(User).where(User.id == user_id).values(password_hash=password_hash,
                                                                  password_changed_at=now))


def insert_session(session: Session, user_id: str, token_digest: str, now: datetime, expires_at: datetime,
                   ip: str, user_agent: str) -> DashboardSession:
    row = DashboardSession(user_id=user_id, token_digest=token_digest, created_at=now, last_seen_at=now,
                           expires_at=expires_at, ip=ip, user_agent=user_agent)
    session.add(row)
    session.flush()
    return row


def find_session(session: Session, token_digest: str) -> tuple[DashboardSession, User] | None:
    stmt = (select(DashboardSession, User).join(User, User.id == DashboardSession.user_id)
            .where(DashboardSession.token_digest == token_digest))
    found = session.execute(stmt).first()
    return None if found is None else (found[0], found[1])


def touch_session(session: Session, session_id: str, now: datetime) -> None:
    session.execute(update(DashboardSession).where(DashboardSession.id == session_id).values(last_seen_at=now))


def list_sessions(session: Session, user_id: str) -> list[DashboardSession]:
    stmt = select(DashboardSession).where(DashboardSession.user_id == user_id).order_by(DashboardSession.id.desc())
    return list(session.execute(stmt).scalars())


def delete_session(session: Session, user_id: str, session_id: str) -> bool:
    return bool(affected(session, delete(DashboardSession).where(DashboardSession.id == session_id,
                                                            DashboardSession.user_id == user_id)))


def delete_sessions(session: Session, user_id: str, keep: str | None = None) -> int:
    stmt = delete(DashboardSession).where(DashboardSession.user_id == user_id)
    if keep is not None:
        stmt = stmt.where(DashboardSession.id != keep)
    return affected(session, stmt)


def delete_expired_sessions(session: Session, now: datetime, idle_since: datetime) -> int:
    stmt = delete(DashboardSession).where((DashboardSession.expires_at <= now)
                                          | (DashboardSession.last_seen_at <= idle_since))
    return affected(session, stmt)


def projects_of(session: Session, user: User) -> list[tuple[Project, str]]:
    """The projects a user may open, with their role, oldest first (an instance owner: all, as owner)."""
    if user.instance_owner:
        return [(project, Role.OWNER) for project in session.execute(select(Project).order_by(Project.id)).scalars()]
    stmt = (select(Project, Membership.role).join(Membership, Membership.project_id == Project.id)
            .where(Membership.user_id == user.id).order_by(Project.id))
    return [(project, role) for project, role in session.execute(stmt).all()]


def project_role(session: Session, user: User, project_id: str) -> tuple[Project, str] | None:
    """The project and the user's role in it, or None if it does not exist or the user is not a member."""
    if user.instance_owner:
        project = session.get(Project, project_id)
        return None if project is None else (project, Role.OWNER)
    stmt = (select(Project, Membership.role).join(Membership, Membership.project_id == Project.id)
            .where(Membership.user_id == user.id, Project.id == project_id))
    found = session.execute(stmt).first()
    return None if found is None else (found[0], found[1])


def put_membership(session: Session, project_id: str, user_id: str, role: str) -> None:
    existing = session.execute(select(Membership).where(Membership.project_id == project_id,
                                                        Membership.user_id == user_id)).scalar_one_or_none()
    if existing is None:
        session.add(Membership(project_id=project_id, user_id=user_id, role=role))
    else:
        existing.role = role
    session.flush()


def delete_membership(session: Session, project_id: str, user_id: str) -> bool:
    return bool(affected(session, delete(Membership).where(Membership.project_id == project_id,
                                                      Membership.user_id == user_id)))


def list_members(session: Session, project_id: str) -> list[tuple[User, str]]:
    stmt = (select(User, Membership.role).join(Membership, Membership.user_id == User.id)
            .where(Membership.project_id == project_id).order_by(User.email))
    return [(user, role) for user, role in session.execute(stmt).all()]


def count_owners(session: Session, project_id: str) -> int:
    stmt = select(func.count()).select_from(Membership).where(Membership.project_id == project_id,
                                                              Membership.role == Role.OWNER)
    return session.execute(stmt).scalar_one()


def insert_invitation(session: Session, project_id: str, email: str, role: str, token_digest: str,
                      invited_by: str | None, expires_at: datetime) -> Invitation:
    row = Invitation(project_id=project_id, email=email, role=role, token_digest=token_digest,
                     invited_by=invited_by, expires_at=expires_at)
    session.add(row)
    session.flush()
    return row


def find_invitation(session: Session, token_digest: str) -> tuple[Invitation, Project] | None:
    stmt = (select(Invitation, Project).join(Project, Project.id == Invitation.project_id)
            .where(Invitation.token_digest == token_digest))
    found = session.execute(stmt).first()
    return None if found is None else (found[0], found[1])


def accept_invitation(session: Session, invitation_id: str, now: datetime) -> bool:
    """Mark it used; False if it already was (two tabs accepting at once: one wins)."""
    return bool(affected(session, update(Invitation).where(Invitation.id == invitation_id,
                                                      Invitation.accepted_at.is_(None)).values(accepted_at=now)))


def list_invitations(session: Session, project_id: str, now: datetime) -> list[Invitation]:
    stmt = (select(Invitation).where(Invitation.project_id == project_id, Invitation.accepted_at.is_(None),
                                     Invitation.expires_at > now).order_by(Invitation.id.desc()))
    return list(session.execute(stmt).scalars())


def members_and_invitations(session: Session, project_id: str,
                            now: datetime) -> tuple[list[tuple[User, str]], list[Invitation]]:
    """The members page's two lists in one read."""
    return list_members(session, project_id), list_invitations(session, project_id, now)


def delete_invitation(session: Session, project_id: str, invitation_id: str) -> bool:
    return bool(affected(session, delete(Invitation).where(Invitation.project_id == project_id,
                                                      Invitation.id == invitation_id)))


def count_attempt(session: Session, key: str, now: datetime, window_start: datetime) -> int:
    """Count one more sign-in attempt under `key` and return the count in the current window (a window
    older than `window_start` starts again at 1). One statement, so concurrent attempts on any node each
    get their own number."""
    insert = insert_for(session.get_bind().dialect.name)
    table = LoginFailure.__table__
    stale = table.c.first_at < window_start
    upsert = insert(table).values(key=key, count=1, first_at=now).on_conflict_do_update(index_elements=["key"], set_={
        "count": case((stale, 1), else_=table.c.count + 1),
        "first_at": case((stale, literal(now, table.c.first_at.type)), else_=table.c.first_at),
    })
    return session.execute(upsert.returning(table.c.count)).scalar_one()


def delete_ended(session: Session, now: datetime, counted_before: datetime) -> tuple[int, int]:
    """Sessions past their expiry and attempt counts whose window began before `counted_before`: the rows
    nobody will read again (a sign-in flood with made-up addresses leaves one count per address)."""
    sessions = affected(session, delete(DashboardSession).where(DashboardSession.expires_at <= now))
    counts = affected(session, delete(LoginFailure).where(LoginFailure.first_at < counted_before))
    return sessions, counts


def clear_attempts(session: Session, key: str) -> None:
    session.execute(delete(LoginFailure).where(LoginFailure.key == key))

