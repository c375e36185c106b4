"""Events API (seed 004), and `pipeline.events.record_event`: what an event sets off is written in the
event's own transaction."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from sqlalchemy import func, select, text

from pipeline.events import record_event
from storage import contacts as contact_store
from storage import db as db_module
from storage import events as event_store
from storage import webhooks as webhook_store
from storage import workflow_admin
from storage.models import Event, WebhookDelivery, WorkflowRun

T = TypeVar("T")


async def track(api, email, event, **extra):
    status, body = await api.call("POST", "/v1/track", json={"email": email, "event": event, **extra})
    assert status == 200, body
    return body["data"]


async def test_list_filter_and_names_by_frequency(api):
    for event, times in (("open-app", 3), ("purchase", 1), ("login", 2)):
        for _ in range(times):
            await track(api, "e@example.com", event)
    _, body = await api.call("GET", "/events?name=login")
    assert {e["name"] for e in body["data"]["items"]} == {"login"} and body["data"]["total"] == 2
    _, body = await api.call("GET", "/events?limit=2")
    assert len(body["data"]["items"]) == 2 and body["data"]["hasMore"] is True
    _, body = await api.call("GET", "/v1/events/names")
    assert body["data"] == ["open-app", "login", "purchase"]


async def test_stats_window(api):
    await track(api, "e@example.com", "a")
    await track(api, "e@example.com", "a")
    await track(api, "e@example.com", "b")
    _, body = await api.call("GET", "/events/stats")
    assert body["data"]["total"] == 3
    assert body["data"]["events"] == [{"name": "a", "count": 2}, {"name": "b", "count": 1}]
    _, body = await api.call("GET", "/events/stats?start=2999-01-01T00:00:00Z")
    assert body["data"]["total"] == 0
    _, body = await api.call("GET", "/events/stats?start=2000-01-01&end=2999-01-01")
    assert body["data"]["total"] == 3


@pytest.mark.parametrize("query", ["start=yesterday", "end=2020-13-01", "start=2025-01-02&end=2025-01-01"])
async def test_stats_bad_dates(api, query):
    status, body = await api.call("GET", f"/events/stats?{query}")
    assert status == 422 and body["error"]["code"] == "VALIDATION_ERROR"


async def test_delete_by_name(api):
    await track(api, "e@example.com", "old event")
    await track(api, "e@example.com", "keep")
    status, body = await api.call("DELETE", "/events/old%20event")
    assert status == 200 and body["data"] == {"name": "old event", "deleted": 1}
    _, body = await api.call("GET", "/events/names")
    assert body["data"] == ["keep"]
    status, _ = await api.call("DELETE", "/events/old%20event")
    assert status == 404


async def _tracks_until(api, done: Callable[[], bool], workers: int = 4) -> list[float]:
    """`workers` clients POST /v1/track back to back (events named `beside`) until `done()` (bounded); returns when
    each track was answered (time.monotonic)."""
    answered: list[float] = []

    async def worker() -> None:
        for index in range(10_000):
            if done():
                return
            await track(api, f"beside{index % 7}@example.org", "beside")
            answered.append(time.monotonic())

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(workers))), 60)
    return answered


def _timed_parts(fn: Callable[..., int], parts: list[float], pause: float = 0.02) -> Callable[..., int]:
    """`fn`, a part of `Database.write_in_chunks`, noting in `parts` when each starts and taking `pause` seconds
    longer (as a thousand rows would, where the tests change ten): a write beside it then has the time to come
    between two parts on a fast machine too. PostgreSQL's part waits in the server (its Python runs on the event
    loop, which the other writes need); SQLite's on the writer thread, which is where they wait for it."""
    def part(session, *args, **kwargs) -> int:
        parts.append(time.monotonic())
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SELECT pg_sleep(:seconds)"), {"seconds": pause})
        else:
            time.sleep(pause)
        return fn(session, *args, **kwargs)

    return part


