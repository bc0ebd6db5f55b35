"""The inbound SMTP transfer server (inbox.smtp.transfer) against real clients on 127.0.0.1:
raw sockets, aiosmtplib, smtplib (in a thread) and swaks. The policy is a small recording
object defined here; the server runs in the test's own event loop."""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import smtplib
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inbox.errors import (
    ConfigError,
    DnsTemporary,
    InboxError,
    NotFound,
    PolicyRejected,
    RateLimited,
    RelayDenied,
    StorageUnavailable,
)
from inbox.smtp import certs
from inbox.smtp.paths import parse_path
from inbox.smtp.transfer import InboundEnvelope, TransferServer, received_header
from tests.support.smtp_smuggling import FIRST, PAYLOADS, SMUGGLED, Smuggle, payload

HOST = "mx.inbox.test"
ENHANCED = re.compile(r"^[2-5]\d\d[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


class RecordingPolicy:
    """Pure logic: records what it is asked and accepts, unless told to raise."""

    def __init__(self) -> None:
        self.envelopes: list[InboundEnvelope] = []
        self.connects: list[str] = []
        self.mails: list[str] = []
        self.rcpts: list[str] = []
        self.connect_error: BaseException | None = None
        self.mail_error: BaseException | None = None
        self.rcpt_errors: dict[str, BaseException] = {}
        self.message_error: BaseException | None = None
        self.hold: asyncio.Event | None = None  # on_message waits for it when set
        self.holding = asyncio.Event()

    async def on_connect(self, peer_ip: str) -> None:
        self.connects.append(peer_ip)
        if self.connect_error:
            raise self.connect_error

    async def on_mail(self, peer_ip: str, mail_from: str) -> None:
        self.mails.append(mail_from)
        if self.mail_error:
            raise self.mail_error

    async def on_recipient(self, peer_ip: str, address: str) -> Any:
        self.rcpts.append(address)
        if address in self.rcpt_errors:
            raise self.rcpt_errors[address]
        return {"mailbox": address.lower()}

    async def on_message(self, envelope: InboundEnvelope) -> str:
        if self.hold is not None:
            self.holding.set()
            await self.hold.wait()
        if self.message_error:
            raise self.message_error
        self.envelopes.append(envelope)
        return f"msg-{len(self.envelopes)}"


@pytest.fixture(scope="session")
def tls_context(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    return certs.dev_server_context(tmp_path_factory.mktemp("tls"), HOST)


Start = Callable[..., Awaitable[tuple[TransferServer, RecordingPolicy]]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Start a TransferServer on 127.0.0.1:0 with a fresh RecordingPolicy; stopped after."""
    servers: list[TransferServer] = []

    async def _start(**overrides: Any) -> tuple[TransferServer, RecordingPolicy]:
        policy = overrides.pop("policy", None) or RecordingPolicy()
        options: dict[str, Any] = {"hostname": HOST, "port": 0, "tls_context": None,
                                   "max_message_bytes": 100_000, "clock": lambda: NOW}
        options.update(overrides)
        server = TransferServer(policy, **options)
        await server.start()
        servers.append(server)
        return server, policy

    yield _start
    for server in servers:
        await server.stop()


class Client:
    """A raw SMTP client: exact bytes out, whole replies in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> tuple[Client, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        return client, await client.reply()

    async def reply(self, timeout: float = 5) -> str:
        """One reply, its lines joined by newlines; "" at EOF."""
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
            if not raw:
                return "\n".join(lines)
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str | bytes) -> str:
        await self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply()

    async def eof(self, timeout: float = 5) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(), timeout) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.writer.close()


async def transaction(client: Client, body: bytes, *, sender: str = "<a@sender.test>",
                      rcpt: str = "<b@inbox.test>") -> str:
    assert (await client.cmd(f"MAIL FROM:{sender}")).startswith("250 2.1.0")
    assert (await client.cmd(f"RCPT TO:{rcpt}")).startswith("250 2.1.5")
    assert (await client.cmd("DATA")).startswith("354 ")
    await client.send(body + b".\r\n")
    return await client.reply()


def crlf_only(data: bytes) -> bool:
    rest = data.replace(b"\r\n", b"")
    return b"\r" not in rest and b"\n" not in rest


def body_of(envelope: InboundEnvelope) -> bytes:
    """The message without our Received field (always first, four folded lines)."""
    assert envelope.data.startswith(b"Received: from ")
    return envelope.data.split(b"\r\n", 4)[4]


# --- EHLO and the reply-code table --------------------------------------------------------


async def test_ehlo_capabilities_and_greeting(start: Start, tls_context: ssl.SSLContext) -> None:
    server, _ = await start(tls_context=tls_context, max_message_bytes=12345)
    client, greeting = await Client.open(server.port)
    assert greeting == f"220 {HOST} ESMTP"
    ehlo = (await client.cmd("EHLO client.test")).split("\n")
    assert ehlo[0] == f"250-{HOST}"
    assert {line[4:] for line in ehlo[1:]} == {
        "PIPELINING", "SIZE 12345", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "STARTTLS"}
    assert ehlo[-1].startswith("250 ") and all(x.startswith("250-") for x in ehlo[:-1])
    assert await client.cmd("HELO client.test") == f"250 {HOST}"
    client.close()


P = {"mail": "MAIL FROM:<a@sender.test>", "rcpt": "RCPT TO:<b@inbox.test>"}
REPLY_TABLE: list[tuple[str, dict[str, Any], list[tuple[str | bytes, str]]]] = [
    ("noop", {}, [("NOOP", "250 2.0.0"), ("NOOP with args", "250 2.0.0")]),
    ("rset", {}, [("EHLO c", "250"), (P["mail"], "250 2.1.0"), ("RSET", "250 2.0.0"),
                  (P["rcpt"], "503 5.5.1")]),
    ("rset-with-arg", {}, [("RSET now", "501 5.5.4")]),
    ("help", {}, [("HELP", "214 2.0.0")]),
    ("vrfy", {}, [("VRFY b@inbox.test", "252 2.5.0")]),
    ("vrfy-empty", {}, [("VRFY", "501 5.5.4")]),
    ("expn", {}, [("EXPN staff", "502 5.5.1")]),
    ("quit", {}, [("QUIT", "221 2.0.0"), ("", "")]),
    ("quit-with-arg", {}, [("QUIT now", "501 5.5.4")]),
    ("unknown-command", {}, [("FOO bar", "500 5.5.1")]),
    ("auth-not-offered", {}, [("EHLO c", "250"), ("AUTH PLAIN AGFAYg==", "500 5.5.1")]),
    ("starttls-not-offered", {}, [("EHLO c", "250"), ("STARTTLS", "502 5.5.1")]),
    ("empty-line", {}, [("", "500 5.5.2")]),
    ("binary-junk", {}, [(b"\x00\xff\xfe\x80junk", "500 5.5.2"), ("NOOP", "250 2.0.0")]),
    ("tls-hello-on-plain", {}, [(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "500 5.5."),
                                ("NOOP", "250 2.0.0")]),
    ("command-too-long", {}, [("NOOP " + "x" * 600, "500 5.5.2"), ("NOOP", "250 2.0.0")]),
    ("line-over-buffer", {}, [("X" * 3000, "500 5.5.2"), ("NOOP", "250 2.0.0")]),
    ("ehlo-empty", {}, [("EHLO", "501 5.5.4")]),
    ("ehlo-control-char", {}, [(b"EHLO a\rb", "501 5.5.4")]),
    ("mail-before-ehlo", {}, [(P["mail"], "503 5.5.1")]),
    ("rcpt-before-mail", {}, [("EHLO c", "250"), (P["rcpt"], "503 5.5.1")]),
    ("data-before-mail", {}, [("EHLO c", "250"), ("DATA", "503 5.5.1")]),
    ("data-without-rcpt", {}, [("EHLO c", "250"), (P["mail"], "250 2.1.0"),
                               ("DATA", "503 5.5.1")]),
    ("data-with-arg", {}, [("EHLO c", "250"), (P["mail"], "250"), (P["rcpt"], "250"),
                           ("DATA now", "501 5.5.4")]),
    ("nested-mail", {}, [("EHLO c", "250"), (P["mail"], "250 2.1.0"), (P["mail"], "503 5.5.1")]),
    ("mail-no-from", {}, [("EHLO c", "250"), ("MAIL <a@sender.test>", "501 5.5.4")]),
    ("mail-bad-address", {}, [("EHLO c", "250"), ("MAIL FROM:<a b@c.test>", "501 5.1.7")]),
    ("mail-unclosed", {}, [("EHLO c", "250"), ("MAIL FROM:<a@c.test", "501 5.1.7")]),
    ("mail-lowercase-and-space", {}, [("EHLO c", "250"), ("mail from: <a@c.test>", "250 2.1.0")]),
    ("mail-null-sender", {}, [("EHLO c", "250"), ("MAIL FROM:<>", "250 2.1.0")]),
    ("mail-unknown-param", {}, [("EHLO c", "250"), (P["mail"] + " FOO=1", "555 5.5.4")]),
    ("mail-bad-param", {}, [("EHLO c", "250"), (P["mail"] + " =x", "501 5.5.4")]),
    ("mail-size-not-number", {}, [("EHLO c", "250"), (P["mail"] + " SIZE=ten", "501 5.5.4")]),
    ("mail-body-binary", {}, [("EHLO c", "250"), (P["mail"] + " BODY=BINARYMIME", "501 5.5.4")]),
    ("mail-body-8bit", {}, [("EHLO c", "250"), (P["mail"] + " BODY=8BITMIME", "250 2.1.0")]),
    ("mail-param-after-helo", {}, [("HELO c", "250"), (P["mail"] + " SIZE=10", "555 5.5.4")]),
    ("mail-address-literal", {}, [("EHLO c", "250"), ("MAIL FROM:<a@[192.0.2.1]>", "250 2.1.0")]),
    ("mail-bad-literal", {}, [("EHLO c", "250"), ("MAIL FROM:<a@[300.1.1.1]>", "501 5.1.7")]),
    ("utf8-without-param", {}, [("EHLO c", "250"), ("MAIL FROM:<jö@exämple.test>", "553 5.6.7")]),
    ("utf8-with-param", {}, [("EHLO c", "250"),
                             ("MAIL FROM:<jö@exämple.test> SMTPUTF8", "250 2.1.0"),
                             ("RCPT TO:<ü@inbox.test>", "250 2.1.5")]),
    ("utf8-rcpt-without-param", {}, [("EHLO c", "250"), (P["mail"], "250"),
                                     ("RCPT TO:<ü@inbox.test>", "553 5.6.7")]),
    ("invalid-utf8-address", {}, [("EHLO c", "250"),
                                  (b"MAIL FROM:<j\xff@x.test> SMTPUTF8", "501 5.1.7")]),
    ("rcpt-bad-address", {}, [("EHLO c", "250"), (P["mail"], "250"),
                              ("RCPT TO:<@inbox.test>", "501 5.1.3")]),
    ("rcpt-null", {}, [("EHLO c", "250"), (P["mail"], "250"), ("RCPT TO:<>", "501 5.1.3")]),
    ("rcpt-param", {}, [("EHLO c", "250"), (P["mail"], "250"),
                        (P["rcpt"] + " NOTIFY=NEVER", "555 5.5.4")]),
    ("rcpt-postmaster", {}, [("EHLO c", "250"), (P["mail"], "250"),
                             ("RCPT TO:<Postmaster>", "250 2.1.5")]),
    ("rcpt-source-route", {}, [("EHLO c", "250"), (P["mail"], "250"),
                               ("RCPT TO:<@a.test,@b.test:b@inbox.test>", "250 2.1.5")]),
    ("rcpt-relay-denied", {"rcpt": RelayDenied("Relay access denied")},
     [("EHLO c", "250"), (P["mail"], "250"), (P["rcpt"], "550 5.7.1 Relay access denied")]),
    ("rcpt-not-found", {"rcpt": NotFound("No such user")},
     [("EHLO c", "250"), (P["mail"], "250"), (P["rcpt"], "550 5.1.1 No such user"),
      ("NOOP", "250 2.0.0")]),
    ("rcpt-dns-temporary", {"rcpt": DnsTemporary("DNS timeout")},
     [("EHLO c", "250"), (P["mail"], "250"), (P["rcpt"], "451 4.4.3 DNS timeout")]),
    ("rcpt-policy-crash", {"rcpt": RuntimeError("secret internals")},
     [("EHLO c", "250"), (P["mail"], "250"), (P["rcpt"], "451 4.3.0"), ("NOOP", "250 2.0.0")]),
    ("mail-rate-limited", {"mail": RateLimited("Too many messages")},
     [("EHLO c", "250"), (P["mail"], "451 4.7.0 Too many messages"), (P["rcpt"], "503 5.5.1")]),
    ("mail-policy-crash", {"mail": KeyError("secret internals")},
     [("EHLO c", "250"), (P["mail"], "451 4.3.0"), (P["mail"], "451 4.3.0")]),
]


@pytest.mark.parametrize("setup, steps", [(s, t) for _, s, t in REPLY_TABLE],
                         ids=[i for i, _, _ in REPLY_TABLE])
async def test_reply_codes(start: Start, setup: dict[str, Any],
                           steps: list[tuple[str | bytes, str]]) -> None:
    server, policy = await start()
    policy.mail_error = setup.get("mail")
    if "rcpt" in setup:
        policy.rcpt_errors["b@inbox.test"] = setup["rcpt"]
    client, _ = await Client.open(server.port)
    for line, expected in steps:
        reply = await client.cmd(line)
        assert reply.startswith(expected), (line, reply)
        assert "secret" not in reply
        if not reply.startswith(("250-", f"250 {HOST}")) and reply:
            assert all(ENHANCED.match(x) for x in reply.split("\n")), reply
    client.close()


async def test_source_route_and_postmaster_reach_the_policy(start: Start) -> None:
    server, policy = await start()
    client, _ = await Client.open(server.port)
    await client.cmd("EHLO c")
    assert await transaction(client, b"Subject: x\r\n\r\nhi\r\n",
                             rcpt="<@a.test,@b.test:b@inbox.test>") == \
        "250 2.0.0 OK queued as msg-1"
    assert await transaction(client, b"x\r\n", rcpt="<Postmaster>") == \
        "250 2.0.0 OK queued as msg-2"
    assert policy.rcpts == ["b@inbox.test", "postmaster"]
    assert policy.envelopes[0].recipients == [{"mailbox": "b@inbox.test"}]
    client.close()


async def test_too_many_errors_disconnects(start: Start) -> None:
    server, _ = await start(max_errors=5)
    client, _ = await Client.open(server.port)
    replies = [await client.cmd("RCPT TO:<b@inbox.test>") for _ in range(5)]
    assert replies == ["503 5.5.1 Error: send HELO/EHLO first"] * 5
    assert await client.reply() == f"421 4.7.0 {HOST} Error: too many errors"
    assert await client.eof()


# --- connect-time policy and limits -------------------------------------------------------

CONNECT_TABLE = [
    ("rate-limited", RateLimited("Too many connections from you"),
     "421 4.7.0 Too many connections from you", []),
    ("refused", PolicyRejected("You are blocked"), "554 5.7.1 You are blocked",
     [("NOOP", "503 5.5.1"), ("EHLO c", "503 5.5.1"), ("QUIT", "221 2.0.0")]),
    ("policy-crash", RuntimeError("secret"), f"421 4.3.0 {HOST}", []),
]


@pytest.mark.parametrize("error, greeting, steps", [c[1:] for c in CONNECT_TABLE],
                         ids=[c[0] for c in CONNECT_TABLE])
async def test_connect_refusals(start: Start, error: BaseException, greeting: str,
                                steps: list[tuple[str, str]]) -> None:
    server, policy = await start()
    policy.connect_error = error
    client, first = await Client.open(server.port)
    assert first.startswith(greeting) and "secret" not in first
    for line, expected in steps:
        assert (await client.cmd(line)).startswith(expected)
    assert await client.eof()
    policy.connect_error = None
    again, first = await Client.open(server.port)  # the server keeps serving
    assert first == f"220 {HOST} ESMTP"
    again.close()


async def test_max_connections(start: Start) -> None:
    server, _ = await start(max_connections=2)
    first, g1 = await Client.open(server.port)
    second, g2 = await Client.open(server.port)
    assert g1.startswith("220 ") and g2.startswith("220 ")
    third, g3 = await Client.open(server.port)
    assert g3.startswith("421 4.7.0") and await third.eof()
    assert (await first.cmd("EHLO a")).startswith("250-")  # the others keep working
    assert await transaction(first, b"x\r\n") == "250 2.0.0 OK queued as msg-1"
    assert await second.cmd("NOOP") == "250 2.0.0 OK"
    assert await first.cmd("QUIT") == f"221 2.0.0 {HOST} closing connection"
    assert await first.eof()
    for _ in range(100):
        if server.active_sessions < 2:
            break
        await asyncio.sleep(0.01)
    fourth, g4 = await Client.open(server.port)
    assert g4 == f"220 {HOST} ESMTP"
    second.close()
    fourth.close()


# --- DATA: smuggling, normalisation, size and line limits ---------------------------------


@pytest.mark.parametrize("case", PAYLOADS, ids=[p.id for p in PAYLOADS])
async def test_smuggling_never_ends_data(start: Start, case: Smuggle) -> None:
    server, policy = await start()
    client, _ = await Client.open(server.port)
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<alice@sender.test>")
    await client.cmd("RCPT TO:<bob@inbox.test>")
    assert (await client.cmd("DATA")).startswith("354 ")
    await client.send(payload(case) + b"QUIT\r\n")
    replies = []
    while reply := await client.reply():
        replies.append(reply)
    queued = [r for r in replies if r.startswith("250 2.0.0 OK queued as")]
    assert len(queued) == case.messages == len(policy.envelopes), replies
    assert replies[-1].startswith("221 2.0.0")
    first = policy.envelopes[0]
    assert first.mail_from == "alice@sender.test"
    assert crlf_only(first.data)
    if case.messages == 1:
        assert body_of(first) == FIRST + case.stored + SMUGGLED
        assert policy.mails == ["alice@sender.test"]
    else:
        assert body_of(first) == FIRST + b"\r\n"
        assert policy.envelopes[1].mail_from == "evil@attacker.test"


NORMALISE_TABLE = [
    ("crlf", b"a\r\nb\r\n", b"a\r\nb\r\n"),
    ("bare-lf", b"a\nb\r\n", b"a\r\nb\r\n"),
    ("bare-cr", b"a\rb\r\n", b"a\r\nb\r\n"),
    ("lf-cr", b"a\n\rb\r\n", b"a\r\n\r\nb\r\n"),
    ("cr-before-crlf", b"a\r\r\n", b"a\r\n\r\n"),
    ("dot-stuffed", b"..x\r\n.\r\r\n", b".x\r\n\r\n\r\n"),
    ("dot-after-bare-lf-kept", b"a\n.b\r\n", b"a\r\n.b\r\n"),
    ("nul-and-8bit", b"\x00\xff\r\n", b"\x00\xff\r\n"),
    ("empty-message", b"", b""),
]


@pytest.mark.parametrize("sent, stored", [c[1:] for c in NORMALISE_TABLE],
                         ids=[c[0] for c in NORMALISE_TABLE])
async def test_data_normalised_to_crlf(start: Start, sent: bytes, stored: bytes) -> None:
    server, policy = await start()
    client, _ = await Client.open(server.port)
    await client.cmd("EHLO c")
    assert (await transaction(client, sent)).startswith("250 2.0.0 OK queued as msg-1")
    assert body_of(policy.envelopes[0]) == stored
    client.close()


LIMIT = 2000
LIMIT_TABLE = [
    # id, MAIL parameters, body sent, reply to MAIL, reply to the end of DATA
    ("declared-over", f" SIZE={LIMIT + 1}", None, "552 5.3.4", None),
    ("declared-ok-data-over", " SIZE=100", b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n" +
     b"z" * 900 + b"\r\n", "250 2.1.0", "552 5.3.4"),
    ("undeclared-data-over", "", (b"a" * 98 + b"\r\n") * 30, "250 2.1.0", "552 5.3.4"),
    ("exactly-at-limit", f" SIZE={LIMIT}", (b"a" * 98 + b"\r\n") * 20, "250 2.1.0",
     "250 2.0.0"),
    ("line-998-ok", "", b"l" * 998 + b"\r\n", "250 2.1.0", "250 2.0.0"),
    ("stuffed-998-ok", "", b"." + b"." * 998 + b"\r\n", "250 2.1.0", "250 2.0.0"),
    ("line-999", "", b"l" * 999 + b"\r\n", "250 2.1.0", "554 5.6.0"),
    ("line-beyond-buffer", "", b"l" * 5000 + b"\r\n", "250 2.1.0", "554 5.6.0"),
    ("long-line-then-dot-end", "", b"l" * 1500 + b".", "250 2.1.0", "554 5.6.0"),
]


@pytest.mark.parametrize("params, body, mail_reply, data_reply", [c[1:] for c in LIMIT_TABLE],
                         ids=[c[0] for c in LIMIT_TABLE])
async def test_size_and_line_limits_keep_session_in_step(
        start: Start, params: str, body: bytes | None, mail_reply: str,
        data_reply: str | None) -> None:
    server, policy = await start(max_message_bytes=LIMIT)
    client, _ = await Client.open(server.port)
    await client.cmd("EHLO c")
    assert (await client.cmd(f"MAIL FROM:<a@sender.test>{params}")).startswith(mail_reply)
    if body is not None:
        assert data_reply is not None
        assert (await client.cmd("RCPT TO:<b@inbox.test>")).startswith("250 2.1.5")
        assert (await client.cmd("DATA")).startswith("354")
        if body.endswith(b"."):  # the over-long line ends with the dot of "<CRLF>.<CRLF>"
            await client.send(body + b"\r\n.\r\n")
        else:
            await client.send(body + b".\r\n")
        assert (await client.reply()).startswith(data_reply)
    accepted = len(policy.envelopes)
    # The same session carries on: a small message goes through.
    assert await transaction(client, b"Subject: next\r\n\r\nok\r\n") == \
        f"250 2.0.0 OK queued as msg-{accepted + 1}"
    assert body_of(policy.envelopes[-1]) == b"Subject: next\r\n\r\nok\r\n"
    if data_reply and data_reply.startswith("250"):
        assert accepted == 1 and len(body_of(policy.envelopes[0])) <= LIMIT
    else:
        assert accepted == 0
    client.close()


async def test_101_recipients_with_smtplib(start: Start) -> None:
    server, policy = await start()
    rcpts = [f"user{i}@inbox.test" for i in range(101)]

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
            return smtp.sendmail("a@sender.test", rcpts, b"Subject: many\r\n\r\nhi\r\n")

    refused = await asyncio.to_thread(send)
    assert refused == {"user100@inbox.test": (452, b"4.5.3 Too many recipients")}
    assert policy.envelopes[0].rcpt_addresses == rcpts[:100]
    assert len(policy.envelopes[0].recipients) == 100
    assert b"\tfor <" not in policy.envelopes[0].data  # recipients stay private


async def test_pipelined_transaction(start: Start) -> None:
    server, policy = await start()
    client, _ = await Client.open(server.port)
    await client.send(b"EHLO c\r\nMAIL FROM:<a@sender.test> BODY=8BITMIME SIZE=20\r\n"
                      b"RCPT TO:<x@inbox.test>\r\nRCPT TO:<y@inbox.test>\r\nDATA\r\n")
    replies = [await client.reply() for _ in range(5)]
    assert [r[:9] for r in replies[1:]] == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "354 End d"]
    await client.send(b"hi\r\n.\r\nQUIT\r\n")
    assert await client.reply() == "250 2.0.0 OK queued as msg-1"
    assert (await client.reply()).startswith("221 2.0.0")
    env = policy.envelopes[0]
    assert env.mail_options == ["BODY=8BITMIME", "SIZE=20"]
    assert env.rcpt_addresses == ["x@inbox.test", "y@inbox.test"]


MESSAGE_ERRORS = [
    ("storage-unavailable", StorageUnavailable("Storage busy"), "451 4.3.0 Storage busy"),
    ("policy-rejected", PolicyRejected("DMARC policy says reject"),
     "550 5.7.1 DMARC policy says reject"),
    ("unexpected", ZeroDivisionError("secret"), "451 4.3.0 Internal error"),
]


@pytest.mark.parametrize("error, reply", [c[1:] for c in MESSAGE_ERRORS],
                         ids=[c[0] for c in MESSAGE_ERRORS])
async def test_on_message_errors(start: Start, error: BaseException, reply: str) -> None:
    server, policy = await start()
    policy.message_error = error
    client, _ = await Client.open(server.port)
    await client.cmd("EHLO c")
    got = await transaction(client, b"hi\r\n")
    assert got.startswith(reply) and "secret" not in got
    policy.message_error = None
    assert await transaction(client, b"again\r\n") == "250 2.0.0 OK queued as msg-1"
    client.close()


async def test_smtputf8_message(start: Start) -> None:
    server, policy = await start()
    client, _ = await Client.open(server.port)
    await client.cmd("EHLO c")
    got = await transaction(client, "Subject: héllo\r\n\r\nwörld\r\n".encode(),
                            sender="<jö@exämple.test> SMTPUTF8", rcpt="<ü@inbox.test>")
    assert got == "250 2.0.0 OK queued as msg-1"
    env = policy.envelopes[0]
    assert (env.mail_from, env.rcpt_addresses, env.smtputf8) == \
        ("jö@exämple.test", ["ü@inbox.test"], True)
    assert b" with UTF8SMTP id " in env.data and "for <ü@inbox.test>".encode() in env.data
    client.close()


# --- timeouts, dropped connections, shutdown ----------------------------------------------

TIMEOUT_TABLE = [
    ("idle-after-greeting", {"command_timeout_secs": 0.3}, [], None),
    ("idle-mid-transaction", {"command_timeout_secs": 0.3},
     ["EHLO c", "MAIL FROM:<a@sender.test>", "RCPT TO:<b@inbox.test>"], None),
    ("idle-mid-data", {"command_timeout_secs": 0.3},
     ["EHLO c", "MAIL FROM:<a@sender.test>", "RCPT TO:<b@inbox.test>", "DATA"], b"half"),
    ("data-total", {"command_timeout_secs": 5, "data_timeout_secs": 0.5},
     ["EHLO c", "MAIL FROM:<a@sender.test>", "RCPT TO:<b@inbox.test>", "DATA"], b"trickle"),
]


@pytest.mark.parametrize("options, commands, data", [c[1:] for c in TIMEOUT_TABLE],
                         ids=[c[0] for c in TIMEOUT_TABLE])
async def test_timeouts(start: Start, options: dict[str, float], commands: list[str],
                        data: bytes | None) -> None:
    server, policy = await start(**options)
    client, _ = await Client.open(server.port)
    for line in commands:
        await client.cmd(line)
    loop = asyncio.get_running_loop()
    began = loop.time()
    reply_task = asyncio.create_task(client.reply())  # read while still sending
    if data == b"trickle":  # active, but too slow overall: one line every 0.1 s
        for _ in range(20):
            await asyncio.wait([reply_task], timeout=0.1)
            if reply_task.done():
                break
            client.writer.write(b"line\r\n")
    elif data:
        await client.send(data)
    reply = await reply_task
    assert reply == f"421 4.4.2 {HOST} Error: timeout exceeded"
    assert await client.eof()
    assert loop.time() - began < 2
    assert policy.envelopes == []


DROP_TABLE = [
    ("after-354", b"", False),
    ("mid-line", b"Subject: x\r\n\r\nhalf a li", False),
    ("before-final-crlf", b"Subject: x\r\n\r\nbody\r\n.", False),
    ("reset-mid-data", b"Subject: x\r\n\r\nbody\r\n", True),
]


@pytest.mark.parametrize("data, reset", [c[1:] for c in DROP_TABLE],
                         ids=[c[0] for c in DROP_TABLE])
async def test_dropped_connection_mid_data(start: Start, data: bytes, reset: bool) -> None:
    server, policy = await start()
    client, _ = await Client.open(server.port)
    await client.cmd("EHLO c")
    await client.cmd("MAIL FROM:<a@sender.test>")
    await client.cmd("RCPT TO:<b@inbox.test>")
    assert (await client.cmd("DATA")).startswith("354")
    await client.send(data)
    if reset:  # RST instead of FIN
        sock = client.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    for _ in range(200):
        if server.active_sessions == 0:
            break
        await asyncio.sleep(0.01)
    assert server.active_sessions == 0
    assert policy.envelopes == []
    other, _ = await Client.open(server.port)
    await other.cmd("EHLO c")
    assert await transaction(other, b"ok\r\n") == "250 2.0.0 OK queued as msg-1"
    other.close()


async def test_stop_lets_a_message_being_stored_get_its_reply(start: Start) -> None:
    server, policy = await start()
    policy.hold = asyncio.Event()
    busy, _ = await Client.open(server.port)
    idle, _ = await Client.open(server.port)
    await busy.cmd("EHLO c")
    await busy.cmd("MAIL FROM:<a@sender.test>")
    await busy.cmd("RCPT TO:<b@inbox.test>")
    await busy.cmd("DATA")
    await busy.send(b"hi\r\n.\r\n")
    await policy.holding.wait()
    stopping = asyncio.create_task(server.stop())
    await asyncio.sleep(0.1)
    assert not stopping.done()
    policy.hold.set()
    await stopping
    assert await busy.reply() == "250 2.0.0 OK queued as msg-1"
    assert (await busy.reply()).startswith("421 4.3.2")
    assert (await idle.reply()).startswith(f"421 4.3.2 {HOST}")
    assert await busy.eof() and await idle.eof()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", server.port)


async def test_stop_is_bounded_with_a_silent_tls_peer(start: Start,
                                                      tls_context: ssl.SSLContext) -> None:
    server, _ = await start(tls_context=tls_context, shutdown_grace_secs=0.5)
    client, _ = await Client.open(server.port)
    await client.cmd("EHLO c")
    assert (await client.cmd("STARTTLS")).startswith("220 2.0.0")
    await client.writer.start_tls(client_tls())
    assert (await client.cmd("EHLO c")).startswith("250-")
    loop = asyncio.get_running_loop()
    began = loop.time()
    await server.stop()  # the client neither reads nor answers close_notify
    assert loop.time() - began < 2
    assert server.active_sessions == 0
    client.writer.transport.abort()


# --- STARTTLS -----------------------------------------------------------------------------


def client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def test_starttls_with_aiosmtplib(start: Start, tls_context: ssl.SSLContext) -> None:
    server, policy = await start(tls_context=tls_context)
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port, start_tls=False,
                           validate_certs=False, timeout=10)
    await smtp.connect()
    await smtp.ehlo()
    assert smtp.supports_extension("starttls")
    await smtp.starttls()
    code, _ = await smtp.ehlo()  # EHLO again after TLS (RFC 3207 §4.2)
    assert code == 250 and not smtp.supports_extension("starttls")
    second = await smtp.execute_command(b"STARTTLS")
    assert (second.code, second.message[:5]) == (503, "5.5.1")
    errors, reply = await smtp.sendmail("a@sender.test", ["b@inbox.test"],
                                        b"Subject: tls\r\n\r\nsecret\r\n")
    assert errors == {} and reply.startswith("2.0.0 OK queued as msg-1")
    await smtp.quit()
    env = policy.envelopes[0]
    assert env.tls and b" with ESMTPS id " in env.data


