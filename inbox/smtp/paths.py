"""Syntax of the MAIL and RCPT arguments on the inbound SMTP server: reverse-path,
forward-path and ESMTP parameters (RFC 5321 §4.1.2, §4.1.1.2-3; RFC 6531 for UTF-8).

Pure functions on strings. The parsers raise InvalidAddress (bad mailbox syntax) or ValidationError
(bad command or parameter syntax); the protocol layer turns those into replies. Whether a path
with non-ASCII characters is allowed (SMTPUTF8 given) is the caller's check: see `is_ascii`.
"""

from __future__ import annotations

import ipaddress
import re

from inbox.errors import InvalidAddress, ValidationError
from inbox.smtp.replies import clean_text

# RFC 5321 §4.1.2 / RFC 5322 §3.2.3 atext, plus RFC 6531 §3.3 UTF8-non-ascii. Lone surrogates
# (what surrogateescape makes of invalid UTF-8) are excluded on purpose.
_U = "\u0080-\ud7ff\ue000-\U0010ffff"
_ATEXT = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\-{_U}]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
# RFC 5321 §4.1.2 Quoted-string: qtextSMTP (%d32-33 / %d35-91 / %d93-126) / quoted-pairSMTP.
_QUOTED = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_U}]|\\[\x20-\x7e])*"'
_LABEL = rf"[A-Za-z0-9{_U}](?:[A-Za-z0-9\-{_U}]*[A-Za-z0-9{_U}])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_MAILBOX = re.compile(rf"({_DOT_STRING}|{_QUOTED})@({_DOMAIN}|\[[^\[\]\\\s]*\])")
# RFC 5321 §4.1.2 A-d-l: a source route, which §4.1.1.3 says to accept and ignore.
_SOURCE_ROUTE = re.compile(rf"@{_DOMAIN}(?:,@{_DOMAIN})*:")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# RFC 5321 §4.1.2 esmtp-value (%d33-60 / %d62-126), UTF-8 allowed by RFC 6531 §3.3.
_VALUE = re.compile(rf"[\x21-\x3c\x3e-\x7e{_U}]+")

MAX_PATH_OCTETS = 256  # RFC 5321 §4.5.3.1.3, including the angle brackets
MAX_DOMAIN_OCTETS = 255  # RFC 5321 §4.5.3.1.2
MAX_LABEL_OCTETS = 63  # RFC 1035 §2.3.4


def is_ascii(text: str) -> bool:
    return text.isascii()


def split_argument(arg: str | None, keyword: str) -> tuple[str, list[str]]:
    """Split "FROM:<path> P1 P2=V" (keyword "FROM") into the path text with its brackets and
    the parameter tokens. Tolerates spaces after the colon and a path without brackets, as
    many MTAs do; the path itself is checked by `parse_path`."""
    if not arg or arg[: len(keyword) + 1].upper() != keyword + ":":
        raise ValidationError(f"Syntax: {keyword} <address>")
    rest = arg[len(keyword) + 1:].lstrip(" ")
    if rest.startswith("<"):
        end = _closing_bracket(rest)
        path, tail = rest[: end + 1], rest[end + 1:]
        if tail and not tail.startswith(" "):
            raise ValidationError(f"Syntax: {keyword} <address> [parameters]")
    else:
        path, _, tail = rest.partition(" ")
    if not path:
        raise ValidationError(f"Syntax: {keyword} <address>")
    return path, tail.split()


def _closing_bracket(text: str) -> int:
    quoted = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    raise InvalidAddress("Missing '>' after the address")


def parse_path(path: str, *, null_allowed: bool = False, postmaster_allowed: bool = False
               ) -> str:
    """The mailbox in a reverse- or forward-path, as "local@domain" ("" for the null path
    "<>" when `null_allowed`; "postmaster" for the bare "<Postmaster>" of RFC 5321 §4.1.1.3
    when `postmaster_allowed`). A source route is dropped. Raises InvalidAddress."""
    inner = path[1:-1] if path.startswith("<") and path.endswith(">") else path
    if path.startswith("<") != path.endswith(">"):
        raise InvalidAddress("Unbalanced angle brackets")
    if len(path.encode("utf-8", "surrogateescape")) + (0 if path.startswith("<") else 2) \
            > MAX_PATH_OCTETS:
        raise InvalidAddress("Address too long (RFC 5321 4.5.3.1.3)")
    if inner == "":
        if null_allowed:
            return ""
        raise InvalidAddress("Null address not allowed here")
    if postmaster_allowed and inner.lower() == "postmaster":
        return "postmaster"
    route = _SOURCE_ROUTE.match(inner)
    if route:
        inner = inner[route.end():]
    match = _MAILBOX.fullmatch(inner)
    if not match:
        raise InvalidAddress("Bad address syntax")
    domain = match.group(2)
    if domain.startswith("["):
        _check_address_literal(domain)
    else:
        _check_domain(domain)
    return inner


def _check_domain(domain: str) -> None:
    if len(domain.encode("utf-8")) > MAX_DOMAIN_OCTETS:
        raise InvalidAddress("Domain too long")
    for label in domain.split("."):
        if label.isascii() and len(label) > MAX_LABEL_OCTETS:
            raise InvalidAddress("Domain label too long")


def _check_address_literal(literal: str) -> None:
    """RFC 5321 §4.1.3: IPv4 dotted quad or "IPv6:" address; general literals are refused."""
    body = literal[1:-1]
    try:
        if body[:5].upper() == "IPV6:":
            ipaddress.IPv6Address(body[5:])
        else:
            ipaddress.IPv4Address(body)
    except ValueError:
        raise InvalidAddress("Bad address literal") from None


def parse_parameters(tokens: list[str]) -> dict[str, str | None]:
    """ESMTP parameters (RFC 5321 §4.1.2 esmtp-param) as {KEYWORD: value or None}.
    Keywords are upper-cased; a repeated keyword is a syntax error."""
    params: dict[str, str | None] = {}
    for token in tokens:
        keyword, eq, value = token.partition("=")
        if not _KEYWORD.fullmatch(keyword) or (eq and not _VALUE.fullmatch(value)):
            raise ValidationError(f"Bad parameter syntax: {token[:40]}")
        keyword = keyword.upper()
        if keyword in params:
            raise ValidationError(f"Parameter given twice: {keyword}")
        params[keyword] = value if eq else None
    return params


def mail_parameter_problem(params: dict[str, str | None], address: str, max_bytes: int
                           ) -> str | None:
    """The refusal for MAIL parameters we cannot take (BODY RFC 6152, SIZE RFC 1870,
    SMTPUTF8 RFC 6531, nothing else), or None."""
    params = dict(params)
    smtputf8 = "SMTPUTF8" in params
    if params.pop("BODY", "7BIT") not in ("7BIT", "8BITMIME"):  # RFC 6152
        return "501 5.5.4 BODY must be 7BIT or 8BITMIME"
    if "SMTPUTF8" in params and params.pop("SMTPUTF8") is not None:
        return "501 5.5.4 SMTPUTF8 takes no value"
    if "SIZE" in params:  # RFC 1870 §6
        size = params.pop("SIZE") or ""
        if not re.fullmatch(r"[0-9]{1,20}", size):
            return "501 5.5.4 Syntax: SIZE=<number>"
        if int(size) > max_bytes:
            return f"552 5.3.4 Message size exceeds fixed limit of {max_bytes} bytes"
    if params:
        return f"555 5.5.4 Unsupported MAIL parameter {clean_text(next(iter(params)), 40)}"
    if not smtputf8 and not address.isascii():
        return "553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter (RFC 6531)"
    return None
