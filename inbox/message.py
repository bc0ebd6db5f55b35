"""Outbound message model: validation of submitted fields and RFC 5322/2045 MIME building.

Does no I/O. Addresses are parsed in `inbox.addresses`; top-level header fields are encoded
and folded in `inbox.headers` (RFC 2047 encoded-words, folding at 78) and handed to the `email`
package pre-folded; the body parts come from `inbox.mimeparts` (built with `email`). Text/html
messages are written directly by `inbox.mimefast`, to the same bytes.
"""

from __future__ import annotations

import email.errors
import email.header
import email.policy
import email.utils
import functools
import mimetypes
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage

import idna

from inbox.addresses import SURROGATES as _SURROGATES
from inbox.addresses import Address, parse_address
from inbox.addresses import check_text as _check_text
from inbox.errors import MessageTooLarge, ValidationError
from inbox.headers import FOLD_AT as FOLD_AT  # re-exported
from inbox.headers import Prefolded, address_list, fold, unstructured
from inbox.mimefast import fast_mime
from inbox.mimeparts import PARAM as _PARAM
from inbox.mimeparts import mime_body

MAX_MESSAGE_BYTES = 25 * 1024 * 1024
MAX_ATTACHMENT_BYTES = 18 * 1024 * 1024
MAX_LINE = 998  # RFC 5322 §2.1.1: at most 998 octets per line, excluding CRLF
STRUCTURAL_HEADERS = frozenset({
    "from", "to", "cc", "bcc", "date", "message-id", "mime-version", "content-type",
    "content-transfer-encoding", "dkim-signature", "received", "return-path",
    "subject", "reply-to",  # have their own fields
})

_HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}")  # RFC 5322 §3.6.8 ftext
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # RFC 2045 §5.1 token
_CONTENT_TYPE = re.compile(rf"({_TOKEN})/({_TOKEN})((?:\s*;\s*{_TOKEN}=(?:{_TOKEN}|\"[^\"\\]*\"))*)"
                           r"\s*;?")
_CONTENT_ID = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.@]{1,200}")
_MESSAGE_ID = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]{1,250}@[A-Za-z0-9.-]{1,253}>")


@dataclass
class Attachment:
    filename: str
    content: bytes
    content_type: str | None = None
    content_id: str | None = None  # set: an inline part the HTML refers to as cid:<content_id>


@dataclass
class OutboundMessage:
    from_: str
    to: list[str] = field(default_factory=list)
    cc: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)
    reply_to: list[str] = field(default_factory=list)
    subject: str = ""
    text_body: str | None = None
    html_body: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    attachments: list[Attachment] = field(default_factory=list)


@dataclass(frozen=True)
class ValidatedMessage:
    from_: Address
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    bcc: tuple[Address, ...]
    reply_to: tuple[Address, ...]
    subject: str
    text_body: str | None
    html_body: str | None
    headers: tuple[tuple[str, str], ...]
    attachments: tuple[Attachment, ...]  # content_type resolved, content_id without <>
    envelope_recipients: tuple[Address, ...]  # to + cc + bcc, deduplicated
    smtputf8: bool

    @property
    def from_header(self) -> str:
        return self.from_.formatted


# --- validation --------------------------------------------------------------------------------

def _content_type(value: str | None, filename: str, path: list[str]) -> str:
    if not value:
        guessed = mimetypes.guess_type(filename, strict=False)[0] or "application/octet-stream"
        return "application/octet-stream" if guessed.startswith(("message/", "multipart/")) \
            else guessed
    _check_text(value, path, "contentType")
    m = _CONTENT_TYPE.fullmatch(value.strip())
    if m is None:
        raise ValidationError("contentType must look like type/subtype[; name=value]", field=path)
    if m[1].lower() in ("multipart", "message"):  # RFC 2046 §5: these cannot be base64
        raise ValidationError(f"{m[1]}/* attachments are not supported", field=path)
    params = "".join(f"; {k.lower()}={v}" for k, v in _PARAM.findall(m[3]))
    return f"{m[1].lower()}/{m[2].lower()}{params}"


