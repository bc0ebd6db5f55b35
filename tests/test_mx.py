"""inbox.delivery.mx: MX selection (RFC 5321 §5.1, RFC 7505) against a real local DNS server."""

from __future__ import annotations

import random

import pytest

from inbox.delivery.mx import MxHost, NullMx, ascii_domain, mx_hosts
from inbox.errors import DnsNotFound, DnsTemporary
from inbox.resolver import Resolver
from tests.support.dnsserver import DnsServer
from tests.support.fixtures_dns import dns_server, resolver  # noqa: F401

# ruff: noqa: F811 - pytest injects the imported fixtures by parameter name.


async def test_sorted_by_preference(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("example.test", "MX", "30 c.example.test.")
    dns_server.add("example.test", "MX", "10 A.example.test.")
    dns_server.add("example.test", "MX", "20 b.example.test.")
    assert await mx_hosts(resolver, "example.test") == [
        MxHost("a.example.test", 10, implicit=False),
        MxHost("b.example.test", 20, implicit=False),
        MxHost("c.example.test", 30, implicit=False),
    ]


async def test_equal_preferences_are_shuffled(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("example.test", "MX", "10 one.example.test.")
    dns_server.add("example.test", "MX", "10 two.example.test.")
    dns_server.add("example.test", "MX", "5 first.example.test.")
    orders: set[tuple[str, ...]] = set()
    for _ in range(40):  # P(one order 40 times in a row) = 2**-39
        hosts = await mx_hosts(resolver, "example.test")
        assert hosts[0].host == "first.example.test"
        orders.add(tuple(h.host for h in hosts[1:]))
        if len(orders) == 2:
            break
    assert orders == {
        ("one.example.test", "two.example.test"),
        ("two.example.test", "one.example.test"),
    }


async def test_seeded_rng_gives_a_fixed_order(dns_server: DnsServer, resolver: Resolver) -> None:
    for host in ("a", "b", "c", "d"):
        dns_server.add("example.test", "MX", f"10 {host}.example.test.")
    first = await mx_hosts(resolver, "example.test", rng=random.Random(7))
    again = await mx_hosts(resolver, "example.test", rng=random.Random(7))
    assert first == again
    assert {h.host for h in first} == {f"{h}.example.test" for h in "abcd"}


async def test_duplicate_host_keeps_best_preference(
    dns_server: DnsServer, resolver: Resolver
) -> None:
    dns_server.add("example.test", "MX", "20 mx.example.test.")
    dns_server.add("example.test", "MX", "10 MX.example.test.")
    dns_server.add("example.test", "MX", "30 backup.example.test.")
    assert await mx_hosts(resolver, "example.test") == [
        MxHost("mx.example.test", 10, implicit=False),
        MxHost("backup.example.test", 30, implicit=False),
    ]


@pytest.mark.parametrize(
    ("rtype", "address"),
    [("A", "127.0.0.1"), ("AAAA", "::1")],
    ids=["a", "aaaa"],
)
async def test_implicit_mx(
    dns_server: DnsServer, resolver: Resolver, rtype: str, address: str
) -> None:
    dns_server.add("example.test", rtype, address)
    assert await mx_hosts(resolver, "Example.Test.") == [MxHost("example.test", 0, implicit=True)]


@pytest.mark.parametrize(
    "records",
    [["0 ."], ["10 ."]],
    ids=["rfc7505", "nonzero-preference"],
)
async def test_null_mx(dns_server: DnsServer, resolver: Resolver, records: list[str]) -> None:
    for record in records:
        dns_server.add("nomail.test", "MX", record)
    dns_server.add("nomail.test", "A", "127.0.0.1")  # must not become an implicit MX
    with pytest.raises(NullMx) as caught:
        await mx_hosts(resolver, "nomail.test")
    error = caught.value
    assert (error.code, error.temporary) == ("NULL_MX", False)
    assert error.smtp_reply().startswith("550 5.1.10 ")


async def test_null_mx_among_others_is_dropped(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("example.test", "MX", "0 .")
    dns_server.add("example.test", "MX", "10 mx.example.test.")
    assert await mx_hosts(resolver, "example.test") == [
        MxHost("mx.example.test", 10, implicit=False)
    ]


@pytest.mark.parametrize(
    "domain",
    ["missing.test", "txt-only.test"],
    ids=["nxdomain", "no-mx-no-address"],
)
async def test_no_mail_host_is_permanent(
    dns_server: DnsServer, resolver: Resolver, domain: str
) -> None:
    dns_server.add("txt-only.test", "TXT", '"v=spf1 -all"')
    with pytest.raises(DnsNotFound, match=f"{domain}: no MX and no address") as caught:
        await mx_hosts(resolver, domain)
    assert caught.value.temporary is False
    assert caught.value.smtp_reply().startswith("550 5.1.2 ")


@pytest.mark.parametrize(
    "broken",
    ["example.test", "addr-only.test"],
    ids=["mx-lookup", "implicit-address-lookup"],
)
async def test_servfail_propagates(dns_server: DnsServer, broken: str) -> None:
    dns_server.add("example.test", "MX", "10 mx.example.test.")
    dns_server.set_servfail(broken)
    with pytest.raises(DnsTemporary):
        await mx_hosts(Resolver([dns_server.address], timeout=1), broken)


async def test_idna_domain(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("xn--bcher-kva.test", "MX", "10 mx.xn--bcher-kva.test.")
    dns_server.add("xn--caf-dma.test", "A", "127.0.0.1")
    assert await mx_hosts(resolver, "Bücher.test") == [
        MxHost("mx.xn--bcher-kva.test", 10, implicit=False)
    ]
    assert await mx_hosts(resolver, "café.test.") == [MxHost("xn--caf-dma.test", 0, implicit=True)]


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("Example.COM.", "example.com"),
        ("bücher.test", "xn--bcher-kva.test"),
        ("BÜCHER.test", "xn--bcher-kva.test"),
        ("xn--bcher-kva.test", "xn--bcher-kva.test"),
        ("_tcp.example.test", "_tcp.example.test"),
    ],
    ids=["ascii-case-dot", "u-label", "u-label-upper", "a-label", "underscore"],
)
def test_ascii_domain(domain: str, expected: str) -> None:
    assert ascii_domain(domain) == expected


@pytest.mark.parametrize("domain", ["", ".", "☃.test"], ids=["empty", "root", "symbol"])
def test_ascii_domain_rejects(domain: str) -> None:
    with pytest.raises(DnsNotFound):
        ascii_domain(domain)
