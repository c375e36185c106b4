"""delivery.dkim writes the DKIM-Signature dkimpy writes, byte for byte, and dkimpy verifies it.

dkimpy's `dkim.sign` reads the clock itself (no timestamp argument), so no clock is pinned: each comparison
signs with dkimpy first, reads the t= it wrote, and gives that second to `signature_header`.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from delivery import dkim as signer
from pipeline.compose import Attachment, MessageSpec
from pipeline.domains import dkim_txt, generate_key

DATA = Path(__file__).parent / "data"
DOMAIN, SELECTOR = "example.com", "plunkd"
WIDEST_DOMAIN = "a" * 31 + "." + "b" * 32 + ".com"
"""68 octets: the longest whose `i=@domain;` still fits a folded line (71 octets after its leading SP)."""
LONG_DOMAIN = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 57, "com"])
"""253 octets: d= and i= are runs without a space longer than a folded line, which dkimpy cuts."""
DOMAINS = [(DOMAIN, SELECTOR), ("mail.example.org", "s2026"), ("m" * 46 + ".com", "s" * 50), (WIDEST_DOMAIN, "k" * 63)]
"""The third is the longest the signer takes its short path for (delivery.dkim._hashed_tags)."""


@pytest.fixture(scope="module")
def key() -> tuple[str, str]:
    return generate_key()


def dkimpy_signature(message: bytes, private_pem: str, domain: str = DOMAIN, selector: str = SELECTOR) -> bytes:
    """dkimpy's field, called as plunkd called it: relaxed/simple, h= the SIGNED_HEADERS the message has."""
    present = {name.lower() for name, _ in dkim.rfc822_parse(message)[0]}
    include = [name for name in signer.SIGNED_HEADERS if name in present]
    return dkim.sign(message, selector.encode(), domain.encode(), private_pem.encode(),
                     canonicalize=(b"relaxed", b"simple"), include_headers=include)


def signed_at(field: bytes) -> int:
    found = re.search(rb"\bt=(\d+);", field)
    assert found is not None, field
    return int(found.group(1))


def assert_same_as_dkimpy(message: bytes, private_pem: str, domain: str = DOMAIN, selector: str = SELECTOR) -> bytes:
    expected = dkimpy_signature(message, private_pem, domain, selector)
    ours = signer.signature_header(message, domain, selector, private_pem, signed_at(expected))
    assert ours == expected
    return ours


def verifies(signed: bytes, public_key: str, domain: str = DOMAIN, selector: str = SELECTOR) -> bool:
    records = {f"{selector}._domainkey.{domain}.".encode(): dkim_txt(public_key).encode()}
    return dkim.verify(signed, dnsfunc=lambda name, timeout=5: records.get(name))


def from_fields(message: bytes) -> int:
    return sum(name.lower() == b"from" for name, _ in dkim.rfc822_parse(message)[0])


def composed() -> dict[str, bytes]:
    """What the API's composer writes: text, HTML (alternative), the house layout, attachments (mixed),
    Reply-To and custom headers, non-ASCII names and subjects (RFC 2047), a subject folded over lines."""
    logo = bytes(range(256)) * 20
    specs = {
        "text": MessageSpec("hello@example.com", "Shop", "Your order", "Thanks.\nSee you.\n\n\n"),
        "html": MessageSpec("hello@example.com", "Shop", "Hi", "<p>Hi <b>there</b></p>", reply_to="help@example.com"),
        "plunk_layout": MessageSpec("hello@example.com", "Shop", "News", "Plain words\n\nTwo paragraphs",
                                    style="PLUNK"),
        "attachments": MessageSpec("hello@example.com", "Shop", "Invoice", "<p>Attached</p>",
                                   attachments=[Attachment("invoice.pdf", logo, "application/pdf"),
                                                Attachment("naïve résumé.txt", "é\r\n".encode() * 40, "text/plain")]),
        "non_ascii": MessageSpec("hello@example.com", "Jürgen Müller", "Grüße — ünïcödé 日本語", "Ça va? 日本語\n",
                                 headers={"X-Campaign": "été", "Cc": "carl@example.org"}),
        "folded_subject": MessageSpec("hello@example.com", "Shop", " ".join(["word"] * 60), "body",
                                      headers={"X-Long": "x" * 200}),
    }
    return {name: spec.build("ann@example.org", {}) for name, spec in specs.items()}


