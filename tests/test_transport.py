"""inbox.delivery.transport: one delivery attempt against real local SMTP servers (aiosmtpd)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest

from inbox.delivery.transport import (
    AttemptResult,
    RecipientResult,
    RelayConfig,
    SmtpTransport,
    TlsOutcome,
    split_enhanced,
)
from tests.support.fixtures_smtp import (  # noqa: F401
    make_smtp_sink,
    quiet_aiosmtpd,
    refused_port,
)
from tests.support.smtpsink import SmtpSink, make_self_signed_cert, make_self_signed_context

# ruff: noqa: F811 - pytest injects the imported fixtures by parameter name.

MakeSink = Callable[..., SmtpSink]
MakeTransport = Callable[..., SmtpTransport]
RAW = (b"From: a@sender.test\r\nTo: ok@x.test\r\nSubject: hi\r\n\r\n"
       b"line one\r\n.leading dot\r\n..two dots\r\n.\r\nlast\r\n")


# Every test here runs against a sink that offers PIPELINING (the transaction is pipelined,
# RFC 2920) and against one that does not (command by command).
@pytest.fixture(params=[True, False], ids=["pipelining", "one-by-one"])
def smtp_sink(request: pytest.FixtureRequest) -> Iterator[SmtpSink]:
    quiet_aiosmtpd()
    with SmtpSink(pipelining=request.param) as sink:
        yield sink


@pytest.fixture(params=[True, False], ids=["pipelining", "one-by-one"])
def smtp_sink_tls(request: pytest.FixtureRequest) -> Iterator[SmtpSink]:
    quiet_aiosmtpd()
    with SmtpSink(tls_context=make_self_signed_context("sink.test"),
                  pipelining=request.param) as sink:
        yield sink


@dataclass(frozen=True)
class Host:
    """Stands in for inbox.delivery.mx.MxHost, plus the test-only port override."""

    host: str
    port: int | None = None


@pytest.fixture
async def transport() -> AsyncIterator[MakeTransport]:
    """Make `SmtpTransport`s (timeout 5 s unless given); each is `aclose`d after the test."""
    made: list[SmtpTransport] = []

    def make(**kwargs: object) -> SmtpTransport:
        kwargs.setdefault("timeout", 5)
        client = SmtpTransport("client.test", **kwargs)  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()
    if made:
        # The sink answered QUIT and is closing its side; aiosmtpd's Controller.stop() would
        # abandon (leak) a session socket it has not closed yet.
        await asyncio.sleep(0.01)


def at(sink: SmtpSink) -> Host:
    return Host("127.0.0.1", sink.port)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections (kernel backlog) but never sends a greeting."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


async def test_delivered_and_bytes_arrive_intact(
        smtp_sink: SmtpSink, transport: MakeTransport) -> None:
    result = await transport().deliver([at(smtp_sink)], "bounce@sender.test", ["ok@x.test"], RAW)
    assert result.connection_error is None
    assert result.host == "127.0.0.1"
    assert result.tls == TlsOutcome(used=False, reason="STARTTLS not offered")
    [rcpt] = result.recipients
    assert (rcpt.delivered, rcpt.temporary, rcpt.code, rcpt.enhanced) == (True, False, 250, "2.0.0")
    assert rcpt.reply == "250 2.0.0 OK queued"
    [message] = smtp_sink.messages
    assert message.data == RAW  # dot-stuffed on the wire, restored by the server
    assert (message.mail_from, message.rcpt_tos) == ("bounce@sender.test", ["ok@x.test"])
    assert message.mail_options == [f"SIZE={len(RAW)}"]  # RFC 1870
    assert message.tls is False
    # RFC 2920: MAIL, RCPT and DATA went in one write when the server offered PIPELINING.
    assert smtp_sink.pipelined == (1 if smtp_sink.pipelining else 0)


async def test_port_from_transport_for_plain_host_strings(
        smtp_sink: SmtpSink, transport: MakeTransport) -> None:
    result = await transport(port=smtp_sink.port).deliver(
        ["127.0.0.1."], "", ["ok@x.test"], RAW)  # trailing dot of a DNS name; null sender
    assert result.recipients[0].delivered
    assert smtp_sink.messages[0].mail_from == ""


async def test_eight_bit_body_uses_8bitmime(smtp_sink: SmtpSink, transport: MakeTransport) -> None:
    raw = "Subject: café\r\n\r\nnaïve\r\n".encode()
    result = await transport().deliver([at(smtp_sink)], "a@sender.test", ["ok@x.test"], raw)
    assert result.recipients[0].delivered
    [message] = smtp_sink.messages
    assert "BODY=8BITMIME" in message.mail_options
    assert message.data == raw


async def test_per_recipient_replies_and_data_only_for_accepted(
        smtp_sink: SmtpSink, transport: MakeTransport) -> None:
    smtp_sink.rcpt_replies = {"gone@x.test": "550 5.1.1 No such user",
                              "later@x.test": "451 4.2.0 Mailbox busy"}
    result = await transport().deliver([at(smtp_sink)], "a@sender.test",
                                       ["gone@x.test", "ok@x.test", "later@x.test"], RAW)
    gone, ok, later = result.recipients
    assert (gone.address, gone.code, gone.enhanced, gone.text) == (
        "gone@x.test", 550, "5.1.1", "No such user")
    assert gone.permanent and not gone.delivered
    assert ok.delivered and ok.address == "ok@x.test"
    assert (later.code, later.enhanced, later.temporary, later.delivered) == (
        451, "4.2.0", True, False)
    [message] = smtp_sink.messages
    assert message.rcpt_tos == ["ok@x.test"]


async def test_no_recipient_accepted_sends_no_data(
        smtp_sink: SmtpSink, transport: MakeTransport) -> None:
    smtp_sink.rcpt_replies = {"gone@x.test": "550 5.1.1 No such user"}
    smtp_sink.data_reply = "554 5.0.0 DATA must not be reached"
    result = await transport().deliver([at(smtp_sink)], "a@sender.test", ["gone@x.test"], RAW)
    assert [r.reply for r in result.recipients] == ["550 5.1.1 No such user"]
    assert result.host == "127.0.0.1" and result.connection_error is None


@pytest.mark.parametrize(("data_reply", "temporary"), [
    ("451 4.3.0 try later", True),
    ("554 5.6.0 content rejected", False),
], ids=["data-451-temporary", "data-554-permanent"])
async def test_data_reply_applies_to_all_accepted(
        smtp_sink: SmtpSink, data_reply: str, temporary: bool, transport: MakeTransport) -> None:
    smtp_sink.rcpt_replies = {"gone@x.test": "550 5.1.1 No such user"}
    smtp_sink.data_reply = data_reply
    result = await transport().deliver([at(smtp_sink)], "a@sender.test",
                                       ["ok@x.test", "gone@x.test", "ok2@x.test"], RAW)
    ok, gone, ok2 = result.recipients
    for rcpt in (ok, ok2):
        assert rcpt.reply == data_reply
        assert (rcpt.temporary, rcpt.delivered) == (temporary, False)
    assert gone.code == 550
    assert smtp_sink.messages == []


async def test_fail_next_data_then_accept(smtp_sink: SmtpSink, transport: MakeTransport) -> None:
    smtp_sink.fail_next_data = 1
    client = transport()
    first = await client.deliver([at(smtp_sink)], "a@sender.test", ["ok@x.test"], RAW)
    second = await client.deliver([at(smtp_sink)], "a@sender.test", ["ok@x.test"], RAW)
    assert first.recipients[0].temporary and first.recipients[0].code == 451
    assert second.recipients[0].delivered
    assert len(smtp_sink.messages) == 1


async def test_mail_from_rejected_applies_to_all(
        smtp_sink: SmtpSink, transport: MakeTransport) -> None:
    smtp_sink.mail_reply = "553 5.7.1 Sender address rejected"
    result = await transport().deliver([at(smtp_sink)], "a@sender.test",
                                       ["ok@x.test", "ok2@x.test"], RAW)
    assert [(r.code, r.enhanced, r.temporary) for r in result.recipients] == [
        (553, "5.7.1", False), (553, "5.7.1", False)]
    assert smtp_sink.messages == []


async def test_refused_first_host_then_second(
        smtp_sink: SmtpSink, refused_port: int, transport: MakeTransport) -> None:
    result = await transport().deliver(
        [Host("127.0.0.1", refused_port), at(smtp_sink)], "a@sender.test", ["ok@x.test"], RAW)
    assert result.recipients[0].delivered
    assert result.connection_error is None
    assert len(smtp_sink.messages) == 1


async def test_silent_host_times_out_then_next(
        smtp_sink: SmtpSink, silent_port: int, transport: MakeTransport) -> None:
    result = await transport(timeout=0.3).deliver(
        [Host("127.0.0.1", silent_port), at(smtp_sink)], "a@sender.test", ["ok@x.test"], RAW)
    assert result.recipients[0].delivered


async def test_all_hosts_down_all_temporary(
        refused_port: int, silent_port: int, transport: MakeTransport) -> None:
    result = await transport(timeout=0.3).deliver(
        [Host("127.0.0.1", refused_port), Host("127.0.0.1", silent_port)],
        "a@sender.test", ["a@x.test", "b@x.test"], RAW)
    assert result.host is None
    assert result.connection_error is not None
    assert f":{refused_port}:" in result.connection_error
    assert f":{silent_port}:" in result.connection_error
    for rcpt in result.recipients:
        assert (rcpt.code, rcpt.enhanced, rcpt.temporary, rcpt.delivered) == (
            451, "4.4.1", True, False)
        assert f":{silent_port}:" in rcpt.text  # the last error


async def test_no_hosts_is_temporary(transport: MakeTransport) -> None:
    result = await transport().deliver([], "a@sender.test", ["a@x.test"], RAW)
    assert result.recipients[0].temporary and result.connection_error


async def test_no_recipients_does_nothing(refused_port: int, transport: MakeTransport) -> None:
    result = await transport().deliver([Host("127.0.0.1", refused_port)], "a@x.test", [], RAW)
    assert result.recipients == [] and result.connection_error is None


@pytest.mark.parametrize("first", ["greeting-421", "refuse"])
async def test_unusable_first_host_then_next(
        make_smtp_sink: MakeSink, first: str, transport: MakeTransport) -> None:
    bad, good = make_smtp_sink(), make_smtp_sink()
    if first == "refuse":
        bad.refuse = True
    else:
        bad.greeting_reply = "421 4.3.2 Too busy, come back later"
    result = await transport().deliver([at(bad), at(good)], "a@sender.test", ["ok@x.test"], RAW)
    assert result.recipients[0].delivered
    assert (len(bad.messages), len(good.messages)) == (0, 1)


@pytest.mark.parametrize(("greetings", "temporary"), [
    (["554 5.7.1 You are blocked", "554 No SMTP service here"], False),
    (["554 5.7.1 You are blocked", "421 4.3.2 Busy"], True),
], ids=["all-554-permanent", "554-and-421-temporary"])
async def test_greeting_rejections(
        make_smtp_sink: MakeSink, greetings: list[str], temporary: bool,
        transport: MakeTransport) -> None:
    sinks = [make_smtp_sink() for _ in greetings]
    for sink, greeting in zip(sinks, greetings, strict=True):
        sink.greeting_reply = greeting
    result = await transport().deliver([at(s) for s in sinks], "a@sender.test", ["a@x.test"], RAW)
    [rcpt] = result.recipients
    assert rcpt.temporary is temporary and not rcpt.delivered
    assert result.connection_error and "greeting" in result.connection_error
    if temporary:
        assert (rcpt.code, rcpt.enhanced) == (451, "4.4.1")
    else:  # the last host's own reply; X.3.2 when it has no enhanced code (RFC 3463)
        assert rcpt.reply == "554 5.3.2 No SMTP service here"


async def test_starttls_used_when_offered(
        smtp_sink_tls: SmtpSink, transport: MakeTransport) -> None:
    result = await transport().deliver([at(smtp_sink_tls)], "a@sender.test", ["ok@x.test"], RAW)
    assert result.recipients[0].delivered
    assert result.tls.used and result.tls.version and result.tls.version.startswith("TLS")
    assert result.tls.cipher and result.tls.error is None
    [message] = smtp_sink_tls.messages
    assert message.tls is True and message.data == RAW


async def test_tls_handshake_failure_retries_in_plaintext(
        make_smtp_sink: MakeSink, transport: MakeTransport) -> None:
    server = make_self_signed_context("sink.test")
    server.maximum_version = ssl.TLSVersion.TLSv1_2
    sink = make_smtp_sink(tls_context=server)

    def tls13_only(host: str) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        return context

    result = await transport(tls_context_factory=tls13_only).deliver(
        [at(sink)], "a@sender.test", ["ok@x.test"], RAW)
    assert result.recipients[0].delivered
    assert result.tls.used is False and result.tls.error
    assert "TLS" in result.tls.error
    [message] = sink.messages
    assert message.tls is False


async def test_relay_with_auth_ignores_hosts(
        make_smtp_sink: MakeSink, refused_port: int, transport: MakeTransport) -> None:
    relay = make_smtp_sink(auth_users={"user": "s3cret:@x"})
    config = RelayConfig.parse(f"user:s3cret:@x@127.0.0.1:{relay.port}", starttls=False)
    result = await transport(relay=config).deliver(
        [Host("127.0.0.1", refused_port)], "a@sender.test", ["ok@x.test"], RAW)
    assert result.recipients[0].delivered
    [message] = relay.messages
    assert message.auth_user == "user"


async def test_relay_wrong_password_is_temporary(
        make_smtp_sink: MakeSink, transport: MakeTransport) -> None:
    relay = make_smtp_sink(auth_users={"user": "right"})
    config = RelayConfig("127.0.0.1", relay.port, "user", "wrong", starttls=False)
    result = await transport(relay=config).deliver([], "a@sender.test", ["ok@x.test"], RAW)
    [rcpt] = result.recipients
    assert rcpt.temporary and not rcpt.delivered
    assert result.connection_error and "AUTH" in result.connection_error
    assert "wrong" not in result.connection_error
    assert relay.messages == []


async def test_relay_starttls_verifies_certificate(
        make_smtp_sink: MakeSink, transport: MakeTransport) -> None:
    cert = make_self_signed_cert("relay.test")
    relay = make_smtp_sink(tls_context=make_self_signed_context("relay.test", cert),
                           auth_users={"user": "pw"})
    config = RelayConfig("127.0.0.1", relay.port, "user", "pw")
    # Default context verifies against the system CAs: the self-signed relay is refused,
    # with no plaintext fallback (credentials would go in the clear).
    refused = await transport(relay=config).deliver([], "a@sender.test", ["ok@x.test"], RAW)
    assert refused.recipients[0].temporary and refused.connection_error
    assert relay.messages == []

    def trust_relay(host: str) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=cert[0].decode())

    accepted = await transport(relay=config, tls_context_factory=trust_relay).deliver(
        [], "a@sender.test", ["ok@x.test"], RAW)
    assert accepted.recipients[0].delivered and accepted.tls.used
    [message] = relay.messages
    assert message.tls and message.auth_user == "user"


async def test_relay_starttls_required_but_not_offered(
        smtp_sink: SmtpSink, transport: MakeTransport) -> None:
    config = RelayConfig("127.0.0.1", smtp_sink.port)
    result = await transport(relay=config).deliver([], "a@sender.test", ["ok@x.test"], RAW)
    assert result.recipients[0].temporary
    assert result.connection_error and "STARTTLS" in result.connection_error
    assert smtp_sink.messages == []


async def test_connection_dropped_during_data(
        smtp_sink: SmtpSink, transport: MakeTransport) -> None:
    smtp_sink.rcpt_replies = {"gone@x.test": "550 5.1.1 No such user"}
    smtp_sink.drop_next_data = 1
    result = await transport().deliver([at(smtp_sink)], "a@sender.test",
                                       ["ok@x.test", "gone@x.test"], RAW)
    ok, gone = result.recipients
    assert (ok.temporary, ok.delivered, ok.code, ok.enhanced) == (True, False, 451, "4.4.2")
    assert gone.permanent
    assert result.host == "127.0.0.1"


async def test_no_reply_to_data_in_time_is_not_delivered(
        smtp_sink: SmtpSink, transport: MakeTransport) -> None:
    smtp_sink.hold_data = threading.Event()
    try:
        result = await transport(timeout=0.5).deliver(
            [at(smtp_sink)], "a@sender.test", ["ok@x.test"], RAW)
        assert smtp_sink.data_held.is_set()
        [rcpt] = result.recipients
        assert rcpt.temporary and not rcpt.delivered
    finally:
        smtp_sink.hold_data.set()


async def test_cancelled_delivery_propagates(smtp_sink: SmtpSink, transport: MakeTransport) -> None:
    smtp_sink.hold_data = threading.Event()
    task = asyncio.create_task(transport().deliver(
        [at(smtp_sink)], "a@sender.test", ["ok@x.test"], RAW))
    try:
        assert await asyncio.to_thread(smtp_sink.data_held.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        smtp_sink.hold_data.set()


async def test_smtputf8_used_when_supported(smtp_sink: SmtpSink, transport: MakeTransport) -> None:
    result = await transport().deliver([at(smtp_sink)], "sénder@sender.test", ["üser@x.test"],
                                       RAW, smtputf8=True)
    assert result.recipients[0].delivered
    [message] = smtp_sink.messages
    assert message.smtputf8 and message.rcpt_tos == ["üser@x.test"]
    assert "SMTPUTF8" in message.mail_options


async def test_smtputf8_needed_but_unsupported_is_permanent(
        make_smtp_sink: MakeSink, transport: MakeTransport) -> None:
    sink = make_smtp_sink(smtputf8_supported=False)
    result = await transport().deliver([at(sink)], "a@sender.test", ["üser@x.test", "b@x.test"],
                                       RAW, smtputf8=True)
    assert [(r.code, r.enhanced, r.permanent) for r in result.recipients] == [
        (553, "5.6.7", True), (553, "5.6.7", True)]  # RFC 6531
    assert sink.messages == []


async def test_non_ascii_address_without_smtputf8_fails_that_recipient(
        smtp_sink: SmtpSink, transport: MakeTransport) -> None:
    result = await transport().deliver([at(smtp_sink)], "a@sender.test",
                                       ["üser@x.test", "ok@x.test"], RAW)
    bad, ok = result.recipients
    assert bad.permanent and bad.enhanced == "5.1.3"
    assert ok.delivered


async def test_concurrent_deliveries(smtp_sink: SmtpSink, transport: MakeTransport) -> None:
    client = transport()
    results = await asyncio.gather(*(
        client.deliver([at(smtp_sink)], "a@sender.test", [f"r{i}@x.test"], RAW)
        for i in range(10)))
    assert all(r.recipients[0].delivered for r in results)
    assert len(await smtp_sink.wait_for(10)) == 10


@pytest.mark.parametrize(("code", "message", "enhanced", "text"), [
    (250, "2.0.0 OK queued", "2.0.0", "OK queued"),
    (550, "5.1.1 No such user", "5.1.1", "No such user"),
    (550, "5.1.10 RESOLVER.ADR.RecipientNotFound", "5.1.10", "RESOLVER.ADR.RecipientNotFound"),
    (451, "4.7.1 Greylisted", "4.7.1", "Greylisted"),
    (550, "5.1.1", "5.1.1", ""),
    (550, "No such user here", None, "No such user here"),
    (550, "4.1.1 class does not match", None, "4.1.1 class does not match"),
    (550, "5.1.1a not a code", None, "5.1.1a not a code"),
    (550, "5.1000.1 too many digits", None, "5.1000.1 too many digits"),
    (550, "5.1.1 The email account does not exist.\n5.1.1 Please try\n5.1.1 https://x",
     "5.1.1", "The email account does not exist. Please try https://x"),
    (421, "", None, ""),
], ids=["ok", "bad-mailbox", "three-digit-detail", "temporary", "code-only", "no-code",
        "class-mismatch", "junk-after-code", "subject-too-long", "gmail-multiline", "empty"])
def test_split_enhanced(code: int, message: str, enhanced: str | None, text: str) -> None:
    assert split_enhanced(code, message) == (enhanced, text)


@pytest.mark.parametrize(("value", "expected"), [
    ("smtp.relay.test:587", RelayConfig("smtp.relay.test", 587)),
    ("u:p@smtp.relay.test:2525", RelayConfig("smtp.relay.test", 2525, "u", "p")),
    ("u:p:a@ss@[::1]:25", RelayConfig("::1", 25, "u", "p:a@ss")),
], ids=["host-port", "credentials", "ipv6-and-odd-password"])
def test_relay_parse(value: str, expected: RelayConfig) -> None:
    assert RelayConfig.parse(value) == expected


@pytest.mark.parametrize("value", [
    "smtp.relay.test", "smtp.relay.test:", ":25", "smtp.relay.test:0", "smtp.relay.test:99999",
    "smtp.relay.test:smtp", "user@smtp.relay.test:25", ":pw@smtp.relay.test:25", "::1:25",
    "[::1]25",
], ids=["no-port", "empty-port", "no-host", "port-0", "port-too-big", "port-name",
        "user-without-password", "empty-user", "bare-ipv6", "ipv6-no-colon"])
def test_relay_parse_rejects(value: str) -> None:
    with pytest.raises(ValueError, match="relay") as info:
        RelayConfig.parse(value.replace("pw", "hunter2"))
    assert "hunter2" not in str(info.value)


def test_relay_password_not_in_repr() -> None:
    assert "hunter2" not in repr(RelayConfig("h", 25, "u", "hunter2"))


def test_reply_property() -> None:
    assert RecipientResult("a@x", 550, None, "nope", False, False).reply == "550 nope"


# Session pooling. `Proxy` sits between the transport and a real sink: it counts the client's
# connections and commands, and can hang up on sessions as a server would.

_VERBS = (b"EHLO", b"HELO", b"STARTTLS", b"AUTH", b"MAIL", b"RCPT", b"DATA", b"RSET", b"QUIT")


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    hang_up: bytes | None = None  # on the next client bytes: send this (b"" = nothing), close

    def close(self) -> None:
        self.client.close()
        self.upstream.close()


class Proxy:
    """A TCP relay on 127.0.0.1 in front of `target`, running in the test's event loop."""

    def __init__(self, target: SmtpSink) -> None:
        self.target = target
        self.refuse = False  # close new connections at once
        self.accepted = 0
        self.commands: list[str] = []  # client command verbs, while readable (before TLS)
        self.links: set[_Link] = set()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def at(self) -> Host:
        return Host("127.0.0.1", self.port)

    def count(self, verb: str) -> int:
        return self.commands.count(verb)

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def drop_all(self) -> None:
        """Hang up on every open session now, as a server's idle timeout would."""
        for link in list(self.links):
            link.close()

    def hang_up_on_next_command(self, reply: bytes = b"") -> None:
        """Each open session answers its next command with `reply` (if any) and hangs up: a
        server that dropped it silently, or said 421 (RFC 5321 §3.8)."""
        for link in self.links:
            link.hang_up = reply

    async def open_sessions(self, expected: int) -> None:
        """Wait until exactly `expected` sessions are open."""
        for _ in range(500):
            if len(self.links) == expected:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{len(self.links)} sessions open, expected {expected}")

    async def aclose(self) -> None:
        assert self._server is not None
        self._server.close()
        self.drop_all()
        await asyncio.gather(*self._tasks)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            self.accepted += 1
            if self.refuse:
                writer.close()
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target.port)
            link = _Link(writer, up_writer)
            self.links.add(link)
            try:
                await asyncio.gather(self._pump(reader, link, from_client=True),
                                     self._pump(up_reader, link, from_client=False))
            finally:
                self.links.discard(link)
                link.close()
        finally:
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, link: _Link, *, from_client: bool
                    ) -> None:
        out = link.upstream if from_client else link.client
        try:
            while data := await reader.read(65536):
                if from_client:
                    if link.hang_up is not None:
                        link.client.write(link.hang_up)
                        await link.client.drain()
                        return
                    self.commands.extend(
                        line.split()[0].decode() for line in data.split(b"\r\n")
                        if line.split() and line.split()[0].upper() in _VERBS)
                out.write(data)
                await out.drain()
        except OSError:
            pass
        finally:
            link.close()


