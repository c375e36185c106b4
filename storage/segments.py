"""Segment queries, and the one compiler of a segment's condition tree into SQL (`condition_clause`).

The tree's grammar and its validation live in `pipeline.marketing.segments`; `condition_clause` takes a tree that
passed it. The same clause serves every use: counting and listing a segment's contacts, a campaign's
fan-out, membership tracking for one contact (`membership_states`) and the snapshot taken when
tracking starts, so a contact matches a segment in exactly one way everywhere.

Identical on SQLite and PostgreSQL:
* `data.<key>` reads one top-level key of the contact's JSON data and first checks the JSON type of
  its value, so a comparison never casts text to a number (PostgreSQL would raise) and never compares
  across types (SQLite orders numbers before text, PostgreSQL compares text). On SQLite the key is
  looked up with `json_each` (which decodes keys; a JSON path would compare them raw, and the stored
  JSON escapes non-ASCII keys), on PostgreSQL with `->` / `->>`.
* dates in data compare as text in code-point order (COLLATE "C" on PostgreSQL, whose database
  collation may ignore punctuation).
* text tests are exact and case-sensitive (`instr` / `strpos`, no LIKE: SQLite's LIKE ignores ASCII
  case, PostgreSQL's does not); `email` is stored lower-cased, so its operand is lower-cased.
* every leaf is TRUE or FALSE, never NULL, so `not` and the negative operators (`notEquals`,
  `notContains`, `notExists`, `didNot`) are exactly the complement of their positive form: a contact
  without the key matches `notEquals` / `notContains`.
* events are correlated EXISTS subqueries on `events` by `contact_id` (indexed); "at least N" looks
  for an N-th row (`LIMIT 1 OFFSET N-1`) instead of counting them all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Float,
    String,
    and_,
    bindparam,
    case,
    delete,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import FunctionElement

from storage.batch import flush_pending
from storage.models import Campaign, CampaignStatus, Contact, Event, Segment, SegmentMember, new_id, utcnow
from storage.pagination import Page, paginate

CONTACTS = Contact.__table__
_EVENTS = Event.__table__
_SEGMENTS = Segment.__table__
_MEMBERS = SegmentMember.__table__
_CAMPAIGNS = Campaign.__table__
_SEGMENT_COLUMNS = [_SEGMENTS.c[name] for name in
                    ("id", "project_id", "name", "slug", "condition", "track_membership", "created_at",
                     "updated_at")]


@dataclass
class SegmentRecord:
    id: str
    project_id: str
    name: str
    slug: str
    condition: dict[str, Any]
    track_membership: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class TrackedSegment:
    id: str
    slug: str
    condition: dict[str, Any]


# ---------------------------------------------------------------------------------------------------
# The condition compiler.

class _DataKind(FunctionElement[str]):
    """The JSON type of `data[key]`: 'string', 'number', 'true', 'false', 'null', 'object', 'array', or
    NULL when the key is absent."""

    type = String()
    name = "data_kind"
    inherit_cache = True


class _DataText(FunctionElement[str]):
    """`data[key]` when it is a JSON string, else NULL."""

    type = String()
    name = "data_text"
    inherit_cache = True


class _DataNumber(FunctionElement[float]):
    """`data[key]` when it is a JSON number, else NULL."""

    type = Float()
    name = "data_number"
    inherit_cache = True


class _TextContains(FunctionElement[bool]):
    """`needle` occurs in `haystack`, exactly (case-sensitive); NULL when `haystack` is NULL."""

    type = Boolean()
    name = "text_contains"
    inherit_cache = True


class _ByteOrder(FunctionElement[str]):
    """Text that orders by code point (byte order in UTF-8) whatever the database's collation: SQLite's
    default BINARY, PostgreSQL's "C" (a database made with e.g. en_US.UTF-8 would ignore punctuation)."""

    type = String()
    name = "byte_order"
    inherit_cache = True


def _args(element: FunctionElement[Any], compiler: Any, **kw: Any) -> list[str]:
    return [compiler.process(arg, **kw) for arg in element.clauses]


def _sqlite_member(column: str, key: str, what: str, types: str) -> str:
    return f"(SELECT {what} FROM json_each({column}) AS j WHERE j.key = {key}{types})"


