"""Amazon SES through aioboto3 (SESv2): raw sends, the account's send rate, identity checks."""

from __future__ import annotations

from typing import Any

import aioboto3
from botocore.exceptions import BotoCoreError, ClientError

from core.config import SesConfig
from delivery.result import SendResult

THROTTLING = {"Throttling", "ThrottlingException", "TooManyRequestsException", "LimitExceededException",
              "ServiceUnavailable", "InternalFailure", "SendingPausedException"}


def _client_args(settings: SesConfig) -> dict[str, Any]:
    args: dict[str, Any] = {"region_name": settings.region}
    if settings.endpoint_url:
        args["endpoint_url"] = settings.endpoint_url
    if settings.access_key_id:
        args["aws_access_key_id"] = settings.access_key_id
        args["aws_secret_access_key"] = settings.secret_access_key
    return args


class SesTransport:
    name = "ses"

    def __init__(self, settings: SesConfig) -> None:
        self.settings = settings
        self.session = aioboto3.Session()
        self._client_cm: Any = None
        self._client: Any = None

    async def _sesv2(self) -> Any:
        if self._client is None:
            self._client_cm = self.session.client("sesv2", **_client_args(self.settings))
            self._client = await self._client_cm.__aenter__()
        return self._client

    async def send(self, sender: str, recipients: list[str], message: bytes,
                   envelope_sender: str | None = None) -> SendResult:
        """SES picks the MAIL FROM itself; an envelope sender other than the From address (SES's default)
        becomes the address SES forwards bounces and complaints to (`FeedbackForwardingEmailAddress`, on a
        verified identity too)."""
        request: dict[str, Any] = {"FromEmailAddress": sender, "Destination": {"ToAddresses": recipients},
                                   "Content": {"Raw": {"Data": message}}}
        if envelope_sender and envelope_sender != sender:
            request["FeedbackForwardingEmailAddress"] = envelope_sender
        if self.settings.configuration_set:
            request["ConfigurationSetName"] = self.settings.configuration_set
        try:
            reply = await (await self._sesv2()).send_email(**request)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            text = f"{code}: {exc.response.get('Error', {}).get('Message', '')}"
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 400)
            return SendResult.retry(text) if code in THROTTLING or status >= 500 else SendResult.fail(text)
        except (BotoCoreError, OSError, TimeoutError) as exc:
            return SendResult.retry(f"{exc.__class__.__name__}: {exc}")
        return SendResult.sent(reply["MessageId"])

    async def max_send_rate(self) -> float | None:
        """The account's MaxSendRate from SES GetSendQuota, or None if SES cannot say."""
        try:
            async with self.session.client("ses", **_client_args(self.settings)) as ses:
                quota = await ses.get_send_quota()
        except (ClientError, BotoCoreError, OSError):
            return None
        rate = quota.get("MaxSendRate")
        return float(rate) if rate else None

    async def close(self) -> None:
        if self._client_cm is not None:
            await self._client_cm.__aexit__(None, None, None)
            self._client_cm = self._client = None


async def ses_identity_verified(settings: SesConfig, domain: str) -> bool:
    """Ask SES whether the domain identity may send (creating the identity if it is new)."""
    async with aioboto3.Session().client("sesv2", **_client_args(settings)) as ses:
        try:
            identity = await ses.get_email_identity(EmailIdentity=domain)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NotFoundException":
                raise
            await ses.create_email_identity(EmailIdentity=domain)
            identity = await ses.get_email_identity(EmailIdentity=domain)
    return bool(identity.get("VerifiedForSendingStatus")) or identity.get("VerificationStatus") == "SUCCESS"