CRLF_HEAD = b"From: Shop <hello@example.com>\r\nTo: ann@example.org\r\nSubject: Hi\r\n"
HANDMADE = {
    "folded_headers": (b"From: Shop\r\n <hello@example.com>\r\nTo: ann@example.org,\r\n\tbob@example.org,\r\n"
                       b"   carl@example.org\r\nSubject: a subject\r\n  over\r\n\t\tthree lines\r\n\r\nbody\r\n"),
    "repeated_headers": (b"Received: from a\r\nReceived: from b\r\nFrom: hello@example.com\r\nTo: first@example.org\r\n"
                         b"Subject: first\r\nTo: second@example.org\r\nSubject: second\r\nCc: x@example.org\r\n"
                         b"cc: y@example.org\r\nSUBJECT: third\r\n\r\nbody\r\n"),
    "tabs_and_spaces": (b"From:\t Shop  \t <hello@example.com>  \r\nTo:ann@example.org\r\nSubject:  two   spaces\t\t"
                        b"and tabs \t \r\nX-Empty:\r\nCc:   \r\nReply-To: \t\r\n help@example.com\r\n\r\n"
                        b"  body  with \t spaces  \r\n\t\r\n"),
    "raw_utf8": ("From: Jürgen <hello@example.com>\r\nTo: ann@example.org\r\nSubject: Grüße, 日本語 ✓\r\n"
                 "X-Note: ünïcödé\r\n\r\nBody: Ça va? 日本語 ✓\r\n").encode(),
    "empty_body": CRLF_HEAD + b"\r\n",
    "no_body_no_blank_line": CRLF_HEAD,
    "no_final_line_end": CRLF_HEAD.rstrip(b"\r\n"),
    "body_without_final_line_end": CRLF_HEAD + b"\r\nlast line without CRLF",
    "trailing_blank_lines": CRLF_HEAD + b"\r\nbody\r\n\r\n\r\n\r\n",
    "blank_lines_only": CRLF_HEAD + b"\r\n\r\n\r\n\r\n",
    "trailing_spaces_lines": CRLF_HEAD + b"\r\nbody\r\n \r\n\t\r\n",
    "long_lines": (CRLF_HEAD + b"X-Long: " + b"y" * 1500 + b"\r\n\r\n" + b"z" * 5000 + b"\r\n"
                   + b"w " * 1200 + b"\r\n"),
    "lf_only": b"From: hello@example.com\nTo: ann@example.org\nSubject: lf\n  folded\n\nline 1\nline 2\n\n\n",
    "lf_only_empty_body": b"From: hello@example.com\nSubject: x\n\n",
    "mixed_line_ends": b"From: hello@example.com\r\nTo: ann@example.org\nSubject: mix\r\n\nbody\r\nmore\nend\r\n",
    "bare_cr": b"From: hello@example.com\r\nSubject: a\rb\r\r\nTo: x\r\n\r\nbody\rwith\r\r\nbare CR\r\r\n\r\n",
    "odd_case_names": (b"FROM: hello@example.com\r\nto: ann@example.org\r\nsUbJeCt: case\r\nmime-VERSION: 1.0\r\n"
                       b"\r\nx\r\n"),
    "list_headers": (CRLF_HEAD + b"Cc: carl@example.org\r\nReply-To: help@example.com\r\nList-Unsubscribe: "
                     b"<https://example.com/u/abc>, <mailto:u@example.com>\r\nList-Unsubscribe-Post: "
                     b"List-Unsubscribe=One-Click\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n"
                     b"Content-Transfer-Encoding: 7bit\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
                     b"Message-ID: <1@example.com>\r\n\r\nbody\r\n"),
    "mbox_from_line": b"From hello@example.com Sun Nov 22 10:00:00 2026\r\n" + CRLF_HEAD + b"\r\nbody\r\n",
    "own_dkim_signature": b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=own; h=from; bh=x; b=y\r\n"
                          + CRLF_HEAD + b"\r\nbody\r\n",
    "bare_cr_in_continuation": b"From: hello@example.com\r\nSubject: x\r\n y\rz\r\n\tw\r\nTo: a\r\n\r\nbody\r\n",
    "colon_in_value": b"From: hello@example.com\r\nSubject: re: re: a:b\r\nX-Odd:name: value\r\n\r\nbody\r\n",
}
CORPUS = {**{path.stem: path.read_bytes() for path in sorted(DATA.glob("*.eml"))}, **composed(), **HANDMADE}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_the_signature_is_dkimpys_and_verifies(key, name):
    private_pem, public_key = key
    message = CORPUS[name]
    field = assert_same_as_dkimpy(message, private_pem)
    assert verifies(field + message, public_key)


