"""Choosing MX hosts for a recipient domain (RFC 5321 §5.1). Does not connect to them.

`mx_hosts` turns a recipient domain into the ordered list of hosts to try:

* the domain is IDNA-encoded first (RFC 5890 A-labels; UTS #46 mapping for user input);
* MX records are sorted by preference, equal preferences shuffled (RFC 5321 §5.1);
* a null MX (RFC 7505) means the domain accepts no mail: `NullMx`, permanent;
* no MX records but an address record: the domain itself, "implicit MX" (RFC 5321 §5.1);
* neither: `DnsNotFound`, permanent (5.1.2); `DnsTemporary` propagates.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import idna

from inbox.errors import DnsNotFound, InboxError
from inbox.resolver import DnsLookup


class NullMx(InboxError):
    """The domain publishes a null MX: it accepts no mail (RFC 7505 §3, reply code §4.2)."""

    code = "NULL_MX"
    temporary = False
    smtp_enhanced = "5.1.10"


@dataclass(frozen=True)
class MxHost:
    """A host to try. `implicit` is True when there was no MX and this is the domain itself."""

    host: str
    preference: int
    implicit: bool
    # The answer naming this host was DNSSEC-authenticated (RFC 7672 §2.2.1: DANE needs it).
    authenticated: bool = False


def ascii_domain(domain: str) -> str:
    """The A-label form of a domain, lowercased, without a trailing dot.

    Raises `DnsNotFound` (5.1.2, bad destination system address) when it cannot be encoded.
    """
    name = domain.strip().rstrip(".")
    if not name:
        raise DnsNotFound(f"{domain!r}: empty domain")
    if name.isascii():
        # Already ASCII (possibly A-labels): keep as is. IDNA2008 would reject names that
        # are fine in DNS, such as ones with "_".
        return name.lower()
    try:
        return idna.encode(name, uts46=True).decode("ascii").lower()
    except idna.IDNAError as exc:
        raise DnsNotFound(f"{domain!r}: not a valid internationalized domain ({exc})") from None


async def mx_hosts(
    resolver: DnsLookup, domain: str, *, rng: random.Random | None = None
) -> list[MxHost]:
    """Hosts to try for mail to `domain`, best first. `rng` shuffles equal preferences
    (pass a seeded one for a fixed order); it defaults to the `random` module's."""
    name = ascii_domain(domain)
    try:
        records = await resolver.mx(name)
    except DnsNotFound:
        # RFC 5321 §5.1: no MX records, but an address record → the domain is its own MX
        # with preference 0. If there is no address either, `DnsNotFound` propagates.
        try:
            addresses = await resolver.ips(name)
        except DnsNotFound:
            raise DnsNotFound(f"{name}: no MX and no address records") from None
        return [MxHost(name, 0, implicit=True,
                       authenticated=bool(getattr(addresses, "authenticated", False)))]

    # RFC 7505 §3: a null MX is one record, preference 0, target "." (our host ""). A "."
    # among other records is no deliverable host either, so it is dropped (§4.3).
    usable = [record for record in records if record.host]
    if not usable:
        raise NullMx(f"{name} accepts no mail (null MX, RFC 7505)")

    shuffle = (rng or random).random
    # RFC 5321 §5.1: lowest preference first; "randomize" among equal preferences. Sorting by
    # host first makes the order depend only on `rng`, not on the order DNS returned them in.
    by_host = sorted(usable, key=lambda record: (record.preference, record.host))
    ordered = sorted(by_host, key=lambda record: (record.preference, shuffle()))
    seen: set[str] = set()
    hosts: list[MxHost] = []
    for record in ordered:
        if record.host not in seen:  # A host listed twice keeps its best preference.
            seen.add(record.host)
            hosts.append(MxHost(record.host, record.preference, implicit=False,
                                authenticated=bool(getattr(records, "authenticated", False))))
    return hosts
