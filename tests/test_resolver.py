"""inbox.resolver against a real DNS server on 127.0.0.1 (tests/support/dnsserver.py)."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import dns.message
import pytest

from inbox.errors import ConfigError, DnsNotFound, DnsTemporary, ValidationError
from inbox.resolver import Answer, MxRecord, Resolver, TlsaRecord, parse_nameserver
from tests.support.dnsserver import DnsServer
from tests.support.fixtures_dns import dns_server, resolver  # noqa: F401

# ruff: noqa: F811 - pytest injects the imported fixtures by parameter name.

# A 2048-bit RSA public key as published in DKIM records (RFC 6376 §3.6.1): ~400 characters.
DKIM_KEY = (
    "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAwz9ZQ3kKaWTVN4R1aVXbR6T8U2mO5iA8yJ5Xp0p4l3CF"
    "Z1nQm8Vh6K9Gd0P3y7xqW2JkT4sR1bN0cE5uH8fA9LzQ6wY3tM2vD7iB5oX1eC4nK0jS8hG6aU2lP9rV3mF7qT"
    "1yW5zE8dO4bI0xN6gH2cJ9kL3pA7sR5uQ1vM8wB4eF0iY6tK2nZ9oD3hC7jG5aX1lP8rU4mS0qV6wE2yT9zB3dN"
    "7fH5kO1iL8gJ4cA0pR6sM2uX9vQ3wY7eT5bZ1nD8hF4kC0jG6aI2lO9rP3mS7qU5vW1xE8yB4zN0dH6fK2iL9gJ"
    "3cA7pR5sM1uQ8vX4wY0eT6bZ2nD9hF5kC3jG7aI1lO8rP4mS0qU6vW2xE9yB5zN1dH7fK3iL0gJ4cA8pR6sM2u"
    "QIDAQAB"
)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("192.0.2.1", ("192.0.2.1", 53)),
        ("192.0.2.1:5353", ("192.0.2.1", 5353)),
        (" 127.0.0.1:53 ", ("127.0.0.1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[2001:db8::1]", ("2001:db8::1", 53)),
        ("2001:DB8::1", ("2001:db8::1", 53)),
        ("::1", ("::1", 53)),
    ],
    ids=["v4", "v4-port", "v4-spaces", "v6-port", "v6-brackets", "v6-bare-upper", "v6-loopback"],
)
def test_parse_nameserver(spec: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "ns.example.com",
        "ns.example.com:53",
        "192.0.2.1:",
        "192.0.2.1:0",
        "192.0.2.1:65536",
        "192.0.2.1:dns",
        "[::1",
        "[::1]53",
        "[::1]:",
        "[192.0.2.1]:53",
        "",
    ],
    ids=[
        "hostname",
        "hostname-port",
        "empty-port",
        "port-0",
        "port-too-big",
        "port-text",
        "unclosed-bracket",
        "no-colon",
        "bracket-empty-port",
        "bracketed-v4",
        "empty",
    ],
)
def test_parse_nameserver_rejects(spec: str) -> None:
    with pytest.raises(ConfigError, match="nameserver"):
        parse_nameserver(spec)


def test_resolver_uses_given_nameservers_and_ports() -> None:
    r = Resolver(["127.0.0.1:5300", "[::1]:5301", "192.0.2.1"], timeout=1)
    assert r.nameservers == [("127.0.0.1", 5300), ("::1", 5301), ("192.0.2.1", 53)]


async def test_mx_records(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("example.test", "MX", "10 MX1.Example.Test.")
    dns_server.add("example.test", "MX", "20 mx2.example.test.")
    records = await resolver.mx("example.test")
    assert isinstance(records, Answer)
    assert sorted(records, key=lambda r: r.preference) == [
        MxRecord(10, "mx1.example.test"),
        MxRecord(20, "mx2.example.test"),
    ]
    assert records.authenticated is False


async def test_null_mx_record_host_is_empty(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("nomail.test", "MX", "0 .")
    assert await resolver.mx("nomail.test") == [MxRecord(0, "")]


async def test_authenticated_follows_the_ad_bit(dns_server: DnsServer) -> None:
    resolver = Resolver([dns_server.address], timeout=2, cache=False)
    dns_server.add("example.test", "TXT", '"hello"')
    assert (await resolver.txt("example.test")).authenticated is False
    dns_server.authenticated = True  # as a validating resolver would (RFC 6840 §5.7)
    answer = await resolver.txt("example.test")
    assert answer == ["hello"]
    assert answer.authenticated is True


async def test_long_txt_is_split_and_joined(dns_server: DnsServer, resolver: Resolver) -> None:
    text = f"v=DKIM1; k=rsa; p={DKIM_KEY}"
    assert len(text) > 400
    dns_server.add_txt("sel._domainkey.example.test", text)
    dns_server.add("quoted._domainkey.example.test", "TXT", f'"{text}"')
    assert await resolver.txt("sel._domainkey.example.test") == [text]
    assert await resolver.txt("quoted._domainkey.example.test") == [text]


async def test_txt_strings_presentation_and_bad_utf8(
    dns_server: DnsServer, resolver: Resolver
) -> None:
    dns_server.add("example.test", "TXT", '"v=spf1 " "-all"')
    dns_server.add("raw.example.test", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")  # unquoted: literal
    dns_server.add_txt("bytes.example.test", b"ok \xff")
    assert await resolver.txt("example.test") == ["v=spf1 -all"]
    assert await resolver.txt("raw.example.test") == ["v=spf1 ip4:192.0.2.0/24 -all"]
    assert await resolver.txt("bytes.example.test") == ["ok \ufffd"]


async def test_big_txt_answer_retries_over_tcp(dns_server: DnsServer, resolver: Resolver) -> None:
    texts = [f"record-{i}-" + "x" * 300 for i in range(10)]
    for text in texts:
        dns_server.add_txt("big.example.test", text)
    assert sorted(await resolver.txt("big.example.test")) == sorted(texts)
    # Truncated (TC) over UDP, then the same question over TCP (RFC 7766).
    assert dns_server.transports("big.example.test", "TXT") == ["udp", "tcp"]


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (
            [("A", "127.0.0.1"), ("A", "127.0.0.2"), ("AAAA", "::1")],
            ["127.0.0.1", "127.0.0.2", "::1"],
        ),
        ([("A", "192.0.2.7")], ["192.0.2.7"]),
        ([("AAAA", "2001:db8::25")], ["2001:db8::25"]),
    ],
    ids=["a-and-aaaa", "a-only", "aaaa-only"],
)
async def test_ips(
    dns_server: DnsServer, resolver: Resolver, records: list[tuple[str, str]], expected: list[str]
) -> None:
    for rtype, value in records:
        dns_server.add("host.example.test", rtype, value)
    assert sorted(await resolver.ips("host.example.test")) == sorted(expected)
    assert sorted(dns_server.transports("host.example.test", "A")) == ["udp"]
    assert sorted(dns_server.transports("host.example.test", "AAAA")) == ["udp"]


async def test_ips_without_addresses(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("example.test", "MX", "10 mx.example.test.")
    with pytest.raises(DnsNotFound, match="example.test A/AAAA"):
        await resolver.ips("example.test")
    with pytest.raises(DnsNotFound, match="NXDOMAIN"):
        await resolver.ips("missing.example.test")


async def test_tlsa(dns_server: DnsServer, resolver: Resolver) -> None:
    digest = "0c72ac70b745ac19998811b131d662c9ac69dbdbe7cb23e5b514b56664c5d3d6"
    dns_server.add("_25._tcp.mx.example.test", "TLSA", f"3 1 1 {digest}")
    dns_server.add("_25._tcp.mx.example.test", "TLSA", "2 0 0 3082")
    records = await resolver.tlsa("_25._tcp.mx.example.test")
    assert sorted(records, key=lambda r: r.usage) == [
        TlsaRecord(2, 0, 0, bytes.fromhex("3082")),
        TlsaRecord(3, 1, 1, bytes.fromhex(digest)),
    ]


@pytest.mark.parametrize(
    ("ip", "reverse"),
    [("127.0.0.1", "1.0.0.127.in-addr.arpa"), ("::1", "1." + "0." * 31 + "ip6.arpa")],
    ids=["v4", "v6"],
)
async def test_ptr(dns_server: DnsServer, resolver: Resolver, ip: str, reverse: str) -> None:
    dns_server.add(reverse, "PTR", "MX.Example.Test.")
    assert await resolver.ptr(ip) == ["mx.example.test"]


async def test_ptr_rejects_non_address(resolver: Resolver) -> None:
    with pytest.raises(ValidationError):
        await resolver.ptr("mx.example.test")


async def test_cname_is_followed_in_zone(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("alias.example.test", "CNAME", "target.example.test.")
    dns_server.add("target.example.test", "TXT", '"at target"')
    assert await resolver.txt("alias.example.test") == ["at target"]


async def test_zone_text(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.load_zone_text(
        "example.test.",
        """
        @      3600 IN SOA ns.example.test. admin.example.test. 1 7200 900 1209600 300
        @           IN MX  10 mx
        mx          IN A   127.0.0.1
        _dmarc      IN TXT "v=DMARC1; p=reject"
        """,
    )
    assert await resolver.mx("example.test") == [MxRecord(10, "mx.example.test")]
    assert await resolver.ips("mx.example.test") == ["127.0.0.1"]
    assert await resolver.txt("_dmarc.example.test") == ["v=DMARC1; p=reject"]
    with pytest.raises(DnsNotFound, match="no records of that type"):
        await resolver.txt("mx.example.test")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing.example.test", r"missing\.example\.test MX: no such domain \(NXDOMAIN\)"),
        ("example.test", r"example\.test MX: no records of that type"),
        ("_domainkey.example.test", r"_domainkey\.example\.test MX: no records"),  # RFC 8020
        ("a..example.test", "not a valid domain name"),
        ("x" * 64 + ".example.test", "not a valid domain name"),
    ],
    ids=["nxdomain", "nodata", "empty-non-terminal", "empty-label", "label-too-long"],
)
async def test_not_found(
    dns_server: DnsServer, resolver: Resolver, name: str, message: str
) -> None:
    dns_server.add("example.test", "TXT", '"exists"')
    dns_server.add("sel._domainkey.example.test", "TXT", '"v=DKIM1"')
    with pytest.raises(DnsNotFound, match=message) as caught:
        await resolver.mx(name)
    assert caught.value.temporary is False


async def test_servfail_is_temporary_and_fast(dns_server: DnsServer) -> None:
    dns_server.add("broken.test", "MX", "10 mx.broken.test.")
    dns_server.set_servfail("broken.test")
    started = time.monotonic()
    with pytest.raises(DnsTemporary, match="broken.test MX") as caught:
        await Resolver([dns_server.address], timeout=1).mx("broken.test")
    assert time.monotonic() - started < 0.5
    assert caught.value.temporary is True
    assert caught.value.smtp_reply().startswith("451 4.4.3 ")


async def test_timeout_is_temporary(dns_server: DnsServer) -> None:
    dns_server.set_silent("slow.test")
    started = time.monotonic()
    with pytest.raises(DnsTemporary, match="slow.test TXT: timed out"):
        await Resolver([dns_server.address], timeout=0.3).txt("slow.test")
    assert time.monotonic() - started < 1.5


async def test_unreachable_nameserver_is_temporary() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens there any more: ICMP port unreachable (or a timeout), never a crash.
    with pytest.raises(DnsTemporary):
        await Resolver([f"127.0.0.1:{port}"], timeout=0.5).ips("example.test")


# -- the cache -------------------------------------------------------------------------------


class FakeClock:
    """An injectable clock that only moves when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cached_resolver(dns_server: DnsServer, clock: FakeClock, **options: Any) -> Resolver:
    return Resolver([dns_server.address], timeout=2, clock=clock, **options)


