"""inbox.resolver against a real DNS server on 127.0.0.1 (tests/support/dnsserver.py)."""

from __future__ import annotations

import socket
import time

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


async def test_authenticated_follows_the_ad_bit(dns_server: DnsServer, resolver: Resolver) -> None:
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
