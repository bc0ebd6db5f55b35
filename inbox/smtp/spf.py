"""SPF (RFC 7208) for inbound mail: check_host() and the HELO / MAIL FROM checks. Owns the
evaluation and the lookup limits (record syntax is inbox.smtp.spf_record, macros
inbox.smtp.spf_macros); DNS is a resolver passed in, and what to do with a result (reject, add
a header) is the caller's.

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
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from inbox.errors import DnsNotFound, DnsTemporary, ValidationError
from inbox.smtp.spf_macros import (
    EXP_LETTERS,
    Abort,
    MacroExpander,
    Tokens,
    macro_string,
    perm,
    split_sender,
    valid_domain,
)
from inbox.smtp.spf_record import MECHANISMS, QUALIFIERS, Directive, is_spf_record, parse_record

# RFC 7208 §4.6.4
DNS_TERM_LIMIT = 10
VOID_LOOKUP_LIMIT = 2
MX_NAME_LIMIT = 10
PTR_NAME_LIMIT = 10
DEFAULT_TIME_LIMIT = 20.0  # RFC 7208 §4.6.4: allow at least 20 seconds


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
        self.macros = MacroExpander(ip, sender, helo, receiver, clock, self._ptr_names)
        self.terms = 0
        self.voids = 0
        self._ptr: tuple[bool, list[str]] | None = None  # (void, validated names)

    # -- limits and lookups ---------------------------------------------------------------

    def count_term(self) -> None:
        self.terms += 1
        if self.terms > DNS_TERM_LIMIT:
            raise perm(f"more than {DNS_TERM_LIMIT} DNS-querying terms (RFC 7208 §4.6.4)")

    def void(self) -> None:
        self.voids += 1
        if self.voids > VOID_LOOKUP_LIMIT:
            raise perm(f"more than {VOID_LOOKUP_LIMIT} void lookups (RFC 7208 §4.6.4)")

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
            raise Abort("temperror", exc.message) from None

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

    async def _ptr_names(self) -> list[str]:
        return (await self.validated_names())[1]

    # -- check_host (RFC 7208 §4) ---------------------------------------------------------

    async def record(self, domain: str) -> str | None:
        """RFC 7208 §4.4-4.5: the one "v=spf1" TXT record, None if there is none."""
        try:
            texts = await self.resolver.txt(domain)
        except DnsNotFound:
            return None
        except DnsTemporary as exc:
            raise Abort("temperror", exc.message) from None
        records = [text for text in texts if is_spf_record(text)]
        if len(records) > 1:
            raise perm(f"{domain} has {len(records)} SPF records")
        return records[0] if records else None

    async def check_host(self, domain: str) -> tuple[str, str, str]:
        """(result, explanation, mechanism) for `domain`; `Abort` for errors."""
        domain = domain.removesuffix(".")
        if not valid_domain(domain):
            return "none", f"{domain!r} is not a valid domain name", ""
        text = await self.record(domain)
        if text is None:
            return "none", f"no SPF record at {domain}", ""
        record = parse_record(text)
        for directive in record.directives:
            if await self.matches(directive, domain):
                explanation = ""
                if directive.result == "fail":
                    explanation = await self.explain(record.exp, domain)
                return directive.result, explanation, directive.text
        if record.redirect is not None:  # RFC 7208 §6.1
            self.count_term()
            target = await self.macros.target(record.redirect, domain)
            result = await self.check_host(target) if target else ("none", "", "")
            if result[0] == "none":
                raise perm(f"redirect to {target or 'an invalid name'}: no SPF record")
            return result
        return "neutral", "", ""  # RFC 7208 §4.7

    async def matches(self, directive: Directive, domain: str) -> bool:
        """RFC 7208 §5: does the mechanism match the client?"""
        name = directive.name
        if name == "all":
            return True
        if directive.network is not None:  # ip4 / ip6 (§5.6)
            return self.ip in directive.network
        self.count_term()
        target = await self.macros.target(directive.target, domain)
        if name == "include":  # RFC 7208 §5.2
            result, _, _ = await self.check_host(target) if target else ("none", "", "")
            if result in ("none", "permerror"):
                raise perm(f"include:{target or 'an invalid name'}: no SPF record")
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
                raise Abort("temperror", exc.message) from None
        if name == "a":  # RFC 7208 §5.3
            hosts = [target]
        else:  # mx, RFC 7208 §5.4
            try:
                records = list(await self.resolver.mx(target))
            except DnsNotFound:
                records = []
            except DnsTemporary as exc:
                raise Abort("temperror", exc.message) from None
            if len(records) > MX_NAME_LIMIT:
                raise perm(f"{target} has more than {MX_NAME_LIMIT} MX records")
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

    async def explain(self, exp: Tokens | None, domain: str) -> str:
        """RFC 7208 §6.2: the expanded exp= text, or "" if anything about it goes wrong."""
        if exp is None:
            return ""
        target = await self.macros.target(exp, domain)
        if target is None:
            return ""
        try:
            texts = await self.resolver.txt(target)
        except (DnsNotFound, DnsTemporary):
            return ""
        if len(texts) != 1 or not texts[0].isascii():
            return ""
        try:
            tokens = macro_string(texts[0], EXP_LETTERS, domain_spec=False, exp=True)
        except Abort:
            return ""
        return await self.macros.expand(tokens, domain)


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
    except Abort as exc:
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
    _, domain = split_sender(mail_from, helo)
    return await check_host(resolver, ip, domain, mail_from, **options)


__all__ = [
    "MECHANISMS", "QUALIFIERS", "SpfLookup", "SpfResult", "check_host", "check_spf",
    "is_spf_record", "valid_domain",
]