def sent(dns_server: DnsServer, name: str, rtype: str) -> int:
    """How many queries the server received for `name`/`rtype`."""
    return len(dns_server.transports(name, rtype))


@pytest.mark.parametrize(
    ("method", "arg", "again", "records", "expected"),
    [
        (
            "mx",
            "example.test",
            "EXAMPLE.Test.",
            [("example.test", "MX", "10 mx.")],
            [MxRecord(10, "mx")],
        ),
        ("txt", "example.test", "Example.TEST", [("example.test", "TXT", '"t"')], ["t"]),
        (
            "ips",
            "h.example.test",
            "H.example.test",
            [("h.example.test", "A", "192.0.2.1"), ("h.example.test", "AAAA", "::1")],
            ["192.0.2.1", "::1"],
        ),
        ("ptr", "127.0.0.1", "127.0.0.1", [("1.0.0.127.in-addr.arpa", "PTR", "h.")], ["h"]),
        (
            "tlsa",
            "_25._tcp.mx.test",
            "_25._TCP.MX.test",
            [("_25._tcp.mx.test", "TLSA", "3 0 0 00")],
            [TlsaRecord(3, 0, 0, b"\0")],
        ),
    ],
    ids=["mx", "txt", "ips", "ptr", "tlsa"],
)
async def test_second_lookup_within_ttl_sends_no_query(
    dns_server: DnsServer,
    method: str,
    arg: str,
    again: str,
    records: list[tuple[str, str, str]],
    expected: list[Any],
) -> None:
    for name, rtype, value in records:
        dns_server.add(name, rtype, value)
    clock = FakeClock()
    resolver = cached_resolver(dns_server, clock)
    first = await getattr(resolver, method)(arg)
    clock.now += 59
    second = await getattr(resolver, method)(again)  # names are compared case-insensitively
    assert first == expected
    assert second == first
    for name, rtype, _ in records:
        assert sent(dns_server, name, rtype) == 1


