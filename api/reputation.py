"""A project's sending reputation: `GET /projects/reputation` (the rates the reputation guard judges)."""

from __future__ import annotations

from typing import Literal

from aiohttp import web
from pydantic import Field

from api.context import DB
from api.envelope import success
from api.routing import Route, caller
from api.schemas import Out
from pipeline import reputation as rules

Level = Literal["OK", "WARN", "PAUSE"]


class ReputationThresholdsOut(Out):
    minSends: int
    bounceWarn: float
    bouncePause: float
    complaintWarn: float
    complaintPause: float


class ReputationOut(Out):
    windowDays: int
    sent: int = Field(ge=0)
    """Emails handed to the transport in the window (sent, or refused for good at RCPT or DATA)."""
    bounced: int = Field(ge=0)
    """Hard (permanent) bounces."""
    complained: int = Field(ge=0)
    bounceRate: float = Field(ge=0)
    complaintRate: float = Field(ge=0)
    bounceLevel: Level
    complaintLevel: Level
    judged: bool
    """Whether the window holds `thresholds.minSends` sends: below, both levels are OK."""
    paused: bool
    """Whether the project's campaigns and workflow sends are paused (resume a campaign to lift it)."""
    thresholds: ReputationThresholdsOut


async def get_reputation(request: web.Request) -> web.Response:
    return success(await request.app[DB].read(rules.project_reputation, caller(request).project_id))


ROUTES = [
    Route("GET", "/projects/reputation", get_reputation, "The project's bounce and complaint rates over the last "
          "7 days, and whether its campaigns are paused", tag="Projects", response=ReputationOut),
]