@compiles(_DataKind, "sqlite")
def _data_kind_sqlite(element, compiler, **kw):
    column, key = _args(element, compiler, **kw)
    kind = ("CASE j.type WHEN 'text' THEN 'string' WHEN 'integer' THEN 'number' WHEN 'real' THEN 'number' "
            "ELSE j.type END")
    return _sqlite_member(column, key, kind, "")


@compiles(_DataText, "sqlite")
def _data_text_sqlite(element, compiler, **kw):
    column, key = _args(element, compiler, **kw)
    return _sqlite_member(column, key, "j.atom", " AND j.type = 'text'")


@compiles(_DataNumber, "sqlite")
def _data_number_sqlite(element, compiler, **kw):
    column, key = _args(element, compiler, **kw)
    return _sqlite_member(column, key, "j.atom", " AND j.type IN ('integer', 'real')")


@compiles(_TextContains, "sqlite")
def _contains_sqlite(element, compiler, **kw):
    haystack, needle = _args(element, compiler, **kw)
    return f"(instr({haystack}, {needle}) > 0)"


@compiles(_ByteOrder, "sqlite")
def _byte_order_sqlite(element, compiler, **kw):
    (text,) = _args(element, compiler, **kw)
    return text


@compiles(_ByteOrder, "postgresql")
def _byte_order_pg(element, compiler, **kw):
    (text,) = _args(element, compiler, **kw)
    return f'({text} COLLATE "C")'


def _pg_value(column: str, key: str) -> str:
    return f"({column} -> CAST({key} AS TEXT))"


@compiles(_DataKind, "postgresql")
def _data_kind_pg(element, compiler, **kw):
    column, key = _args(element, compiler, **kw)
    typeof = f"json_typeof({_pg_value(column, key)})"
    return f"(CASE {typeof} WHEN 'boolean' THEN ({column} ->> CAST({key} AS TEXT)) ELSE {typeof} END)"


@compiles(_DataText, "postgresql")
def _data_text_pg(element, compiler, **kw):
    column, key = _args(element, compiler, **kw)
    return (f"(CASE WHEN json_typeof({_pg_value(column, key)}) = 'string' "
            f"THEN ({column} ->> CAST({key} AS TEXT)) END)")


@compiles(_DataNumber, "postgresql")
def _data_number_pg(element, compiler, **kw):
    column, key = _args(element, compiler, **kw)
    return (f"(CASE WHEN json_typeof({_pg_value(column, key)}) = 'number' "
            f"THEN CAST(({column} ->> CAST({key} AS TEXT)) AS DOUBLE PRECISION) END)")


@compiles(_TextContains, "postgresql")
def _contains_pg(element, compiler, **kw):
    haystack, needle = _args(element, compiler, **kw)
    return f"(strpos({haystack}, {needle}) > 0)"


def iso_text(value: datetime) -> str:
    """How a date operand is compared with a date stored as text in contact data: UTC in JavaScript's
    `toISOString()` form, `YYYY-MM-DDTHH:MM:SS.mmmZ`."""
    value = value.astimezone(UTC)
    return f"{value.year:04d}-{value.month:02d}-{value.day:02d}T{value.hour:02d}:{value.minute:02d}:" \
           f"{value.second:02d}.{value.microsecond // 1000:03d}Z"


_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")
_DATE_TIME = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
                        r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))")


def parse_instant(text: str) -> datetime:
    """An RFC 3339 date (`2024-03-01`: midnight UTC) or date-time with its offset
    (`2024-03-01T10:00:00Z`, `2024-03-01T12:00:00.5+02:00`) as an aware UTC datetime, clamped to the
    years 1-9999. ValueError for anything else (what JSON schema's `date` and `date-time` refuse)."""
    if (match := _DATE.fullmatch(text)) is not None:
        year, month, day = match.groups()
        return datetime(int(year), int(month), int(day), tzinfo=UTC)
    match = _DATE_TIME.fullmatch(text)
    if match is None:
        raise ValueError(f"not an ISO 8601 date or date-time: {text!r}")
    year, month, day, hour, minute, second, fraction, _, sign, off_hours, off_minutes = match.groups()
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    offset = timedelta(0)
    if sign is not None:
        if int(off_hours) > 23 or int(off_minutes) > 59:
            raise ValueError(f"bad UTC offset in {text!r}")
        offset = timedelta(hours=int(off_hours), minutes=int(off_minutes)) * (1 if sign == "+" else -1)
    local = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micro, tzinfo=UTC)
    try:
        return local - offset
    except OverflowError:
        return (datetime.min if offset > timedelta(0) else datetime.max).replace(tzinfo=UTC)


