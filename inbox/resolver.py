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
import dns.message
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


# How each record type becomes plain values (the `Answer` items).
_PARSERS: dict[str, Callable[[Any], Any]] = {
    "MX": lambda rd: MxRecord(rd.preference, _host(rd.exchange)),
    # RFC 7208 §3.3, RFC 6376 §3.6.2.2: a TXT record's character-strings are joined with "".
    "TXT": lambda rd: b"".join(rd.strings).decode("utf-8", errors="replace"),
    "A": lambda rd: rd.address,
    "AAAA": lambda rd: rd.address,
    "TLSA": lambda rd: TlsaRecord(rd.usage, rd.selector, rd.mtype, bytes(rd.cert)),
    "PTR": lambda rd: _host(rd.target),
}

# A lookup's result: the records (empty for NODATA), or None for NXDOMAIN.
_Result = Answer[Any] | None


def _copy(result: _Result) -> _Result:
    """A copy the caller may change without changing the cache."""
    return None if result is None else Answer(result, authenticated=result.authenticated)


def _negative_ttl(response: dns.message.Message | None) -> float:
    """RFC 2308 §5: a negative answer lives min(SOA TTL, SOA MINIMUM) from the authority
    section, and no longer than any CNAME followed to reach it (RFC 2308 §6)."""
    if response is None:
        return NEGATIVE_TTL_WITHOUT_SOA
    ttls = [
        min(rrset.ttl, rrset[0].minimum)
        for rrset in response.authority
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset)
    ]
    if not ttls:
        ttls.append(NEGATIVE_TTL_WITHOUT_SOA)
    return min([*ttls, *(rrset.ttl for rrset in response.answer)])


