"""SPF (RFC 7208) for inbound mail: check_host() and the HELO / MAIL FROM checks. Owns record
parsing, macros and the lookup limits; DNS is a resolver passed in, and what to do with a
result (reject, add a header) is the caller's.

Choices where the RFC leaves room:
* A target name that cannot be a DNS name after macro expansion (an empty or over-long label)
  makes that mechanism not match (RFC 7208 §4.8 by analogy with §4.3); for include= and
  redirect= it is a permerror (check_host() on it would be "none").
* "Void lookups" (§4.6.4: NOERROR without records, or NXDOMAIN) are counted once per term that
  does DNS (a, mx, ptr, exists): the lookups for each MX host or PTR name are not counted, nor
  is the exp= lookup.
* An "mx" target with more than 10 MX records is a permerror; only the first 10 PTR names are
  looked at (§4.6.4). Null MX targets (RFC 7505 ".") are skipped.
* %{p} prefers a validated name equal to <domain>, then one below it (§7.3); it does not count
  towards the 10-term limit.
* The whole evaluation is bounded by `time_limit` seconds (§4.6.4: "at least 20 seconds") and
  gives temperror when it runs out.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol
from urllib.parse import quote

from inbox.errors import DnsNotFound, DnsTemporary, InboxError, ValidationError

# RFC 7208 §4.6.4
DNS_TERM_LIMIT = 10
VOID_LOOKUP_LIMIT = 2
MX_NAME_LIMIT = 10
PTR_NAME_LIMIT = 10
MAX_DOMAIN = 253  # RFC 7208 §7.3 (the longest name in text form)
DEFAULT_TIME_LIMIT = 20.0  # RFC 7208 §4.6.4: allow at least 20 seconds

QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}  # RFC 7208 §4.6.2
MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")  # RFC 7208 §5

# RFC 7208 §7.1 ABNF pieces.
_TOPLABEL = r"(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9])"
_DOMAIN_END = re.compile(rf".*\.{_TOPLABEL}\.?", re.S)
_TOKEN = re.compile(
    r"%\{(?P<letter>[A-Za-z])(?P<digits>[0-9]*)(?P<rev>[rR]?)(?P<delims>[.+,/_=-]*)\}"
    r"|%(?P<esc>[%_-])|(?P<lit>[^%]+)|%",
    re.S,
)
_DOMAIN_LETTERS = "slodiphv"
_EXP_LETTERS = _DOMAIN_LETTERS + "crt"  # RFC 7208 §7.3: c, r, t only in explanation text
_LITERAL = re.compile(r"[!-$&-~]*")  # macro-literal = %x21-24 / %x26-7E
_EXP_LITERAL = re.compile(r"[ !-$&-~]*")  # explanation-string also allows SP (§6.2)
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.-]*)=(.*)", re.S)  # RFC 7208 §4.6.1
_DIRECTIVE = re.compile(r"([+?~-]?)([A-Za-z][A-Za-z0-9]*)(.*)", re.S)
_QNUM = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IP4 = re.compile(rf":({_QNUM}(?:\.{_QNUM}){{3}})(?:/([0-9]+))?")  # RFC 7208 §5.6
_IP6 = re.compile(r":([0-9A-Fa-f:.]+)(?:/([0-9]+))?")
_DUAL_CIDR = re.compile(r"(?::(.*?))?(?:/([0-9]+))?(?://([0-9]+))?", re.S)  # §5.3, §5.4
_LABEL = re.compile(r"[ -\[\]-~]{1,63}")  # printable ASCII or SP; no "\\" (DNS escape)


@dataclass(frozen=True)
class SpfResult:
    """One check_host() outcome (RFC 7208 §2.6)."""

    result: str  # "none"|"neutral"|"pass"|"fail"|"softfail"|"temperror"|"permerror"
    domain: str  # the domain that was checked ("" when none)
    identity: str  # "mailfrom" or "helo"
    explanation: str = ""  # exp= text for fail, or a reason for errors
    mechanism: str = ""  # the matching mechanism text, if any


class SpfLookup(Protocol):
    """The DNS lookups SPF needs; `inbox.resolver.Resolver` is one. Each raises `DnsNotFound`
    (NXDOMAIN / no records) or `DnsTemporary`."""

    async def txt(self, name: str) -> list[str]: ...

    async def a(self, name: str) -> list[str]: ...

    async def aaaa(self, name: str) -> list[str]: ...

    async def mx(self, name: str) -> list[Any]: ...  # items with .preference and .host

    async def ptr(self, ip: str) -> list[str]: ...


class _Abort(InboxError):
    """Ends the evaluation with `result` (permerror/temperror). Never leaves this module."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result