@pytest.mark.parametrize(("domain", "selector"), DOMAINS)
def test_domains_and_selectors_fold_as_dkimpy_folds_them(key, domain, selector):
    private_pem, public_key = key
    message = CORPUS["list_headers"]
    field = assert_same_as_dkimpy(message, private_pem, domain, selector)
    assert all(len(line) <= 72 for line in field.split(b"\r\n"))
    assert verifies(field + message, public_key, domain, selector)


def test_a_domain_longer_than_a_folded_line_verifies(key):
    """dkimpy 1.1.8 cuts a d= or i= longer than a line (a domain over 68 octets) with CRLF SP, which a
    verifier reads as a space: its signature fails (dkimpy's own verifier refuses it). Here the value stays
    whole on a longer line."""
    private_pem, public_key = key
    message = CORPUS["list_headers"]
    assert not verifies(dkimpy_signature(message, private_pem, LONG_DOMAIN, SELECTOR) + message, public_key,
                        LONG_DOMAIN)
    signed = signer.sign(message, LONG_DOMAIN, SELECTOR, private_pem)
    assert verifies(signed, public_key, LONG_DOMAIN)
    assert f"d={LONG_DOMAIN};".encode() in signed and f"i=@{LONG_DOMAIN};".encode() in signed


def test_two_from_fields_are_signed_as_dkimpy_signs_them(key):
    """The bottom-most From is signed, as dkimpy picks it. dkimpy's verifier then refuses the message, as it
    refuses its own signature of it: it looks for one From more than the signature lists (RFC 6376 5.4.2's
    guard against an added From), and finds the other one."""
    private_pem, public_key = key
    message = b"From: first@example.com\r\nTo: ann@example.org\r\nFrom: second@example.com\r\n\r\nbody\r\n"
    field = assert_same_as_dkimpy(message, private_pem)
    assert not verifies(field + message, public_key)


def test_sign_prepends_a_signature_made_now(key):
    private_pem, public_key = key
    message = CORPUS["attachments"]
    signed = signer.sign(message, DOMAIN, SELECTOR, private_pem)
    field = signed[:len(signed) - len(message)]
    assert signed.endswith(message) and field.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/simple;")
    assert field == signer.signature_header(message, DOMAIN, SELECTOR, private_pem, signed_at(field))
    assert verifies(signed, public_key)


def test_a_key_is_parsed_once(key):
    private_pem, _ = key
    signer.sign(CORPUS["text"], DOMAIN, SELECTOR, private_pem)
    parsed = signer._private_key.cache_info()
    signer.sign(CORPUS["html"], DOMAIN, SELECTOR, private_pem)
    assert signer._private_key.cache_info().hits == parsed.hits + 1
    assert signer._private_key.cache_info().misses == parsed.misses


def ec_key_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