class Resolver:
    """The real `DnsLookup`: dnspython's async stub resolver, with a cache.

    `nameservers` are "ip", "ip:port" or "[v6]:port"; None or empty means /etc/resolv.conf.
    `timeout` bounds each lookup (all nameservers and retries together), in seconds.

    With `cache` (see the module docstring), answers are kept at most `max_ttl` seconds,
    "not found" at most `max_negative_ttl`, and at most `max_entries` of them (the least
    recently used go first). `clock` tells the time in seconds for expiry. Without `cache`,
    every lookup sends its queries.
    """

    def __init__(
        self,
        nameservers: list[str] | None = None,
        timeout: float = 5.0,
        *,
        cache: bool = True,
        max_ttl: float = 3600,
        max_negative_ttl: float = 300,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
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
        self._use_cache = cache
        self._max_ttl = max_ttl
        self._max_negative_ttl = max_negative_ttl
        self._max_entries = max_entries
        self._clock = clock
        # (name, type) -> (expiry by `clock`, result); least recently used first.
        self._cache: OrderedDict[tuple[dns.name.Name, str], tuple[float, _Result]] = OrderedDict()
        # (name, type) -> the task fetching it, which returns a result or the error to raise.
        self._inflight: dict[tuple[dns.name.Name, str], asyncio.Task[_Result | InboxError]] = {}
        # Name text as asked -> canonical Name (parsing one costs more than the cache hit).
        self._names: dict[str, dns.name.Name] = {}

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

    async def _query(self, name: str | dns.name.Name, rdtype: str) -> tuple[_Result, float]:
        """One query, uncached: the result and how long it may be cached (0: not at all).
        dnspython errors become `DnsTemporary`, or `DnsNotFound` for impossible names."""
        what = f"{name} {rdtype}"
        try:
            answer = await self._resolver.resolve(
                name, rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN as exc:
            responses = list(exc.kwargs.get("responses", {}).values())
            ttl = _negative_ttl(responses[0] if responses else None)
            return None, max(0.0, min(ttl, self._max_negative_ttl))
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
        authenticated = bool(answer.response.flags & dns.flags.AD)
        if answer.rrset is None:  # NODATA: the name exists without records of this type
            ttl = min(_negative_ttl(answer.response), self._max_negative_ttl)
            return Answer(authenticated=authenticated), max(0.0, ttl)
        parse = _PARSERS[rdtype]
        # The smallest TTL of the answer and of any CNAME followed to reach it.
        ttl = min(answer.chaining_result.minimum_ttl, self._max_ttl)
        return Answer(map(parse, answer), authenticated=authenticated), max(0.0, ttl)

    async def _fetch(
        self, name: str | dns.name.Name, rdtype: str, key: tuple[dns.name.Name, str]
    ) -> _Result | InboxError:
        """Query and cache; errors are returned, so each waiter can raise its own copy."""
        sent = self._clock()
        try:
            result, ttl = await self._query(name, rdtype)
        except InboxError as exc:
            return exc
        if ttl > 0:
            self._cache[key] = (sent + ttl, result)
            self._cache.move_to_end(key)
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        return result

    def _landed(self, key: tuple[dns.name.Name, str], task: asyncio.Task[Any]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved even if every waiter was cancelled meanwhile

    async def _lookup(self, name: str | dns.name.Name, rdtype: str) -> _Result:
        """The (copied) cached result if fresh; else join the query in flight or send one."""
        if not self._use_cache:
            return (await self._query(name, rdtype))[0]
        qname = name.canonicalize() if isinstance(name, dns.name.Name) else self._names.get(name)
        if qname is None:
            assert isinstance(name, str)
            try:
                qname = dns.name.from_text(name).canonicalize()  # lowercase (RFC 4343)
            except dns.exception.DNSException:
                return (await self._query(name, rdtype))[0]  # it says why the name is impossible
            if len(self._names) >= self._max_entries:
                self._names.clear()
            self._names[name] = qname
        key = (qname, rdtype)
        cached = self._cache.get(key)
        if cached is not None:
            expires, result = cached
            if self._clock() < expires:
                self._cache.move_to_end(key)
                return _copy(result)
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None or task.get_loop() is not asyncio.get_running_loop():
            task = asyncio.ensure_future(self._fetch(name, rdtype, key))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._landed(key, done))
        # Shielded: a caller that gives up does not cancel the query for the others.
        outcome = await asyncio.shield(task)
        if isinstance(outcome, InboxError):
            raise type(outcome)(outcome.message)
        return _copy(outcome)

    async def _records(
        self, name: str | dns.name.Name, rdtype: str, *, allow_nodata: bool = False
    ) -> Answer[Any]:
        """Records of one type; `DnsNotFound` for NXDOMAIN, and for NODATA unless allowed
        (then the answer is empty)."""
        result = await self._lookup(name, rdtype)
        if result is None:
            raise DnsNotFound(f"{name} {rdtype}: no such domain (NXDOMAIN)")
        if not result and not allow_nodata:
            raise DnsNotFound(f"{name} {rdtype}: no records of that type")
        return result

    async def mx(self, name: str) -> Answer[MxRecord]:
        """MX records, in the order received (sorting and shuffling is the caller's job)."""
        return await self._records(name, "MX")

    async def txt(self, name: str) -> Answer[str]:
        """TXT records; each record's character-strings joined with "" (RFC 7208 §3.3,
        RFC 6376 §3.6.2.2) and decoded as UTF-8 with bad bytes replaced."""
        return await self._records(name, "TXT")

    async def ips(self, name: str) -> Answer[str]:
        """A then AAAA addresses, both asked at once. `DnsNotFound` only if neither has any;
        if one family fails temporarily but the other has addresses, those are returned."""
        results = await asyncio.gather(
            self._records(name, "A", allow_nodata=True),
            self._records(name, "AAAA", allow_nodata=True),
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
            elif result:
                found.extend(result)
                authenticated = authenticated and result.authenticated
        if found:
            return Answer(found, authenticated=authenticated)
        # Temporary first: "try later" beats "does not exist" when the two disagree.
        errors.sort(key=lambda error: not error.temporary)
        if errors:
            raise errors[0]
        raise DnsNotFound(f"{name} A/AAAA: no address records")

    async def a(self, name: str) -> Answer[str]:
        """IPv4 addresses only (one A query), e.g. for SPF's "a" and "exists" mechanisms,
        which look up exactly one type (RFC 7208 §5.3, §5.7)."""
        return await self._records(name, "A")

    async def aaaa(self, name: str) -> Answer[str]:
        """IPv6 addresses only (one AAAA query, RFC 3596 §2.1)."""
        return await self._records(name, "AAAA")

    async def tlsa(self, name: str) -> Answer[TlsaRecord]:
        """TLSA records, e.g. for "_25._tcp.mx.example.com" (RFC 7672 §2.2)."""
        return await self._records(name, "TLSA")

    async def ptr(self, ip: str) -> Answer[str]:
        """Reverse names for an IPv4/IPv6 address (RFC 1035 §3.5, RFC 3596 §2.5).
        Raises `ValidationError` if `ip` is not an address."""
        try:
            reverse = dns.reversename.from_address(ip)
        except (ValueError, dns.exception.SyntaxError):
            raise ValidationError(f"{ip!r} is not an IP address", field=["ip"]) from None
        return await self._records(reverse, "PTR")


__all__ = [
    "Answer",
    "DnsLookup",
    "MxRecord",
    "Resolver",
    "TlsaRecord",
    "parse_nameserver",
]