def _perm(message: str) -> _Abort:
    return _Abort("permerror", message)


@dataclass(frozen=True)
class _Macro:
    letter: str  # lowercase
    digits: int  # 0: all parts
    reverse: bool
    delims: str
    escape: bool  # an uppercase letter: URL-escape the value (RFC 7208 §7.3)


_Tokens = list[str | _Macro]


def _macro_string(text: str, letters: str, *, domain_spec: bool, exp: bool = False) -> _Tokens:
    """Parse a macro-string (RFC 7208 §7.1); with `domain_spec`, it must also end like a
    domain-spec: "." toplabel ["."] or a macro-expand. Raises `_Abort` (permerror)."""
    if domain_spec and not text:
        raise _perm("empty domain-spec")
    tokens: _Tokens = []
    ends_with_macro = False
    literal = _EXP_LITERAL if exp else _LITERAL
    for match in _TOKEN.finditer(text):
        if match["lit"] is not None:
            if not literal.fullmatch(match["lit"]):
                raise _perm(f"invalid character in {text!r}")
            tokens.append(match["lit"])
            ends_with_macro = False
        elif match["esc"] is not None:  # %% %_ %- (RFC 7208 §7.1)
            tokens.append({"%": "%", "_": " ", "-": "%20"}[match["esc"]])
            ends_with_macro = True
        elif match["letter"] is not None:
            letter = match["letter"]
            if letter.lower() not in letters:
                raise _perm(f"macro letter {letter!r} not allowed in {text!r}")
            digits = int(match["digits"] or 0)
            if match["digits"] and digits == 0:  # RFC 7208 §7.3: "MUST be nonzero"
                raise _perm(f"zero transformer in {text!r}")
            tokens.append(
                _Macro(
                    letter.lower(), digits, bool(match["rev"]), match["delims"], letter.isupper()
                )
            )
            ends_with_macro = True
        else:
            raise _perm(f"'%' not followed by '{{', '%', '_' or '-' in {text!r}")
    if domain_spec and not ends_with_macro and not _DOMAIN_END.fullmatch(str(tokens[-1])):
        raise _perm(f"{text!r} does not end in a valid top-level label")
    return tokens


def _cidr(text: str | None, top: int) -> int:
    if text is None:
        return top
    if (text != "0" and text.startswith("0")) or int(text) > top:  # RFC 7208 §5.6
        raise _perm(f"invalid CIDR length /{text}")
    return int(text)


@dataclass
class _Directive:
    text: str
    result: str
    name: str
    target: _Tokens | None = None  # domain-spec, None for "the current domain"
    cidr4: int = 32
    cidr6: int = 128
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None


@dataclass
class _Record:
    directives: list[_Directive] = field(default_factory=list)
    redirect: _Tokens | None = None
    exp: _Tokens | None = None


