"""The reputation guard: a project's hard-bounce and complaint rates over the last `WINDOW_DAYS` days, judged
each time a hard bounce or a complaint is recorded, in that transaction.

A rate is judged once the project sent `reputation.min_sends` emails in the window (sends: emails handed to
the transport, sent or refused at RCPT/DATA). Its level is OK, WARN (above `*_warn`) or PAUSE (above
`*_pause`). Rising to WARN records `reputation.warning`; rising to PAUSE records `reputation.paused`, pauses
every scheduled or sending campaign of the project (PAUSED, `campaign.paused` each, its queued emails parked
after the commit)
and holds its workflow sends (the runs wait at their send step). Each is recorded once per crossing: a rate
that stays above a level fires nothing more, one that falls below and rises again fires again.
Transactional mail (`/v1/send`, the relay, test copies) is never held. A user resumes a campaign
(`POST /campaigns/:id/resume`), which also lifts the hold on workflow sends.

The rates come from daily counters (`storage.reputation`), never from counting emails.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from core.config import ReputationConfig
from pipeline.events import record_event
from storage import campaigns as campaign_store
from storage import reputation as store
from storage.models import Campaign, CampaignStatus, utcnow
from storage.reputation import OK, PAUSE, WARN, WINDOW_DAYS, Window

_settings = ReputationConfig()


def configure(settings: ReputationConfig) -> None:
    """The thresholds of this process (`[reputation]`), set by the wiring at start."""
    global _settings
    _settings = settings


def settings() -> ReputationConfig:
    return _settings


def current_window(session: Session, project_id: str) -> Window:
    today = store.day_of(utcnow())
    return store.window(session, project_id, today - WINDOW_DAYS, today)


def level(rate: float, warn: float, pause: float) -> str:
    return PAUSE if rate > pause else WARN if rate > warn else OK


def levels(window: Window) -> tuple[str, str]:
    """(bounce level, complaint level); both OK below `min_sends` sends."""
    if window.sent < _settings.min_sends:
        return OK, OK
    return (level(window.bounce_rate, _settings.bounce_warn, _settings.bounce_pause),
            level(window.complaint_rate, _settings.complaint_warn, _settings.complaint_pause))


def reputation_json(window: Window, paused: bool) -> dict[str, Any]:
    """A project's reputation as the API (`GET /projects/reputation`) and the events show it."""
    bounce, complaint = levels(window)
    return {"windowDays": WINDOW_DAYS, "sent": window.sent, "bounced": window.bounced,
            "complained": window.complained, "bounceRate": round(window.bounce_rate, 6),
            "complaintRate": round(window.complaint_rate, 6), "bounceLevel": bounce, "complaintLevel": complaint,
            "judged": window.sent >= _settings.min_sends, "paused": paused,
            "thresholds": {"minSends": _settings.min_sends, "bounceWarn": _settings.bounce_warn,
                           "bouncePause": _settings.bounce_pause, "complaintWarn": _settings.complaint_warn,
                           "complaintPause": _settings.complaint_pause}}


def project_reputation(session: Session, project_id: str) -> dict[str, Any]:
    return reputation_json(current_window(session, project_id), store.marketing_paused(session, project_id))


def record_feedback(session: Session, project_id: str, bounced: int = 0, complained: int = 0) -> None:
    """Count a hard bounce or a complaint of the project and judge its rates (in the caller's transaction)."""
    store.count_feedback(session, project_id, utcnow(), bounced, complained)
    judge(session, project_id, current_window(session, project_id).plus(bounced, complained))


def judge(session: Session, project_id: str, window: Window) -> None:
    """Compare `window` (the counters, with this transaction's feedback, written at commit) with the levels."""
    bounce, complaint = levels(window)
    state = store.state_for_update(session, project_id)
    rising = [(metric, new) for metric, new, old in (("bounce", bounce, state.bounce_level),
                                                      ("complaint", complaint, state.complaint_level))
              if store.LEVELS.index(new) > store.LEVELS.index(old)]
    state.bounce_level, state.complaint_level = bounce, complaint
    if not rising:
        return
    data = {k: v for k, v in reputation_json(window, True).items() if k not in ("thresholds", "paused", "judged")}
    for metric, new in rising:
        threshold = getattr(_settings, f"{metric}_{'pause' if new == PAUSE else 'warn'}")
        about = {**data, "metric": metric, "level": new, "threshold": threshold}
        if new == WARN:
            record_event(session, project_id, None, "reputation.warning", about)
        else:
            state.marketing_paused = True
            record_event(session, project_id, None, "reputation.paused", about)
            for campaign in campaign_store.pausable_campaigns(session, project_id):
                pause_campaign(session, campaign, about)
    session.flush()


def pause_campaign(session: Session, campaign: Campaign, why: dict[str, Any]) -> None:
    """PAUSED, and `campaign.paused` recorded with `why` and how many of its emails wait in the outbox (`parked`).
    They are parked after this commits, a thousand per transaction, by the fan-out loop
    (`pipeline.marketing.campaigns.park_paused_emails`): this runs in the transaction of a bounce or a complaint,
    which other requests' writes share, and 100,000 parked in it held them all (1.1 s on PostgreSQL, 0.25 s on
    SQLite). One a dispatcher claims first it parks itself when it reads the campaign's status."""
    campaign.status = CampaignStatus.PAUSED
    parked = campaign_store.parkable_count(session, campaign.id)
    record_event(session, campaign.project_id, None, "campaign.paused",
                 {"campaignId": campaign.id, "parked": parked, **why})


def lift_pause(session: Session, project_id: str) -> None:
    """A user resumed: the project's workflow sends go on (the levels stay, so only a new crossing pauses again)."""
    state = store.get_state(session, project_id, for_update=True)
    if state is not None and state.marketing_paused:
        state.marketing_paused = False
        session.flush()