async def in_parts_beside_tracks(api, monkeypatch, module: Any, part: str, expected_parts: int,
                                 request: Callable[[], Awaitable[T]]) -> T:
    """`request()` (a bulk change made by `Database.write_in_chunks`, ten rows a part here) while four clients track
    events beside it; `module.part` is the function of one part. Checks that it took `expected_parts` parts and that
    a track was answered between the first part and the last (in one transaction, none could be: on SQLite's one
    writer every other write waited for it). Returns what `request()` returned."""
    monkeypatch.setattr(db_module, "BULK_CHUNK", 10)
    parts: list[float] = []
    monkeypatch.setattr(module, part, _timed_parts(getattr(module, part), parts))
    started = asyncio.Event()
    beside = asyncio.create_task(_tracks_until(api, lambda: started.is_set() and len(parts) >= expected_parts))
    await asyncio.sleep(0.2)
    started.set()
    answer = await request()
    answered = await beside
    assert len(parts) == expected_parts
    assert any(parts[0] < done < parts[-1] for done in answered), "no track was answered between the parts"
    return answer


async def deleted_in_parts(api, monkeypatch, path: str, children: Callable[[Any], int], module: Any,
                           part: str) -> dict[str, Any]:
    """DELETE `path`, a thing whose rows `children(session)` counts, which are deleted (or unlinked) before it a part
    at a time by `module.part`, each part looking the thing up again: another project's DELETE is 404 and leaves
    them; the project's own goes in parts beside tracks (`in_parts_beside_tracks`) and leaves none. Returns the
    reply's data."""
    count = await api.db.read(children)
    _, other_sk, _ = await api.new_project("other")
    status, _ = await api.call("DELETE", path, key=other_sk)
    assert status == 404 and await api.db.read(children) == count
    status, body = await in_parts_beside_tracks(api, monkeypatch, module, part, count // 10 + 1,
                                                lambda: api.call("DELETE", path))
    assert status == 200, body
    assert await api.db.read(children) == 0
    return body["data"]


async def test_deleting_many_events_goes_a_part_at_a_time_and_other_writes_go_on_between(api, monkeypatch):
    """Deleting a name's events in one transaction held every other write on SQLite's one writer until it committed
    (100,000 events: 0.6 s for /v1/send beside it; a million, six). They go a thousand per transaction (ten here),
    and tracks written all along commit between the parts."""
    for _ in range(45):
        await track(api, "e@example.com", "page view")
    status, body = await in_parts_beside_tracks(api, monkeypatch, event_store, "delete_events_named", 5,
                                                lambda: api.call("DELETE", "/events/page%20view"))
    assert status == 200 and body["data"] == {"name": "page view", "deleted": 45}
    _, names = await api.call("GET", "/events/names")
    assert "page view" not in names["data"] and "beside" in names["data"]


@pytest.mark.parametrize("name", ["email.sent", "contact.subscribed", "segment.vip.entry"])
async def test_system_events_cannot_be_deleted(api, name):
    await track(api, "e@example.com", "x", subscribed=False)
    await track(api, "e@example.com", "x", subscribed=True)
    status, body = await api.call("DELETE", f"/events/{name}")
    assert status == 403 and body["error"]["code"] == "FORBIDDEN"
    _, names = await api.call("GET", "/events/names")
    assert "contact.subscribed" in names["data"]


async def test_events_are_per_project(api):
    await track(api, "e@example.com", "mine")
    _, other_sk, _ = await api.new_project()
    _, body = await api.call("GET", "/events", key=other_sk)
    assert body["data"]["items"] == []
    status, _ = await api.call("DELETE", "/events/mine", key=other_sk)
    assert status == 404
    _, body = await api.call("GET", "/events")
    assert body["data"]["total"] == 1