async def test_starttls_discards_plaintext_injection(start: Start,
                                                     tls_context: ssl.SSLContext) -> None:
    """CVE-2011-0411 style: commands pipelined after STARTTLS in plaintext are dropped."""
    server, _ = await start(tls_context=tls_context)
    client, _ = await Client.open(server.port)
    await client.cmd("EHLO c")
    await client.send(b"STARTTLS\r\nNOOP\r\n")
    assert await client.reply() == "220 2.0.0 Ready to start TLS"
    await client.writer.start_tls(client_tls())
    assert (await client.cmd("EHLO c")).startswith(f"250-{HOST}")
    assert await client.cmd("NOOP") == "250 2.0.0 OK"
    client.close()


async def test_failed_tls_handshake_keeps_server_serving(start: Start,
                                                         tls_context: ssl.SSLContext) -> None:
    server, _ = await start(tls_context=tls_context)
    client, _ = await Client.open(server.port)
    await client.cmd("EHLO c")
    assert (await client.cmd("STARTTLS")).startswith("220 2.0.0")
    await client.send(b"this is not a TLS client hello\r\n" * 4)
    assert await client.eof()
    other, greeting = await Client.open(server.port)
    assert greeting.startswith("220 ")
    other.close()


async def run_swaks(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "swaks", "--server", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode()
    return out.decode()


async def test_swaks_capabilities(start: Start, tls_context: ssl.SSLContext) -> None:
    server, _ = await start(tls_context=tls_context, max_message_bytes=5000)
    out = await run_swaks(f"127.0.0.1:{server.port}", "--quit-after", "EHLO", "--helo", "sw.test")
    for capability in ("PIPELINING", "SIZE 5000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
                       "STARTTLS"):
        assert f"<-  250-{capability}" in out or f"<-  250 {capability}" in out, out


SWAKS_TABLE = [
    ("plain", [], False),
    ("starttls", ["--tls"], True),
    ("pipelined", ["--pipeline"], False),
]


@pytest.mark.parametrize("extra, tls", [c[1:] for c in SWAKS_TABLE],
                         ids=[c[0] for c in SWAKS_TABLE])
async def test_swaks_sends_a_message(start: Start, tls_context: ssl.SSLContext,
                                     extra: list[str], tls: bool) -> None:
    server, policy = await start(tls_context=tls_context)
    out = await run_swaks(f"127.0.0.1:{server.port}", "--helo", "sw.test", "--from",
                          "s@sender.test", "--to", "r@inbox.test", "--body",
                          "line one\n.\nline three", *extra)
    assert "250 2.0.0 OK queued as msg-1" in out
    env = policy.envelopes[0]
    assert (env.helo, env.mail_from, env.rcpt_addresses, env.tls) == \
        ("sw.test", "s@sender.test", ["r@inbox.test"], tls)
    assert env.data.startswith(b"Received: from sw.test ([127.0.0.1])\r\n")
    assert b"\r\n\r\nline one\r\n.\r\nline three\r\n" in env.data and crlf_only(env.data)


# --- the Received field -------------------------------------------------------------------

RECEIVED_TABLE = [
    ("helo", dict(esmtp=False, tls=False, smtputf8=False), "SMTP", True),
    ("esmtp", dict(esmtp=True, tls=False, smtputf8=False), "ESMTP", True),
    ("esmtps", dict(esmtp=True, tls=True, smtputf8=False), "ESMTPS", True),
    ("utf8", dict(esmtp=True, tls=False, smtputf8=True), "UTF8SMTP", True),
    ("utf8-tls-two-rcpts", dict(esmtp=True, tls=True, smtputf8=True), "UTF8SMTPS", False),
]


@pytest.mark.parametrize("flags, protocol, one", [c[1:] for c in RECEIVED_TABLE],
                         ids=[c[0] for c in RECEIVED_TABLE])
def test_received_header(flags: dict[str, bool], protocol: str, one: bool) -> None:
    rcpts = ["b@inbox.test"] if one else ["b@inbox.test", "c@inbox.test"]
    header = received_header(helo="c.test", peer_ip="192.0.2.7", hostname=HOST,
                             trace_id="abc123", recipients=rcpts, when=NOW, **flags)
    for_clause = "\r\n\tfor <b@inbox.test>" if one else ""
    assert header.decode() == (
        f"Received: from c.test ([192.0.2.7])\r\n\tby {HOST} with {protocol} id abc123"
        f"{for_clause};\r\n\tFri, 02 Jan 2026 03:04:05 +0000\r\n")


def test_received_header_sanitises_helo_and_ipv6() -> None:
    header = received_header(helo="evil (x)\\\r\nBcc: y", peer_ip="2001:db8::1",
                             hostname=HOST, esmtp=True, tls=False, smtputf8=False,
                             trace_id="t", recipients=[], when=NOW)
    first = header.split(b"\r\n")[0]
    assert first == b"Received: from evil__x____Bcc:_y ([IPv6:2001:db8::1])"
    assert header.count(b"\r\n") == 3 and crlf_only(header)


# --- certs --------------------------------------------------------------------------------


def test_dev_certificate_is_reused(tmp_path: Path) -> None:
    cert, key = certs.ensure_dev_certificate(tmp_path, HOST)
    before = (cert.read_bytes(), key.read_bytes(), cert.stat().st_mtime_ns)
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    again = certs.ensure_dev_certificate(tmp_path, HOST)
    assert again == (cert, key)
    assert (cert.read_bytes(), key.read_bytes(), cert.stat().st_mtime_ns) == before
    certs.dev_server_context(tmp_path, HOST)  # loads
    assert cert.read_bytes() == before[0]


RENEW_TABLE = [
    ("other-hostname", "other.test", 0, True),
    ("near-expiry", HOST, certs.DEV_CERT_DAYS - 10, True),
    ("still-fresh", HOST, 100, False),
]


@pytest.mark.parametrize("hostname, days_later, renewed", [c[1:] for c in RENEW_TABLE],
                         ids=[c[0] for c in RENEW_TABLE])
def test_dev_certificate_renewal(tmp_path: Path, hostname: str, days_later: int,
                                 renewed: bool) -> None:
    cert, _ = certs.ensure_dev_certificate(tmp_path, HOST)
    before = cert.read_bytes()
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days_later)
    certs.ensure_dev_certificate(tmp_path, hostname, clock=lambda: later)
    assert (cert.read_bytes() != before) == renewed


