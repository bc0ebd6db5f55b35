"""DNS lookups (MX, TXT, A/AAAA, TLSA, PTR) behind one small interface; dnspython underneath.

Everything DNS-shaped that inbox needs goes through `DnsLookup`; `Resolver` is the real one.
Callers get plain Python values, never dnspython objects, and only two errors:

* `DnsNotFound` (permanent): NXDOMAIN, or the name exists without records of the asked type
  (NODATA), or the name cannot exist (bad syntax, label too long).
* `DnsTemporary`: timeout, SERVFAIL, no nameserver answered, network error.

Each lookup returns an `Answer` — a plain list with one extra attribute, `authenticated`, which
is True only when the upstream resolver set the AD bit (RFC 4035 §3.2.3). We ask for it with the
EDNS DO bit (RFC 3225) and the AD bit in the query (RFC 6840 §5.7). The AD bit is only worth
trusting when the path to a validating resolver is trusted (e.g. it runs on localhost).

`Resolver` caches answers per (name, type) for their TTL (RFC 1035 §3.2.1, RFC 2181 §8),
capped at `max_ttl`, and "not found" answers per RFC 2308 §5 (the SOA in the authority
section), capped at `max_negative_ttl`. Temporary failures are never cached. Concurrent
identical lookups share one query. Each caller gets its own copy of a cached answer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.reversename

from inbox.errors import ConfigError, DnsNotFound, DnsTemporary, InboxError, ValidationError

T = TypeVar("T")

DNS_PORT = 53
# RFC 6891 §6.2.5 / DNS Flag Day 2020: 1232 bytes avoids IP fragmentation on most paths.
EDNS_PAYLOAD = 1232
# RFC 2308 §5 wants the SOA for negative caching; without one, cache "not found" this long.
NEGATIVE_TTL_WITHOUT_SOA = 60.0


class Answer(list[T], Generic[T]):
    """A list of results plus `authenticated`: the upstream resolver set the AD bit.

    For lookups built from several queries (`ips`), it is True only if every answer that
    contributed records was authenticated.
    """

    authenticated: bool

    def __init__(self, items: Iterable[T] = (), *, authenticated: bool = False) -> None:
        super().__init__(items)
        self.authenticated = authenticated

    def __repr__(self) -> str:
        return f"Answer({list.__repr__(self)}, authenticated={self.authenticated})"


@dataclass(frozen=True)
class MxRecord:
    """One MX record (RFC 1035 §3.3.9). `host` is lowercased, without the trailing dot;
    the RFC 7505 null MX target "." becomes ""."""

    preference: int
    host: str


@dataclass(frozen=True)
class TlsaRecord:
    """One TLSA record (RFC 6698 §2.1): certificate usage, selector, matching type, data."""

    usage: int
    selector: int
    mtype: int
    data: bytes


class DnsLookup(Protocol):
    """What inbox asks of DNS. Tests pass the real `Resolver` pointed at a local server."""

    async def mx(self, name: str) -> Answer[MxRecord]: ...

    async def txt(self, name: str) -> Answer[str]: ...

    async def ips(self, name: str) -> Answer[str]: ...

    async def tlsa(self, name: str) -> Answer[TlsaRecord]: ...

    async def ptr(self, ip: str) -> Answer[str]: ...


def parse_nameserver(spec: str) -> tuple[str, int]:
    """Split "host", "host:port", "[v6]", "[v6]:port" or a bare IPv6 address into (ip, port).

    The host must be an IP address (a resolver cannot look up its own nameserver's name).
    Raises `ConfigError` naming the bad value.
    """
    text = spec.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"nameserver {spec!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"nameserver {spec!r}: expected ':port' after ']'")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"nameserver {spec!r}: not an IP address") from None
    if text.startswith("[") and address.version != 6:
        raise ConfigError(f"nameserver {spec!r}: brackets are for IPv6 addresses")
    port = DNS_PORT
    if port_text or text.endswith(":"):
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
            raise ConfigError(f"nameserver {spec!r}: bad port {port_text!r}")
        port = int(port_text)
    return str(address), port


def _host(name: dns.name.Name) -> str:
    """A DNS name as inbox stores hosts: lowercase ASCII, no trailing dot; the root is ""."""
    return name.to_text(omit_final_dot=True).lower() if name != dns.name.root else ""


class Resolver:
    """The real `DnsLookup`: dnspython's async stub resolver.

    `nameservers` are "ip", "ip:port" or "[v6]:port"; None or empty means /etc/resolv.conf.
    `timeout` bounds each lookup (all nameservers and retries together), in seconds.
    """

    def __init__(self, nameservers: list[str] | None = None, timeout: float = 5.0) -> None:
        try:
            self._resolver = dns.asyncresolver.Resolver(configure=not nameservers)
        except dns.exception.DNSException as exc:
            raise ConfigError(f"cannot read the system resolver configuration: {exc}") from None
        if nameservers:
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(*parse_nameserver(ns)) for ns in nameservers
            ]
        self._resolver.timeout = timeout
        self._resolver.lifetime = timeout
        # RFC 3225: DO asks for DNSSEC records; RFC 6840 §5.7: AD in the query asks the
        # validating resolver to tell us (in the AD bit) whether it validated the answer.
        self._resolver.use_edns(0, dns.flags.DO, EDNS_PAYLOAD)
        self._resolver.flags = dns.flags.RD | dns.flags.AD

    @property
    def nameservers(self) -> list[tuple[str, int]]:
        """(ip, port) of each configured nameserver, in order (from resolv.conf if none given)."""
        servers: list[tuple[str, int]] = []
        for ns in self._resolver.nameservers:
            if isinstance(ns, str):  # from resolv.conf: a plain address on the default port
                servers.append((ns, self._resolver.nameserver_ports.get(ns, self._resolver.port)))
            elif isinstance(ns, dns.nameserver.Do53Nameserver):
                servers.append((ns.address, ns.port))
        return servers

    async def _query(
        self, name: str | dns.name.Name, rdtype: str, *, allow_nodata: bool = False
    ) -> dns.resolver.Answer:
        """One lookup; dnspython errors become `DnsNotFound` / `DnsTemporary`.
        With `allow_nodata`, a name without records of the type gives an empty answer."""
        what = f"{name} {rdtype}"
        try:
            return await self._resolver.resolve(
                name, rdtype, search=False, raise_on_no_answer=not allow_nodata
            )
        except dns.resolver.NXDOMAIN:
            raise DnsNotFound(f"{what}: no such domain (NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            raise DnsNotFound(f"{what}: no records of that type") from None
        except dns.resolver.NoNameservers as exc:
            # Every nameserver failed: SERVFAIL, REFUSED, or could not be reached.
            raise DnsTemporary(f"{what}: no nameserver answered ({exc})") from None
        except dns.exception.Timeout:
            raise DnsTemporary(f"{what}: timed out") from None
        except (dns.name.NameTooLong, dns.exception.SyntaxError) as exc:
            # Bad escapes, empty or over-long labels: such a name cannot exist.
            raise DnsNotFound(f"{what}: not a valid domain name ({exc})") from None
        except dns.exception.DNSException as exc:
            detail = f"{type(exc).__name__}: {exc}"
            raise DnsTemporary(f"{what}: lookup failed ({detail})") from None
        except OSError as exc:
            raise DnsTemporary(f"{what}: network error ({exc})") from None

    @staticmethod
    def _authenticated(answer: dns.resolver.Answer) -> bool:
        return bool(answer.response.flags & dns.flags.AD)

    async def mx(self, name: str) -> Answer[MxRecord]:
        """MX records, in the order received (sorting and shuffling is the caller's job)."""
        answer = await self._query(name, "MX")
        return Answer(
            (MxRecord(rd.preference, _host(rd.exchange)) for rd in answer),
            authenticated=self._authenticated(answer),
        )

    async def txt(self, name: str) -> Answer[str]:
        """TXT records; each record's character-strings joined with "" (RFC 7208 §3.3,
        RFC 6376 §3.6.2.2) and decoded as UTF-8 with bad bytes replaced."""
        answer = await self._query(name, "TXT")
        return Answer(
            (b"".join(rd.strings).decode("utf-8", errors="replace") for rd in answer),
            authenticated=self._authenticated(answer),
        )

    async def ips(self, name: str) -> Answer[str]:
        """A then AAAA addresses, both asked at once. `DnsNotFound` only if neither has any;
        if one family fails temporarily but the other has addresses, those are returned."""
        results = await asyncio.gather(
            self._query(name, "A", allow_nodata=True),
            self._query(name, "AAAA", allow_nodata=True),
            return_exceptions=True,
        )
        found: list[str] = []
        authenticated = True
        errors: list[InboxError] = []
        for result in results:
            if isinstance(result, InboxError):
                errors.append(result)
            elif isinstance(result, BaseException):
                raise result
            elif len(result):
                found.extend(rd.address for rd in result)
                authenticated = authenticated and self._authenticated(result)
        if found:
            return Answer(found, authenticated=authenticated)
        # Temporary first: "try later" beats "does not exist" when the two disagree.
        errors.sort(key=lambda error: not error.temporary)
        if errors:
            raise errors[0]
        raise DnsNotFound(f"{name} A/AAAA: no address records")

    async def tlsa(self, name: str) -> Answer[TlsaRecord]:
        """TLSA records, e.g. for "_25._tcp.mx.example.com" (RFC 7672 §2.2)."""
        answer = await self._query(name, "TLSA")
        return Answer(
            (TlsaRecord(rd.usage, rd.selector, rd.mtype, bytes(rd.cert)) for rd in answer),
            authenticated=self._authenticated(answer),
        )

    async def ptr(self, ip: str) -> Answer[str]:
        """Reverse names for an IPv4/IPv6 address (RFC 1035 §3.5, RFC 3596 §2.5).
        Raises `ValidationError` if `ip` is not an address."""
        try:
            reverse = dns.reversename.from_address(ip)
        except (ValueError, dns.exception.SyntaxError):
            raise ValidationError(f"{ip!r} is not an IP address", field=["ip"]) from None
        answer = await self._query(reverse, "PTR")
        return Answer(
            (_host(rd.target) for rd in answer), authenticated=self._authenticated(answer)
        )


__all__ = [
    "Answer",
    "DnsLookup",
    "MxRecord",
    "Resolver",
    "TlsaRecord",
    "parse_nameserver",
]