@pytest.mark.parametrize(
    ("records", "options", "lifetime"),
    [
        ([("a.test", "TXT", 30)], {}, 30),
        ([("a.test", "TXT", 86400)], {"max_ttl": 100}, 100),
        # RFC 2181 §10.1.1 / RFC 2308 §6: the chain lives as long as its shortest TTL.
        ([("a.test", "CNAME", 10), ("b.test", "TXT", 600)], {}, 10),
    ],
    ids=["record-ttl", "capped-at-max-ttl", "cname-ttl"],
)
async def test_new_query_after_ttl_sees_changed_record(
    dns_server: DnsServer,
    records: list[tuple[str, str, int]],
    options: dict[str, Any],
    lifetime: int,
) -> None:
    for name, rtype, ttl in records:
        value = "b.test." if rtype == "CNAME" else '"old"'
        dns_server.add(name, rtype, value, ttl=ttl)
    target = records[-1][0]
    clock = FakeClock()
    resolver = cached_resolver(dns_server, clock, **options)
    assert await resolver.txt("a.test") == ["old"]
    dns_server.remove(target, "TXT")
    dns_server.add(target, "TXT", '"new"')
    clock.now += lifetime - 0.5
    assert await resolver.txt("a.test") == ["old"]
    assert sent(dns_server, "a.test", "TXT") == 1
    clock.now += 0.5
    assert await resolver.txt("a.test") == ["new"]
    assert sent(dns_server, "a.test", "TXT") == 2