# Named ids: the EC key is new at each collection, and pytest-xdist's workers must collect the same tests.
@pytest.mark.parametrize("bad_key", [
    "", "not a key", "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n", ec_key_pem()],
    ids=["empty", "not PEM", "bad RSA body", "EC key"])
def test_a_bad_key_is_a_signing_error(bad_key):
    """The dispatcher fails the email on SigningError (tests/test_delivery.py drives that end to end)."""
    with pytest.raises(signer.SigningError):
        signer.sign(CORPUS["text"], DOMAIN, SELECTOR, bad_key)


@pytest.mark.parametrize("message", [
    b"", b"\r\n\r\nonly a body\r\n", b"To: ann@example.org\r\nSubject: no From\r\n\r\nbody\r\n",
    b"Message-ID: <1@example.com>\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\nnot an email at all",
    b" starts folded\r\nFrom: hello@example.com\r\n\r\n", b"From : hello@example.com\r\n\r\n",
    b"From: hello@example.com\r\nSubject : spaced name\r\n\r\n",
    b"From: hello@example.com\r\njunk\r\n continued junk\r\n\r\nbody\r\n"])
def test_what_dkimpy_refuses_to_sign_is_a_signing_error(key, message):
    private_pem, _ = key
    with pytest.raises((dkim.DKIMException, IndexError)):
        dkimpy_signature(message, private_pem)
    with pytest.raises(signer.SigningError):
        signer.sign(message, DOMAIN, SELECTOR, private_pem)


def mostly(common: st.SearchStrategy, rare: st.SearchStrategy, odds: int = 10) -> st.SearchStrategy:
    """`rare` once in `odds` draws, `common` otherwise (`a | b` would draw each half the time)."""
    return st.integers(1, odds).flatmap(lambda draw: rare if draw == 1 else common)


FIELD_NAMES = mostly(st.sampled_from([b"From", b"from", b"TO", b"Cc", b"Subject", b"Date", b"Message-ID",
                                      b"Reply-To", b"MIME-Version", b"Content-Type", b"List-Unsubscribe",
                                      b"Received", b"X-Trace", b"DKIM-Signature", b"From "]),
                     st.binary(min_size=1, max_size=6), odds=40)
LINE_ENDS = st.sampled_from([b"\r\n", b"\n", b"\r\r\n"])
PIECES = [b" ", b"\t", b"  ", b":", b"a", b"b=", b";", "é日".encode(), b"\x00", b"\xff", b"\x0b", b"\r"]
HEADER_BYTES = st.lists(mostly(st.sampled_from([*PIECES, b"\r\n ", b"\n\t"]), st.binary(max_size=4), odds=40),
                        max_size=30).map(b"".join)
"""A field value: whitespace, bytes that matter to the b= regex and to relaxed canonicalization, folds."""
BODY_BYTES = st.lists(mostly(st.sampled_from([*PIECES, b"\r\n", b"\n", b"\r\n\r\n"]), st.binary(max_size=4)),
                      max_size=40).map(b"".join)
HEADER_LINES = mostly(mostly(st.tuples(FIELD_NAMES, HEADER_BYTES).map(lambda field: field[0] + b":" + field[1]),
                             st.tuples(st.sampled_from([b" ", b"\t"]), HEADER_BYTES).map(b"".join), odds=6),
                      HEADER_BYTES, odds=40)
"""Fields, some continuation lines, now and then a line that is neither."""


@st.composite
def hostile_messages(draw) -> bytes:
    """Header lines (fields, continuations, now and then junk), half the time all ending in CRLF (the
    signer's regex path) and half the time with random line ends, usually a From among them, usually a
    blank line, a body of the bytes that matter to canonicalization; a few kilobytes at most."""
    line_ends = st.just(b"\r\n") if draw(st.booleans()) else LINE_ENDS
    lines = draw(st.lists(st.tuples(HEADER_LINES, line_ends).map(b"".join), max_size=12))
    if draw(mostly(st.just(True), st.just(False))):
        lines.insert(draw(st.integers(0, len(lines))), b"From: hello@example.com" + draw(line_ends))
    blank = draw(mostly(st.sampled_from([b"\r\n", b"\n"]), st.just(b""), odds=8))
    body = draw(BODY_BYTES)
    return b"".join(lines) + blank + body


