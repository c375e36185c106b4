"""DATA read in chunks (relay/data.py) against aiosmtpd's own line-at-a-time smtp_DATA: two real
servers on 127.0.0.1 fed the same bytes by a raw TCP client, replies and received contents compared
byte for byte; every chunk split around the end of data and a stuffed dot; a 1 MB message through
the TLS relay into the outbox."""

from __future__ import annotations

import asyncio
import random
import smtplib
from dataclasses import dataclass, field

import pytest
from aiosmtpd.smtp import SMTP

from core.smtp_data import ChunkedData, DotStuffedData, texts_at_most
from core.smtp_session import SessionSMTP as RelaySMTP
from storage import emails as email_store

SIZE_LIMIT = 4000
LINE_LIMIT = SMTP.line_length_limit
END = b"\r\n.\r\n"
ENVELOPE = (b"EHLO client.example\r\n", b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<b@example.org>\r\n",
            b"DATA\r\n")
REPLY_SECONDS = 5.0


def line(length: int, first: bytes = b"a") -> bytes:
    """One line of `length` bytes, its CRLF included."""
    return first + b"x" * (length - 3) + b"\r\n"


@dataclass
class Recorder:
    """The handler: keeps what the server hands over as the message."""

    contents: list[bytes] = field(default_factory=list)

    async def handle_DATA(self, server, session, envelope) -> str:
        assert envelope.content is envelope.original_content, "decode_data=False: content is the same bytes"
        self.contents.append(envelope.original_content)
        return "250 2.0.0 recorded"


@dataclass
class Server:
    port: int
    recorder: Recorder
    server: asyncio.AbstractServer


async def start(protocol: type[SMTP], data_size_limit: int = SIZE_LIMIT) -> Server:
    recorder = Recorder()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: protocol(recorder, hostname="test.example", data_size_limit=data_size_limit, decode_data=False,
                         auth_require_tls=False),
        "127.0.0.1", 0)
    return Server(server.sockets[0].getsockname()[1], recorder, server)


SMALL_LINE_LIMIT = 40
"""Also the StreamReader's limit, so also the longest command line: the envelope commands fit."""
SMALL_SIZE_LIMIT = 200


class SmallLimitsSMTP(SMTP):
    line_length_limit = SMALL_LINE_LIMIT


class SmallLimitsChunked(ChunkedData, SMTP):
    line_length_limit = SMALL_LINE_LIMIT


@pytest.fixture
async def servers():
    """aiosmtpd as it is (the reference) and with ChunkedData, the same handler and limits."""
    pair = [await start(SMTP), await start(ChunkedData)]
    yield pair
    for server in pair:
        server.server.close()
        await server.server.wait_closed()


