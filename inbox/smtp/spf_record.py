"""SPF record syntax (RFC 7208 §4.6, §5, §6): parsing a "v=spf1" record into directives and
modifiers, so that a syntax error anywhere is found before anything is evaluated. Does no DNS
(inbox.smtp.spf evaluates records; macro-strings are inbox.smtp.spf_macros).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from inbox.smtp.spf_macros import DOMAIN_LETTERS, EXP_LETTERS, Tokens, macro_string, perm

QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}  # RFC 7208 §4.6.2
MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")  # RFC 7208 §5
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.-]*)=(.*)", re.S)  # RFC 7208 §4.6.1
_DIRECTIVE = re.compile(r"([+?~-]?)([A-Za-z][A-Za-z0-9]*)(.*)", re.S)
_QNUM = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IP4 = re.compile(rf":({_QNUM}(?:\.{_QNUM}){{3}})(?:/([0-9]+))?")  # RFC 7208 §5.6
_IP6 = re.compile(r":([0-9A-Fa-f:.]+)(?:/([0-9]+))?")
_DUAL_CIDR = re.compile(r"(?::(.*?))?(?:/([0-9]+))?(?://([0-9]+))?", re.S)  # §5.3, §5.4


def _cidr(text: str | None, top: int) -> int:
    if text is None:
        return top
    if (text != "0" and text.startswith("0")) or int(text) > top:  # RFC 7208 §5.6
        raise perm(f"invalid CIDR length /{text}")
    return int(text)


@dataclass
class Directive:
    text: str
    result: str
    name: str
    target: Tokens | None = None  # domain-spec, None for "the current domain"
    cidr4: int = 32
    cidr6: int = 128
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None


@dataclass
class Record:
    directives: list[Directive] = field(default_factory=list)
    redirect: Tokens | None = None
    exp: Tokens | None = None


def _directive(term: str) -> Directive:
    match = _DIRECTIVE.fullmatch(term)
    if match is None or match[2].lower() not in MECHANISMS:
        raise perm(f"unknown mechanism {term!r}")
    qualifier, name, rest = match[1] or "+", match[2].lower(), match[3]
    made = Directive(term, QUALIFIERS[qualifier], name)
    if name == "all":
        if rest:
            raise perm(f"'all' takes no arguments: {term!r}")
    elif name in ("include", "exists") or (name == "ptr" and rest):
        if not rest.startswith(":"):
            raise perm(f"{name} needs ':domain': {term!r}")
        made.target = macro_string(rest[1:], DOMAIN_LETTERS, domain_spec=True)
    elif name in ("a", "mx"):
        cidr = _DUAL_CIDR.fullmatch(rest)
        if cidr is None:
            raise perm(f"bad {name} arguments: {term!r}")
        if cidr[1] is not None:
            made.target = macro_string(cidr[1], DOMAIN_LETTERS, domain_spec=True)
        made.cidr4, made.cidr6 = _cidr(cidr[2], 32), _cidr(cidr[3], 128)
    elif name in ("ip4", "ip6"):
        net = (_IP4 if name == "ip4" else _IP6).fullmatch(rest)
        try:
            address = ipaddress.ip_address(net[1]) if net else None
        except ValueError:
            address = None
        if net is None or address is None or address.version != int(name[2]):
            raise perm(f"bad {name} network: {term!r}")
        length = _cidr(net[2], address.max_prefixlen)
        made.network = ipaddress.ip_network((address, length), strict=False)
    return made


def parse_record(text: str) -> Record:
    """Parse a whole "v=spf1" record (RFC 7208 §4.6), so that a syntax error anywhere is found
    before anything is evaluated. Raises `Abort` (permerror)."""
    if not text.isascii():
        raise perm("SPF record is not 7-bit ASCII")  # RFC 7208 §3.1 (and test suite)
    record = Record()
    for term in text.split(" ")[1:]:  # RFC 7208 §4.6.1: terms are separated by 1*SP
        if not term:
            continue
        modifier = _MODIFIER.fullmatch(term)
        if modifier is None:
            record.directives.append(_directive(term))
            continue
        name, value = modifier[1].lower(), modifier[2]
        if name in ("redirect", "exp"):
            if getattr(record, name) is not None:  # RFC 7208 §6: at most once each
                raise perm(f"{name}= appears twice")
            setattr(record, name, macro_string(value, DOMAIN_LETTERS, domain_spec=True))
        else:  # RFC 7208 §6: unknown modifiers are ignored, but must be well-formed
            macro_string(value, EXP_LETTERS, domain_spec=False)
    return record


def is_spf_record(text: str) -> bool:
    """RFC 7208 §4.5: "v=spf1" (any case) followed by a space or the end."""
    return text[:6].lower() == "v=spf1" and (len(text) == 6 or text[6] == " ")