@pytest.fixture
async def make_proxy() -> AsyncIterator[Callable[[SmtpSink], Awaitable[Proxy]]]:
    proxies: list[Proxy] = []

    async def make(target: SmtpSink) -> Proxy:
        proxy = await Proxy(target).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        await proxy.aclose()


MakeProxy = Callable[[SmtpSink], Awaitable[Proxy]]


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


async def send(client: SmtpTransport, *hosts: Host, rcpts: tuple[str, ...] = ("ok@x.test",)
               ) -> AttemptResult:
    return await client.deliver(list(hosts), "a@sender.test", list(rcpts), RAW)


async def test_sequential_deliveries_share_one_session(
        smtp_sink: SmtpSink, make_proxy: MakeProxy, transport: MakeTransport) -> None:
    proxy = await make_proxy(smtp_sink)
    client = transport()
    for _ in range(20):
        result = await send(client, proxy.at())
        assert result.recipients[0].delivered and result.connection_error is None
    assert len(smtp_sink.messages) == 20
    assert proxy.accepted == 1
    # RFC 5321 §4.1.1.4: after a completed DATA the next MAIL follows directly.
    assert (proxy.count("EHLO"), proxy.count("MAIL"), proxy.count("RSET")) == (1, 20, 0)
    assert proxy.count("QUIT") == 0
    await proxy.open_sessions(1)