def _directive(term: str) -> _Directive:
    match = _DIRECTIVE.fullmatch(term)
    if match is None or match[2].lower() not in MECHANISMS:
        raise _perm(f"unknown mechanism {term!r}")
    qualifier, name, rest = match[1] or "+", match[2].lower(), match[3]
    made = _Directive(term, QUALIFIERS[qualifier], name)
    if name == "all":
        if rest:
            raise _perm(f"'all' takes no arguments: {term!r}")
    elif name in ("include", "exists") or (name == "ptr" and rest):
        if not rest.startswith(":"):
            raise _perm(f"{name} needs ':domain': {term!r}")
        made.target = _macro_string(rest[1:], _DOMAIN_LETTERS, domain_spec=True)
    elif name in ("a", "mx"):
        cidr = _DUAL_CIDR.fullmatch(rest)
        if cidr is None:
            raise _perm(f"bad {name} arguments: {term!r}")
        if cidr[1] is not None:
            made.target = _macro_string(cidr[1], _DOMAIN_LETTERS, domain_spec=True)
        made.cidr4, made.cidr6 = _cidr(cidr[2], 32), _cidr(cidr[3], 128)
    elif name in ("ip4", "ip6"):
        net = (_IP4 if name == "ip4" else _IP6).fullmatch(rest)
        try:
            address = ipaddress.ip_address(net[1]) if net else None
        except ValueError:
            address = None
        if net is None or address is None or address.version != int(name[2]):
            raise _perm(f"bad {name} network: {term!r}")
        length = _cidr(net[2], address.max_prefixlen)
        made.network = ipaddress.ip_network((address, length), strict=False)
    return made


def _parse_record(text: str) -> _Record:
    """Parse a whole "v=spf1" record (RFC 7208 §4.6), so that a syntax error anywhere is found
    before anything is evaluated. Raises `_Abort` (permerror)."""
    if not text.isascii():
        raise _perm("SPF record is not 7-bit ASCII")  # RFC 7208 §3.1 (and test suite)
    record = _Record()
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
                raise _perm(f"{name}= appears twice")
            setattr(record, name, _macro_string(value, _DOMAIN_LETTERS, domain_spec=True))
        else:  # RFC 7208 §6: unknown modifiers are ignored, but must be well-formed
            _macro_string(value, _EXP_LETTERS, domain_spec=False)
    return record


def is_spf_record(text: str) -> bool:
    """RFC 7208 §4.5: "v=spf1" (any case) followed by a space or the end."""
    return text[:6].lower() == "v=spf1" and (len(text) == 6 or text[6] == " ")


def valid_domain(domain: str) -> bool:
    """RFC 7208 §4.3: a multi-label name whose labels fit in DNS and whose last label is a
    valid top label (so address literals like "[192.0.2.1]" and bare IPs are not)."""
    labels = domain[:-1].split(".") if domain.endswith(".") else domain.split(".")
    return (
        len(labels) > 1
        and len(domain) <= MAX_DOMAIN + 1
        and all(_LABEL.fullmatch(label) for label in labels)
        and re.fullmatch(_TOPLABEL, labels[-1]) is not None
    )


def _split_sender(sender: str, domain: str) -> tuple[str, str]:
    """(local-part, domain) of <sender>; RFC 7208 §4.3: no local-part means "postmaster"."""
    local, at, sender_domain = sender.rpartition("@")
    if not at:
        local, sender_domain = "", sender or domain
    return local or "postmaster", sender_domain