@pytest.mark.parametrize(
    ("soa", "name", "options", "lifetime"),
    [
        # RFC 2308 §5: min(SOA TTL, SOA MINIMUM) = min(3600, 120).
        ("3600 1209600 120", "missing.example.test", {}, 120),
        ("30 1209600 120", "missing.example.test", {}, 30),
        ("3600 1209600 86400", "missing.example.test", {}, 300),
        ("3600 1209600 86400", "missing.example.test", {"max_negative_ttl": 10}, 10),
        (None, "missing.example.test", {}, 60),
        ("3600 1209600 120", "nodata.example.test", {}, 120),
    ],
    ids=["soa-minimum", "soa-ttl", "capped", "capped-option", "no-soa-default", "nodata"],
)
async def test_not_found_is_cached_for_the_negative_ttl(
    dns_server: DnsServer, soa: str | None, name: str, options: dict[str, Any], lifetime: int
) -> None:
    if soa is not None:
        ttl, expire, minimum = soa.split()
        dns_server.load_zone_text(
            "example.test.",
            f"@ {ttl} IN SOA ns.example.test. admin.example.test. 1 7200 900 {expire} {minimum}",
        )
    dns_server.add("nodata.example.test", "A", "192.0.2.1")
    clock = FakeClock()
    resolver = cached_resolver(dns_server, clock, **options)
    with pytest.raises(DnsNotFound):
        await resolver.txt(name)
    dns_server.add(name, "TXT", '"now it exists"')
    clock.now += lifetime - 0.5
    with pytest.raises(DnsNotFound):
        await resolver.txt(name)
    assert sent(dns_server, name, "TXT") == 1
    clock.now += 0.5
    assert await resolver.txt(name) == ["now it exists"]
    assert sent(dns_server, name, "TXT") == 2