async def test_new_session_after_max_messages(
        smtp_sink: SmtpSink, make_proxy: MakeProxy, transport: MakeTransport) -> None:
    proxy = await make_proxy(smtp_sink)
    client = transport(max_messages_per_connection=5)
    for _ in range(12):
        assert (await send(client, proxy.at())).recipients[0].delivered
    assert proxy.accepted == 3  # 5 + 5 + 2
    await proxy.open_sessions(1)
    assert proxy.count("QUIT") == 2  # the two full sessions said goodbye


@pytest.mark.parametrize("hang_up", [
    "closed-while-idle", "drops-at-mail", "421-at-mail",
], ids=lambda x: x)
async def test_dead_pooled_session_is_replaced_transparently(
        smtp_sink: SmtpSink, make_proxy: MakeProxy, transport: MakeTransport,
        hang_up: str) -> None:
    proxy = await make_proxy(smtp_sink)
    client = transport()
    first = await send(client, proxy.at())
    if hang_up == "closed-while-idle":
        proxy.drop_all()
        await proxy.open_sessions(0)
    else:
        proxy.hang_up_on_next_command(b"421 4.4.2 Idle too long\r\n" if "421" in hang_up
                                      else b"")
    second = await send(client, proxy.at())
    assert second == first  # just as if the pool had been empty
    assert second.recipients[0].delivered
    assert proxy.accepted == 2
    assert len(smtp_sink.messages) == 2


