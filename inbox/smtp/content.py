"""The DATA phase of the inbound SMTP server: reading one message after the 354 up to
<CRLF>.<CRLF>, with transparency, line-length and size limits and bare CR/LF normalisation;
the Received trace field we put in front of it.
Does not parse the message (headers, MIME) and does not decide anything about it.

Why this is strict about the end and lenient about the rest (SMTP smuggling, SEC Consult,
December 2023): a message ends only at <CRLF>.<CRLF> (RFC 5321 §4.1.1.4). Lines are split at
CRLF exactly as sent, so <LF>.<LF>, <CR>.<CR>, <LF>.<CR><LF>, <CR><LF>.<LF>, <CR><LF>.<CR> and
similar sequences are just content and a command after them never becomes a second message.
Bare CR and bare LF are then NORMALISED to CRLF (Postfix 3.9's default
`smtpd_forbid_bare_newline = normalize` does the same for LF), so what we store has CRLF line
endings only and cannot be read differently by a later hop. Dot-unstuffing (RFC 5321 §4.5.2)
applies at the start of each CRLF-terminated line as sent: a dot after a bare CR/LF is content.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import logging
import re
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

MAX_LINE_OCTETS = 998  # RFC 5321 §4.5.3.1.6: 1000 octets including CRLF (and before stuffing)
_BARE_EOL = re.compile(rb"\r|\n")
_TRACE_UNSAFE = re.compile(r"[\s()\\\x00-\x1f\x7f\ud800-\udfff]")

LINE_TOO_LONG = "554 5.6.0 Message has a line longer than 998 octets (RFC 5321 4.5.3.1.6)"


def too_big(limit: int) -> str:
    return f"552 5.3.4 Message size exceeds fixed limit of {limit} bytes"


async def read_message(reader: asyncio.StreamReader, max_bytes: int,
                       activity: Callable[[], None] = lambda: None) -> tuple[bytes, str | None]:
    """Read DATA content up to and including the final <CRLF>.<CRLF>; return (message, None),
    or (b"", reply) when it broke a limit. The whole input is always consumed to the end
    marker, so the session stays in step after a refusal (RFC 5321 §4.2.5). Memory stays
    bounded by `max_bytes` plus one line (the reader's limit, at least 1001 octets).

    `activity` is called after each line (the caller's idle timer). Raises
    asyncio.IncompleteReadError when the peer closes before the end marker."""
    out = bytearray()
    problem: str | None = None
    overlong = False  # in the middle of a line longer than the reader's limit
    bare = 0
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as exc:
            # Drop what was buffered; the rest of the line follows. `consumed` keeps the last
            # byte back when no CRLF was found, so a CR split from its LF is not lost.
            await reader.readexactly(exc.consumed)
            overlong = True
            activity()
            continue
        activity()
        if overlong:  # the tail of an over-long line
            overlong = False
            problem = problem or LINE_TOO_LONG
            out.clear()
            continue
        if line == b".\r\n":  # the end: <CRLF>.<CRLF> with the previous line's CRLF
            break
        if problem:
            continue
        body = line[:-2]
        if body[:1] == b".":  # RFC 5321 §4.5.2 transparency
            body = body[1:]
        if len(body) > MAX_LINE_OCTETS:
            problem = LINE_TOO_LONG
            out.clear()
            continue
        if b"\r" in body or b"\n" in body:
            body = _BARE_EOL.sub(b"\r\n", body)
            bare += 1
        if len(out) + len(body) + 2 > max_bytes:
            problem = too_big(max_bytes)
            out.clear()
            continue
        out += body
        out += b"\r\n"
    if bare:
        log.info("DATA: normalised bare CR/LF in %d line(s)", bare)
    return (b"", problem) if problem else (bytes(out), None)


def received_header(*, helo: str, peer_ip: str, hostname: str, esmtp: bool, tls: bool,
                    smtputf8: bool, trace_id: str, recipients: Sequence[str],
                    when: datetime.datetime, authenticated: bool = False) -> bytes:
    """The Received trace field we prepend (RFC 5321 §4.4), folded, ending in CRLF. The
    protocol name follows RFC 3848 (SMTP/ESMTP/ESMTPS, ESMTPA/ESMTPSA after AUTH) and
    RFC 6531 §3.7.3 (UTF8SMTP[S][A]); "for" names the recipient only when there is exactly
    one (others stay private)."""
    if smtputf8:
        protocol = "UTF8SMTPS" if tls else "UTF8SMTP"
    elif tls:
        protocol = "ESMTPS"
    else:
        protocol = "ESMTP" if esmtp else "SMTP"
    if authenticated:
        protocol = protocol + "A" if protocol != "SMTP" else "ESMTPA"
    literal = f"IPv6:{peer_ip}" if ":" in peer_ip else peer_ip  # RFC 5321 §4.1.3
    helo_word = _TRACE_UNSAFE.sub("_", helo)[:255] or "unknown"
    text = f"Received: from {helo_word} ([{literal}])\r\n\tby {hostname} with {protocol}" \
           f" id {trace_id}"
    if len(recipients) == 1:
        text += f"\r\n\tfor <{_TRACE_UNSAFE.sub('_', recipients[0])}>"
    text += f";\r\n\t{email.utils.format_datetime(when)}\r\n"
    return text.encode("utf-8", "replace")
