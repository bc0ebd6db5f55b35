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


_END = b"\r\n.\r\n"  # RFC 5321 §4.1.1.4: the end of the mail data, with the previous line's CRLF


async def read_message(reader: asyncio.StreamReader, max_bytes: int,
                       activity: Callable[[], None] = lambda: None) -> tuple[bytes, str | None]:
    """Read DATA content up to and including the final <CRLF>.<CRLF>; return (message, None),
    or (b"", reply) when it broke a limit. The whole input is always consumed to the end
    marker, and nothing after it (pipelined commands stay in the reader), so the session
    stays in step after a refusal (RFC 5321 §4.2.5). Memory stays bounded by `max_bytes` plus
    what the reader had buffered. The reader's limit must be at least 999 octets (aiosmtpd
    uses 1001): a line is refused for being over 998 octets after unstuffing, which covers
    every line longer than the limit.

    Most of the message is read with one `readuntil(b"\\r\\n.\\r\\n")` and checked with bytes
    operations; a line that starts with a dot or after a CR we already read (where that
    search could miss an end line whose CRLF was consumed) is read on its own.

    `activity` (the caller's idle timer) is called after each read but the one octet at the
    start of a line: not per line, but at least once per reader's limit (+5) octets received.
    Raises asyncio.IncompleteReadError when the peer closes before the end marker."""
    body = _Body(max_bytes)
    line = b""  # the start of the current line (when `long`, only its last octet)
    long = False  # the current line is already too long, whatever follows
    ended = False
    while not ended:
        if not line:  # at the start of a line: one octet says whether it may be the end
            line = await reader.readexactly(1)
            continue
        # The search for <CRLF>.<CRLF> only sees CRLFs not yet read: it is safe unless this
        # line may be the "." line, or ends in a CR whose LF may come next.
        sep = b"\r\n" if line[-1:] == b"\r" or (line == b"." and not long) else _END
        try:
            data = await reader.readuntil(sep)
        except asyncio.LimitOverrunError as exc:
            # Nothing was consumed; what is buffered holds no separator up to `consumed` (and
            # so no end line), so take that much and look again.
            data = await reader.readexactly(exc.consumed)
        activity()
        line, long, ended = _feed(body, line, long, data)
    if body.bare:
        log.info("DATA: normalised bare CR/LF in %d line(s)", body.bare)
    return (b"", body.problem) if body.problem else (bytes(body.out), None)


def _feed(body: _Body, line: bytes, long: bool, data: bytes) -> tuple[bytes, bool, bool]:
    """Add `data` to the current `line`: hand the complete lines to `body`, stop at the end
    line. Returns (the new current line, whether it is too long, whether the message ended)."""
    blob = line + data
    if long:
        i = blob.find(b"\r\n")
        if i < 0:
            return blob[-1:], True, False
        body.line(None)
        blob = blob[i + 2:]
    cut = blob.rfind(b"\r\n") + 2  # complete lines end there (0: none)
    complete = blob[:cut] if cut > 1 else b""
    if complete[:3] == b".\r\n":  # the first line is ".": the CRLF before it is read
        body.lines(b"")
        return b"", False, True
    end = complete.find(_END)
    if end >= 0:
        body.lines(complete[:end + 2])
        return b"", False, True
    body.lines(complete)
    rest = blob[len(complete):]
    if len(rest) > MAX_LINE_OCTETS + 1:  # over 998 octets even after unstuffing a dot
        return rest[-1:], True, False
    return rest, False, False


_WINDOW = (MAX_LINE_OCTETS + 2) // 2  # 500: a run of 999 octets covers an aligned window


def _lines_fit(blob: bytes) -> bool:
    """Whether no line of CRLF-terminated `blob` (without bare CR/LF) is over 998 octets.
    A line of 999 or more covers a whole aligned 500-octet window with no LF in it, so when
    every window has one there is no need to split the lines."""
    if len(blob) <= MAX_LINE_OCTETS + 2:
        return True
    find = blob.find
    if all(find(b"\n", start, start + _WINDOW) >= 0
           for start in range(0, len(blob) - _WINDOW + 1, _WINDOW)):
        return True
    return max(map(len, blob.split(b"\r\n"))) <= MAX_LINE_OCTETS


class _Body:
    """The message so far: unstuffed, CRLF-normalised lines, and the first problem."""

    __slots__ = ("bare", "max_bytes", "out", "problem")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.out = bytearray()
        self.problem: str | None = None
        self.bare = 0

    def lines(self, blob: bytes) -> None:
        """Complete CRLF-terminated lines, none of them the end line. At C speed when there
        is no bare CR/LF and no line over 998 octets; line by line otherwise."""
        if self.problem or not blob:
            return
        crlf = blob.count(b"\r\n")
        if blob.count(b"\r") == crlf and blob.count(b"\n") == crlf and _lines_fit(blob):
            # RFC 5321 §4.5.2 transparency: drop a dot at the start of each line
            text = blob.replace(b"\r\n.", b"\r\n")
            if text[:1] == b".":
                text = text[1:]
            if len(self.out) + len(text) > self.max_bytes:
                self.problem = too_big(self.max_bytes)
                self.out.clear()
            else:
                self.out += text
            return
        for content in blob.split(b"\r\n")[:-1]:
            self.line(content)

    def line(self, content: bytes | None) -> None:
        """One line without its CRLF; None for a line known to be too long."""
        if self.problem:
            return
        if content is None:
            self.problem = LINE_TOO_LONG
            self.out.clear()
            return
        if content[:1] == b".":  # RFC 5321 §4.5.2 transparency
            content = content[1:]
        if len(content) > MAX_LINE_OCTETS:
            self.problem = LINE_TOO_LONG
            self.out.clear()
            return
        if b"\r" in content or b"\n" in content:
            content = _BARE_EOL.sub(b"\r\n", content)
            self.bare += 1
        if len(self.out) + len(content) + 2 > self.max_bytes:
            self.problem = too_big(self.max_bytes)
            self.out.clear()
            return
        self.out += content
        self.out += b"\r\n"


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
