"""SMTP reply text for the inbound server: RFC 3463 enhanced status codes on every reply
(RFC 2034), including the replies aiosmtpd 1.4.6 writes itself, and InboxError -> reply.

The greeting, the EHLO/HELO response lines and 354 carry no enhanced code (RFC 2034 §3); every
other reply does. Pure functions; no I/O.
"""

from __future__ import annotations

import re

from inbox.errors import InboxError

_ENHANCED = re.compile(r"^[2-5]\d\d[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Replies aiosmtpd 1.4.6 writes itself (in its command loop and STARTTLS), exact text -> ours.
AIOSMTPD_REPLIES: dict[str, str] = {
    "500 Error: bad syntax": "500 5.5.2 Error: bad syntax",
    # RFC 5321 §4.5.3.1.4: a command line is at most 512 octets.
    "500 Command line too long": "500 5.5.2 Error: command line too long",
    "500 Error: strict ASCII mode": "500 5.6.7 Error: non-ASCII command",
    "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",
    "454 TLS not available": "454 4.7.0 TLS not available",
    "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
    "554 Command refused due to lack of security":
        "554 5.7.0 Command refused due to lack of security",
}
# aiosmtpd reply prefixes whose text varies.
AIOSMTPD_PREFIXES: list[tuple[str, str]] = [
    ('500 Error: command "', "5.5.1"),  # unknown command (RFC 3463 X.5.1 invalid command)
    ("500 Error: (", "5.3.0"),  # its own exception text; we never let it through, see below
]
# Fallback by basic code (RFC 5321 §4.2.3 meaning -> closest RFC 3463 detail).
BY_BASIC_CODE: dict[int, str] = {
    211: "2.0.0", 214: "2.0.0", 220: "2.0.0", 221: "2.0.0", 250: "2.0.0", 251: "2.1.5",
    252: "2.5.0", 421: "4.3.0", 450: "4.2.0", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0",
    455: "4.5.4", 500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4",
    530: "5.7.0", 550: "5.0.0", 551: "5.1.6", 552: "5.3.4", 553: "5.1.3", 554: "5.0.0",
    555: "5.5.4",
}

INTERNAL_ERROR = "451 4.3.0 Internal error, please try again later"
# Replies without an enhanced code (RFC 2034 §3): the 354 go-ahead and AUTH's 334. The greeting
# and the EHLO/HELO lines are written without passing through `enhance` at all.
EXEMPT_PREFIXES = ("354 ", "334 ")


def enhance(reply: str) -> str:
    """`reply` with an enhanced status code after the basic one (unchanged if it has one)."""
    if _ENHANCED.match(reply):
        return reply
    if reply in AIOSMTPD_REPLIES:
        return AIOSMTPD_REPLIES[reply]
    for prefix, detail in AIOSMTPD_PREFIXES:
        if reply.startswith(prefix):
            if detail == "5.3.0":
                return INTERNAL_ERROR
            return f"{reply[:4]}{detail} {reply[4:]}"
    code = reply[:3]
    if not code.isdigit():
        return INTERNAL_ERROR
    detail = BY_BASIC_CODE.get(int(code), f"{code[0]}.0.0")
    sep, text = reply[3:4] or " ", reply[4:]
    return f"{code}{sep}{detail} {text}".rstrip()


def clean_text(text: str, limit: int = 300) -> str:
    """Reply text that cannot break the reply framing: no control characters, bounded."""
    return _CONTROL.sub(" ", text)[:limit]


def error_reply(error: InboxError, *, temporary_code: int = 451,
                permanent_code: int = 550) -> str:
    """The reply for an InboxError with the basic code chosen by the caller (421/554 when
    refusing a connection, 451/550 otherwise); the enhanced code's class follows it."""
    basic, enhanced, text = (error.smtp_reply().split(" ", 2) + ["", ""])[:3]
    code = temporary_code if error.temporary else permanent_code
    enhanced = f"{str(code)[0]}{enhanced[1:]}" if enhanced[1:2] == "." else f"{str(code)[0]}.0.0"
    return f"{code} {enhanced} {clean_text(text or error.code)}"