async def test_dead_pooled_session_then_host_unusable_falls_back_in_order(
        make_smtp_sink: MakeSink, make_proxy: MakeProxy, transport: MakeTransport) -> None:
    first_sink, second_sink = make_smtp_sink(), make_smtp_sink()
    proxy = await make_proxy(first_sink)
    client = transport()
    assert (await send(client, proxy.at(), at(second_sink))).recipients[0].delivered
    proxy.hang_up_on_next_command(b"421 4.4.2 Idle too long\r\n")
    proxy.refuse = True
    result = await send(client, proxy.at(), at(second_sink))
    assert result.recipients[0].delivered and result.connection_error is None
    assert (len(first_sink.messages), len(second_sink.messages)) == (1, 1)
    assert proxy.accepted == 2  # the pooled session, then one fresh try of the same host


async def test_idle_sessions_expire(
        smtp_sink: SmtpSink, make_proxy: MakeProxy, transport: MakeTransport) -> None:
    proxy = await make_proxy(smtp_sink)
    clock = FakeClock()
    client = transport(max_idle_secs=30, clock=clock)
    await send(client, proxy.at())
    clock.now += 29
    await send(client, proxy.at())
    assert proxy.accepted == 1
    clock.now += 31
    assert (await send(client, proxy.at())).recipients[0].delivered
    assert proxy.accepted == 2
    await proxy.open_sessions(1)  # the expired one was closed
    assert proxy.count("QUIT") == 1