class RawClient:
    """Bytes out, reply lines in, over a plain TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        await client.reply()
        return client

    async def reply(self) -> bytes:
        lines = []
        while True:
            text = await asyncio.wait_for(self.reader.readline(), REPLY_SECONDS)
            assert text, f"connection closed after {lines}"
            lines.append(text)
            if text[3:4] != b"-":
                return b"".join(lines)

    async def send(self, *parts: bytes) -> None:
        """Each part in its own write; a pause after all but the last so the server reads them apart."""
        for index, part in enumerate(parts):
            self.writer.write(part)
            await self.writer.drain()
            if index < len(parts) - 1:
                await asyncio.sleep(0.002)

    async def start_data(self) -> list[bytes]:
        replies = []
        for command in ENVELOPE[1:]:
            await self.send(command)
            replies.append(await self.reply())
        return replies

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def transcript(port: int, stream: bytes, replies_after: int = 1, then: bytes = b"") -> list[bytes]:
    """EHLO, MAIL, RCPT, DATA, then `stream` in one write and `replies_after` replies to it, then
    `then` (more data, if the stream pipelined another DATA) and a NOOP, which shows the command
    stream is back in step after the end of data."""
    client = await RawClient.open(port)
    await client.send(ENVELOPE[0])
    replies = [await client.reply(), *await client.start_data()]
    await client.send(stream)
    replies += [await client.reply() for _ in range(replies_after)]
    if then:
        await client.send(then)
        replies.append(await client.reply())
    await client.send(b"NOOP\r\n")
    replies.append(await client.reply())
    await client.close()
    return replies


def stuffed(body: bytes) -> bytes:
    """What a client sends for `body` (CRLF lines): a dot doubled at each line start, then the end."""
    return (b"\r\n" + body).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"


SMUGGLING = [b"\n.\n", b"\r.\n", b"\n.\r\n", b"\r\n.\n", b"\n.\r"]
HEAD = b"From: a@example.com\r\nSubject: t\r\n\r\n"
SIZED = line(100, b".") + line(100) * 38


CASES = {
    **{f"smuggling-{variant!r}-mid": HEAD + b"before" + variant + b"after\r\n" + b".\r\n" for variant in SMUGGLING},
    **{f"smuggling-{variant!r}-before-end": HEAD + b"before" + variant + END for variant in SMUGGLING},
    **{f"smuggling-{variant!r}-first": variant + b"x\r\n.\r\n" for variant in SMUGGLING},
    "empty message": b".\r\n",
    "one empty line": b"\r\n.\r\n",
    "first line starts with a dot": b".x\r\n.\r\n",
    "first line two dots": b"..\r\nrest\r\n.\r\n",
    "dot lines": HEAD + b"a\r\n..\r\n...\r\n.a\r\n..b\r\n.\r\n",
    "dot after bare LF or CR is not unstuffed": HEAD + b"a\n.b\r.c\r\n.\r\n",
    **{f"line of {length} bytes": HEAD + line(length) + b"tail\r\n.\r\n"
       for length in range(LINE_LIMIT - 2, LINE_LIMIT + 4)},
    **{f"dotted line of {length} bytes": HEAD + line(length, b".") + b".\r\n"
       for length in range(LINE_LIMIT - 1, LINE_LIMIT + 3)},
    "line of 10000 bytes then more": HEAD + line(10_000) + b"more\r\n.\r\n",
    "line without end longer than a chunk": line(300_000) + b".\r\n",
    "exactly the size limit": SIZED + line(SIZE_LIMIT - len(SIZED)) + b".\r\n",
    "one byte over the size limit": SIZED + line(SIZE_LIMIT - len(SIZED) + 1) + b".\r\n",
    "far over the size limit": line(1000) * 400 + b".\r\n",
    "over the size limit, then a too-long line": line(1000) * 5 + line(LINE_LIMIT + 5) + b".\r\n",
    "too-long line, then over the size limit": line(LINE_LIMIT + 5) + line(1000) * 5 + b".\r\n",
    "the line over the size limit is 1 byte too long": line(1000) * 3 + line(LINE_LIMIT + 1) + b".\r\n",
    "the line over the size limit is 3 bytes too long": line(1000) * 3 + line(LINE_LIMIT + 3) + b".\r\n",
    "bare CR and LF inside lines": HEAD + b"a\rb\r\nc\nd\r\n\r\r\n\n\r\n\r\n\r\r\n.\r\n",
    "8-bit bytes": HEAD + bytes(range(128, 256)) + b"\r\n" + "grüße ☃".encode() + b"\r\n\x00\x7f\r\n.\r\n",
    "CR before the end": HEAD + b"x\r\r\n.\r\n",
}


@pytest.mark.parametrize("name", list(CASES))
async def test_same_replies_and_content_as_aiosmtpd(servers, name):
    reference, ours = servers
    expected = await transcript(reference.port, CASES[name])
    assert await transcript(ours.port, CASES[name]) == expected
    assert ours.recorder.contents == reference.recorder.contents


async def test_smuggled_end_of_data_stays_in_the_message(servers):
    _, ours = servers
    for variant in SMUGGLING:
        await transcript(ours.port, HEAD + b"before" + variant + b"after\r\n.\r\n")
    assert [content[len(HEAD):] for content in ours.recorder.contents] == \
        [b"before" + variant + b"after\r\n" for variant in SMUGGLING[:3]] + \
        [b"before\r\n\nafter\r\n", b"before\n.\rafter\r\n"]


async def test_pipelined_commands_after_the_end_of_data(servers):
    reference, ours = servers
    stream = HEAD + b"first\r\n.\r\nMAIL FROM:<c@example.com>\r\nRCPT TO:<d@example.org>\r\nDATA\r\n"
    second = HEAD + b"..second\r\n.\r\n"
    expected = await transcript(reference.port, stream, replies_after=4, then=second)
    assert expected[-6:-1] == [b"250 2.0.0 recorded\r\n", b"250 OK\r\n", b"250 OK\r\n",
                               b"354 End data with <CR><LF>.<CR><LF>\r\n", b"250 2.0.0 recorded\r\n"]
    assert await transcript(ours.port, stream, replies_after=4, then=second) == expected
    assert ours.recorder.contents == reference.recorder.contents == [HEAD + b"first\r\n", HEAD + b".second\r\n"]


async def test_pipelined_commands_after_a_refused_message(servers):
    reference, ours = servers
    stream = line(1000) * 5 + b".\r\nRSET\r\nMAIL FROM:<c@example.com>\r\n"
    expected = await transcript(reference.port, stream, replies_after=3)
    assert expected[-4:-1] == [b"552 Error: Too much mail data\r\n", b"250 OK\r\n", b"250 OK\r\n"]
    assert await transcript(ours.port, stream, replies_after=3) == expected


def random_stream(rng: random.Random) -> bytes:
    """Random CRLF lines (dots, bare CR and LF, now and then a long one) whose only end of data is
    the last."""
    pieces = [b"\r", b"\n", b".", b"..", b"a", b"\xe9", b"x" * 9]
    while True:
        lines = [b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 5)))
                 + b"y" * rng.choice([0] * 150 + [30, 36, 37, 38, 39, 45]) + b"\r\n"
                 for _ in range(rng.randint(0, 30))]
        stream = b"".join(lines) + rng.choice([b".\r\n", END, b"." + END, b"\n" + END])
        if (b"\r\n" + stream).find(END) == len(stream) - 3:
            return stream


async def test_random_streams_same_as_aiosmtpd():
    """Small limits (40-byte lines, 200 bytes a message) so random streams hit all of them."""
    pair = [await start(SmallLimitsSMTP, SMALL_SIZE_LIMIT), await start(SmallLimitsChunked, SMALL_SIZE_LIMIT)]
    rng = random.Random(20240514)
    streams = [random_stream(rng) for _ in range(150)]
    replies = []
    for server in pair:
        client = await RawClient.open(server.port)
        await client.send(ENVELOPE[0])
        await client.reply()
        session = []
        for stream in streams:
            envelope = await client.start_data()
            assert [reply[:3] for reply in envelope] == [b"250", b"250", b"354"]
            session += envelope
            await client.send(stream)
            session.append(await client.reply())
        replies.append(session)
        await client.close()
        server.server.close()
        await server.server.wait_closed()
    reference, ours = replies
    assert ours == reference
    assert {reply[:3] for reply in reference} >= {b"250", b"354", b"500", b"552"}, "every outcome is exercised"
    assert pair[1].recorder.contents == pair[0].recorder.contents


SPLIT_MESSAGE = b"..dot first\r\n.second\r\n" + b"body line\r\n" * 5 + b"..last\r\n.\r\nNOOP\r\n"


async def test_every_split_near_the_start_and_the_end(servers):
    """The message (a stuffed dot at its start, the end of data and a pipelined NOOP at its end) in
    two writes, cut at every offset of its first and last 20 bytes."""
    reference, ours = servers
    expected = await transcript(reference.port, SPLIT_MESSAGE, replies_after=2)
    assert reference.recorder.contents == [b".dot first\r\nsecond\r\n" + b"body line\r\n" * 5 + b".last\r\n"]
    cuts = [*range(1, 21), *range(len(SPLIT_MESSAGE) - 20, len(SPLIT_MESSAGE))]
    client = await RawClient.open(ours.port)
    await client.send(ENVELOPE[0])
    await client.reply()
    for cut in cuts:
        replies = await client.start_data()
        await client.send(SPLIT_MESSAGE[:cut], SPLIT_MESSAGE[cut:])
        replies += [await client.reply(), await client.reply()]
        assert replies == expected[1:-1], f"cut at {cut}"
    await client.close()
    assert ours.recorder.contents == reference.recorder.contents * len(cuts)


@pytest.mark.parametrize("limits", [(LINE_LIMIT, LINE_LIMIT, SIZE_LIMIT), (SMALL_LINE_LIMIT, SMALL_LINE_LIMIT, 160),
                                    (24, 10, None)])
def test_dot_stuffed_data_any_two_cuts(limits):
    """The bytes logic alone, deterministic: every stream of the cases cut into three chunks at every
    pair of offsets (short streams) or every offset near its ends (long ones) gives the same result
    as the stream in one chunk, and `feed` says where DATA ended."""
    rng = random.Random(7)
    streams = [stream for stream in CASES.values() if len(stream) < 20_000]
    streams += [random_stream(rng) for _ in range(40)]
    for stream in streams:
        tail = b"QUIT\r\n"
        whole = DotStuffedData(*limits)
        assert whole.feed(stream + tail) == len(stream)
        expected = whole.refusal, whole.content()
        if len(stream) <= 60:
            cut_pairs = [(i, j) for i in range(1, len(stream)) for j in range(i, len(stream) + len(tail))]
        else:
            near_ends = [*range(1, 24), *range(len(stream) - 24, len(stream) + len(tail))]
            cut_pairs = [(i, i) for i in near_ends]
        for i, j in cut_pairs:
            data = DotStuffedData(*limits)
            chunks = [chunk for chunk in ((stream + tail)[:i], (stream + tail)[i:j], (stream + tail)[j:]) if chunk]
            offset = 0
            for chunk in chunks:
                used = data.feed(chunk)
                if used is not None:
                    assert offset + used == len(stream), (stream, i, j)
                    break
                offset += len(chunk)
            else:
                raise AssertionError(f"no end of data found in {stream!r} cut at {i}, {j}")
            assert (data.refusal, data.content()) == expected, (stream, i, j)


def test_texts_at_most_agrees_with_a_split():
    """The window shortcut against the plain definition, for lines around the limit."""
    rng = random.Random(11)
    pieces = [b"a", b"\r", b"\n", b"b" * 50]
    outcomes = set()
    for _ in range(3000):
        limit = rng.choice([126, 127, 128, 999])
        texts = [b"".join(rng.choices(pieces, k=rng.randint(0, limit // 8))) for _ in range(rng.randint(1, 20))]
        lines = b"\r\n".join(texts) + b"\r\n"
        exact = max(map(len, lines.split(b"\r\n"))) <= limit
        assert texts_at_most(lines, limit) == exact, (lines, limit)
        outcomes.add(exact)
    assert outcomes == {True, False}


async def test_client_gone_mid_data(servers):
    _, ours = servers
    client = await RawClient.open(ours.port)
    await client.send(ENVELOPE[0])
    await client.reply()
    await client.start_data()
    await client.send(b"Subject: cut\r\n\r\nhalf a mess")
    await client.close()
    await asyncio.sleep(0.05)
    assert ours.recorder.contents == []
    assert (await transcript(ours.port, b"whole\r\n.\r\n"))[-2] == b"250 2.0.0 recorded\r\n"
    assert ours.recorder.contents == [b"whole\r\n"]


def test_relay_uses_chunked_data():
    assert RelaySMTP.smtp_DATA is ChunkedData.smtp_DATA


async def test_one_megabyte_message_through_the_relay_byte_exact(relay):
    body_lines = [b"." * (i % 3) + bytes([65 + i % 26]) * (i % 990) + b"\xc3\xa9" for i in range(2200)]
    message = (b"From: Shop <hello@example.com>\r\nTo: ann@example.org\r\nSubject: big\r\n"
               b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
               + b"\r\n".join(body_lines) + b"\r\n.\r\n..\r\nend\r\n")
    assert 1_000_000 < len(message) < relay.config.smtp.max_message_bytes

    def send() -> dict:
        with smtplib.SMTP_SSL("127.0.0.1", relay.tls_port, context=relay.client_tls, timeout=30) as client:
            client.login("plunk", relay.api.sk)
            return client.sendmail("bounce@example.com", ["ann@example.org"], message, mail_options=["BODY=8BITMIME"])

    assert await asyncio.to_thread(send) == {}
    claimed = await relay.api.db.write(lambda s: email_store.claim_due(s, "test", 10, 60.0, False))
    assert len(claimed) == 1 and claimed[0].recipient == "ann@example.org"
    assert claimed[0].raw == message


HEADER_LINES_REFUSAL = (552, b"5.3.4 Message header too big: more than 1000 lines before the blank line that ends "
                             b"the header")
HEADER_FIELD_REFUSAL = (552, b"5.3.4 Message header too big: a header field is longer than 65536 bytes")
ADDRESSES = b"From: Shop <hello@example.com>\r\nTo: ann@example.org\r\nSubject: headers\r\n"
"""Three header lines of every message below."""


def relayed(env, message: bytes) -> dict | tuple[int, bytes]:
    """Send `message` through the TLS port: {} when queued, else (code, text) of the reply to DATA."""
    with smtplib.SMTP_SSL("127.0.0.1", env.tls_port, context=env.client_tls, timeout=60) as client:
        client.login("plunk", env.api.sk)
        try:
            return client.sendmail("bounce@example.com", ["ann@example.org"], message)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error


def folded_field(name: bytes, size: int) -> bytes:
    """One header field of exactly `size` bytes (its last CRLF not counted), folded into lines of 900."""
    first = name + b": " + b"v" * (898 - len(name))
    folded, last = divmod(size - len(first), 900)
    lines = [first] + [b" " + b"v" * 897] * folded + ([b" " + b"v" * (last - 3)] if last else [])
    text = b"\r\n".join(lines)
    assert len(text) == size and (last == 0 or last > 3), (len(text), last)
    return text + b"\r\n"


async def queued(env) -> int:
    return len(await env.api.db.read(email_store.list_emails, env.api.project_id))


async def test_header_section_of_1000_lines_is_the_most(relay):
    at_cap = ADDRESSES + b"".join(b"X-Line-%d: v\r\n" % i for i in range(997)) + b"\r\nbody\r\n"
    assert await asyncio.to_thread(relayed, relay, at_cap) == {}
    over = ADDRESSES + b"".join(b"X-Line-%d: v\r\n" % i for i in range(998)) + b"\r\nbody\r\n"
    assert await asyncio.to_thread(relayed, relay, over) == HEADER_LINES_REFUSAL
    folded_lines = ADDRESSES + b"X-Folded: v\r\n" + b" v\r\n" * 997 + b"\r\nbody\r\n"
    assert await asyncio.to_thread(relayed, relay, folded_lines) == HEADER_LINES_REFUSAL, "folded lines count"
    assert await queued(relay) == 1


async def test_a_header_field_of_64_kib_is_the_most(relay):
    at_cap = ADDRESSES + folded_field(b"X-Long", 65536) + b"\r\nbody\r\n"
    assert await asyncio.to_thread(relayed, relay, at_cap) == {}
    over = ADDRESSES + folded_field(b"X-Long", 65537) + b"\r\nbody\r\n"
    assert await asyncio.to_thread(relayed, relay, over) == HEADER_FIELD_REFUSAL
    claimed = await relay.api.db.write(lambda s: email_store.claim_due(s, "test", 10, 60.0, False))
    assert [row.raw for row in claimed] == [at_cap]


async def test_the_issues_ten_thousand_lines_and_five_megabyte_header_are_refused(relay):
    """Both were queued before the caps; now DATA is answered 552 and nothing is stored."""
    relay.config.smtp.max_message_bytes = 6 * 1024 * 1024  # read by each new session
    many = ADDRESSES + b"".join(b"X-Line-%d: v\r\n" % i for i in range(10_000)) + b"\r\nbody\r\n"
    huge = ADDRESSES + folded_field(b"X-Huge", 5 * 1024 * 1024) + b"\r\nbody\r\n"
    assert await asyncio.to_thread(relayed, relay, many) == HEADER_LINES_REFUSAL
    assert await asyncio.to_thread(relayed, relay, huge) == HEADER_LINES_REFUSAL
    assert await queued(relay) == 0


@pytest.mark.parametrize("nesting", [b"(" * 900, b":" * 600 + b"\r\n " + b":" * 600,
                                     b"sender@example.com" + b"(" * 900],
                         ids=["comments", "groups, folded", "an address, then comments"])
async def test_a_from_nested_past_the_parsers_recursion_limit_is_refused_as_no_from(relay, nesting):
    """Python's address parser recurses into comments and groups: a From nested 500–1,000 deep raised
    RecursionError and the client got a crash reply. It is a From with no address: 550, nothing queued."""
    message = b"From: " + nesting + b"\r\nTo: ann@example.org\r\nSubject: x\r\n\r\nbody\r\n"
    assert await asyncio.to_thread(relayed, relay, message) == (
        550, b"5.7.1 The message needs exactly one From address on a verified domain")
    assert await queued(relay) == 0


async def test_forged_authentication_results_are_stripped_trace_fields_kept(relay):
    """A submitting client's own Received fields and DKIM signature are normal and kept; authentication
    results (Authentication-Results, Received-SPF, ARC sets) and SES instructions are removed with their
    folded lines, every other byte kept as written."""
    kept_before = (b"Received: from laptop.example.com (laptop [192.0.2.7])\r\n\tby mta.example.com; "
                   b"Thu, 3 Dec 2026 08:00:00 +0000\r\n"
                   b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=own; h=from; bh=x; b=y\r\n")
    stripped = (b"Authentication-Results: mx.google.com;\r\n dkim=pass header.d=bank.example;\r\n spf=pass\r\n"
                b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=google.com; s=arc; b=z\r\n"
                b"ARC-Message-Signature: i=1; a=rsa-sha256; d=google.com; s=arc; h=from; bh=x; b=y\r\n"
                b"arc-authentication-results: i=1; mx.google.com; dmarc=pass\r\n"
                b"Received-SPF: pass (google.com: domain of bank.example designates 192.0.2.7)\r\n"
                b"X-SES-CONFIGURATION-SET: someone-elses\r\n")
    kept_after = b"X-Arc-Note: kept\r\nX-Authentication-Results-Copy: kept\r\n"
    body = b"\r\nAuthentication-Results: in the body, kept\r\n"
    message = kept_before + stripped + ADDRESSES + kept_after + body
    assert await asyncio.to_thread(relayed, relay, message) == {}
    claimed = await relay.api.db.write(lambda s: email_store.claim_due(s, "test", 10, 60.0, False))
    assert [row.raw for row in claimed] == [kept_before + ADDRESSES + kept_after + body]