class _Evaluation:
    """One check_host() run, with its shared limits (RFC 7208 §4.6.4) across include/redirect."""

    def __init__(
        self,
        resolver: SpfLookup,
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
        sender: str,
        helo: str,
        receiver: str,
        clock: Callable[[], float],
    ) -> None:
        self.resolver = resolver
        self.ip = ip
        self.local, self.sender_domain = _split_sender(sender, "")
        self.sender = f"{self.local}@{self.sender_domain}"
        self.helo = helo
        self.receiver = receiver or "unknown"  # RFC 7208 §7.3
        self.clock = clock
        self.terms = 0
        self.voids = 0
        self._ptr: tuple[bool, list[str]] | None = None  # (void, validated names)

    # -- limits and lookups ---------------------------------------------------------------

    def count_term(self) -> None:
        self.terms += 1
        if self.terms > DNS_TERM_LIMIT:
            raise _perm(f"more than {DNS_TERM_LIMIT} DNS-querying terms (RFC 7208 §4.6.4)")

    def void(self) -> None:
        self.voids += 1
        if self.voids > VOID_LOOKUP_LIMIT:
            raise _perm(f"more than {VOID_LOOKUP_LIMIT} void lookups (RFC 7208 §4.6.4)")

    async def addresses(self, name: str, *, tolerant: bool = False) -> list[str] | None:
        """A or AAAA records by the client's address family (RFC 7208 §5.3); None when there
        are none. DNS trouble is a temperror, or None if `tolerant`."""
        lookup = self.resolver.a if self.ip.version == 4 else self.resolver.aaaa
        try:
            return list(await lookup(name))
        except DnsNotFound:
            return None
        except DnsTemporary as exc:
            if tolerant:
                return None
            raise _Abort("temperror", exc.message) from None

    async def validated_names(self) -> tuple[bool, list[str]]:
        """RFC 7208 §5.5: PTR names of the client whose A/AAAA records include it; any DNS
        error just drops a name. Also says whether the PTR lookup was void."""
        if self._ptr is None:
            try:
                names = list(await self.resolver.ptr(str(self.ip)))
            except (DnsNotFound, DnsTemporary) as exc:
                self._ptr = (isinstance(exc, DnsNotFound), [])
                return self._ptr
            validated = []
            for name in names[:PTR_NAME_LIMIT]:
                found = await self.addresses(name, tolerant=True) or []
                if any(ipaddress.ip_address(a) == self.ip for a in found):
                    validated.append(name.lower().rstrip("."))
            self._ptr = (False, validated)
        return self._ptr

    # -- macros (RFC 7208 §7) -------------------------------------------------------------

    async def macro_value(self, letter: str, domain: str) -> str:
        ip = self.ip
        if letter == "s":
            return self.sender
        if letter == "l":
            return self.local
        if letter == "o":
            return self.sender_domain
        if letter == "d":
            return domain
        if letter == "i":  # RFC 7208 §7.3: dotted nibbles for IPv6
            return str(ip) if ip.version == 4 else ".".join(ip.packed.hex().upper())
        if letter == "p":
            names = (await self.validated_names())[1]
            domain = domain.lower()
            for good in (lambda n: n == domain, lambda n: n.endswith("." + domain), lambda n: True):
                for name in names:
                    if good(name):
                        return name
            return "unknown"
        if letter == "v":
            return "in-addr" if ip.version == 4 else "ip6"
        if letter == "h":
            return self.helo
        if letter == "c":
            return str(ip)
        if letter == "r":
            return self.receiver
        return str(int(self.clock()))  # "t"

    async def expand(self, tokens: _Tokens, domain: str) -> str:
        out = []
        for token in tokens:
            if isinstance(token, str):
                out.append(token)
                continue
            value = await self.macro_value(token.letter, domain)
            parts = re.split("[" + re.escape(token.delims or ".") + "]", value)
            if token.reverse:
                parts.reverse()
            if token.digits:
                parts = parts[-token.digits :]
            value = ".".join(parts)
            out.append(quote(value, safe="") if token.escape else value)
        return "".join(out)

    async def target(self, tokens: _Tokens | None, domain: str) -> str | None:
        """The <target-name> for a lookup, or None if it cannot be a DNS name. RFC 7208 §7.3:
        over 253 characters, labels are dropped from the left; a trailing dot is ignored."""
        if tokens is None:
            return domain
        name = (await self.expand(tokens, domain)).removesuffix(".")
        while len(name) > MAX_DOMAIN and "." in name:
            name = name.split(".", 1)[1]
        labels = name.split(".")
        if len(name) > MAX_DOMAIN or not all(_LABEL.fullmatch(label) for label in labels):
            return None
        return name

    # -- check_host (RFC 7208 §4) ---------------------------------------------------------

    async def record(self, domain: str) -> str | None:
        """RFC 7208 §4.4-4.5: the one "v=spf1" TXT record, None if there is none."""
        try:
            texts = await self.resolver.txt(domain)
        except DnsNotFound:
            return None
        except DnsTemporary as exc:
            raise _Abort("temperror", exc.message) from None
        records = [text for text in texts if is_spf_record(text)]
        if len(records) > 1:
            raise _perm(f"{domain} has {len(records)} SPF records")
        return records[0] if records else None

    async def check_host(self, domain: str) -> tuple[str, str, str]:
        """(result, explanation, mechanism) for `domain`; `_Abort` for errors."""
        domain = domain.removesuffix(".")
        if not valid_domain(domain):
            return "none", f"{domain!r} is not a valid domain name", ""
        text = await self.record(domain)
        if text is None:
            return "none", f"no SPF record at {domain}", ""
        record = _parse_record(text)
        for directive in record.directives:
            if await self.matches(directive, domain):
                explanation = ""
                if directive.result == "fail":
                    explanation = await self.explain(record.exp, domain)
                return directive.result, explanation, directive.text
        if record.redirect is not None:  # RFC 7208 §6.1
            self.count_term()
            target = await self.target(record.redirect, domain)
            result = await self.check_host(target) if target else ("none", "", "")
            if result[0] == "none":
                raise _perm(f"redirect to {target or 'an invalid name'}: no SPF record")
            return result
        return "neutral", "", ""  # RFC 7208 §4.7

    async def matches(self, directive: _Directive, domain: str) -> bool:
        """RFC 7208 §5: does the mechanism match the client?"""
        name = directive.name
        if name == "all":
            return True
        if directive.network is not None:  # ip4 / ip6 (§5.6)
            return self.ip in directive.network
        self.count_term()
        target = await self.target(directive.target, domain)
        if name == "include":  # RFC 7208 §5.2
            result, _, _ = await self.check_host(target) if target else ("none", "", "")
            if result in ("none", "permerror"):
                raise _perm(f"include:{target or 'an invalid name'}: no SPF record")
            return result == "pass"
        if target is None:
            return False
        if name == "ptr":  # RFC 7208 §5.5
            void, names = await self.validated_names()
            if void:
                self.void()
            target = target.lower()
            return any(n == target or n.endswith("." + target) for n in names)
        if name == "exists":  # RFC 7208 §5.7: always an A lookup
            try:
                return bool(await self.resolver.a(target))
            except DnsNotFound:
                self.void()
                return False
            except DnsTemporary as exc:
                raise _Abort("temperror", exc.message) from None
        if name == "a":  # RFC 7208 §5.3
            hosts = [target]
        else:  # mx, RFC 7208 §5.4
            try:
                records = list(await self.resolver.mx(target))
            except DnsNotFound:
                records = []
            except DnsTemporary as exc:
                raise _Abort("temperror", exc.message) from None
            if len(records) > MX_NAME_LIMIT:
                raise _perm(f"{target} has more than {MX_NAME_LIMIT} MX records")
            if not records:
                self.void()
                return False
            hosts = [r.host for r in sorted(records, key=lambda r: r.preference) if r.host]
        length = directive.cidr4 if self.ip.version == 4 else directive.cidr6
        for host in hosts:
            found = await self.addresses(host)
            if found is None:
                if name == "a":
                    self.void()
                continue
            for address in found:
                if self.ip in ipaddress.ip_network((address, length), strict=False):
                    return True
        return False

    async def explain(self, exp: _Tokens | None, domain: str) -> str:
        """RFC 7208 §6.2: the expanded exp= text, or "" if anything about it goes wrong."""
        if exp is None:
            return ""
        target = await self.target(exp, domain)
        if target is None:
            return ""
        try:
            texts = await self.resolver.txt(target)
        except (DnsNotFound, DnsTemporary):
            return ""
        if len(texts) != 1 or not texts[0].isascii():
            return ""
        try:
            tokens = _macro_string(texts[0], _EXP_LETTERS, domain_spec=False, exp=True)
        except _Abort:
            return ""
        return await self.expand(tokens, domain)


