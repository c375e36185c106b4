"""Dashboard accounts: who may sign in, for how long, and in which projects with which role.

* Passwords are hashed with argon2id (`argon2-cffi`) in a worker thread, at most two at a time, so a flood
  of sign-ins cannot take the event loop or every core.
* A sign-in attempt is counted *before* its password is checked, per account and per client address, in one
  statement in the shared database: the first `login_failure_limit` attempts of a window are checked, any
  more are refused without a check until `lockout_seconds` after the first, on every node alike (the rule
  SMTP AUTH follows). A right password clears the counts.
* A session is a random token in an HttpOnly cookie; the database keeps its SHA-256 only. Every sign-in
  makes a new one. It ends when unused for `session_idle_hours`, `session_max_days` after sign-in (the
  limits in force now: lowering them ends older sessions at once), on sign-out, when revoked from the
  account page, and (the others) when the password changes.
* The CSRF token of a page is derived from the session token (or, before sign-in, from a random
  pre-session cookie), so a page of another site can neither read nor compute it.
* A password-reset link is signed and names the user, its expiry and a fingerprint of the current password
  hash: using it changes the hash, so the same link never works twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from pydantic_core import PydanticCustomError

from core.config import DashboardConfig
from pipeline.errors import Conflict, FieldError, Forbidden, NotFound, PipelineError, ValidationFailed
from pipeline.grammar import normalize_email
from pipeline.links import SignedTokens
from storage import accounts as store
from storage.db import Database
from storage.models import DashboardSession, Invitation, Project, Role, User, utcnow

MIN_PASSWORD = 10
MAX_PASSWORD = 1024
INVITATION_DAYS = 7
RESET_MINUTES = 60
RESET_MAILS_PER_ADDRESS = 3
RESET_MAILS_PER_CLIENT = 20
TOUCH_EVERY = timedelta(seconds=60)
"""A session's last use is written at most this often (a page load is otherwise a read only)."""

_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
"""argon2id at OWASP's first recommended setting (19 MiB, 2 passes)."""
_hashing = asyncio.Semaphore(2)
_DUMMY_HASH = _hasher.hash("not a password of anyone's")


class SignInRefused(PipelineError):
    """Wrong email or password; or, with `locked`, too many attempts (checked or not)."""

    code = "SIGN_IN_REFUSED"
    status = 401

    def __init__(self, message: str, locked: bool = False, retry_after: int = 0) -> None:
        super().__init__(message)
        self.locked = locked
        self.retry_after = retry_after


@dataclass(frozen=True)
class Visit:
    """A signed-in request: the user, their session and the session's token (for the CSRF token)."""

    user: User
    session: DashboardSession
    token: str
    project: tuple[Project, str] | None = None
    """Asked for by `visit_for(..., project_id)`: the project and the user's role in it, or None (no such
    project, or not a member)."""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def csrf_token(cookie_token: str) -> str:
    """The CSRF token for pages shown under a session (or pre-session) cookie's token."""
    return hmac.new(cookie_token.encode("utf-8", "surrogatepass"), b"plunkd csrf", hashlib.sha256).hexdigest()


def csrf_matches(cookie_token: str, given: str) -> bool:
    return bool(given) and hmac.compare_digest(csrf_token(cookie_token), given)


def valid_email(value: str, field: str = "email") -> str:
    try:
        return normalize_email(value.strip())
    except PydanticCustomError as exc:
        raise ValidationFailed([FieldError(field, exc.message(), "invalid_string")]) from None


def check_new_password(password: str, field: str = "password") -> None:
    if len(password) < MIN_PASSWORD:
        raise ValidationFailed([FieldError(field, f"At least {MIN_PASSWORD} characters", "too_small")])
    if len(password) > MAX_PASSWORD:
        raise ValidationFailed([FieldError(field, f"At most {MAX_PASSWORD} characters", "too_big")])


async def hash_password(password: str) -> str:
    async with _hashing:
        return await asyncio.to_thread(_hasher.hash, password)