def test_load_tls_context_choices(tmp_path: Path) -> None:
    cert, key = certs.ensure_dev_certificate(tmp_path / "a", HOST)
    assert isinstance(certs.load_tls_context(str(cert), str(key), None, HOST), ssl.SSLContext)
    assert certs.load_tls_context("", "", None, HOST) is None
    assert isinstance(certs.load_tls_context("", "", tmp_path / "dev", HOST), ssl.SSLContext)
    assert (tmp_path / "dev" / certs.DEV_CERT_NAME).is_file()
    with pytest.raises(ConfigError):
        certs.load_tls_context(str(cert), "", None, HOST)
    with pytest.raises(ConfigError):
        certs.server_context(tmp_path / "missing.pem", key)
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ConfigError):
        certs.server_context(tmp_path / "bad.pem", key)


# --- address syntax (property tests) ------------------------------------------------------

_atom = st.text("abcxyz0189!#$%&'*+-/=?^_`{|}~", min_size=1, max_size=8)
_label = st.builds(lambda a, b: a + b, st.text("abz09", min_size=1, max_size=4),
                   st.text("ab-z09", max_size=4).map(lambda t: t + "x" if t else t))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_parse_path_only_raises_inbox_errors(text: str) -> None:
    for candidate in (text, f"<{text}>"):
        try:
            result = parse_path(candidate, null_allowed=True, postmaster_allowed=True)
        except InboxError:
            continue
        assert isinstance(result, str) and "\r" not in result and "\n" not in result


@settings(max_examples=100, deadline=None)
@given(st.lists(_atom, min_size=1, max_size=3), st.lists(_label, min_size=1, max_size=3))
def test_parse_path_round_trips_valid_mailboxes(local: list[str], labels: list[str]) -> None:
    address = ".".join(local) + "@" + ".".join(labels)
    assert parse_path(f"<{address}>") == address
    assert parse_path(f"<@relay.test:{address}>") == address


def test_environment_has_swaks() -> None:
    assert os.path.exists("/usr/bin/swaks")