def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        raise ValidationError(f"{ip!r} is not an IP address", field=["ip"]) from None
    # RFC 7208 §5: an IPv4-mapped IPv6 address is the IPv4 address.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


async def check_host(
    resolver: SpfLookup,
    ip: str,
    domain: str,
    sender: str,
    *,
    helo: str = "",
    receiver: str = "",
    identity: str = "mailfrom",
    time_limit: float = DEFAULT_TIME_LIMIT,
    clock: Callable[[], float] = time.time,
) -> SpfResult:
    """RFC 7208 §4 check_host(<ip>, <domain>, <sender>): is `ip` allowed to use `domain`?

    `helo` and `receiver` feed the %{h} and %{r} macros; `clock` (seconds since the epoch)
    feeds %{t}. `identity` is only reported. Never raises for DNS or record problems: they
    are "temperror"/"permerror" results with the reason in `explanation`. Raises
    `ValidationError` if `ip` is not an IP address."""
    evaluation = _Evaluation(
        resolver, _address(ip), sender or f"postmaster@{domain}", helo, receiver, clock
    )
    domain = domain.strip().removesuffix(".").lower()
    try:
        async with asyncio.timeout(time_limit):
            result, explanation, mechanism = await evaluation.check_host(domain)
    except _Abort as exc:
        result, explanation, mechanism = exc.result, exc.message, ""
    except TimeoutError:
        result, explanation, mechanism = "temperror", f"SPF check took over {time_limit:g} s", ""
    return SpfResult(
        result,
        domain if result != "none" or valid_domain(domain) else "",
        identity,
        explanation,
        mechanism,
    )