def condition_clause(condition: dict[str, Any], now: datetime) -> ColumnElement[bool]:
    """A validated condition tree as a WHERE clause over the `contacts` table (`Contact.__table__`), to
    be used in a SELECT from that table (event tests correlate to it). `now` anchors `withinDays`.
    TRUE or FALSE for every contact, never NULL. ValueError for a node outside the grammar."""
    if not isinstance(condition, dict):
        raise ValueError("a condition is a JSON object")
    if "all" in condition:
        parts = [condition_clause(child, now) for child in condition["all"]]
        return and_(*parts) if parts else true()
    if "any" in condition:
        parts = [condition_clause(child, now) for child in condition["any"]]
        return or_(*parts) if parts else false()
    if "not" in condition:
        return not_(condition_clause(condition["not"], now))
    if "event" in condition:
        return _event_clause(condition, now)
    if "field" in condition:
        return _field_clause(condition["field"], condition.get("op"), condition.get("value"))
    raise ValueError(f"not a condition: {sorted(condition)}")


def _event_clause(node: dict[str, Any], now: datetime) -> ColumnElement[bool]:
    rows = select(_EVENTS.c.id).where(_EVENTS.c.contact_id == CONTACTS.c.id,
                                      _EVENTS.c.name == str(node["event"]).strip())
    if node.get("withinDays") is not None:
        rows = rows.where(_EVENTS.c.created_at >= now - timedelta(days=int(node["withinDays"])))
    op = node.get("op")
    if op == "did":
        at_least = int(node.get("atLeast") or 1)
        if at_least > 1:
            rows = rows.limit(1).offset(at_least - 1)
        return rows.correlate(CONTACTS).exists()
    if op == "didNot":
        return not_(rows.correlate(CONTACTS).exists())
    raise ValueError(f"unknown event operator {op!r}")


_NEGATIONS = {"notEquals": "equals", "notContains": "contains", "notExists": "exists"}
_TIMESTAMPS = {"createdAt": CONTACTS.c.created_at, "updatedAt": CONTACTS.c.updated_at}


def _field_clause(field: str, op: Any, value: Any) -> ColumnElement[bool]:
    if op in _NEGATIONS:
        return not_(_field_clause(field, _NEGATIONS[op], value))
    if field == "email":
        if op == "equals":
            return CONTACTS.c.email == str(value).lower()
        if op == "contains":
            return _TextContains(CONTACTS.c.email, literal(str(value).lower(), String()))
    elif field == "subscribed":
        if op == "equals":
            return CONTACTS.c.subscribed == bool(value)
    elif field in _TIMESTAMPS:
        if op in ("before", "after"):
            column = _TIMESTAMPS[field]
            instant = parse_instant(value)
            return column < instant if op == "before" else column > instant
    elif isinstance(field, str) and field.startswith("data.") and len(field) > 5:
        return _data_clause(field[5:], op, value)
    raise ValueError(f"operator {op!r} does not apply to field {field!r}")


def _data_clause(key: str, op: str, value: Any) -> ColumnElement[bool]:
    key_param = literal(key, String())
    data = CONTACTS.c.data
    kind = func.coalesce(_DataKind(data, key_param), "")
    if op == "exists":
        return kind.not_in(["", "null"])
    if op == "equals":
        if isinstance(value, bool):
            return kind == ("true" if value else "false")
        if isinstance(value, int | float):
            return and_(kind == "number", _DataNumber(data, key_param) == float(value))
        return and_(kind == "string", _DataText(data, key_param) == str(value))
    if op == "contains":
        return and_(kind == "string", _TextContains(_DataText(data, key_param), literal(str(value), String())))
    if op in ("greaterThan", "lessThan"):
        number = _DataNumber(data, key_param)
        test = number > float(value) if op == "greaterThan" else number < float(value)
        return and_(kind == "number", test)
    if op in ("before", "after"):
        text = _ByteOrder(_DataText(data, key_param))
        bound = iso_text(parse_instant(value))
        return and_(kind == "string", text < bound if op == "before" else text > bound)
    raise ValueError(f"operator {op!r} does not apply to a data field")


