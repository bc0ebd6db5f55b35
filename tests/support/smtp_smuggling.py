"""SMTP smuggling payloads for the inbound server's tests (SEC Consult, "SMTP Smuggling",
December 2023; Postfix smtpd_forbid_bare_newline). Each separator is sent between the body of
a first message and a smuggled "MAIL FROM ... DATA ..." block, and the whole is closed with
the real <CRLF>.<CRLF>. Only the real end-of-data sequence may end a message."""

from __future__ import annotations

from dataclasses import dataclass

FIRST = b"From: alice@sender.test\r\nSubject: first\r\n\r\nbody"
SMUGGLED = (b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@inbox.test>\r\nDATA\r\n"
            b"From: ceo@sender.test\r\nSubject: smuggled\r\n\r\nowned\r\n")
END = b".\r\n"


@dataclass(frozen=True)
class Smuggle:
    id: str
    separator: bytes  # what the client sends after FIRST
    stored: bytes  # what the stored message has in its place (CRLF-normalised, unstuffed)
    messages: int = 1  # how many messages the server must accept


PAYLOADS: list[Smuggle] = [
    Smuggle("lf.lf", b"\n.\n", b"\r\n.\r\n"),
    Smuggle("cr.cr", b"\r.\r", b"\r\n.\r\n"),
    Smuggle("lf.crlf", b"\n.\r\n", b"\r\n.\r\n"),
    Smuggle("crlf.lf", b"\r\n.\n", b"\r\n\r\n"),  # the dot starts a line as sent: unstuffed
    Smuggle("crlf.cr", b"\r\n.\r", b"\r\n\r\n"),
    Smuggle("cr.lf", b"\r.\n", b"\r\n.\r\n"),
    Smuggle("cr.crlf", b"\r.\r\n", b"\r\n.\r\n"),
    Smuggle("lf.cr", b"\n.\r", b"\r\n.\r\n"),
    Smuggle("crlf.cr.crlf", b"\r\n.\r\r\n", b"\r\n\r\n\r\n"),
    Smuggle("crlf.nul.crlf", b"\r\n.\x00\r\n", b"\r\n\x00\r\n"),
    Smuggle("crlf.space.crlf", b"\r\n. \r\n", b"\r\n \r\n"),
    Smuggle("crlf.dotdot.crlf", b"\r\n..\r\n", b"\r\n.\r\n"),  # a stuffed dot: content "."
    Smuggle("lf.lf.lf", b"\n\n.\n\n", b"\r\n\r\n.\r\n\r\n"),
    # The control row: the real end. The block after it is a second, pipelined transaction,
    # which shows the harness would notice a smuggled message.
    Smuggle("crlf.crlf(real end)", b"\r\n.\r\n", b"", messages=2),
]


def payload(case: Smuggle) -> bytes:
    """The bytes sent after the 354 reply."""
    return FIRST + case.separator + SMUGGLED + END
