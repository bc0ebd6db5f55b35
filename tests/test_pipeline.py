"""inbox.delivery.pipeline: the reply reader and the DATA payload (pure logic; the pipelined
transaction itself runs against real SMTP servers in test_transport.py, test_postfix_sink.py
and test_postfix_relay.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiosmtplib import SMTPReadTimeoutError, SMTPResponseException, SMTPServerDisconnected
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from inbox.delivery.pipeline import Replies, command, data_payload, mail_command


class Inner:
    """Records what the reader passes on to aiosmtplib's protocol."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def eof_received(self) -> bool:
        self.calls.append(("eof", None))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append(("lost", exc))

    def pause_writing(self) -> None:
        self.calls.append(("pause", None))

    def resume_writing(self) -> None:
        self.calls.append(("resume", None))


async def test_replies_in_order_however_the_bytes_arrive() -> None:
    replies = Replies(Inner(), timeout=1)
    replies.data_received(b"250 2.1.0 OK\r\n250-2.1.5 first\r\n250-se")
    replies.data_received(b"cond\r\n250 third\r\n35")
    assert await replies.reply() == (250, "2.1.0 OK")
    assert await replies.reply() == (250, "2.1.5 first\nsecond\nthird")
    waiting = asyncio.ensure_future(replies.reply())
    await asyncio.sleep(0)
    assert not waiting.done()  # "35" is not a reply yet
    replies.data_received(b"4 End data with <CR><LF>.<CR><LF>\r\n")
    assert await waiting == (354, "End data with <CR><LF>.<CR><LF>")


async def test_a_bare_lf_ends_a_line_as_for_aiosmtplib() -> None:
    replies = Replies(Inner(), timeout=1)
    replies.data_received(b"550 5.1.1 no such user\n")
    assert await replies.reply() == (550, "5.1.1 no such user")


async def test_malformed_and_overlong_replies_are_errors() -> None:
    replies = Replies(Inner(), timeout=1)
    replies.data_received(b"250 ok\r\nhello there\r\n")
    assert await replies.reply() == (250, "ok")  # what came before stays readable
    with pytest.raises(SMTPResponseException, match="Malformed SMTP response line: hello"):
        await replies.reply()
    replies = Replies(Inner(), timeout=1)
    replies.data_received(b"250-" + b"x" * 70_000)
    with pytest.raises(SMTPResponseException, match="too long"):
        await replies.reply()


async def test_eof_and_loss_end_the_wait_and_reach_aiosmtplib() -> None:
    inner = Inner()
    replies = Replies(inner, timeout=5)
    waiting = asyncio.ensure_future(replies.reply())
    await asyncio.sleep(0)
    assert replies.eof_received() is False  # aiosmtplib's answer: close the transport
    with pytest.raises(SMTPServerDisconnected, match="EOF"):
        await waiting
    cause = ConnectionResetError()
    replies.connection_lost(cause)
    replies.pause_writing()
    replies.resume_writing()
    assert inner.calls == [("eof", None), ("lost", cause), ("pause", None), ("resume", None)]
    inner2 = Inner()
    lost = Replies(inner2, timeout=5)
    lost.connection_lost(None)
    with pytest.raises(SMTPServerDisconnected, match="Connection lost"):
        await lost.reply()
    assert inner2.calls == [("lost", None)]


async def test_no_reply_in_time() -> None:
    with pytest.raises(SMTPReadTimeoutError):
        await Replies(Inner(), timeout=0.05).reply()


def test_commands_refuse_control_characters_as_aiosmtplib_does() -> None:
    assert command(b"RCPT", b"TO:<a@b.test>") == b"RCPT TO:<a@b.test>\r\n"
    assert mail_command("a@b.test", ["SIZE=10", "BODY=8BITMIME"], "ascii") == (
        b"MAIL FROM:<a@b.test> SIZE=10 BODY=8BITMIME\r\n")
    with pytest.raises(ValueError, match="control character"):
        command(b"RCPT", b"TO:<a@b.test>\r\nDATA")
    with pytest.raises(UnicodeEncodeError):
        mail_command("jos\u00e9@b.test", [], "ascii")


@given(st.lists(st.sampled_from([b"a", b".", b"..", b"\r\n", b"\n", b"\r", b" ", b"\xff"]),
                max_size=30).map(b"".join))
def test_data_payload_is_what_aiosmtplib_sends(raw: bytes) -> None:
    expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(raw)) + b".\r\n"
    assert data_payload(raw) == expected