def _attachment(att: Attachment, i: int, max_bytes: int) -> Attachment:
    path = ["attachments", str(i)]
    if not isinstance(att.content, bytes | bytearray | memoryview):
        raise ValidationError("attachment content must be bytes", field=[*path, "content"])
    content = bytes(att.content)
    if len(content) > max_bytes:
        raise MessageTooLarge(f"attachment is {len(content)} bytes; the limit is {max_bytes}",
                              field=path)
    filename = _check_text(att.filename, [*path, "filename"], "filename").strip()
    if not filename or len(filename) > 255:
        raise ValidationError("filename must be 1-255 characters", field=[*path, "filename"])
    content_type = _content_type(att.content_type, filename, [*path, "contentType"])
    cid = None
    if att.content_id:
        cid = _check_text(att.content_id, [*path, "contentId"], "contentId").strip().strip("<>")
        if not _CONTENT_ID.fullmatch(cid):
            raise ValidationError("contentId may use letters, digits and !#$%&'*+-/=?^_`{|}~.@",
                                  field=[*path, "contentId"])
    return Attachment(filename, content, content_type, cid)


def _custom_headers(headers: dict[str, str]) -> tuple[tuple[str, str], ...]:
    out = []
    for name, value in (headers or {}).items():
        path = ["headers", str(name)]
        _check_text(name, path, "header name")
        if not _HEADER_NAME.fullmatch(name):
            raise ValidationError("header names are 1-76 printable ASCII characters without "
                                  "spaces or ':'", field=path)
        if name.lower() in STRUCTURAL_HEADERS:
            raise ValidationError(f"{name} is set by inbox and cannot be given as a header",
                                  field=path)
        value = _check_text(value, path, f"header {name}").strip(" \t")
        if value.isascii() and any(len(name) + 2 + len(w) > MAX_LINE for w in value.split()):
            raise ValidationError(f"header {name} has a word too long for one line", field=path)
        out.append((name, value))
    return tuple(out)