async def check_spf(
    resolver: SpfLookup,
    ip: str,
    mail_from: str,
    helo: str,
    *,
    receiver: str = "",
    time_limit: float = DEFAULT_TIME_LIMIT,
    clock: Callable[[], float] = time.time,
) -> SpfResult:
    """SPF for an SMTP transaction, following RFC 7208 §2.3 and §2.4:

    1. If `helo` is a domain name (not an address literal or a single label), check the HELO
       identity: check_host(ip, helo, "postmaster@" + helo). A "fail" there is the overall
       result (§2.3), reported with identity "helo".
    2. Otherwise the MAIL FROM identity is the result. An empty `mail_from` ("" or "<>", a
       bounce) means "postmaster@<helo>" (§2.4) — the same check as step 1, so its result is
       reused and reported as identity "mailfrom"; with no usable HELO either, "none".
    """
    helo = helo.strip()
    mail_from = mail_from.strip().removeprefix("<").removesuffix(">")
    options: dict[str, Any] = {
        "helo": helo,
        "receiver": receiver,
        "time_limit": time_limit,
        "clock": clock,
    }
    helo_result = None
    if valid_domain(helo):
        helo_result = await check_host(
            resolver, ip, helo, f"postmaster@{helo}", identity="helo", **options
        )
        if helo_result.result == "fail":
            return helo_result
    if not mail_from:
        if helo_result is None:
            return SpfResult("none", "", "mailfrom", "empty MAIL FROM and no HELO domain")
        return replace(helo_result, identity="mailfrom")
    _, domain = _split_sender(mail_from, helo)
    return await check_host(resolver, ip, domain, mail_from, **options)


__all__ = ["SpfLookup", "SpfResult", "check_host", "check_spf", "is_spf_record", "valid_domain"]