async def test_nxdomain_message_survives_the_cache(dns_server: DnsServer) -> None:
    resolver = cached_resolver(dns_server, FakeClock())
    for name in ("missing.test", "MISSING.test"):
        with pytest.raises(DnsNotFound, match=rf"{name} MX: no such domain \(NXDOMAIN\)"):
            await resolver.mx(name)
    with pytest.raises(DnsNotFound, match="NXDOMAIN"):
        await resolver.ips("missing.test")
    assert sent(dns_server, "missing.test", "MX") == 1


async def test_servfail_is_not_cached(dns_server: DnsServer) -> None:
    dns_server.add("broken.test", "MX", "10 mx.broken.test.")
    dns_server.set_servfail("broken.test")
    resolver = cached_resolver(dns_server, FakeClock())
    for _ in range(2):
        with pytest.raises(DnsTemporary):
            await resolver.mx("broken.test")
    dns_server.set_servfail("broken.test", on=False)
    assert await resolver.mx("broken.test") == [MxRecord(10, "mx.broken.test")]
    assert sent(dns_server, "broken.test", "MX") == 3


@pytest.mark.parametrize(
    ("name", "error"),
    [("example.test", None), ("missing.test", DnsNotFound), ("broken.test", DnsTemporary)],
    ids=["answer", "nxdomain", "servfail"],
)
async def test_concurrent_identical_lookups_send_one_query(
    dns_server: DnsServer, name: str, error: type[Exception] | None
) -> None:
    dns_server.add("example.test", "MX", "10 mx.example.test.")
    dns_server.add("broken.test", "MX", "10 mx.broken.test.")
    dns_server.set_servfail("broken.test")
    resolver = cached_resolver(dns_server, FakeClock())
    results = await asyncio.gather(*(resolver.mx(name) for _ in range(20)), return_exceptions=True)
    assert sent(dns_server, name, "MX") == 1
    if error is None:
        assert all(r == [MxRecord(10, "mx.example.test")] for r in results)
        assert len({id(r) for r in results}) == 20  # each caller has its own copy
    else:
        assert all(type(r) is error for r in results)
        assert len({id(r) for r in results}) == 20  # and its own exception


async def test_cancelled_caller_does_not_cancel_the_others(dns_server: DnsServer) -> None:
    dns_server.set_silent("slow.test")
    resolver = Resolver([dns_server.address], timeout=0.3)
    first = asyncio.create_task(resolver.txt("slow.test"))
    second = asyncio.create_task(resolver.txt("slow.test"))
    await asyncio.sleep(0.05)
    first.cancel()
    with pytest.raises(DnsTemporary, match="timed out"):
        await second
    assert first.cancelled()


async def test_cache_disabled_sends_every_query(dns_server: DnsServer) -> None:
    dns_server.add("example.test", "MX", "10 mx.example.test.")
    resolver = cached_resolver(dns_server, FakeClock(), cache=False)
    for _ in range(3):
        await resolver.mx("example.test")
    await asyncio.gather(*(resolver.mx("example.test") for _ in range(3)))
    assert sent(dns_server, "example.test", "MX") == 6


async def test_zero_ttl_is_never_cached(dns_server: DnsServer) -> None:
    dns_server.add("example.test", "MX", "10 mx.example.test.", ttl=0)
    dns_server.load_zone_text(
        "zero.test.", "@ 0 IN SOA ns.zero.test. admin.zero.test. 1 7200 900 1209600 0"
    )
    resolver = cached_resolver(dns_server, FakeClock())
    for _ in range(3):
        await resolver.mx("example.test")
        with pytest.raises(DnsNotFound):
            await resolver.mx("missing.zero.test")
    assert sent(dns_server, "example.test", "MX") == 3
    assert sent(dns_server, "missing.zero.test", "MX") == 3


