"""Reading an inbound message: structural checks, index metadata, bodies, attachments and parts.

`parse_inbound(raw)` refuses what is not a message (RFC 5322 §2.1/§3.6: a header section with
a From field; RFC 5321 §4.1.4 / RFC 2045 §2.7: no NUL octets; RFC 2046 §5.1: a multipart needs
a boundary that actually opens its parts) with `MalformedMessage`, and otherwise returns what
the index and the blob store need. It never decides where anything is stored.
"""

from __future__ import annotations

import email
import email.errors
import email.header
import email.policy
import email.utils
import re
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

from inbox.errors import ValidationError

SNIPPET_CHARS = 200
_HEADER_LINE = re.compile(rb"^[!-9;-~]+:")  # RFC 5322 §2.2: printable, no colon, then ':'
_FATAL_DEFECTS = (
    email.errors.NoBoundaryInMultipartDefect,
    email.errors.StartBoundaryNotFoundDefect,
    email.errors.MultipartInvariantViolationDefect,
)


class MalformedMessage(ValidationError):
    code = "MALFORMED_MESSAGE"
    smtp_enhanced = "5.6.0"


@dataclass
class Attachment:
    part_id: str  # "a1", "a2", … in document order
    mime_path: str
    filename: str
    content_type: str
    size: int
    data: bytes = field(repr=False)
    content_id: str = ""
    inline: bool = False


@dataclass
class ParsedMessage:
    subject: str = ""
    from_address: str = ""
    from_name: str = ""
    to: list[str] = field(default_factory=list)
    cc: list[str] = field(default_factory=list)
    date: str = ""
    message_id: str = ""
    in_reply_to: str = ""
    references: list[str] = field(default_factory=list)
    text: str = ""
    html: str = ""
    snippet: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    parts: list[tuple[str, str, bytes]] = field(default_factory=list)  # (path, type, payload)


def _ids(value: str) -> list[str]:
    return re.findall(r"<[^<>\s]+>", value or "")


def _decode(value: object) -> str:
    """A header value with RFC 2047 encoded-words decoded; undecodable bytes replaced."""
    text = str(value)
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (LookupError, ValueError, email.errors.HeaderParseError):
        return text


def _header(msg: Message, name: str) -> str:
    value = msg.get(name)
    return _decode(value) if value is not None else ""


def _addresses(msg: Message, name: str) -> list[tuple[str, str]]:
    values = [str(v) for v in msg.get_all(name, failobj=[])]
    return [(_decode(n), a) for n, a in email.utils.getaddresses(values) if a]


def _text_of(part: Message) -> str:
    payload = part.get_payload(decode=True) or b""
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, "replace")
    except LookupError:  # an unknown charset name
        return payload.decode("utf-8", "replace")


def _snippet(text: str, html: str) -> str:
    source = text or re.sub(r"<[^>]*>", " ", html)
    return " ".join(source.split())[:SNIPPET_CHARS]


def check_structure(raw: bytes) -> Message:
    """Parse and refuse what is not a message; MalformedMessage says why."""
    if b"\0" in raw:
        raise MalformedMessage("message contains NUL octets")
    first = raw.split(b"\n", 1)[0]
    if not _HEADER_LINE.match(first):
        raise MalformedMessage("message has no header section (RFC 5322 §2.1)")
    # compat32: headers stay strings until asked for; the default policy's header objects
    # cost ~3x the whole parse (measured with py-spy on bench/inbound.py).
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    if not msg.get_all("From"):
        raise MalformedMessage("message has no From header (RFC 5322 §3.6)")
    for part in msg.walk():
        for defect in part.defects:
            if isinstance(defect, _FATAL_DEFECTS):
                raise MalformedMessage(f"malformed MIME structure: {type(defect).__name__}")
    return msg


def parse_inbound(raw: bytes, *, keep_parts: bool = False, checked: Message | None = None
                  ) -> ParsedMessage:
    """Everything the index needs. `checked` is the result of `check_structure(raw)` when the
    caller already has it (it is not parsed twice)."""
    msg = checked if checked is not None else check_structure(raw)
    out = ParsedMessage()
    out.subject = " ".join(_header(msg, "Subject").split())[:998]
    sender = _addresses(msg, "From")
    if sender:
        out.from_name, out.from_address = sender[0]
    out.to = [a for _n, a in _addresses(msg, "To")]
    out.cc = [a for _n, a in _addresses(msg, "Cc")]
    out.date = _header(msg, "Date")
    ids = _ids(_header(msg, "Message-ID"))
    out.message_id = ids[0] if ids else ""
    reply = _ids(_header(msg, "In-Reply-To"))
    out.in_reply_to = reply[0] if reply else ""
    out.references = _ids(_header(msg, "References"))[-50:]
    for name, value in msg.items():
        out.headers.append((name, _decode(value)))
    _walk(msg, "1", out, keep_parts)
    out.snippet = _snippet(out.text, out.html)
    return out


def _walk(part: Message, path: str, out: ParsedMessage, keep_parts: bool) -> None:
    if part.is_multipart():
        for index, child in enumerate(part.get_payload(), start=1):  # type: ignore[arg-type]
            _walk(child, f"{path}.{index}", out, keep_parts)
        return
    ctype = part.get_content_type()
    disposition = (part.get_content_disposition() or "").lower()
    filename = _decode(part.get_filename() or "")
    payload = part.get_payload(decode=True)
    data = payload if isinstance(payload, bytes) else b""
    if keep_parts:
        out.parts.append((path, ctype, data))
    is_body = disposition != "attachment" and not filename and ctype in ("text/plain",
                                                                        "text/html")
    if is_body and ctype == "text/plain" and not out.text:
        out.text = _text_of(part)
    elif is_body and ctype == "text/html" and not out.html:
        out.html = _text_of(part)
    elif not is_body:  # a second text body stays in the raw message only
        cid = _ids(str(part.get("Content-ID", "")))
        out.attachments.append(Attachment(
            part_id=f"a{len(out.attachments) + 1}", mime_path=path,
            filename=filename[:255], content_type=ctype, size=len(data), data=data,
            content_id=cid[0] if cid else "", inline=disposition == "inline"))


def summary(parsed: ParsedMessage) -> dict[str, Any]:
    """Index fields that are safe to keep for `standard` tenants."""
    return {
        "subject": parsed.subject, "from_address": parsed.from_address,
        "from_name": parsed.from_name, "to": parsed.to, "cc": parsed.cc, "date": parsed.date,
        "snippet": parsed.snippet,
    }
