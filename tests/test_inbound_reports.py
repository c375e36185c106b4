"""The DSN and ARF readers (`inbound.reports`) on hostile input: never an exception, always a bounded time
(a report is read while its SMTP session waits for the 250), and the fields of a well-formed report read back
exactly, whatever their text."""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inbound.reports import MAX_PARTS, DeliveryReport, FeedbackReport, parse_report
from pipeline.mime_bounds import MAX_PARAMETER_FIELD

SECONDS = 1.0
"""The bound on one read of a message of up to a few MB (the inbound size limit is 10 MB by default)."""
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def timed(raw: bytes) -> DeliveryReport | FeedbackReport | None:
    """The report read from `raw`, in less than SECONDS of this thread's CPU time: what the reader costs, not
    how long a loaded machine kept the test waiting (CI once saw a 1-byte input take 1.81 s of wall time)."""
    started = time.thread_time()
    report = parse_report(raw)
    elapsed = time.thread_time() - started
    assert elapsed < SECONDS, f"{len(raw)} bytes read in {elapsed:.2f} s of CPU time"
    return report


def report_message(report_type: str, parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> bytes:
    body = b"".join(f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode() + content + b"\r\n"
                    for kind, content in parts)
    head = (f"From: MAILER-DAEMON@mx.example\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; "
            f"report-type={report_type}; boundary=\"{boundary}\"\r\n\r\n").encode()
    return head + body + f"--{boundary}--\r\n".encode()


field_text = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=";"), min_size=1,
                     max_size=60)


@PROPERTY
@given(st.binary(max_size=20_000))
def test_any_bytes_are_read_without_an_error(raw):
    assert timed(raw) is None or isinstance(timed(raw), DeliveryReport | FeedbackReport)


@PROPERTY
@given(st.binary(max_size=5_000), st.sampled_from(["delivery-status", "feedback-report"]))
def test_any_body_under_a_report_header_is_read_without_an_error(body, report_type):
    raw = (f"Content-Type: multipart/report; report-type={report_type}; boundary=x\r\n\r\n--x\r\n").encode() + body
    timed(raw)


@PROPERTY
@given(st.integers(1, 200_000), st.sampled_from(['"', ';', ';"', 'a="b;', "(", "\\"]))
def test_a_content_type_built_to_make_the_parameter_parser_quadratic_is_not_parsed(repeat, piece):
    value = b"multipart/report; report-type=delivery-status; boundary=x" + piece.encode() * repeat
    raw = (b"Content-Type: " + value
           + b"\r\n\r\n--x\r\nContent-Type: message/delivery-status\r\n\r\nAction: failed\r\n--x--\r\n")
    report = timed(raw)
    assert len(value) <= MAX_PARAMETER_FIELD or report is None, "a Content-Type over the cap is not parsed"


@PROPERTY
@given(st.integers(1, 100_000))
def test_many_parts_and_many_recipient_blocks_are_read_in_bounded_time(count):
    blocks = b"Reporting-MTA: dns; mx\r\n\r\n" + b"Action: failed\r\nStatus: 5.1.1\r\n\r\n" * count
    parts = [("text/plain", b"x")] * min(count, 5000) + [("message/delivery-status", blocks)]
    report = timed(report_message("delivery-status", parts))
    if count + 1 <= MAX_PARTS:
        assert isinstance(report, DeliveryReport) and len(report.recipients) == min(count, 100)
    else:
        assert report is None, "the status part is past the parts looked at"


def test_a_megabyte_without_line_breaks_or_blank_lines_is_read_in_bounded_time():
    for filler in (b"a" * 3_000_000, b"\r\n" * 1_500_000, b"--b\r\n" * 600_000, b":" * 3_000_000):
        assert timed(b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n" + filler) \
            is None


@PROPERTY
@given(recipient=field_text, status=st.from_regex(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}", fullmatch=True),
       action=st.sampled_from(["failed", "delayed", "delivered", "relayed", "expanded"]),
       diagnostic=st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=200)
       .filter(lambda text: text.strip() == text and "  " not in text),
       crlf=st.booleans())
def test_a_dsns_fields_read_back_exactly(recipient, status, action, diagnostic, crlf):
    blocks = (f"Reporting-MTA: dns; mx.example\r\n\r\nFinal-Recipient: rfc822; {recipient}\r\nAction: {action}\r\n"
              f"Status: {status}\r\nDiagnostic-Code: smtp; {diagnostic}\r\n").encode()
    raw = report_message("delivery-status", [("text/plain", b"Sorry."), ("message/delivery-status", blocks),
                                             ("text/rfc822-headers", b"Subject: hi\r\n")])
    if not crlf:
        raw = raw.replace(b"\r\n", b"\n")
    report = timed(raw)
    assert isinstance(report, DeliveryReport) and report.reporting_mta == "mx.example"
    [read] = report.recipients
    assert (read.final_recipient, read.action, read.status, read.diagnostic) == (recipient, action, status, diagnostic)
    assert read.permanent == (action == "failed" and not status.startswith("4"))
    assert read.bounce == (action in ("failed", "delayed"))


@PROPERTY
@given(feedback_type=st.sampled_from(["abuse", "fraud", "virus", "other", "not-spam"]), user_agent=field_text,
       message_id=field_text.map(lambda text: f"<{text}@mx.example>"))
def test_an_arf_reports_fields_read_back_exactly(feedback_type, user_agent, message_id):
    fields = (f"Feedback-Type: {feedback_type}\r\nUser-Agent: {user_agent}\r\nVersion: 1\r\n"
              "Original-Rcpt-To: <ann@example.org>\r\nSource-IP: 192.0.2.1\r\n").encode()
    original = f"Return-Path: <b+x.y@bounces.example.com>\r\nMessage-ID: {message_id}\r\n\r\nHi\r\n".encode()
    report = timed(report_message("feedback-report", [("text/plain", b"An abuse report."),
                                                       ("message/feedback-report", fields),
                                                       ("message/rfc822", original)]))
    assert isinstance(report, FeedbackReport)
    assert (report.feedback_type, report.user_agent, report.original_message_id, report.original_return_path,
            report.original_rcpt_to, report.source_ip) == (feedback_type, user_agent, message_id,
                                                           "b+x.y@bounces.example.com", "<ann@example.org>",
                                                           "192.0.2.1")


def test_a_reply_that_is_not_a_report_is_none():
    assert parse_report(b"From: ann@example.org\r\nSubject: Out of office\r\n\r\nAway.\r\n") is None
    receipt = b"Disposition: manual-action/MDN-sent-manually; displayed\r\n"
    assert parse_report(report_message("disposition-notification",
                                       [("message/disposition-notification", receipt)])) is None
    assert parse_report(report_message("delivery-status", [("text/plain", b"no status part")])) is None
