"""Pytest fixtures for DNS: a real local DNS server and an inbox Resolver pointed at it.

Import them into a test module (the names must stay as imported):

    from tests.support.fixtures_dns import dns_server, resolver  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from inbox.resolver import Resolver
from tests.support.dnsserver import DnsServer


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    """A started `DnsServer` with an empty zone; stopped after the test, which then fails
    if the server hit a bug while answering."""
    server = DnsServer().start()
    try:
        yield server
    finally:
        server.stop()
    assert not server.errors, "DNS server errors:\n" + "\n".join(server.errors)


@pytest.fixture
def resolver(dns_server: DnsServer) -> Resolver:
    """An `inbox.resolver.Resolver` that asks only `dns_server`, with a 2 s lifetime."""
    return Resolver([dns_server.address], timeout=2)


def dkim_dnsfunc(dns_server: DnsServer) -> Callable[..., bytes]:
    """dkimpy's key lookup (`dnsfunc`), answered by the loopback DNS server: a real query to
    it, never a patched resolver."""
    import dns.resolver

    res = dns.resolver.Resolver(configure=False)
    host, port = dns_server.address.rsplit(":", 1)
    res.nameservers = [host]
    res.port = int(port)

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        try:
            answer = res.resolve(name.decode().rstrip("."), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return b""
        return b"".join(b"".join(r.strings) for r in answer)

    return lookup
