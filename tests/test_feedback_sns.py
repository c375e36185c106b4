"""POST /webhooks/incoming/sns against a stand-in SNS (testkit/sns.py: our own CA and signing certificate, a
local HTTPS server for the certificate and ConfirmSubscription; the real SNS is on the internet): genuine
messages are applied once, whatever SNS redelivers; forged, tampered, stale, foreign and malformed ones are
refused with the exact reply and change nothing."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from api.context import DB
from core.config import ConfigError, FeedbackConfig, load_config
from feedback.sns import SnsRefused, SnsVerifier
from plunkd.app import create_app
from storage.models import AppliedSnsMessage, Suppression
from testkit.sns import TOPIC, SnsSigner, make_signing_certificate, ses_event, sns_time
from tests import sns_fixtures
from tests.conftest import Api
from tests.sns_fixtures import events, post_sns, sent_email

signing_certificate, sns, config = sns_fixtures.signing_certificate, sns_fixtures.sns, sns_fixtures.config
"""The feedback fixtures (`config` overrides conftest's in this module)."""


async def status_of(api, email_id: str) -> str:
    from storage import emails as email_store

    return (await api.db.read(email_store.get_email, api.project_id, email_id)).status


def refused(body: dict, message: str) -> bool:
    return (body["success"] is False and body["error"]["code"] == "FORBIDDEN" and body["error"]["statusCode"] == 403
            and body["error"]["message"] == message and body["message"] == message)


async def test_signed_notifications_v1_and_v2_are_applied_without_an_api_key(api, sender, sns, tmp_path):
    first = await sent_email(api, tmp_path, "ann@example.org")
    second = await sent_email(api, tmp_path, "bob@example.org")
    assert first.status == second.status == "SENT"
    for email, version in ((first, "1"), (second, "2")):
        message = sns.signer.notification(ses_event("Delivery", email.transport_id, email.recipient),
                                          version=version, subject="Amazon SES Email Event Notification")
        status, body = await post_sns(api, message)
        assert status == 200, body
        assert body["data"]["outcome"] == "applied" and body["data"]["messageId"] == message["MessageId"]
        assert body["data"]["type"] == "Notification" and f"email {email.id}: delivered" in body["data"]["detail"]
        assert await status_of(api, email.id) == "DELIVERED"
    recorded = await events(api, "email.delivery")
    assert {e["emailId"] for e in recorded} == {first.id, second.id}
    assert {e["contactId"] for e in recorded} == {first.contact_id, second.contact_id}
    data = next(e["data"] for e in recorded if e["emailId"] == first.id)
    assert data["via"] == "ses" and data["messageId"] == first.transport_id
    assert data["smtpResponse"] == "250 ok dirdel" and data["processingTimeMillis"] == 546


async def test_plunks_path_and_an_identity_notification(api, sender, sns, tmp_path):
    email = await sent_email(api, tmp_path)
    message = sns.signer.notification(ses_event("Delivery", email.transport_id, email.recipient, shape="identity"))
    status, body = await post_sns(api, message, path="/api/webhooks/incoming/sns")
    assert status == 200 and body["data"]["outcome"] == "applied", body
    assert await status_of(api, email.id) == "DELIVERED"


async def test_forged_and_tampered_messages_are_403_and_change_nothing(api, sender, sns, tmp_path):
    email = await sent_email(api, tmp_path)
    bounce = ses_event("Bounce", email.transport_id, email.recipient)
    other_key, _ = make_signing_certificate()
    forger = SnsSigner(other_key, sns.signer.cert_url)
    status, body = await post_sns(api, forger.notification(bounce))
    assert status == 403 and refused(body, "The SNS signature does not verify"), body

    genuine = sns.signer.notification(ses_event("Delivery", email.transport_id, email.recipient))
    tampered = {**genuine, "Message": json.dumps(bounce)}
    status, body = await post_sns(api, tampered)
    assert status == 403 and refused(body, "The SNS signature does not verify"), body
    for change in ({"Subject": "added after signing"}, {"Timestamp": sns_time()}, {"MessageId": "another-id"},
                   {"SignatureVersion": "2"}):
        status, body = await post_sns(api, {**genuine, **change})
        assert status == 403 and refused(body, "The SNS signature does not verify"), (change, body)
    unsigned = {key: value for key, value in genuine.items() if key != "Signature"}
    status, body = await post_sns(api, unsigned)
    assert status == 422 and body["error"]["errors"][0]["field"] == "Signature", body
    status, body = await post_sns(api, {**genuine, "Signature": "not base64!"})
    assert status == 403 and refused(body, "The SNS signature is not base64"), body

    assert await status_of(api, email.id) == "SENT"
    assert await events(api, "email.bounce") == [] and await events(api, "email.delivery") == []
    status, body = await post_sns(api, genuine)
    assert status == 200 and body["data"]["outcome"] == "applied", "refusals did not use up its MessageId"


async def test_a_redelivered_message_is_applied_once_even_when_it_arrives_twice_at_once(api, sender, sns, tmp_path):
    email = await sent_email(api, tmp_path)
    message = sns.signer.notification(ses_event("Open", email.transport_id, email.recipient))
    status, body = await post_sns(api, message)
    assert status == 200 and body["data"]["outcome"] == "applied"
    status, body = await post_sns(api, message)
    assert status == 200 and body["data"] == {**body["data"], "outcome": "duplicate", "detail": "already applied"}
    assert len(await events(api, "email.open")) == 1

    burst = sns.signer.notification(ses_event("Click", email.transport_id, email.recipient))
    replies = await asyncio.gather(*(post_sns(api, burst) for _ in range(12)))
    outcomes = sorted(body["data"]["outcome"] for status, body in replies if status == 200)
    assert outcomes == ["applied"] + ["duplicate"] * 11, replies
    clicks = await events(api, "email.click")
    assert len(clicks) == 1 and clicks[0]["data"]["count"] == 1


@pytest.mark.parametrize("age, message", [
    (timedelta(hours=2), "The SNS message is older than 3600 s (Timestamp {})"),
    (-timedelta(hours=1), "The SNS Timestamp {} is in the future"),
])
async def test_stale_and_future_messages_are_403(api, sender, sns, tmp_path, age, message):
    email = await sent_email(api, tmp_path)
    stamp = sns_time(datetime.now(UTC) - age)
    signed = sns.signer.notification(ses_event("Delivery", email.transport_id, email.recipient), timestamp=stamp)
    status, body = await post_sns(api, signed)
    assert status == 403 and refused(body, message.format(stamp)), body
    assert await status_of(api, email.id) == "SENT"
    recent = sns_time(datetime.now(UTC) - timedelta(minutes=50))
    status, body = await post_sns(api, sns.signer.notification(
        ses_event("Delivery", email.transport_id, email.recipient), timestamp=recent))
    assert status == 200 and body["data"]["outcome"] == "applied", "50 minutes old is still within the hour"


async def test_a_bad_timestamp_is_403(api, sns):
    signed = sns.signer.notification("{}", timestamp="yesterday")
    status, body = await post_sns(api, signed)
    assert status == 403 and refused(body, "The SNS Timestamp 'yesterday' is not an ISO 8601 time"), body


async def test_only_configured_topics_are_accepted(api, sender, sns, tmp_path, aiohttp_client, config, caplog):
    email = await sent_email(api, tmp_path)
    other = "arn:aws:sns:us-east-1:123456789012:someone-else"
    signed = sns.signer.notification(ses_event("Bounce", email.transport_id, email.recipient), topic=other)
    status, body = await post_sns(api, signed)
    assert status == 403 and refused(body, f"SNS topic {other} is not one of feedback.sns_topic_arns"), body

    config.feedback.sns_topic_arns = []
    bare_app = create_app(config)
    bare = Api(await aiohttp_client(bare_app), bare_app[DB], api.project_id, api.sk, api.pk)
    genuine = sns.signer.notification(ses_event("Bounce", email.transport_id, email.recipient))
    with caplog.at_level(logging.WARNING, logger="plunkd.feedback"):
        status, body = await post_sns(bare, genuine)
    assert status == 403 and refused(body, "No SNS topic is accepted: set feedback.sns_topic_arns"), body
    assert f"sns '{genuine['MessageId']}' (Notification, topic '{TOPIC}'" in caplog.text
    assert "No SNS topic is accepted" in caplog.text
    assert await status_of(api, email.id) == "SENT"


@pytest.mark.parametrize("url, message", [
    ("https://sns.example.com/SimpleNotificationService-0123.pem",
     "The SNS SigningCertURL is not https on an SNS host (feedback.sns_host_pattern)"),
    ("http://127.0.0.1:{port}/SimpleNotificationService-0123.pem",
     "The SNS SigningCertURL is not https on an SNS host (feedback.sns_host_pattern)"),
    ("https://user@127.0.0.1:{port}/SimpleNotificationService-0123.pem",
     "The SNS SigningCertURL is not https on an SNS host (feedback.sns_host_pattern)"),
    ("https://127.0.0.1:{port}/SimpleNotificationService-0123.pem?x=1",
     "The SNS SigningCertURL does not name a .pem certificate"),
    ("https://127.0.0.1:{port}/../etc/cert.pem", "The SNS SigningCertURL does not name a .pem certificate"),
    ("https://127.0.0.1:{port}/", "The SNS SigningCertURL does not name a .pem certificate"),
    ("https://127.0.0.1:{port}/missing.pem", "SNS answered 404 for the signing certificate"),
    ("https://127.0.0.1:{port}/huge.pem", "The SNS signing certificate is larger than 65536 bytes"),
    ("https://127.0.0.1:{port}/garbage.pem", "The SNS signing certificate is not a PEM certificate"),
])
async def test_signing_certificates_come_only_from_sns_hosts(api, sns, url, message):
    port = sns.base_url.rsplit(":", 1)[1]
    signer = SnsSigner(sns.signer.key, url.format(port=port))
    status, body = await post_sns(api, signer.notification("{}"))
    assert status == 403 and refused(body, message), body
    served = "huge" in url or "garbage" in url
    assert len(sns.host.requests) == (1 if served else 0), "a refused URL is never fetched"


async def test_an_unreachable_certificate_host_is_503_so_sns_retries(api, sns):
    from tests.servers import free_port

    signer = SnsSigner(sns.signer.key, f"https://127.0.0.1:{free_port()}/SimpleNotificationService-1.pem")
    status, body = await post_sns(api, signer.notification("{}"))
    assert status == 503, body
    assert body["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert body["error"]["message"] == ("Could not fetch the SNS signing certificate: ClientConnectorError; "
                                        "SNS will retry")


async def test_the_certificate_is_fetched_once_and_its_key_reused(api, sender, sns, tmp_path):
    email = await sent_email(api, tmp_path)
    messages = [sns.signer.notification(ses_event("Open", email.transport_id, email.recipient)) for _ in range(6)]
    replies = await asyncio.gather(*(post_sns(api, m) for m in messages))
    assert [status for status, _ in replies] == [200] * 6
    assert sns.host.requests == ["/SimpleNotificationService-0123456789abcdef0123456789abcdef.pem"]


async def test_subscription_confirmation_gets_the_subscribe_url_once(api, sns, caplog):
    message = sns.signer.confirmation(sns.base_url, token="secret-token-value")
    with caplog.at_level(logging.INFO, logger="plunkd.feedback"):
        status, body = await post_sns(api, message)
    assert status == 200 and body["data"]["outcome"] == "confirmed", body
    confirm = f"/?Action=ConfirmSubscription&TopicArn={TOPIC}&Token=secret-token-value"
    assert sns.host.requests[-1] == confirm
    status, body = await post_sns(api, message)
    assert status == 200 and body["data"]["outcome"] == "duplicate", body
    assert sns.host.requests.count(confirm) == 1, "a redelivered confirmation is not confirmed again"
    assert message["MessageId"] in caplog.text and "secret-token-value" not in caplog.text
    assert message["Signature"] not in caplog.text


async def test_a_failed_confirmation_is_503_and_confirmed_when_sns_retries(api, sns):
    message = sns.signer.confirmation(sns.base_url)
    sns.host.confirm_status = 500
    status, body = await post_sns(api, message)
    assert status == 503 and body["error"]["message"] == ("SNS answered 500 for the subscription confirmation; "
                                                          "SNS will retry"), body
    sns.host.confirm_status = 200
    status, body = await post_sns(api, message)
    assert status == 200 and body["data"]["outcome"] == "confirmed", body


@pytest.mark.parametrize("subscribe_url, message", [
    ("https://evil.example.com/?Action=ConfirmSubscription&TopicArn={topic}&Token=t",
     "The SNS SubscribeURL is not https on an SNS host (feedback.sns_host_pattern)"),
    ("{base}/?Action=ConfirmSubscription&TopicArn=arn:aws:sns:us-east-1:123456789012:other&Token=t",
     "The SNS SubscribeURL does not confirm a subscription to the message's topic"),
    ("{base}/?Action=DeleteTopic&TopicArn={topic}", "The SNS SubscribeURL does not confirm a subscription to the "
                                                    "message's topic"),
])
async def test_a_subscribe_url_elsewhere_is_403_and_not_fetched(api, sns, subscribe_url, message):
    url = subscribe_url.format(base=sns.base_url, topic=TOPIC)
    status, body = await post_sns(api, sns.signer.confirmation(sns.base_url, subscribe_url=url))
    assert status == 403 and refused(body, message), body
    assert not any(r.startswith("/?") for r in sns.host.requests)


async def test_unsubscribe_confirmation_is_noted(api, sns, caplog):
    message = sns.signer.confirmation(sns.base_url, kind="UnsubscribeConfirmation")
    with caplog.at_level(logging.WARNING, logger="plunkd.feedback"):
        status, body = await post_sns(api, message)
    assert status == 200 and body["data"]["outcome"] == "unsubscribed", body
    assert f"the subscription to topic {TOPIC} was deleted" in caplog.text
    assert not any(r.startswith("/?") for r in sns.host.requests), "nothing is fetched for it"


@pytest.mark.parametrize("raw, status, code, field", [
    (b"", 400, "BAD_REQUEST", None),
    (b"{not json", 400, "BAD_REQUEST", None),
    (b"[" * 100_000, 400, "BAD_REQUEST", None),
    (b"[1, 2]", 422, "VALIDATION_ERROR", "body"),
    (b'{"Type": "Notification"}', 422, "VALIDATION_ERROR", "MessageId"),
    (b"\xff\xfe", 400, "BAD_REQUEST", None),
])
async def test_malformed_bodies(api, sns, raw, status, code, field):
    got, body = await post_sns(api, raw=raw)
    assert got == status and body["error"]["code"] == code, body
    if field is not None:
        assert field in {error["field"] for error in body["error"]["errors"]}, body


@pytest.mark.parametrize("change, field", [
    ({"Type": "Gossip"}, "Type"),
    ({"SignatureVersion": "3"}, "SignatureVersion"),
    ({"SignatureVersion": 1}, "SignatureVersion"),
    ({"MessageId": "x" * 101}, "MessageId"),
    ({"Message": {"nested": "object"}}, "Message"),
    ({"TopicArn": "arn\u0000"}, "TopicArn"),
])
async def test_fields_that_are_not_snss_are_422(api, sns, change, field):
    message = {**sns.signer.notification("{}"), **change}
    status, body = await post_sns(api, message)
    assert status == 422 and field in {error["field"] for error in body["error"]["errors"]}, body


async def test_a_confirmation_without_its_token_is_422(api, sns):
    message = sns.signer.confirmation(sns.base_url)
    del message["Token"]
    status, body = await post_sns(api, message)
    assert status == 422 and body["error"]["errors"] == [
        {"field": "Token", "message": "Required in a SubscriptionConfirmation", "code": "invalid_type"}], body


async def test_an_oversized_body_is_413_before_anything_else(api, sns):
    status, body = await post_sns(api, raw=b" " * (1024 * 1024 + 1))
    assert status == 413 and body["error"]["code"] == "PAYLOAD_TOO_LARGE", body
    assert body["error"]["message"] == "Request body is larger than 1048576 bytes"


async def test_unknown_ses_messages_and_other_notifications_are_acknowledged(api, sns, caplog):
    unknown = sns.signer.notification(ses_event("Bounce", "0100-not-ours", "x@example.org"))
    with caplog.at_level(logging.INFO, logger="plunkd.feedback"):
        status, body = await post_sns(api, unknown)
    assert status == 200 and body["data"]["outcome"] == "unknown", body
    assert "no email was sent as SES message 0100-not-ours" in body["data"]["detail"]
    assert f"sns {unknown['MessageId']} (Notification, topic {TOPIC}): unknown" in caplog.text
    for payload in ("plain text, not JSON", json.dumps({"notificationType": "AmazonSnsSubscriptionSucceeded",
                                                        "message": "You have successfully subscribed"})):
        status, body = await post_sns(api, sns.signer.notification(payload))
        assert status == 200 and body["data"]["outcome"] == "ignored", body
    assert await api.db.read(lambda s: s.execute(select(func.count()).select_from(Suppression)).scalar()) == 0


async def test_what_a_refused_sender_wrote_cannot_forge_log_lines(api, sns, caplog):
    forged = {**sns.signer.notification("{}"), "MessageId": "1\n2026-01-01 INFO plunkd applied everything",
              "TopicArn": "arn\r\nforged"}
    with caplog.at_level(logging.WARNING, logger="plunkd.feedback"):
        status, body = await post_sns(api, forged)
    assert status == 403, body
    assert "\n2026-01-01 INFO" not in caplog.text and "\\n2026-01-01 INFO" in caplog.text
    assert "arn\r\nforged" not in caplog.text


def test_the_default_host_rule_is_snss_own_hosts():
    verifier = SnsVerifier(FeedbackConfig(sns_topic_arns=[TOPIC]))
    for url in ("https://sns.us-east-1.amazonaws.com/SimpleNotificationService-9c6465fa.pem",
                "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-1.pem"):
        verifier.check_url(url, "SigningCertURL")
    for url in ("https://sns.us-east-1.amazonaws.com.evil.com/x.pem", "https://evil.com/sns.us-east-1.amazonaws.com/x.pem",
                "http://sns.us-east-1.amazonaws.com/x.pem", "https://sns.us-east-1.amazonaws.com:8443/x.pem",
                "https://me@sns.us-east-1.amazonaws.com/x.pem", "https://sqs.us-east-1.amazonaws.com/x.pem",
                "https://sns.us-east-1.amazonaws.com\\@evil.com/x.pem", "https://127.0.0.1/x.pem", "not a url"):
        with pytest.raises(SnsRefused):
            verifier.check_url(url, "SigningCertURL")


async def test_applied_message_ids_are_pruned_once_no_redelivery_can_be_accepted(api, sns):
    """A message older than sns_max_age_seconds is refused anyway; its row is kept a day beyond that."""
    now = datetime.now(UTC)
    rows = [AppliedSnsMessage(message_id=name, topic_arn=TOPIC, type="Notification", received_at=now - age)
            for name, age in (("ancient", timedelta(days=3)), ("yesterday", timedelta(hours=20)))]
    await api.db.write(lambda s: s.add_all(rows))
    status, body = await post_sns(api, sns.signer.notification("{}"))
    assert status == 200, body
    kept = await api.db.read(lambda s: set(s.execute(select(AppliedSnsMessage.message_id)).scalars()))
    assert kept == {"yesterday", body["data"]["messageId"]}


@pytest.mark.parametrize("env, message", [
    ({"PLUNKD_FEEDBACK_SNS_TOPIC_ARNS": "ses-feedback"},
     "config key feedback.sns_topic_arns: expected SNS topic ARNs like arn:aws:sns:us-east-1:123456789012:"
     "ses-feedback, got 'ses-feedback'"),
    ({"PLUNKD_FEEDBACK_SNS_HOST_PATTERN": "(["}, "config key feedback.sns_host_pattern: expected a valid regex"),
    ({"PLUNKD_FEEDBACK_SNS_MAX_AGE_SECONDS": "0"}, "config key feedback.sns_max_age_seconds: expected a number > 0"),
    ({"PLUNKD_FEEDBACK_SNS_MAX_BODY_BYTES": "big"},
     "config key feedback.sns_max_body_bytes (PLUNKD_FEEDBACK_SNS_MAX_BODY_BYTES): expected int, got 'big'"),
])
def test_a_bad_feedback_setting_stops_start_up_naming_the_key(env, message):
    with pytest.raises(ConfigError) as failed:
        load_config(env=env)
    assert str(failed.value) == message


def test_topics_from_the_environment():
    config = load_config(env={"PLUNKD_FEEDBACK_SNS_TOPIC_ARNS": f"{TOPIC}, arn:aws-cn:sns:cn-north-1:123456789012:b"})
    assert config.feedback.sns_topic_arns == [TOPIC, "arn:aws-cn:sns:cn-north-1:123456789012:b"]