@settings(max_examples=150, deadline=timedelta(seconds=3), suppress_health_check=[HealthCheck.too_slow])
@given(message=hostile_messages(), names=st.sampled_from(DOMAINS))
@example(message=b"From: a@example.com\r\n\r\n", names=DOMAINS[0])
@example(message=b"From: a@example.com\n \n\r\n\r\n\r\n", names=DOMAINS[0])
def test_hostile_messages_are_signed_as_dkimpy_signs_them(key, message, names):
    """Whatever dkimpy signs we sign the same, and it verifies (unless there are two From fields: see
    above); whatever dkimpy refuses we refuse with SigningError."""
    private_pem, public_key = key
    domain, selector = names
    try:
        expected = dkimpy_signature(message, private_pem, domain, selector)
    except (dkim.DKIMException, IndexError):
        event("dkimpy refuses the message")
        with pytest.raises(signer.SigningError):
            signer.signature_header(message, domain, selector, private_pem, 0)
        return
    assert signer.signature_header(message, domain, selector, private_pem, signed_at(expected)) == expected
    event(f"signed; {min(from_fields(message), 2)} From fields")
    if from_fields(message) == 1:
        assert verifies(expected + message, public_key, domain, selector)


@settings(max_examples=60, deadline=timedelta(seconds=3))
@given(selector=st.lists(st.sampled_from(["b", "=", ";", " ", "\t", "s", "k" * 20, "é"]), min_size=1, max_size=12)
       .map("".join), domain=st.sampled_from([DOMAIN, WIDEST_DOMAIN, LONG_DOMAIN, "b; b=x.example"]))
def test_odd_selectors_and_domains_are_signed_as_dkimpy_signs_them(key, selector, domain):
    """Spaces, `;`, `b=` and long runs in d= and s= take the signer's slow path, dkimpy's own steps; but a
    d=, i= or s= value that dkimpy would cut (a run without a space longer than a line) stays whole."""
    private_pem, _ = key
    message = CORPUS["list_headers"]
    runs = f"d={domain}; i=@{domain}; s={selector};".split(" ")  # folding breaks at SP only, not TAB
    if all(len(run.encode()) < signer.FOLD_WIDTH - 1 for run in runs):
        assert_same_as_dkimpy(message, private_pem, domain, selector)
        return
    unfolded = signer.signature_header(message, domain, selector, private_pem, 0).replace(b"\r\n", b"")
    if re.fullmatch(r"[^\s;]+", selector) and re.fullmatch(r"[^\s;]+", domain):  # values a verifier can read
        for tag in (f"d={domain}", f"i=@{domain}", f"s={selector}"):  # whole (dkimpy's cut just before `;` stays)
            assert re.search(re.escape(tag.encode()) + rb" ?;", unfolded), (tag, unfolded)


@given(value=st.lists(st.sampled_from([b" ", b"  ", b"a", b"bc", b"x" * 30, b"\r\n", b"\r\n ", b";"]),
                     max_size=60).map(b"".join),
       name_length=st.sampled_from([0, 14, 30]))
def test_fold_is_dkimpys(value, name_length):
    assert signer.fold(value, name_length) == dkim.fold(value, namelen=name_length)


def test_an_empty_body_hashes_as_one_crlf(key):
    """RFC 6376 3.4.3: the simple canonical form of an empty body is CRLF; its widely published bh=."""
    private_pem, _ = key
    for message in (CORPUS["empty_body"], CORPUS["no_body_no_blank_line"], CORPUS["blank_lines_only"]):
        field = signer.signature_header(message, DOMAIN, SELECTOR, private_pem, 0)
        assert b" bh=frcCV1k9oG9oKj3dpUqdJg1PxRT2RSN/XKdLCPjaYaY=;" in field
