"""Outbound message model: validation of submitted fields and RFC 5322/2045 MIME building.

Does no I/O. Top-level header fields are encoded and folded here (RFC 2047 encoded-words,
folding at 78) and handed to the `email` package pre-folded, so text that merely looks like an
encoded-word stays literal and no line can exceed 998 octets. The MIME tree is built by `email`.
"""

from __future__ import annotations

import base64
import email.errors
import email.header
import email.policy
import email.utils
import mimetypes
import re
import secrets
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage, MIMEPart

import idna

from inbox.errors import HeaderInjection, InvalidAddress, MessageTooLarge, ValidationError

MAX_MESSAGE_BYTES = 25 * 1024 * 1024
MAX_ATTACHMENT_BYTES = 18 * 1024 * 1024
MAX_LINE = 998  # RFC 5322 §2.1.1: at most 998 octets per line, excluding CRLF
FOLD_AT = 78  # RFC 5322 §2.1.1: lines SHOULD be at most 78 characters
STRUCTURAL_HEADERS = frozenset({
    "from", "to", "cc", "bcc", "date", "message-id", "mime-version", "content-type",
    "content-transfer-encoding", "dkim-signature", "received", "return-path",
    "subject", "reply-to",  # have their own fields
})

_ATEXT = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~")
_SPECIALS = frozenset('()<>[]:;@\\,."')
# Line breaks for anyone (str.splitlines treats \v \f \x1c-\x1e \x85 U+2028/9 as breaks too).
_BREAKS = re.compile(r"[\r\n\x00\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_SURROGATES = re.compile(r"[\ud800-\udfff]")
_HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}")  # RFC 5322 §3.6.8 ftext
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # RFC 2045 §5.1 token
_CONTENT_TYPE = re.compile(rf"({_TOKEN})/({_TOKEN})((?:\s*;\s*{_TOKEN}=(?:{_TOKEN}|\"[^\"\\]*\"))*)"
                           r"\s*;?")
_PARAM = re.compile(rf"({_TOKEN})=({_TOKEN}|\"[^\"\\]*\")")
_CONTENT_ID = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.@]{1,200}")
_MESSAGE_ID = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]{1,250}@[A-Za-z0-9.-]{1,253}>")
_Q_SAFE = frozenset(string.ascii_letters + string.digits + "!*+-/")  # RFC 2047 §5(3)


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
class Address:
    display_name: str
    local: str  # as written in an addr-spec: a dot-atom, or a quoted-string when it must be
    domain: str  # lowercase U-label form (bücher.example)
    ascii_domain: str  # A-label form (xn--bcher-kva.example): for DNS, SMTP and headers

    @property
    def addr_spec(self) -> str:
        return f"{self.local}@{self.ascii_domain}"

    @property
    def smtputf8(self) -> bool:
        """A UTF-8 local part can only travel with SMTPUTF8 (RFC 6531)."""
        return not self.local.isascii()

    @property
    def formatted(self) -> str:
        """For display and storage (Unicode, not encoded): `Name <addr-spec>`."""
        if not self.display_name:
            return self.addr_spec
        return f"{_quote_phrase(self.display_name)} <{self.addr_spec}>"


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


# --- addresses ---------------------------------------------------------------------------------