async def test_concurrent_deliveries_keep_at_most_max_idle(
        smtp_sink: SmtpSink, make_proxy: MakeProxy, transport: MakeTransport) -> None:
    proxy = await make_proxy(smtp_sink)
    client = transport(max_connections_per_endpoint=3)
    results = await asyncio.gather(*(send(client, proxy.at(), rcpts=(f"r{i}@x.test",))
                                     for i in range(10)))
    assert all(r.recipients[0].delivered for r in results)
    assert len(smtp_sink.messages) == 10
    assert proxy.accepted == 10  # the pool was empty: each opened its own
    await proxy.open_sessions(3)
    assert proxy.count("QUIT") == 7
    for _ in range(3):
        await asyncio.gather(*(send(client, proxy.at()) for _ in range(3)))
    assert proxy.accepted == 10  # the three idle sessions carried the rest


@pytest.mark.parametrize(("setup", "rcpts", "rsets"), [
    ({"rcpt_replies": {"gone@x.test": "550 5.1.1 No such user"}}, ("gone@x.test", "ok@x.test"),
     0),
    ({"rcpt_replies": {"gone@x.test": "550 5.1.1 No such user"}}, ("gone@x.test",), 1),
    ({"data_reply": "554 5.6.0 content rejected"}, ("ok@x.test",), 1),
    ({"mail_reply": "553 5.7.1 Sender address rejected"}, ("ok@x.test",), 0),
], ids=["rcpt-5xx-some-accepted", "rcpt-5xx-none-accepted", "data-5xx", "mail-5xx"])
async def test_refusals_leave_the_session_reusable(
        smtp_sink: SmtpSink, make_proxy: MakeProxy, transport: MakeTransport,
        setup: dict[str, object], rcpts: tuple[str, ...], rsets: int) -> None:
    proxy = await make_proxy(smtp_sink)
    client = transport()
    for name, value in setup.items():
        setattr(smtp_sink, name, value)
    refused = await send(client, proxy.at(), rcpts=rcpts)
    assert any(r.permanent for r in refused.recipients)
    for name in setup:
        setattr(smtp_sink, name, {} if name == "rcpt_replies" else None)
    assert (await send(client, proxy.at())).recipients[0].delivered
    assert proxy.accepted == 1
    assert proxy.count("RSET") == rsets  # RFC 5321 §4.1.1.5: only with a transaction open


