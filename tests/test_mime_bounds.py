"""The bounds on what the email package is given to parse (pipeline.mime_bounds): real mail passes, the
dashboard's message view answers at once for a message over them (it took 22 s for a 32 KB Content-Type, on
the API's event loop), and the check itself is linear. The inbound server's refusals are in
tests/test_inbound_routes.py, the tracking step's in tests/test_tracking.py."""

from __future__ import annotations

from email.message import EmailMessage

import pytest

from pipeline.message_log import HEADER_VALUE_SHOWN, read_message
from pipeline.mime_bounds import MAX_PARAMETER_FIELD, parse_problem
from tests.test_render_limits import cpu_time


def mail_with_attachments(count: int, filename: str) -> bytes:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "ann@example.org", "bob@example.org", "Files"
    message.set_content("See attached.")
    message.add_alternative("<p>See <b>attached</b>.</p>", subtype="html")
    for index in range(count):
        message.add_attachment(b"%d" % index, maintype="application", subtype="pdf", filename=f"{index}-{filename}")
    return message.as_bytes()


def test_mail_with_many_attachments_and_long_international_filenames_is_within_the_bounds():
    raw = mail_with_attachments(40, "報告書" * 28 + ".pdf")  # 255 bytes of UTF-8: a field of about 1,000 bytes
    assert parse_problem(raw) is None
    view = read_message(raw)
    assert view.problem is None and len(view.attachments) == 40 and view.html == "<p>See <b>attached</b>.</p>\n"


def nested(content_type: bytes) -> bytes:
    return (b"From: a@example.org\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: "
            + content_type + b"\r\n\r\n<p>x</p>\r\n--b--\r\n")


@pytest.mark.parametrize(("raw", "says"), [
    (nested(b'text/html; a="' + b";" * 32_000), f"field is over {MAX_PARAMETER_FIELD} bytes"),
    (nested(b'text/html; a="' + b";" * 1_900), None),
    (b"From: a@example.org\r\nContent-Type: text/html" + b";" * 65_000 + b"\r\n\r\n<p>x</p>",
     f"field is over {MAX_PARAMETER_FIELD} bytes"),
    (b"From: a@example.org\r\nX-Long: " + b"x" * 70_000 + b"\r\n\r\n<p>x</p>", "a header field is longer than"),
    (b"From: a@example.org\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" + b"--b\r\n\r\n" * 1_400_000,
     "more than 2000 lines that start with '--'"),
    (b"From: a@example.org\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: " + b'"' * 16_000
     + b"\r\n\r\n<p>x</p>", "-Transfer-Encoding field is over"),
], ids=["nested part's Content-Type", "within the bounds", "top-level Content-Type", "long header field",
        "10 MB of empty parts", "Content-Transfer-Encoding of quotes"])
def test_the_message_view_of_a_message_over_the_bounds_answers_at_once_saying_why(raw, says):
    """Within the bounds the view parses the message, at a cost of milliseconds."""
    assert cpu_time(read_message, raw) < 0.5
    view = read_message(raw)
    if says is None:
        assert view.problem is None and view.html == "<p>x</p>"
        return
    assert view.problem is not None and view.problem.startswith("The message is not shown: ") and says in view.problem
    assert view.html is None and view.attachments == []


def test_the_bounds_are_checked_in_linear_time():
    lines = [b"Content-Type: a\r\n" * 700_000, b"content-typ\r\n" * 800_000, b"Content-Type: a\r\n \r\n" * 500_000]
    for raw in lines:
        assert cpu_time(parse_problem, raw) < 1.0
    assert parse_problem(b"content-type: a\r\n" * 5000) == (
        "its Content-Type, -Disposition and -Transfer-Encoding fields are over 65536 bytes")


@pytest.mark.parametrize("field", [b"To", b"Cc", b"From", b"Reply-To"])
def test_the_message_view_shows_a_long_address_field_as_written_at_once(field):
    """policy.default's address parser is quadratic in quotes: 64 KB of them in a To took 32 s to decode for the
    view (16 KB: 2.7 s). A value over `DECODED_HEADER_CHARS` is shown as written, cut; a short one is decoded."""
    value = b'"' * 64_000
    raw = (b"From: a@example.org\r\nSubject: =?utf-8?q?Caf=C3=A9?=\r\n" + field + b": " + value
           + b"\r\nContent-Type: text/html\r\n\r\n<p>x</p>")
    assert cpu_time(read_message, raw) < 0.5
    headers = dict(read_message(raw).headers)
    assert headers[field.decode()] == '"' * HEADER_VALUE_SHOWN and headers["Subject"] == "Café"