def _check_text(value: str, path: list[str], what: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be text", field=path)
    if _BREAKS.search(value):
        raise HeaderInjection(f"{what} contains a line break or NUL", field=path)
    if _CONTROLS.search(value):
        raise HeaderInjection(f"{what} contains a control character", field=path)
    if _SURROGATES.search(value):
        raise ValidationError(f"{what} is not valid Unicode", field=path)
    return value


def _utf8_char_ok(ch: str) -> bool:  # RFC 6532 §3.2 UTF8-non-ascii, minus spaces and controls
    return unicodedata.category(ch) not in ("Cc", "Cs", "Zs", "Zl", "Zp")


def _read_quoted(s: str, i: int, path: list[str]) -> tuple[int, str]:
    """s[i] is '"': (index after the closing quote, unescaped content). RFC 5322 §3.2.4."""
    out, j = [], i + 1
    while j < len(s):
        ch = s[j]
        if ch == "\\" and j + 1 < len(s):
            out.append(s[j + 1])
            j += 2
        elif ch == '"':
            return j + 1, "".join(out)
        else:
            out.append(ch)
            j += 1
    raise InvalidAddress("unterminated quoted string", field=path)


def _unexpected(ch: str, path: list[str]) -> InvalidAddress:
    if ch in ",;":
        return InvalidAddress("only one address is allowed here", field=path)
    if ch in " \t":
        return InvalidAddress("an address cannot contain spaces", field=path)
    return InvalidAddress(f"unexpected {ch!r} in the address", field=path)


def _split_display(s: str, path: list[str]) -> tuple[str, str]:
    """`Name <addr-spec>` or a bare addr-spec -> (display name, addr-spec)."""
    if not s.endswith(">") or "<" not in s:
        if "<" in s or ">" in s:
            raise InvalidAddress("angle brackets do not match", field=path)
        return "", s
    words, i = [], 0
    while i < len(s) and s[i] != "<":
        if s[i] in " \t":
            i += 1
        elif s[i] == '"':
            i, word = _read_quoted(s, i, path)
            words.append(word)
        else:
            j = i
            while j < len(s) and s[j] not in ' \t"<' and (s[j] == "." or s[j] not in _SPECIALS):
                j += 1
            if j == i:
                raise _unexpected(s[i], path)
            words.append(s[i:j])
            i = j
    if i == len(s):
        raise InvalidAddress("angle brackets do not match", field=path)
    return " ".join(" ".join(words).split()), s[i + 1:-1]


def _dot_atom_ok(text: str) -> bool:  # RFC 5322 §3.2.3, with RFC 6532 UTF-8
    return all(part and all(c in _ATEXT or (ord(c) > 127 and _utf8_char_ok(c)) for c in part)
               for part in text.split("."))


def _local_part(spec: str, path: list[str]) -> tuple[str, str]:
    """(local part as written in an addr-spec, rest after the @)."""
    if spec.startswith('"'):
        end, content = _read_quoted(spec, 0, path)
        if not spec[end:].startswith("@"):
            raise InvalidAddress("expected @ after the quoted local part", field=path)
        if not content or not all(c == " " or c.isprintable() for c in content):
            raise InvalidAddress("invalid quoted local part", field=path)
        if _dot_atom_ok(content):
            return content, spec[end + 1:]
        return '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"', spec[end + 1:]
    if "@" not in spec:
        raise InvalidAddress("an address needs an @", field=path)
    local, _, domain = spec.rpartition("@")
    if not local:
        raise InvalidAddress("the part before @ is empty", field=path)
    if not _dot_atom_ok(local):
        bad = next((c for c in local if c not in _ATEXT and c != "." and not (
            ord(c) > 127 and _utf8_char_ok(c))), None)
        if bad is not None:
            raise _unexpected(bad, path)
        raise InvalidAddress("dots in the local part must separate non-empty words", field=path)
    return local, domain


def _domain(raw: str, path: list[str]) -> tuple[str, str]:
    """(U-label form, A-label form) of a mail domain. RFC 5321 §2.3.5, RFC 5890."""
    if not raw:
        raise InvalidAddress("the domain after @ is empty", field=path)
    if raw.startswith("["):
        raise InvalidAddress("address literals ([...]) are not accepted", field=path)
    if bad := next((c for c in raw if c in " \t,;<>()[]\\\"@:"), None):
        raise _unexpected(bad, path)
    try:
        ascii_name = idna.encode(raw, uts46=True, std3_rules=True).decode("ascii")
        labels = ascii_name.split(".")
        if any(not label or len(label) > 63 for label in labels) or len(ascii_name) > 253:
            raise idna.IDNAError("empty label or name too long")
        unicode_name = idna.decode(ascii_name)
    except (idna.IDNAError, UnicodeError, ValueError) as exc:
        raise InvalidAddress(f"{raw!r} is not a valid domain name ({exc})", field=path) from None
    return unicode_name, ascii_name


def parse_address(text: str, field: str | Sequence[str]) -> Address:
    """One mailbox, `Name <local@domain>` or `local@domain`; errors name `field`."""
    path = [field] if isinstance(field, str) else list(field)
    _check_text(text, path, "address")
    s = text.strip(" \t")
    if not s:
        raise InvalidAddress("address is empty", field=path)
    if re.search(r"[,;]", re.sub(r'"(?:[^"\\]|\\.)*"', "", s)):
        raise InvalidAddress("only one address is allowed here", field=path)
    display, spec = _split_display(s, path)
    if "<" in spec or ">" in spec:
        raise InvalidAddress("only one address is allowed here", field=path)
    local, raw_domain = _local_part(spec, path)
    domain, ascii_domain = _domain(raw_domain, path)
    if len(local.encode()) > 64:  # RFC 5321 §4.5.3.1.1
        raise InvalidAddress("the part before @ is longer than 64 octets", field=path)
    if len(local.encode()) + 1 + len(ascii_domain) > 254:  # RFC 5321 §4.5.3.1.3, minus <>
        raise InvalidAddress("address is longer than 254 octets", field=path)
    return Address(display, local, domain, ascii_domain)


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


# --- header encoding (RFC 2047) and folding (RFC 5322 §2.2.3) ----------------------------------

class _Prefolded(str):
    """A header field folded here; `email` writes objects with .name and .fold() verbatim."""

    name: str
    lines: list[str]

    def __new__(cls, name: str, lines: list[str]) -> _Prefolded:
        obj = super().__new__(cls, "".join(lines)[len(name) + 2:])
        obj.name, obj.lines = name, lines
        return obj

    def fold(self, *, policy: email.policy.Policy) -> str:
        return policy.linesep.join(self.lines) + policy.linesep


def _fold(name: str, tokens: list[str]) -> _Prefolded:
    """Join `name: token token ...`, breaking before a token's leading whitespace at 78."""
    lines, line = [], f"{name}:"
    for i, tok in enumerate(tokens):
        tok = tok if tok[:1] in (" ", "\t") else " " + tok
        if i and len(line) + len(tok) > FOLD_AT:
            lines.append(line)
            line = tok
        else:
            line += tok
    lines.append(line)
    return _Prefolded(name, lines)


def _encoded_words(text: str, first: int = 75) -> list[str]:
    """`text` as UTF-8 encoded-words (RFC 2047 §2: at most 75 characters each; the first at
    most `first`, to fit after the field name), never splitting a character (§5)."""
    use_b = sum(ord(c) > 127 for c in text) * 10 > len(text)
    words: list[str] = []
    chunk, size, room = "", 0, max(first, 30) - 12  # 12 = len("=?utf-8?q?") + len("?=")
    for ch in text:
        raw = ch.encode()
        size_after = (-(-(len(chunk.encode()) + len(raw)) // 3) * 4 if use_b else
                      size + sum(1 if chr(b) in _Q_SAFE or b == 32 else 3 for b in raw))
        if chunk and size_after > room:
            words.append(chunk)
            chunk, size, room = "", 0, 75 - 12
            size_after = (-(-len(raw) // 3) * 4 if use_b else
                          sum(1 if chr(b) in _Q_SAFE or b == 32 else 3 for b in raw))
        chunk, size = chunk + ch, size_after
    words.append(chunk)
    if use_b:
        return [f"=?utf-8?b?{base64.b64encode(w.encode()).decode()}?=" for w in words]
    return ["=?utf-8?q?" + "".join(
        chr(b) if chr(b) in _Q_SAFE else "_" if b == 32 else f"={b:02X}" for b in w.encode()
    ) + "?=" for w in words]


def _needs_encoding(text: str, longest: int = 66) -> bool:
    """Non-ASCII, text an RFC 2047 decoder would take for an encoded-word, or a word (or run
    of spaces) too long to fold at 78."""
    return (not text.isascii() or "=?" in text
            or any(len(t) > longest for t in re.findall(r"[^ \t]+|[ \t]+", text)))


def _unstructured(name: str, text: str) -> _Prefolded:
    if not text:
        return _Prefolded(name, [f"{name}: "])
    if _needs_encoding(text):
        return _fold(name, _encoded_words(text, FOLD_AT - len(name) - 2))
    return _fold(name, re.findall(r"[ \t]*[^ \t]+", text))


def _quote_phrase(name: str) -> str:
    if all(c in _ATEXT or c == " " for c in name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _address_list(name: str, addrs: Sequence[Address]) -> _Prefolded:
    tokens: list[str] = []
    for addr in addrs:
        if tokens:
            tokens[-1] += ","
        display = addr.display_name
        if len(display) > 200 or not display.isascii() or "=?" in display:
            first = FOLD_AT - len(name) - 2 if not tokens else 75
            tokens.extend(_encoded_words(display, first))  # RFC 2047 §5(3): a whole phrase
        elif display:
            tokens.append(_quote_phrase(display))  # one token, at most ~400 characters
        tokens.append(f"<{addr.addr_spec}>" if display else addr.addr_spec)
    return _fold(name, tokens)


# --- MIME --------------------------------------------------------------------------------------

def _text_part(text: str, subtype: str, policy: email.policy.Policy) -> MIMEPart:
    lines = re.split(r"\r\n|\r|\n", text)
    clean = text.isascii() and not _CONTROLS.search(text.replace("\r", "").replace("\n", ""))
    if clean and max(map(len, lines)) <= FOLD_AT:
        cte = "7bit"  # RFC 2045 §2.7: short lines, no NUL, CR or LF except as CRLF
    elif (len(text.encode("utf-8", "surrogatepass")) - len(text)) * 10 > len(text):
        # Mostly non-ASCII (counted in extra UTF-8 bytes, a C-speed proxy for characters).
        cte = "base64"
    else:
        cte = "quoted-printable"  # RFC 2045 §6.7: keeps every line under 76 characters
    part = MIMEPart(policy=policy)
    part.set_content(text, subtype=subtype, charset="utf-8", cte=cte)
    return part


def _multipart(subtype: str, parts: list[MIMEPart], policy: email.policy.Policy) -> MIMEPart:
    container = MIMEPart(policy=policy)
    container["Content-Type"] = f"multipart/{subtype}"
    if subtype == "related":  # RFC 2387 §3.1: type= names the root part's type
        container.set_param("type", parts[0].get_content_type())
    for part in parts:
        container.attach(part)
    return container


def _attachment_part(att: Attachment, inline: bool, policy: email.policy.Policy) -> MIMEPart:
    assert att.content_type is not None
    main_sub, _, params = att.content_type.partition(";")
    maintype, subtype = main_sub.split("/")
    part = MIMEPart(policy=policy)
    part.set_content(att.content, maintype=maintype, subtype=subtype,
                     disposition="inline" if inline else "attachment", filename=att.filename,
                     cid=f"<{att.content_id}>" if att.content_id else None,
                     params={k: v.strip('"') for k, v in _PARAM.findall(params)} or None)
    return part


def _body(v: ValidatedMessage, policy: email.policy.Policy) -> MIMEPart:
    """text | html | alternative(text, html); html -> related(html, inline...); mixed outside."""
    html = _text_part(v.html_body, "html", policy) if v.html_body else None
    inline = [a for a in v.attachments if a.content_id] if html is not None else []
    if html is not None and inline:
        html = _multipart("related", [html, *(_attachment_part(a, True, policy)
                                              for a in inline)], policy)
    text = _text_part(v.text_body, "plain", policy) if v.text_body else None
    body = _multipart("alternative", [text, html], policy) if text and html else text or html
    attached = [a for a in v.attachments if not (html is not None and a.content_id)]
    if not attached:
        assert body is not None
        return body
    return _multipart("mixed", ([body] if body else []) + [
        _attachment_part(a, False, policy) for a in attached], policy)


def build_mime(validated: ValidatedMessage, message_id_domain: str, now: datetime,
               message_id: str | None = None, *,
               max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[bytes, str]:
    """(raw message with CRLF line endings, Message-ID value `<...@domain>`). Bcc is left out."""
    v = validated
    if message_id is None:
        domain = idna.encode(message_id_domain.strip().rstrip("."), uts46=True).decode("ascii")
        message_id = f"<{secrets.token_hex(16)}@{domain}>"  # RFC 5322 §3.6.4: unique
    elif not _MESSAGE_ID.fullmatch(message_id):
        raise ValidationError("message id must look like <local@domain>", field=["messageId"])
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    policy = email.policy.SMTPUTF8 if v.smtputf8 else email.policy.SMTP
    msg = EmailMessage(policy=policy)
    msg["From"] = _address_list("From", [v.from_])
    for name, addrs in (("Reply-To", v.reply_to), ("To", v.to), ("Cc", v.cc)):
        if addrs:
            msg[name] = _address_list(name, addrs)
    msg["Subject"] = _unstructured("Subject", v.subject)
    msg["Date"] = _Prefolded("Date", [f"Date: {email.utils.format_datetime(now)}"])
    msg["Message-ID"] = _Prefolded("Message-ID", [f"Message-ID: {message_id}"])
    msg["MIME-Version"] = _Prefolded("MIME-Version", ["MIME-Version: 1.0"])
    for name, value in v.headers:
        msg[name] = (_fold(name, re.findall(r"[ \t]*[^ \t]+", value) or [""])
                     if value.isascii() else _unstructured(name, value))
    root = _body(v, policy)
    for name, value in root.items():
        msg[name] = value
    msg.set_payload(root.get_payload())
    raw = msg.as_bytes(policy=policy)
    if len(raw) > max_bytes:
        raise MessageTooLarge(f"message is {len(raw)} bytes; the limit is {max_bytes}",
                              field=["message"])
    return raw, message_id


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
