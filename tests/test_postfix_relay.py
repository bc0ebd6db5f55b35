"""A real Postfix as an MTA peer: private instances on 127.0.0.1 relay into our SMTP sink.

Postfix is a different SMTP client from ours (its own queue, Received header, grouping of
recipients per transaction, SMTPUTF8 autodetection), so what arrives shows how a real MTA hands
mail on. Each instance is private (tests/support/postfix.py) and is stopped even when a test fails.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from tests.support.fixtures_smtp import refused_port, smtp_sink
from tests.support.postfix import (
    PostfixFailure,
    PostfixInstance,
    make_root,
    remove_root,
    unavailable,
)
from tests.support.smtpsink import SmtpSink

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

# The trace header Postfix prepends (RFC 5321 §4.4), folded as Postfix folds it.
RECEIVED_LOCAL = re.compile(rb"Received: by relay\.postfix\.test \(Postfix, from userid \d+\)"
                            rb"\r\n\tid [0-9A-F]+; ")
RECEIVED_SMTP = re.compile(rb"Received: from \S+ \(unknown \[127\.0\.0\.1\]\)"
                           rb"\r\n\tby relay\.postfix\.test \(Postfix\) with ESMTP id [0-9A-F]+")


@pytest.fixture
def make_postfix() -> Iterator[Callable[..., PostfixInstance]]:
    """`make_postfix(name, **PostfixInstance kwargs)` starts an instance under its own root;
    every instance is stopped and every root removed after the test, pass or fail."""
    base = make_root()
    started: list[PostfixInstance] = []

    def make(name: str = "relay", **kwargs: Any) -> PostfixInstance:
        instance = PostfixInstance(base / name, **kwargs)
        started.append(instance)  # before start(): a half-started instance is stopped too
        return instance.start()

    try:
        yield make
    finally:
        try:
            for instance in started:
                instance.stop()
        finally:
            remove_root(base)


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


def split(raw: bytes) -> tuple[bytes, bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, raw[:200]
    return head, body


BODY = ("Grüße from the relay test.\n"
        ".\n"  # a lone dot: content for `sendmail -i`, dot-stuffed on the wire (RFC 5321 §4.5.2)
        "..two dots\n"
        "trailing spaces   \n"
        "\n"
        "END-OF-BODY\n")


@pytest.mark.parametrize(("sender", "recipients", "smtputf8"), [
    ("alice@sender.test", ["bob@dest.test", "carol@other.test"], False),
    ("", ["postmaster@dest.test"], False),
    ("jörg@sender.test", ["zoë@dest.test"], True),
], ids=["two-recipients", "null-sender", "smtputf8-addresses"])
async def test_sendmail_injection_is_relayed_intact(
        make_postfix: Callable[..., PostfixInstance], smtp_sink: SmtpSink,
        sender: str, recipients: list[str], smtputf8: bool) -> None:
    postfix = make_postfix(relay_port=smtp_sink.port)
    headers = ("From: Alice <alice@sender.test>\n"
               "To: bob@dest.test\n"
               "Subject: relayed by Postfix\n"
               "Date: Thu, 01 Jan 2026 00:00:00 +0000\n"
               "Message-ID: <relay-test@sender.test>\n"
               "MIME-Version: 1.0\n"
               "Content-Type: text/plain; charset=utf-8\n"
               "Content-Transfer-Encoding: 8bit\n")
    await asyncio.to_thread(postfix.inject, (headers + "\n" + BODY).encode(), sender, recipients)
    await asyncio.to_thread(postfix.wait_empty, 20)

    [got] = await smtp_sink.wait_for(1)  # one transaction carried every recipient
    assert got.mail_from == sender
    assert sorted(got.rcpt_tos) == sorted(recipients)
    assert got.smtputf8 is smtputf8  # Postfix autodetects UTF-8 envelopes from sendmail
    assert got.peer[0] == "127.0.0.1"
    head, body = split(got.data)
    assert RECEIVED_LOCAL.match(head), head
    assert head.endswith(crlf(headers).rstrip(b"\r\n")), head  # our headers, unchanged
    assert body == crlf(BODY)
    log = postfix.wait_log("status=sent")
    assert f"relay=127.0.0.1[127.0.0.1]:{smtp_sink.port}" in log, log


async def test_smtp_submission_is_relayed(make_postfix: Callable[..., PostfixInstance],
                                          smtp_sink: SmtpSink) -> None:
    postfix = make_postfix(relay_port=smtp_sink.port, listen_port=0)
    message = EmailMessage()
    message["From"] = "alice@sender.test"
    message["To"] = "bob@dest.test"
    message["Subject"] = "over SMTP"
    message["Message-ID"] = "<smtp-test@sender.test>"
    message.set_content("Sent with aiosmtplib.\n.leading dot\nEND-OF-BODY\n")
    assert postfix.listen_port is not None
    errors, reply = await aiosmtplib.send(
        message, hostname="127.0.0.1", port=postfix.listen_port, sender="alice@sender.test",
        recipients=["bob@dest.test", "dave@dest.test"], timeout=10)
    assert errors == {} and reply.startswith("2.0.0 Ok: queued as"), (errors, reply)
    await asyncio.to_thread(postfix.wait_empty, 20)

    [got] = await smtp_sink.wait_for(1)
    assert got.mail_from == "alice@sender.test"
    assert sorted(got.rcpt_tos) == ["bob@dest.test", "dave@dest.test"]
    head, body = split(got.data)
    assert RECEIVED_SMTP.match(head), head
    assert b"Subject: over SMTP" in head
    assert body == b"Sent with aiosmtplib.\r\n.leading dot\r\nEND-OF-BODY\r\n"

    postfix.stop()  # the instance is gone: no process left, nothing answers on its port
    assert postfix.processes() == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", postfix.listen_port), timeout=2).close()


async def test_two_instances_chain(make_postfix: Callable[..., PostfixInstance],
                                   smtp_sink: SmtpSink) -> None:
    """Two private instances side by side: client -> edge -> relay -> sink."""
    relay = make_postfix("relay", relay_port=smtp_sink.port, listen_port=0)
    edge = make_postfix("edge", relay_port=relay.listen_port, listen_port=0,
                        myhostname="edge.postfix.test")
    assert edge.listen_port is not None
    await aiosmtplib.send(b"Subject: chained\r\n\r\nhop hop\r\n", hostname="127.0.0.1",
                          port=edge.listen_port, sender="a@sender.test",
                          recipients=["b@dest.test"], timeout=10)
    [got] = await smtp_sink.wait_for(1, timeout=20)
    head, body = split(got.data)
    hops = re.findall(rb"by (\S+) \(Postfix\)", head)
    assert hops == [b"relay.postfix.test", b"edge.postfix.test"]  # newest first
    assert body == b"hop hop\r\n"
    for instance in (edge, relay):
        await asyncio.to_thread(instance.wait_empty, 10)
    edge_log = edge.wait_log("status=sent")
    assert f"relay=127.0.0.1[127.0.0.1]:{relay.listen_port}, " in edge_log, edge_log
    assert f"configuration {edge.config_dir}\n" in edge_log  # each logs only to its own file
    assert str(edge.config_dir) not in relay.log_text()
    assert not set(edge.processes()) & set(relay.processes())


async def test_receiving_instance_discards(make_postfix: Callable[..., PostfixInstance]
                                          ) -> None:
    """relay_port=None: Postfix's smtpd queues each message, then discards it (a baseline
    for benchmarks of our own receiving server)."""
    postfix = make_postfix("receiver", relay_port=None, listen_port=0)
    assert postfix.listen_port is not None
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=postfix.listen_port, timeout=10)
    async with client:
        for i in range(5):
            await client.sendmail("a@sender.test", [f"user{i}@anywhere.test"],
                                  f"Subject: {i}\r\n\r\nbody {i}\r\n")
    await asyncio.to_thread(postfix.wait_empty, 20)
    log = postfix.wait_log("status=sent (discarded)", count=5)
    discarded = re.findall(r"discard\[\d+\]: \w+: to=<(user\d@anywhere\.test)>, relay=none, "
                           r".*status=sent \(discarded\)", log)
    assert sorted(discarded) == [f"user{i}@anywhere.test" for i in range(5)], log


async def test_undeliverable_mail_stays_queued_and_wait_empty_says_why(
        make_postfix: Callable[..., PostfixInstance], refused_port: int) -> None:
    postfix = make_postfix(relay_port=refused_port)
    await asyncio.to_thread(postfix.inject, b"Subject: stuck\n\nnobody listens\n",
                            "a@sender.test", ["b@dest.test"])
    with pytest.raises(PostfixFailure, match="Connection refused") as failure:
        await asyncio.to_thread(postfix.wait_empty, 5)  # time for a first attempt on a slow VM
    assert "queue not empty" in str(failure.value)
    [entry] = postfix.queue()
    assert entry["sender"] == "a@sender.test"
    assert entry["queue_name"] in ("active", "deferred")


def test_start_fails_with_the_reason_when_the_port_is_taken(
        make_postfix: Callable[..., PostfixInstance]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(PostfixFailure, match="Address already in use") as failure:
            make_postfix(relay_port=None, listen_port=taken.getsockname()[1])
    assert "fatal: bind 127.0.0.1 port" in str(failure.value)  # the log's tail is included


def test_start_refuses_a_root_postfix_cannot_reach(tmp_path: Path) -> None:
    instance = PostfixInstance(tmp_path / "pf", relay_port=None)  # under pytest's 0700 base
    with pytest.raises(PostfixFailure, match="not searchable by other users"):
        instance.start()
    instance.stop()
    assert not (tmp_path / "pf").exists()
