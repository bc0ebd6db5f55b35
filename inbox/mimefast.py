"""The fast path of outbound MIME building: text, html or both (no attachments) written
straight to bytes, byte for byte what `inbox.message.email_package_mime` writes with the `email`
package; `fast_mime` returns None where it does not apply. Does no I/O.

What the `email` package (Python 3.11) does, and this module repeats:
- top-level fields are `inbox.headers.Prefolded` objects, which it writes verbatim
  (`Prefolded.fold`), encoded as ASCII (policy SMTP) or UTF-8 (policy SMTPUTF8);
- a text part is `Content-Type: text/<sub>; charset="utf-8"` and `Content-Transfer-Encoding:`
  as chosen by `inbox.mimeparts.transfer_encoding`; the content is `str.encode().splitlines()`
  joined with LF plus a final LF (7bit, quoted-printable via `email.quoprimime.body_encode` at
  78) or with CRLF, base64 in 57-byte lines (`email.contentmanager._encode_base64`); the
  generator then turns every CR, LF or CRLF of the payload into CRLF;
- multipart/alternative is folded as `multipart/alternative;` CRLF SP `boundary="..."`
  (its boundary, `email.generator._make_boundary`'s format, always makes the line longer than
  78); RFC 2046 §5.1.1: `--b` CRLF part CRLF `--b` CRLF part CRLF `--b--` CRLF.
"""

from __future__ import annotations

import base64
import email.utils
import functools
import random
import re
import sys
from datetime import UTC, datetime
from email import quoprimime
from typing import TYPE_CHECKING

from inbox.headers import FOLD_AT, address_list, fold, unstructured
from inbox.mimeparts import transfer_encoding

if TYPE_CHECKING:
    from inbox.addresses import Address
    from inbox.message import ValidatedMessage

_DIGITS = len(repr(sys.maxsize - 1))  # email.generator._width
BOUNDARY = re.compile(rf"={{15}}[0-9]{{{_DIGITS}}}==")
_NEWLINES = re.compile(r"\r\n|\r|\n")  # email.generator.NLCRE
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def new_boundary() -> str:
    """A multipart boundary as `email.generator.Generator._make_boundary` makes one (not a
    secret: the part texts are checked for it)."""
    return "=" * 15 + f"{random.randrange(sys.maxsize):0{_DIGITS}d}" + "=="  # noqa: S311


def format_date(now: datetime) -> str:
    """`email.utils.format_datetime(now)` (RFC 5322 §3.3), without its cost for UTC."""
    if now.tzinfo is not UTC:
        return email.utils.format_datetime(now)
    return (f"{_DAYS[now.weekday()]}, {now.day:02d} {_MONTHS[now.month - 1]} {now.year:04d} "
            f"{now.hour:02d}:{now.minute:02d}:{now.second:02d} +0000")


def _simple(name: str, value: str) -> list[str] | None:
    """The lines `fold`/`unstructured` give an ASCII value that fits on one line unchanged:
    no leading or trailing blanks (they would move or go), nothing an encoded-word is needed
    for (RFC 2047: `=?`, words over 66 characters)."""
    if (value.isascii() and len(name) + 2 + len(value) <= FOLD_AT and len(value) <= 66
            and value[:1] not in (" ", "\t") and value[-1:] not in (" ", "\t")
            and "=?" not in value):
        return [f"{name}: {value}"]
    return None


@functools.lru_cache(maxsize=1024)
def _address_lines(name: str, addrs: tuple[Address, ...]) -> tuple[str, ...]:
    """From and Reply-To recur per sender: `address_list` once per distinct value."""
    return tuple(address_list(name, addrs).lines)


def _header_lines(v: ValidatedMessage, message_id: str, now: datetime) -> list[str] | None:
    lines = list(_address_lines("From", (v.from_,)))
    if v.reply_to:
        lines += _address_lines("Reply-To", v.reply_to)
    for name, addrs in (("To", v.to), ("Cc", v.cc)):
        if addrs:
            lines += address_list(name, addrs).lines
    lines += _simple("Subject", v.subject) or unstructured("Subject", v.subject).lines
    lines += (f"Date: {format_date(now)}", f"Message-ID: {message_id}", "MIME-Version: 1.0")
    seen = set()
    for name, value in v.headers:
        if name.lower() in seen:  # the email package refuses some repeats (ValueError)
            return None
        seen.add(name.lower())
        lines += _simple(name, value) or (
            fold(name, re.findall(r"[ \t]*[^ \t]+", value) or [""]).lines
            if value.isascii() else unstructured(name, value).lines)
    return lines


def _text_part(text: str, subtype: str) -> tuple[list[str], bytes]:
    """(Content-* fields, body with CRLF line ends) of one text part."""
    cte = transfer_encoding(text)
    lines = text.encode().splitlines()
    if cte == "7bit":
        body = b"\r\n".join(lines) + b"\r\n"
    elif cte == "base64":  # RFC 2045 §6.8; encodebytes makes 57-byte (76-character) lines
        body = base64.encodebytes(b"\r\n".join(lines) + b"\r\n").replace(b"\n", b"\r\n")
    else:
        qp = quoprimime.body_encode((b"\n".join(lines) + b"\n").decode("latin-1"), FOLD_AT)
        body = _NEWLINES.sub("\r\n", qp).encode("ascii")
    return [f'Content-Type: text/{subtype}; charset="utf-8"',
            f"Content-Transfer-Encoding: {cte}"], body


def fast_mime(v: ValidatedMessage, message_id: str, now: datetime, *,
              boundary: str | None = None) -> bytes | None:
    """The message `email_package_mime(v, message_id, now)` builds, or None when this path
    does not apply (attachments, repeated custom field names, a boundary found in a part).
    `now` must be aware; `boundary` (default: a new one) is used by multipart/alternative."""
    if v.attachments or not (v.text_body or v.html_body):
        return None
    head = _header_lines(v, message_id, now)
    if head is None:
        return None
    if v.text_body and v.html_body:
        boundary = boundary or new_boundary()
        if not BOUNDARY.fullmatch(boundary):
            return None
        fields, text = _text_part(v.text_body, "plain")
        html_fields, html = _text_part(v.html_body, "html")
        delimiter = b"--" + boundary.encode()
        if delimiter in text or delimiter in html:  # the generator would pick another one
            return None
        head += ("Content-Type: multipart/alternative;", f' boundary="{boundary}"')
        body = b"".join((
            delimiter, b"\r\n", "\r\n".join(fields).encode(), b"\r\n\r\n", text, b"\r\n",
            delimiter, b"\r\n", "\r\n".join(html_fields).encode(), b"\r\n\r\n", html, b"\r\n",
            delimiter, b"--\r\n"))
    else:
        fields, body = _text_part(v.text_body or v.html_body or "",
                                  "plain" if v.text_body else "html")
        head += fields
    header = "\r\n".join(head) + "\r\n\r\n"
    # Newer Pythons' generator refuses a field with a line break not followed by a blank
    # (verify_generated_headers); validation keeps them out, and so does this check.
    if header.count("\n") != len(head) + 1 or header.count("\r") != len(head) + 1:
        return None
    try:
        return header.encode("utf-8" if v.smtputf8 else "ascii") + body
    except UnicodeEncodeError:  # what policy SMTP cannot write: the slow path raises
        return None