# ---------------------------------------------------------------------------------------------------
# Segments.

def _record(row: Any) -> SegmentRecord:
    return SegmentRecord(*row)


def get_segment(session: Session, project_id: str, segment_id: str) -> SegmentRecord | None:
    row = session.connection().execute(select(*_SEGMENT_COLUMNS).where(
        _SEGMENTS.c.project_id == project_id, _SEGMENTS.c.id == segment_id)).first()
    return None if row is None else _record(row)


def slug_taken(session: Session, project_id: str, slug: str, other_than: str | None = None) -> bool:
    stmt = select(_SEGMENTS.c.id).where(_SEGMENTS.c.project_id == project_id, _SEGMENTS.c.slug == slug)
    if other_than is not None:
        stmt = stmt.where(_SEGMENTS.c.id != other_than)
    return session.connection().execute(stmt.limit(1)).first() is not None


def list_segments(session: Session, project_id: str, limit: int, cursor: str | None) -> Page:
    return paginate(session, select(Segment).where(Segment.project_id == project_id), Segment.id, limit, cursor)


def insert_segment(session: Session, project_id: str, name: str, slug: str, condition: dict[str, Any],
                   track_membership: bool) -> SegmentRecord:
    now = utcnow()
    record = SegmentRecord(new_id(), project_id, name, slug, condition, track_membership, now, now)
    session.connection().execute(_SEGMENTS.insert(), vars(record))
    return record


def update_segment(session: Session, segment_id: str, **values: Any) -> None:
    """Set columns (name, slug, condition, track_membership) of one segment and bump updated_at."""
    session.connection().execute(_SEGMENTS.update().where(_SEGMENTS.c.id == segment_id)
                                 .values(updated_at=utcnow(), **values))


def delete_segment(session: Session, segment_id: str) -> None:
    """Its member rows go with it (ON DELETE CASCADE)."""
    session.connection().execute(delete(_SEGMENTS).where(_SEGMENTS.c.id == segment_id))


FINISHED_CAMPAIGNS = (CampaignStatus.SENT, CampaignStatus.CANCELLED)


def segment_in_use(session: Session, segment_id: str) -> bool:
    """Whether a campaign that is not finished names this segment as its audience (campaigns.segment_id)."""
    stmt = (select(_CAMPAIGNS.c.id)
            .where(_CAMPAIGNS.c.segment_id == segment_id, _CAMPAIGNS.c.status.not_in(FINISHED_CAMPAIGNS)).limit(1))
    return session.connection().execute(stmt).first() is not None


def keep_snapshots(session: Session, segment: SegmentRecord) -> None:
    """Finished campaigns sent to `segment` keep a copy of it (id, name, condition) and let go of the row."""
    snapshot = {"id": segment.id, "name": segment.name, "condition": segment.condition}
    session.connection().execute(
        update(_CAMPAIGNS).where(_CAMPAIGNS.c.segment_id == segment.id, _CAMPAIGNS.c.status.in_(FINISHED_CAMPAIGNS))
        .values(segment_id=None, segment_snapshot=snapshot))