def _b64_size(n: int) -> int:
    return -(-n // 57) * 78  # 57 bytes -> 76 base64 characters + CRLF per line


def validate(msg: OutboundMessage, *, max_bytes: int = MAX_MESSAGE_BYTES,
             max_attachment_bytes: int = MAX_ATTACHMENT_BYTES) -> ValidatedMessage:
    """Check and normalize a submitted message; typed errors name the offending field."""
    sender = parse_address(msg.from_, ["from"])
    lists = {}
    for attr, name in (("to", "to"), ("cc", "cc"), ("bcc", "bcc"), ("reply_to", "replyTo")):
        values = getattr(msg, attr) or []
        if isinstance(values, str):
            raise ValidationError(f"{name} must be a list of addresses", field=[name])
        lists[attr] = tuple(parse_address(v, [name, str(i)]) for i, v in enumerate(values))
    if not (lists["to"] or lists["cc"] or lists["bcc"]):
        raise ValidationError("at least one recipient (to, cc or bcc) is needed", field=["to"])
    subject = _check_text(msg.subject or "", ["subject"], "subject").strip(" \t")
    bodies = {}
    for attr, name in (("text_body", "textBody"), ("html_body", "htmlBody")):
        value = getattr(msg, attr)
        if value is not None and (not isinstance(value, str) or _SURROGATES.search(value)):
            raise ValidationError(f"{name} must be valid Unicode text", field=[name])
        bodies[attr] = value or None
    attachments = tuple(_attachment(a, i, max_attachment_bytes)
                        for i, a in enumerate(msg.attachments or []))
    if not (bodies["text_body"] or bodies["html_body"] or attachments):
        raise ValidationError("a message needs textBody, htmlBody or an attachment",
                              field=["textBody"])
    headers = _custom_headers(msg.headers)
    # A lower bound of the built size: refuse early instead of encoding megabytes for nothing.
    floor = sum(_b64_size(len(a.content)) for a in attachments) + sum(
        len(b.encode()) for b in bodies.values() if b)
    if floor > max_bytes:
        raise MessageTooLarge(f"message would be over {max_bytes} bytes", field=["message"])
    seen, envelope = set(), []
    for addr in (*lists["to"], *lists["cc"], *lists["bcc"]):
        if (addr.local, addr.ascii_domain) not in seen:  # domains are case-insensitive
            seen.add((addr.local, addr.ascii_domain))
            envelope.append(addr)
    everyone = (sender, *lists["to"], *lists["cc"], *lists["bcc"], *lists["reply_to"])
    return ValidatedMessage(
        from_=sender, to=lists["to"], cc=lists["cc"], bcc=lists["bcc"],
        reply_to=lists["reply_to"], subject=subject, text_body=bodies["text_body"],
        html_body=bodies["html_body"], headers=headers, attachments=attachments,
        envelope_recipients=tuple(envelope), smtputf8=any(a.smtputf8 for a in everyone))


# --- MIME --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _a_label(domain: str) -> str:
    """The Message-ID domain in A-label form; IDNA costs more than the rest of a message."""
    return idna.encode(domain.strip().rstrip("."), uts46=True).decode("ascii")


def build_mime(validated: ValidatedMessage, message_id_domain: str, now: datetime,
               message_id: str | None = None, *,
               max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[bytes, str]:
    """(raw message with CRLF line endings, Message-ID value `<...@domain>`). Bcc is left out.
    Text/html messages take `inbox.mimefast` (same bytes, a fraction of the cost), the rest
    `email_package_mime`."""
    v = validated
    if message_id is None:
        # RFC 5322 §3.6.4: unique
        message_id = f"<{secrets.token_hex(16)}@{_a_label(message_id_domain)}>"
    elif not _MESSAGE_ID.fullmatch(message_id):
        raise ValidationError("message id must look like <local@domain>", field=["messageId"])
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    raw = fast_mime(v, message_id, now)
    if raw is None:
        raw = email_package_mime(v, message_id, now)
    if len(raw) > max_bytes:
        raise MessageTooLarge(f"message is {len(raw)} bytes; the limit is {max_bytes}",
                              field=["message"])
    return raw, message_id


def email_package_mime(v: ValidatedMessage, message_id: str, now: datetime) -> bytes:
    """The message built with the `email` package: every case, at its cost (`now` aware)."""
    policy = email.policy.SMTPUTF8 if v.smtputf8 else email.policy.SMTP
    msg = EmailMessage(policy=policy)
    msg["From"] = address_list("From", [v.from_])
    for name, addrs in (("Reply-To", v.reply_to), ("To", v.to), ("Cc", v.cc)):
        if addrs:
            msg[name] = address_list(name, addrs)
    msg["Subject"] = unstructured("Subject", v.subject)
    msg["Date"] = Prefolded("Date", [f"Date: {email.utils.format_datetime(now)}"])
    msg["Message-ID"] = Prefolded("Message-ID", [f"Message-ID: {message_id}"])
    msg["MIME-Version"] = Prefolded("MIME-Version", ["MIME-Version: 1.0"])
    for name, value in v.headers:
        msg[name] = (fold(name, re.findall(r"[ \t]*[^ \t]+", value) or [""])
                     if value.isascii() else unstructured(name, value))
    root = mime_body(v, policy)
    for name, value in root.items():
        msg[name] = value
    msg.set_payload(root.get_payload())
    return msg.as_bytes(policy=policy)


# --- a message built by the client (SMTP submission) --------------------------------------------

# RFC 5322 §3.6: fields that may appear at most once.
_ONCE = ("from", "sender", "to", "cc", "bcc", "subject", "message-id", "date", "reply-to",
         "idempotency-key")
# Not passed on: Bcc (RFC 5322 §3.6.3: recipients come from the envelope) and our own
# submission option.
DROPPED_HEADERS = frozenset({b"bcc", b"idempotency-key"})
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")


@dataclass
class EnvelopeRecipient:
    address: str  # RCPT TO mailbox
    notify: str | None = None  # RFC 3461 §4.1 NOTIFY, as given
    orcpt: str | None = None  # RFC 3461 §4.2 ORCPT, as given (addr-type;xtext)


@dataclass
class RawMessage:
    """A MIME message as the client sent it (SMTP submission): delivered as is (plus
    Message-ID/Date when missing, minus Bcc) to the envelope recipients."""

    data: bytes  # CRLF line endings, dot-unstuffed
    mail_from: str
    rcpt_to: list[EnvelopeRecipient]
    smtputf8: bool = False
    dsn_ret: str | None = None  # RFC 3461 §4.3 RET (FULL/HDRS)
    dsn_envid: str | None = None  # RFC 3461 §4.4 ENVID, as given (xtext)
    trace: bytes = b""  # our Received field, put in front (not part of the idempotency hash)


@dataclass(frozen=True)
class PreparedRaw:
    from_: Address  # the header From mailbox
    envelope_from: Address
    to: tuple[str, ...]  # for display: addr-specs named in To/Cc
    cc: tuple[str, ...]
    subject: str
    envelope_recipients: tuple[Address, ...]  # deduplicated, in order
    rcpt_params: dict[str, EnvelopeRecipient]  # by addr_spec
    smtputf8: bool
    data: bytes  # what will be sent
    message_id: str
    header_fields: dict[str, str]  # unfolded values of the single-instance fields we read

    @property
    def from_header(self) -> str:
        return self.from_.formatted


def _header_fields(data: bytes) -> tuple[list[bytes], bytes]:
    """(header fields each with its CRLFs, body with the blank line) of a CRLF message."""
    end = data.find(b"\r\n\r\n")
    head, body = (data, b"") if end < 0 else (data[:end + 2], data[end + 2:])
    fields: list[bytes] = []
    for line in head.split(b"\r\n")[:-1] if head.endswith(b"\r\n") else head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\r\n"  # RFC 5322 §2.2.3: a folded continuation
        elif b":" in line and _FIELD_NAME.fullmatch(line.split(b":", 1)[0].rstrip(b" \t")):
            fields.append(line + b"\r\n")
        else:
            raise ValidationError("the message does not start with a header section "
                                  "(RFC 5322 2.2)", field=["message"])
    return fields, body


def _decoded(value: str) -> str:
    """An unstructured value with RFC 2047 encoded-words decoded (left as is if broken)."""
    if "=?" not in value:
        return value
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        return value


def _mailboxes(value: str) -> list[str]:
    return [addr for _, addr in email.utils.getaddresses([value]) if "@" in addr]


def prepare_raw(msg: RawMessage, *, now: datetime, max_bytes: int = MAX_MESSAGE_BYTES,
                message_id_domain: str | None = None) -> PreparedRaw:
    """Check a client-built message: one From mailbox, single-instance fields at most once,
    a valid envelope; add Date and Message-ID when missing, drop Bcc. Typed errors."""
    fields, body = _header_fields(msg.data)
    values: dict[str, str] = {}
    kept: list[bytes] = []
    for raw_field in fields:
        name_bytes, _, value_bytes = raw_field.partition(b":")
        name = name_bytes.rstrip(b" \t").decode("ascii").lower()
        value = re.sub(r"\r\n(?=[ \t])", "", value_bytes.decode("utf-8", "surrogateescape")
                       ).strip()
        if name in _ONCE:
            if name in values:
                raise ValidationError(f"the {name} header field appears twice (RFC 5322 3.6)",
                                      field=["headers", name])
            values[name] = value
        if name.encode() not in DROPPED_HEADERS:
            kept.append(raw_field)
    if "from" not in values:
        raise ValidationError("the message has no From header field", field=["from"])
    senders = email.utils.getaddresses([values["from"]])
    if len(senders) != 1 or "@" not in senders[0][1]:
        raise ValidationError("From must name exactly one mailbox", field=["from"])
    sender = parse_address(senders[0][1], ["from"])
    sender = Address(_check_text(_decoded(senders[0][0]), ["from"], "display name"),
                     sender.local, sender.domain, sender.ascii_domain)
    envelope_from = parse_address(msg.mail_from, ["mailFrom"])
    seen: dict[str, EnvelopeRecipient] = {}
    recipients: list[Address] = []
    lowered: set[str] = set()
    for i, rcpt in enumerate(msg.rcpt_to):
        addr = parse_address(rcpt.address, ["rcptTo", str(i)])
        if addr.addr_spec.lower() not in lowered:
            lowered.add(addr.addr_spec.lower())
            recipients.append(addr)
            seen[addr.addr_spec] = rcpt
    if not recipients:
        raise ValidationError("at least one recipient is needed", field=["rcptTo"])
    added = b""
    if "date" not in values:  # RFC 5322 §3.6: Date is required
        added += f"Date: {email.utils.format_datetime(now)}\r\n".encode()
    message_id = values.get("message-id", "")
    if not message_id:  # RFC 5322 §3.6.4: SHOULD be present; RFC 6409 §8.3: the MSA adds it
        domain = message_id_domain or sender.ascii_domain
        message_id = f"<{secrets.token_hex(16)}@{domain}>"
        added += f"Message-ID: {message_id}\r\n".encode()
    data = msg.trace + added + b"".join(kept) + body
    if len(data) > max_bytes:
        raise MessageTooLarge(f"message is {len(data)} bytes; the limit is {max_bytes}",
                              field=["message"])
    smtputf8 = msg.smtputf8 or any(a.smtputf8 for a in (sender, envelope_from, *recipients))
    return PreparedRaw(
        from_=sender, envelope_from=envelope_from,
        to=tuple(_mailboxes(values.get("to", ""))), cc=tuple(_mailboxes(values.get("cc", ""))),
        subject=_decoded(values.get("subject", ""))[:1000],
        envelope_recipients=tuple(recipients), rcpt_params=seen, smtputf8=smtputf8, data=data,
        message_id=message_id[:1000], header_fields=values)