async def password_matches(password_hash: str, password: str) -> bool:
    async with _hashing:
        try:
            return await asyncio.to_thread(_hasher.verify, password_hash, password[:MAX_PASSWORD])
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False


def role_of(value: str, field: str = "role") -> Role:
    try:
        return Role(value)
    except ValueError:
        raise ValidationFailed([FieldError(field, "One of " + ", ".join(Role), "invalid_enum_value")]) from None


async def create_user(db: Database, email: str, password: str, instance_owner: bool = False) -> User:
    address = valid_email(email)
    check_new_password(password)
    password_hash = await hash_password(password)

    def insert(session) -> User:
        if store.find_user_by_email(session, address) is not None:
            raise Conflict(f"A user with the email {address} exists")
        return store.insert_user(session, address, password_hash, instance_owner)

    return await db.write(insert)


async def create_first_owner(db: Database, email: str, password: str) -> User:
    """The setup page's user: refused once any user exists (two setups at once: one wins)."""
    address = valid_email(email)
    check_new_password(password)
    password_hash = await hash_password(password)

    def insert(session) -> User:
        if store.count_users(session):
            raise Conflict("The first user exists already: sign in instead")
        return store.insert_user(session, address, password_hash, True)

    return await db.write(insert)


async def has_users(db: Database) -> bool:
    return await db.read(store.count_users) > 0


async def sign_in(db: Database, config: DashboardConfig, email: str, password: str, ip: str,
                  user_agent: str) -> tuple[str, DashboardSession]:
    """A new session's token and row, or SignInRefused (wrong, or locked out)."""
    address = email.strip().lower()[:320]
    keys = (f"account:{address}", f"ip:{ip}")
    now = utcnow()
    window_start = now - timedelta(seconds=config.lockout_seconds)

    def count(session) -> int:
        return max(store.count_attempt(session, key, now, window_start) for key in keys)

    attempts = await db.write(count, light=True)
    if attempts > config.login_failure_limit:
        raise SignInRefused(f"Too many sign-in attempts: try again in {config.lockout_seconds // 60} minutes, "
                            "or reset the password", locked=True, retry_after=config.lockout_seconds)
    user = await db.read(store.find_user_by_email, address)
    matches = await password_matches(user.password_hash if user else _DUMMY_HASH, password)
    if user is None or not matches:
        raise SignInRefused("Wrong email or password")
    token = secrets.token_urlsafe(32)
    expires = now + timedelta(days=config.session_max_days)

    def start(session) -> DashboardSession:
        for key in keys:
            store.clear_attempts(session, key)
        return store.insert_session(session, user.id, digest(token), now, expires, ip[:64], user_agent[:200])

    row = await db.write(start)
    if _hasher.check_needs_rehash(user.password_hash):
        rehashed = await hash_password(password)
        await db.write(lambda s: store.set_password(s, user.id, rehashed, user.password_changed_at))
    return token, row


async def visit_for(db: Database, config: DashboardConfig, token: str, project_id: str | None = None) -> Visit | None:
    """The signed-in visit a session cookie's token stands for, or None (unknown, expired or idle). With
    `project_id`, also the project and the user's role in it, read in the same session: each read is a
    connection checkout and a few hops to the database's thread, which under load cost more than the query."""
    if not token or len(token) > 100:
        return None

    def lookup(session) -> tuple[tuple[DashboardSession, User] | None, tuple[Project, str] | None]:
        found = store.find_session(session, digest(token))
        if found is None or project_id is None:
            return found, None
        return found, store.project_role(session, found[1], project_id)

    found, project = await db.read(lookup)
    if found is None:
        return None
    row, user = found
    now = utcnow()
    if (row.expires_at <= now or row.created_at <= now - timedelta(days=config.session_max_days)
            or row.last_seen_at <= now - timedelta(hours=config.session_idle_hours)):
        await db.write(lambda s: store.delete_session(s, user.id, row.id), light=True)
        return None
    if now - row.last_seen_at >= TOUCH_EVERY:
        await db.write(lambda s: store.touch_session(s, row.id, now), light=True)
    return Visit(user, row, token, project)