@pytest.mark.parametrize("trouble", ["data-dropped", "data-timeout"])
async def test_session_in_unknown_state_is_not_pooled(
        smtp_sink: SmtpSink, make_proxy: MakeProxy, transport: MakeTransport,
        trouble: str) -> None:
    proxy = await make_proxy(smtp_sink)
    client = transport(timeout=1.5)  # short for data-timeout, not flaky on CI
    assert (await send(client, proxy.at())).recipients[0].delivered
    if trouble == "data-dropped":
        smtp_sink.drop_next_data = 1
    else:
        smtp_sink.hold_data = threading.Event()
    try:
        result = await send(client, proxy.at())
    finally:
        if smtp_sink.hold_data is not None:
            smtp_sink.hold_data.set()
    [rcpt] = result.recipients
    assert rcpt.temporary and not rcpt.delivered
    # Never retried after DATA was sent: the client sent DATA twice in all (the first message
    # and this one). The sink itself may still record the held message once released.
    assert proxy.count("DATA") == 2
    await proxy.open_sessions(0)
    smtp_sink.hold_data = None
    assert (await send(client, proxy.at())).recipients[0].delivered
    assert proxy.accepted == 2


async def test_starttls_session_reused(
        smtp_sink_tls: SmtpSink, make_proxy: MakeProxy, transport: MakeTransport) -> None:
    proxy = await make_proxy(smtp_sink_tls)
    client = transport()
    results = [await send(client, proxy.at()) for _ in range(5)]
    assert all(r.recipients[0].delivered and r.tls.used for r in results)
    assert len({r.tls for r in results}) == 1
    assert proxy.accepted == 1 and proxy.count("STARTTLS") == 1  # one TLS handshake
    assert all(m.tls for m in smtp_sink_tls.messages)