@pytest.mark.parametrize(("path", "parameter"), [
    ("/events?event=login", "event"),
    ("/v1/events?limit=5&nmae=login", "nmae"),
    ("/api/v1/events?name=login&sort=asc", "sort"),
    ("/events/stats?from=2999-01-01", "from"),
    ("/events/names?limit=1", "limit"),
    ("/events/contact/x?name=login", "name"),
    ("/contacts?subscribed=true&status=active", "status"),
    ("/contacts/count?subscribed=true", "subscribed"),
])
async def test_an_unknown_query_parameter_is_a_422_naming_it(api, path, parameter):
    """A misspelt or unsupported filter used to be ignored, answering unfiltered data."""
    await track(api, "e@example.com", "login")
    status, body = await api.call("GET", path)
    assert status == 422, body
    assert body["error"]["code"] == "VALIDATION_ERROR"
    assert [(e["field"], e["code"]) for e in body["error"]["errors"]] == [(parameter, "unrecognized_keys")]
    resp = await api.client.get(path)
    assert resp.status == 401, "no key is still a 401 first"


async def test_plunk_parameter_names_filter_too(api):
    """Plunk's own dashboard API reads `eventName` on GET /events and `startDate`/`endDate` on GET
    /events/stats; they filter here as `name`, `start` and `end` do."""
    await track(api, "e@example.com", "login")
    await track(api, "e@example.com", "purchase")
    _, body = await api.call("GET", "/events?eventName=login")
    assert [e["name"] for e in body["data"]["items"]] == ["login"]
    _, body = await api.call("GET", "/events/stats?startDate=2999-01-01T00:00:00Z")
    assert body["data"]["total"] == 0
    _, body = await api.call("GET", "/events/stats?startDate=2000-01-01&endDate=2999-01-01")
    assert body["data"]["total"] == 2
    status, body = await api.call("GET", "/events/stats?start=2000-01-01&startDate=2000-01-01")
    assert status == 422 and body["error"]["errors"][0]["field"] == "startDate"


class RolledBack(Exception):
    """Raised by a write after recording an event, so that its transaction rolls back."""


async def test_record_event_writes_the_event_its_run_and_its_delivery_in_one_transaction(api):
    def listeners(session):
        contact = contact_store.insert_contact(session, api.project_id, "rec@example.com", True, {})
        workflow = workflow_admin.insert_workflow(session, api.project_id, {
            "name": "welcome", "exclude_events": [], "enabled": True, "run_once": False, "kind": "WORKFLOW",
            "definition": {"steps": [{"id": "pause", "type": "delay", "seconds": 3600}]}}, ["signed-up"])
        endpoint = webhook_store.insert_endpoint(session, api.project_id, "https://hooks.example.com/in",
                                                 ["signed-up"], "whsec_test", True)
        return contact.id, workflow.id, endpoint.id

    contact_id, workflow_id, endpoint_id = await api.db.write(listeners)

    def counts(session):
        return (session.scalar(select(func.count()).select_from(Event).where(Event.name == "signed-up")),
                session.scalar(select(func.count()).select_from(WorkflowRun)
                               .where(WorkflowRun.workflow_id == workflow_id)),
                session.scalar(select(func.count()).select_from(WebhookDelivery)
                               .where(WebhookDelivery.endpoint_id == endpoint_id)))

    def record_then_fail(session):
        record_event(session, api.project_id, contact_id, "signed-up", {"plan": "pro"})
        raise RolledBack

    with pytest.raises(RolledBack):
        await api.db.write(record_then_fail)
    assert await api.db.read(counts) == (0, 0, 0)

    event_id, _ = await api.db.write(
        lambda session: record_event(session, api.project_id, contact_id, "signed-up", {"plan": "pro"}))
    assert await api.db.read(counts) == (1, 1, 1)

    def written(session):
        run = session.execute(select(WorkflowRun).where(WorkflowRun.workflow_id == workflow_id)).scalar_one()
        delivery = session.execute(select(WebhookDelivery)
                                   .where(WebhookDelivery.endpoint_id == endpoint_id)).scalar_one()
        return run, delivery

    run, delivery = await api.db.read(written)
    assert (run.contact_id, run.trigger_event_id, run.status) == (contact_id, event_id, "ACTIVE")
    assert (delivery.event_id, delivery.status) == (event_id, "PENDING")
    assert delivery.payload["data"]["contact"] == {"id": contact_id, "email": "rec@example.com"}
    assert delivery.payload["data"]["data"] == {"plan": "pro"}