async def sign_out(db: Database, visit: Visit) -> None:
    await db.write(lambda s: store.delete_session(s, visit.user.id, visit.session.id), light=True)


async def revoke_session(db: Database, visit: Visit, session_id: str) -> None:
    if not await db.write(lambda s: store.delete_session(s, visit.user.id, session_id), light=True):
        raise NotFound("No such session")


async def change_password(db: Database, visit: Visit, current: str, new: str) -> None:
    """Needs the current password; ends every other session of the user."""
    if not await password_matches(visit.user.password_hash, current):
        raise ValidationFailed([FieldError("current", "The current password is wrong", "invalid")])
    check_new_password(new, "new")
    password_hash = await hash_password(new)

    def change(session) -> None:
        store.set_password(session, visit.user.id, password_hash, utcnow())
        store.delete_sessions(session, visit.user.id, keep=visit.session.id)

    await db.write(change)


async def set_password_by_email(db: Database, email: str, password: str) -> User:
    """`plunkd user password`: a new password set from the server's shell; every session of the user ends."""
    address = valid_email(email)
    check_new_password(password)
    password_hash = await hash_password(password)

    def change(session) -> User:
        user = store.find_user_by_email(session, address)
        if user is None:
            raise NotFound(f"No user with the email {address}")
        store.set_password(session, user.id, password_hash, utcnow())
        store.delete_sessions(session, user.id)
        return user

    return await db.write(change)


def counting_window(config: DashboardConfig) -> timedelta:
    """How long an attempt count matters: the longest window counted in (sign-in lockout, reset mails)."""
    return max(timedelta(seconds=config.lockout_seconds), timedelta(minutes=RESET_MINUTES))


async def delete_ended(db: Database, config: DashboardConfig, now: datetime) -> tuple[int, int]:
    """The pruner's part: ended sessions and attempt counts older than their window (counts, ended)."""
    return await db.write(lambda s: store.delete_ended(s, now, now - counting_window(config)))


async def may_mail_reset(db: Database, address: str, ip: str) -> bool:
    """Whether one more reset link may be mailed: at most `RESET_MAILS_PER_ADDRESS` to an address and
    `RESET_MAILS_PER_CLIENT` asked by one client address in `RESET_MINUTES`, so the form cannot flood an
    inbox (nor spend the mail project's sending reputation). Counted in the shared database, on every node."""
    now = utcnow()
    window_start = now - timedelta(minutes=RESET_MINUTES)

    def count(session) -> bool:
        return (store.count_attempt(session, f"reset:{address}", now, window_start) <= RESET_MAILS_PER_ADDRESS
                and store.count_attempt(session, f"reset-ip:{ip}", now, window_start) <= RESET_MAILS_PER_CLIENT)

    return await db.write(count, light=True)


def reset_tokens(secret_key: bytes) -> SignedTokens:
    return SignedTokens(secret_key, 400)


def reset_token(tokens: SignedTokens, user: User, now: float | None = None) -> str:
    expires = int((now or time.time()) + RESET_MINUTES * 60)
    return tokens.make(f"{user.id}|{expires}|{_hash_fingerprint(user.password_hash)}".encode())


def _hash_fingerprint(password_hash: str) -> str:
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


async def user_for_reset(db: Database, tokens: SignedTokens, token: str) -> User:
    """The user a reset link is for; NotFound when forged, expired or used (the password changed since)."""
    payload = tokens.read(token)
    parts = payload.decode("ascii", "replace").split("|") if payload else []
    if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) < time.time():
        raise NotFound("This reset link is not valid: it expired, was used, or was mistyped")
    user = await db.read(store.get_user, parts[0])
    if user is None or not hmac.compare_digest(_hash_fingerprint(user.password_hash), parts[2]):
        raise NotFound("This reset link is not valid: it expired, was used, or was mistyped")
    return user