async def test_relay_session_reused_with_one_auth(
        make_smtp_sink: MakeSink, make_proxy: MakeProxy, transport: MakeTransport) -> None:
    relay = make_smtp_sink(auth_users={"user": "pw"})
    proxy = await make_proxy(relay)
    client = transport(relay=RelayConfig("127.0.0.1", proxy.port, "user", "pw", starttls=False))
    for _ in range(3):
        assert (await client.deliver([], "a@sender.test", ["ok@x.test"], RAW)
                ).recipients[0].delivered
    assert (proxy.accepted, proxy.count("AUTH")) == (1, 1)


async def test_aclose_closes_every_session(
        smtp_sink: SmtpSink, make_proxy: MakeProxy, transport: MakeTransport) -> None:
    proxy = await make_proxy(smtp_sink)
    client = transport(max_connections_per_endpoint=3)
    await asyncio.gather(*(send(client, proxy.at()) for _ in range(5)))
    await client.aclose()
    assert proxy.count("QUIT") == 5  # 2 beyond the idle limit, then the 3 idle ones
    await proxy.open_sessions(0)
    # Still usable afterwards, without keeping sessions.
    assert (await send(client, proxy.at())).recipients[0].delivered
    await proxy.open_sessions(0)
    assert proxy.count("QUIT") == 6