async def test_callers_cannot_change_the_cache(dns_server: DnsServer) -> None:
    dns_server.add("example.test", "MX", "10 mx.example.test.")
    dns_server.authenticated = True
    resolver = cached_resolver(dns_server, FakeClock())
    answer = await resolver.mx("example.test")
    answer.append(MxRecord(0, "evil.test"))
    answer.authenticated = False
    again = await resolver.mx("example.test")
    assert again == [MxRecord(10, "mx.example.test")]
    assert again.authenticated is True
    again.clear()
    assert await resolver.mx("example.test") == [MxRecord(10, "mx.example.test")]
    assert sent(dns_server, "example.test", "MX") == 1


async def test_least_recently_used_is_evicted(dns_server: DnsServer) -> None:
    for name in ("a.test", "b.test", "c.test"):
        dns_server.add(name, "TXT", f'"{name}"')
    resolver = cached_resolver(dns_server, FakeClock(), max_entries=2)
    for name in ("a.test", "b.test", "a.test", "c.test"):  # c evicts b, used less recently
        await resolver.txt(name)
    await resolver.txt("a.test")
    await resolver.txt("b.test")
    assert [sent(dns_server, n, "TXT") for n in ("a.test", "b.test", "c.test")] == [1, 2, 1]


# -- single-family lookups (SPF's "a" and "exists" ask exactly one type) ---------------------


@pytest.mark.parametrize(
    ("method", "records", "expected"),
    [
        (
            "a",
            [("A", "192.0.2.1"), ("A", "192.0.2.2"), ("AAAA", "2001:db8::1")],
            ["192.0.2.1", "192.0.2.2"],
        ),
        ("aaaa", [("A", "192.0.2.1"), ("AAAA", "2001:db8::1")], ["2001:db8::1"]),
    ],
    ids=["a", "aaaa"],
)
async def test_single_family_lookup(
    dns_server: DnsServer,
    resolver: Resolver,
    method: str,
    records: list[tuple[str, str]],
    expected: list[str],
) -> None:
    for rtype, value in records:
        dns_server.add("host.example.test", rtype, value)
    assert sorted(await getattr(resolver, method)("host.example.test")) == expected
    other = "AAAA" if method == "a" else "A"
    assert dns_server.transports("host.example.test", other) == []  # only one query type


@pytest.mark.parametrize(
    ("method", "name", "message"),
    [
        ("a", "v6only.example.test", "v6only.example.test A: no records of that type"),
        ("aaaa", "v4only.example.test", "v4only.example.test AAAA: no records of that type"),
        ("a", "missing.example.test", r"missing.example.test A: no such domain \(NXDOMAIN\)"),
    ],
    ids=["a-nodata", "aaaa-nodata", "a-nxdomain"],
)
async def test_single_family_not_found(
    dns_server: DnsServer, resolver: Resolver, method: str, name: str, message: str
) -> None:
    dns_server.add("v6only.example.test", "AAAA", "2001:db8::1")
    dns_server.add("v4only.example.test", "A", "192.0.2.1")
    with pytest.raises(DnsNotFound, match=message):
        await getattr(resolver, method)(name)


async def test_server_silent_only_for_missing_types(dns_server: DnsServer) -> None:
    # As the RFC 7208 suite's TIMEOUT entries: records that exist are answered, others not.
    dns_server.add("half.test", "TXT", '"v=spf1 -all"')
    dns_server.set_silent("half.test", missing_only=True)
    patient = Resolver([dns_server.address], timeout=5, cache=False)
    assert await patient.txt("half.test") == ["v=spf1 -all"]
    with pytest.raises(DnsTemporary, match="timed out"):
        await Resolver([dns_server.address], timeout=0.3, cache=False).a("half.test")
    dns_server.set_silent("half.test", on=False, missing_only=True)
    with pytest.raises(DnsNotFound):
        await patient.a("half.test")


async def test_server_spf_type_and_explicit_strings(
    dns_server: DnsServer, resolver: Resolver
) -> None:
    dns_server.add_txt("typed.test", ["v=spf1 ", "-all"], rtype="SPF")
    dns_server.add_txt("typed.test", ["v=spf1 ip4:", "192.0.2.1 -all"])
    assert await resolver.txt("typed.test") == ["v=spf1 ip4:192.0.2.1 -all"]
    assert dns_server.transports("typed.test", "SPF") == []
    response = dns_server.answer(dns.message.make_query("typed.test", "SPF"), "udp")
    assert response is not None
    assert [rd.strings for rd in response.answer[0]] == [(b"v=spf1 ", b"-all")]