def segment_conditions(session: Session, project_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, condition) of every segment of the project."""
    stmt = select(_SEGMENTS.c.name, _SEGMENTS.c.condition).where(_SEGMENTS.c.project_id == project_id)
    return [(row.name, row.condition) for row in session.connection().execute(stmt)]


def tracked_segments(session: Session, project_id: str) -> tuple[TrackedSegment, ...]:
    stmt = (select(_SEGMENTS.c.id, _SEGMENTS.c.slug, _SEGMENTS.c.condition)
            .where(_SEGMENTS.c.project_id == project_id, _SEGMENTS.c.track_membership.is_(True))
            .order_by(_SEGMENTS.c.id))
    return tuple(TrackedSegment(*row) for row in session.connection().execute(stmt))


# ---------------------------------------------------------------------------------------------------
# A segment's contacts.

def _matching(project_id: str, condition: dict[str, Any], now: datetime) -> Any:
    return CONTACTS.c.project_id == project_id, condition_clause(condition, now)


def count_matching(session: Session, project_id: str, condition: dict[str, Any], now: datetime) -> int:
    """Contacts of the project the condition matches, subscribed or not."""
    stmt = select(func.count()).select_from(CONTACTS).where(*_matching(project_id, condition, now))
    return session.connection().execute(stmt).scalar_one()


def list_matching(session: Session, project_id: str, condition: dict[str, Any], now: datetime, limit: int,
                  cursor: str | None, count: bool = True) -> Page:
    """Contacts of the project the condition matches, subscribed or not, newest first (counted unless not
    `count`: the dashboard counts with `count_matching`, as the API's /count does)."""
    stmt = select(Contact).where(*_matching(project_id, condition, now))
    return paginate(session, stmt, Contact.id, limit, cursor, count)


# ---------------------------------------------------------------------------------------------------
# Membership (segments with track_membership on).

def membership_states(session: Session, contact_id: str, segments: tuple[TrackedSegment, ...],
                      now: datetime) -> list[tuple[bool, bool]]:
    """For each segment, (does the contact match it now, is it a member): one statement for all of them.
    Empty when the contact does not exist. The statement reads the contact and its events: what this
    transaction queued for its commit is written first."""
    flush_pending(session)
    columns = []
    for i, segment in enumerate(segments):
        member = (select(_MEMBERS.c.contact_id)
                  .where(_MEMBERS.c.segment_id == segment.id, _MEMBERS.c.contact_id == CONTACTS.c.id)
                  .correlate(CONTACTS).exists())
        columns.append(case((condition_clause(segment.condition, now), 1), else_=0).label(f"m{i}"))
        columns.append(case((member, 1), else_=0).label(f"s{i}"))
    row = session.connection().execute(select(*columns).where(CONTACTS.c.id == contact_id)).first()
    if row is None:
        return []
    return [(bool(row[2 * i]), bool(row[2 * i + 1])) for i in range(len(segments))]


_INSERT_MEMBER_IF_ABSENT = {
    "postgresql": pg_insert(_MEMBERS).on_conflict_do_nothing(index_elements=["segment_id", "contact_id"]),
    "sqlite": sqlite_insert(_MEMBERS).on_conflict_do_nothing(index_elements=["segment_id", "contact_id"]),
}


def add_member(session: Session, segment_id: str, contact_id: str, now: datetime) -> bool:
    """Make the contact a member; False when it already was, or when the segment is gone (a cached
    definition may outlive it by a few seconds), so exactly one writer records the entry."""
    source = (select(bindparam("s", segment_id, String()), bindparam("c", contact_id, String()),
                     bindparam("t", now, _MEMBERS.c.entered_at.type))
              .where(select(_SEGMENTS.c.id).where(_SEGMENTS.c.id == segment_id).exists()))
    stmt = _INSERT_MEMBER_IF_ABSENT[session.get_bind().dialect.name].from_select(
        ["segment_id", "contact_id", "entered_at"], source)
    return session.connection().execute(stmt).rowcount == 1


def remove_member(session: Session, segment_id: str, contact_id: str) -> bool:
    """False when it was not a member (another writer recorded the exit)."""
    result = session.connection().execute(delete(_MEMBERS).where(
        _MEMBERS.c.segment_id == segment_id, _MEMBERS.c.contact_id == contact_id))
    return result.rowcount == 1


def clear_members(session: Session, segment_id: str) -> None:
    session.connection().execute(delete(_MEMBERS).where(_MEMBERS.c.segment_id == segment_id))


def snapshot_members(session: Session, segment_id: str, project_id: str, condition: dict[str, Any],
                     now: datetime) -> int:
    """Replace the segment's members with every contact the condition matches now: one DELETE and one
    INSERT ... SELECT. Returns how many are members."""
    clear_members(session, segment_id)
    source = select(literal(segment_id, String()), CONTACTS.c.id, literal(now, _MEMBERS.c.entered_at.type)) \
        .where(*_matching(project_id, condition, now))
    result = session.connection().execute(
        _MEMBERS.insert().from_select(["segment_id", "contact_id", "entered_at"], source))
    return result.rowcount