async def reset_password(db: Database, tokens: SignedTokens, token: str, password: str) -> User:
    check_new_password(password)
    user = await user_for_reset(db, tokens, token)
    password_hash = await hash_password(password)
    fingerprint = _hash_fingerprint(user.password_hash)

    def change(session) -> None:
        current = store.get_user(session, user.id)
        if current is None or _hash_fingerprint(current.password_hash) != fingerprint:
            raise NotFound("This reset link is not valid: it expired, was used, or was mistyped")
        store.set_password(session, user.id, password_hash, utcnow())
        store.delete_sessions(session, user.id)

    await db.write(change)
    return user


async def invite(db: Database, project_id: str, email: str, role: str, invited_by: str) -> tuple[Invitation, str]:
    """A new invitation and its link's token (shown once; the database keeps its digest)."""
    address = valid_email(email)
    chosen = role_of(role)
    token = secrets.token_urlsafe(32)
    expires = utcnow() + timedelta(days=INVITATION_DAYS)
    invitation = await db.write(lambda s: store.insert_invitation(s, project_id, address, chosen, digest(token),
                                                                   invited_by, expires))
    return invitation, token


async def withdraw_invitation(db: Database, project_id: str, invitation_id: str) -> None:
    if not await db.write(lambda s: store.delete_invitation(s, project_id, invitation_id)):
        raise NotFound("No such invitation")


async def invitation_for(db: Database, token: str) -> tuple[Invitation, Project]:
    found = await db.read(store.find_invitation, digest(token)) if 0 < len(token) <= 100 else None
    if found is None or found[0].accepted_at is not None or found[0].expires_at <= utcnow():
        raise NotFound("This invitation is not valid: it expired, was used, or was withdrawn")
    return found


async def accept_invitation(db: Database, token: str, user: User | None, password: str = "") -> User:
    """Join the invitation's project; without a signed-in `user`, as a new account for the invited email
    with `password`."""
    invitation, _project = await invitation_for(db, token)
    password_hash = ""
    if user is None:
        check_new_password(password)
        password_hash = await hash_password(password)

    def accept(session) -> User:
        member = user
        if member is None:
            if store.find_user_by_email(session, invitation.email) is not None:
                raise Conflict(f"{invitation.email} has an account: sign in, then open the link again")
            member = store.insert_user(session, invitation.email, password_hash, False)
        if not store.accept_invitation(session, invitation.id, utcnow()):
            raise NotFound("This invitation is not valid: it expired, was used, or was withdrawn")
        store.put_membership(session, invitation.project_id, member.id, invitation.role)
        return member

    return await db.write(accept)


async def set_member_role(db: Database, project_id: str, user_id: str, role: str, acting: Role) -> None:
    """Change a member's role; only an owner makes or unmakes owners, and the last owner stays one."""
    chosen = role_of(role)

    def change(session) -> None:
        members = dict((member.id, Role(current)) for member, current in store.list_members(session, project_id))
        if user_id not in members:
            raise NotFound("No such member")
        if Role.OWNER in (chosen, members[user_id]) and acting != Role.OWNER:
            raise Forbidden("Only an owner makes or unmakes owners")
        if members[user_id] == Role.OWNER and chosen != Role.OWNER and store.count_owners(session, project_id) <= 1:
            raise Conflict("A project keeps at least one owner")
        store.put_membership(session, project_id, user_id, chosen)

    await db.write(change)


async def remove_member(db: Database, project_id: str, user_id: str, acting: Role) -> None:
    def remove(session) -> None:
        members = dict((member.id, Role(current)) for member, current in store.list_members(session, project_id))
        if user_id not in members:
            raise NotFound("No such member")
        if members[user_id] == Role.OWNER:
            if acting != Role.OWNER:
                raise Forbidden("Only an owner removes an owner")
            if store.count_owners(session, project_id) <= 1:
                raise Conflict("A project keeps at least one owner")
        store.delete_membership(session, project_id, user_id)

    await db.write(remove)