async def test_close_idle_keeps_pooling(
        smtp_sink: SmtpSink, make_proxy: MakeProxy, transport: MakeTransport) -> None:
    proxy = await make_proxy(smtp_sink)
    client = transport()
    await send(client, proxy.at())
    await client.close_idle()
    await proxy.open_sessions(0)
    await send(client, proxy.at())
    await send(client, proxy.at())
    assert proxy.accepted == 2


async def test_pooling_off(
        smtp_sink: SmtpSink, make_proxy: MakeProxy, transport: MakeTransport) -> None:
    proxy = await make_proxy(smtp_sink)
    client = transport(max_connections_per_endpoint=0)
    for _ in range(3):
        assert (await send(client, proxy.at())).recipients[0].delivered
    await proxy.open_sessions(0)
    assert proxy.accepted == proxy.count("QUIT") == 3


@pytest.mark.parametrize("kwargs", [
    {"max_idle_secs": -1}, {"max_messages_per_connection": 0},
    {"max_connections_per_endpoint": -1},
], ids=["negative-idle", "zero-messages", "negative-connections"])
def test_pool_limits_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SmtpTransport("client.test", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("limit", "sessions"), [(2, 2), (5, 5)])
async def test_sessions_per_host_are_limited(smtp_sink: SmtpSink, transport: MakeTransport,
                                             limit: int, sessions: int) -> None:
    # Five deliveries at once while the sink holds every DATA: only `limit` sessions open;
    # the others wait and then reuse the pooled sessions.
    smtp_sink.hold_data = threading.Event()
    client = transport(max_sessions_per_host=limit)
    tasks = [asyncio.create_task(client.deliver([at(smtp_sink)], "a@sender.test",
                                                [f"u{i}@x.test"], RAW)) for i in range(5)]
    try:
        assert await asyncio.to_thread(smtp_sink.data_held.wait, 5)
        await asyncio.sleep(0.3)  # room for more sessions to open, were they allowed
    finally:
        smtp_sink.hold_data.set()
    results = await asyncio.gather(*tasks)
    assert all(r.recipients[0].delivered for r in results)
    assert len({m.peer for m in smtp_sink.messages}) == sessions
