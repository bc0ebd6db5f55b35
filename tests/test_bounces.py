"""inbox.delivery.bounces: which remote replies suppress an address or a domain (RFC 3463)."""

from __future__ import annotations

import pytest

from inbox.delivery.bounces import suppression_scope
from inbox.delivery.transport import RecipientResult, SmtpTransport, split_enhanced
from tests.support.fixtures_smtp import smtp_sink  # noqa: F401
from tests.support.smtpsink import SmtpSink

# ruff: noqa: F811 - pytest injects the imported fixtures by parameter name.


def reply(line: str, *, delivered: bool = False) -> RecipientResult:
    code_text, _, message = line.partition(" ")
    code = int(code_text)
    enhanced, text = split_enhanced(code, message)
    return RecipientResult("rcpt@x.test", code, enhanced, text,
                           temporary=not delivered and code < 500, delivered=delivered)


CASES = [
    # Address: the mailbox is gone (RFC 3463 §3.2, §3.3).
    ("550 5.1.1 No such user", "ADDRESS", "5.1.1-bad-mailbox"),
    ("550 5.1.6 Mailbox has moved", "ADDRESS", "5.1.6-moved"),
    ("550 5.2.1 Mailbox disabled", "ADDRESS", "5.2.1-disabled"),
    ("550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
     "ADDRESS", "5.1.10-exchange-recipient-not-found"),
    # Domain: the destination cannot receive mail at all.
    ("550 5.1.2 Bad destination system address", "DOMAIN", "5.1.2-bad-system"),
    ("556 5.1.10 Recipient address has null MX", "DOMAIN", "5.1.10-null-mx"),
    ("554 5.4.4 Unable to route", "DOMAIN", "5.4.4-unroutable"),
    # Not the address's fault: policy, content, size, full mailbox.
    ("550 5.7.1 Message rejected as spam", None, "5.7.1-spam"),
    ("550 5.7.26 Unauthenticated email is not accepted (DMARC)", None, "5.7.26-dmarc"),
    ("552 5.3.4 Message too big", None, "5.3.4-too-big"),
    ("554 5.6.0 Content rejected", None, "5.6.0-content"),
    ("552 5.2.2 Mailbox full", None, "5.2.2-mailbox-full"),
    ("553 5.6.7 remote server does not support SMTPUTF8", None, "5.6.7-smtputf8"),
    ("550 5.0.0 Something failed", None, "5.0.0-generic"),
    # Temporary never suppresses, whatever the detail.
    ("450 4.1.1 Mailbox lookup unavailable", None, "4.1.1-temporary"),
    ("451 4.4.1 connection refused", None, "4.4.1-temporary"),
    ("452 4.2.2 Mailbox full", None, "4.2.2-temporary"),
    # No enhanced code (or a generic one): the text decides, conservatively.
    ("550 User unknown", "ADDRESS", "bare-user-unknown"),
    ("550 <a@x.test>: No such user here", "ADDRESS", "bare-no-such-user"),
    ("550 Requested action not taken: mailbox unavailable", "ADDRESS", "bare-mailbox-unavailable"),
    ("550 5.1.0 <a@x.test>: Recipient address rejected: User unknown", "ADDRESS",
     "generic-5.1.0-user-unknown"),
    ("550 mailbox unavailable (blocked by policy)", None, "bare-mailbox-unavailable-policy"),
    ("550 Relaying denied", None, "bare-relay-denied"),
    ("550 Service unavailable", None, "bare-other"),
    ("554 No such user", None, "bare-554-not-550"),
]


@pytest.mark.parametrize(("line", "scope"), [(line, scope) for line, scope, _ in CASES],
                         ids=[case_id for *_, case_id in CASES])
def test_suppression_scope(line: str, scope: str | None) -> None:
    assert suppression_scope(reply(line)) == scope


def test_delivered_never_suppresses() -> None:
    assert suppression_scope(reply("250 2.0.0 OK", delivered=True)) is None


async def test_from_a_real_reply(smtp_sink: SmtpSink) -> None:
    smtp_sink.rcpt_replies = {"gone@x.test": "550 5.1.1 <gone@x.test>: No such user",
                              "full@x.test": "452 4.2.2 Mailbox full"}
    result = await SmtpTransport("client.test", port=smtp_sink.port, timeout=5).deliver(
        ["127.0.0.1"], "a@sender.test", ["gone@x.test", "full@x.test", "ok@x.test"],
        b"Subject: x\r\n\r\nhi\r\n")
    assert [suppression_scope(r) for r in result.recipients] == ["ADDRESS", None, None]
