"""A project's open and click tracking defaults: `GET /settings/tracking` and `PATCH /settings/tracking`."""

from __future__ import annotations

from aiohttp import web

from api.context import DB
from api.envelope import success
from api.routing import Route, caller
from api.schemas import Out
from api.validation import Body, read_body
from pipeline.tracking import links as rules


class TrackingChoice(Body):
    """Open and click tracking for one kind of mail, or one send; an omitted (or null) field is left as it is
    (in a send: the project's default)."""

    opens: bool | None = None
    clicks: bool | None = None

    def choice(self) -> rules.Tracking:
        return rules.Tracking(self.opens, self.clicks)


class TrackingSettingsBody(Body):
    """The defaults to change: `marketing` (campaigns, MARKETING templates) and `transactional` (every other
    API send, and all mail relayed over SMTP). An omitted (or null) field is left as it is; mail already queued
    keeps its choice."""

    marketing: TrackingChoice | None = None
    transactional: TrackingChoice | None = None


class TrackingKindOut(Out):
    opens: bool
    clicks: bool


class TrackingSettingsOut(Out):
    marketing: TrackingKindOut
    transactional: TrackingKindOut


def settings_json(defaults: rules.TrackingDefaults) -> dict[str, dict[str, bool]]:
    return {kind: {"opens": bool(choice.opens), "clicks": bool(choice.clicks)}
            for kind, choice in (("marketing", defaults.marketing), ("transactional", defaults.transactional))}


async def get_settings(request: web.Request) -> web.Response:
    defaults = await request.app[DB].read(rules.project_defaults, caller(request).project_id)
    return success(settings_json(defaults))


async def change_settings(request: web.Request) -> web.Response:
    body = await read_body(request, TrackingSettingsBody)
    project_id = caller(request).project_id
    marketing = body.marketing.choice() if body.marketing is not None else rules.Tracking()
    transactional = body.transactional.choice() if body.transactional is not None else rules.Tracking()
    defaults = await request.app[DB].write(lambda s: rules.update_defaults(s, project_id, marketing, transactional))
    return success(settings_json(defaults))


ROUTES = [
    Route("GET", "/settings/tracking", get_settings, "The project's open and click tracking defaults",
          tag="Tracking", response=TrackingSettingsOut),
    Route("PATCH", "/settings/tracking", change_settings, "Change the project's open and click tracking defaults",
          body=TrackingSettingsBody, tag="Tracking", response=TrackingSettingsOut),
]
