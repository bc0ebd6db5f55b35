"""DANE for outbound SMTP (inbox.delivery.dane) against really signed DNS and real TLS peers.

A zone `dane.test` is signed here (ECDSA P-256), served by our loopback authoritative server
with its RRSIGs and NSEC proofs, and validated by a real `unbound` holding its key as trust
anchor. `plain.test` and `mixed.test` are unsigned. The inbox Resolver asks unbound, so
`authenticated` is unbound's AD bit. Certificates come from tests/support/testca.py and are
presented by an aiosmtpd sink over STARTTLS; the client uses `tls_context_for_dane()`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from aiosmtplib import SMTP

from inbox.delivery.dane import (
    is_usable,
    name_matches,
    peer_chain_der,
    tls_context_for_dane,
    tlsa_policy,
    verify_chain,
)
from inbox.resolver import Resolver, TlsaRecord
from tests.support.dnssec import SignedDnsServer, Unbound, ZoneKey, forge, sign_zone
from tests.support.fixtures_smtp import make_smtp_sink
from tests.support.smtpsink import SmtpSink
from tests.support.testca import CertAuthority, Issued, self_signed

needs_unbound = pytest.mark.skipif(not Unbound.available(),
                                   reason="unbound (Debian package) is not installed")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha512(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


@dataclass(frozen=True)
class Pki:
    ee: Issued  # self-signed leaf for every DANE-EE case
    expired: Issued  # self-signed, expired yesterday
    ca: CertAuthority  # root -> intermediate -> leaves
    leaves: dict[str, Issued]  # DANE-TA leaves by MX host


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca = CertAuthority.create(intermediate=True)
    leaves = {
        "taroot.dane.test": ca.issue("taroot.dane.test", include_root=True),
        "taint.dane.test": ca.issue("taint.dane.test"),
        "taname.dane.test": ca.issue("elsewhere.example", include_root=True),
        "taexp.dane.test": ca.issue("taexp.dane.test", expired=True, include_root=True),
        "tawild.dane.test": ca.issue("*.dane.test", include_root=True),
    }
    return Pki(self_signed("mx.dane.test"), self_signed("mx.dane.test", expired=True), ca,
               leaves)


def signed_zone_text(pki: Pki) -> str:
    ee, root, inter = pki.ee, pki.ca.root, pki.ca.intermediate
    assert inter is not None
    other = self_signed("other.test")
    tlsa = {
        "ee311": f"3 1 1 {sha256(ee.spki_der)}",
        "ee301": f"3 0 1 {sha256(ee.der)}",
        "ee312": f"3 1 2 {sha512(ee.spki_der)}",
        "ee300": f"3 0 0 {ee.der.hex()}",
        "eebad": f"3 1 1 {sha256(other.spki_der)}",
        "eeexp": f"3 1 1 {sha256(pki.expired.spki_der)}",
        "taroot": f"2 0 1 {sha256(root.der)}",
        "taint": f"2 1 1 {sha256(inter.spki_der)}",
        "taname": f"2 0 1 {sha256(root.der)}",
        "taexp": f"2 0 1 {sha256(root.der)}",
        "tawild": f"2 0 1 {sha256(root.der)}",
        "pkix": f"0 0 1 {sha256(root.der)}",
        "mixed": f"1 1 1 {sha256(ee.spki_der)}",
        "forged": f"3 1 1 {sha256(ee.spki_der)}",
    }
    lines = ["@ 3600 IN SOA ns hostmaster 1 3600 600 86400 60", "@ NS ns",
             "ns A 127.0.0.1", "@ MX 10 ee311", "notlsa A 127.0.0.1",
             "alias A 127.0.0.1", "_25._tcp.alias CNAME _25._tcp.ee311"]
    lines.append(f"_25._tcp.pkix TLSA 1 1 1 {sha256(ee.spki_der)}")
    lines.append(f"_25._tcp.mixed TLSA 3 1 1 {sha256(ee.spki_der)}")
    for host, record in tlsa.items():
        lines += [f"{host} A 127.0.0.1", f"_25._tcp.{host} TLSA {record}"]
    return "\n".join(lines)


@dataclass
class SignedDns:
    server: SignedDnsServer
    unbound: Unbound
    pki: Pki


@pytest.fixture(scope="module")
def signed_dns(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SignedDns]:
    if not Unbound.available():
        pytest.skip("unbound (Debian package) is not installed")
    key = ZoneKey.generate()
    zone = sign_zone("dane.test", signed_zone_text(pki), key)
    # After signing: an attacker's TLSA (its own key) under the zone's genuine RRSIG.
    forge(zone, "_25._tcp.forged.dane.test", "TLSA", f"3 1 1 {sha256(pki.expired.spki_der)}")
    server = SignedDnsServer()
    server.start()
    server.load_signed_zone(zone)
    # Inside the signed zone but never signed: what a path attacker stripping RRSIGs serves.
    server.add("_25._tcp.stripped.dane.test", "TLSA", f"3 1 1 {sha256(pki.expired.spki_der)}")
    server.load_zone_text("plain.test", f"""
        @ 3600 IN SOA ns hostmaster 1 3600 600 86400 60
        @ MX 10 mx
        mx A 127.0.0.1
        _25._tcp.mx TLSA 3 1 1 {sha256(pki.ee.spki_der)}
    """)
    server.load_zone_text("mixed.test", """
        @ 3600 IN SOA ns hostmaster 1 3600 600 86400 60
        @ MX 10 ee311.dane.test.
    """)
    unbound = Unbound(server, anchors=[key.trust_anchor("dane.test")],
                      stub_zones=["dane.test", "plain.test", "mixed.test"],
                      workdir=tmp_path_factory.mktemp("unbound"))
    try:
        with unbound:
            yield SignedDns(server, unbound, pki)
    finally:
        server.stop()
    assert not server.errors, "DNS server errors:\n" + "\n".join(server.errors)


@pytest.fixture
def resolver(signed_dns: SignedDns) -> Resolver:
    """Asks unbound only; no cache, so every case is a fresh validation."""
    return Resolver([signed_dns.unbound.address], timeout=3, cache=False)


async def handshake(sink: SmtpSink, mx_host: str) -> list[bytes]:
    """EHLO, STARTTLS with the DANE context (SNI = MX host), and the chain the server sent."""
    smtp = SMTP(hostname=sink.host, port=sink.port, start_tls=False, timeout=5)
    await smtp.connect()
    try:
        await smtp.ehlo()
        await smtp.starttls(server_hostname=mx_host, tls_context=tls_context_for_dane())
        assert smtp.transport is not None
        return peer_chain_der(smtp.transport.get_extra_info("ssl_object"))
    finally:
        await smtp.quit()


# -- DNS: which TLSA answers count ---------------------------------------------------------


@needs_unbound
async def test_signed_zone_validates_end_to_end(resolver: Resolver) -> None:
    mx = await resolver.mx("dane.test")
    assert [r.host for r in mx] == ["ee311.dane.test"] and mx.authenticated
    addresses = await resolver.ips("ee311.dane.test")
    assert addresses == ["127.0.0.1"] and addresses.authenticated
    policy = await tlsa_policy(resolver, mx[0].host, mx_authenticated=mx.authenticated,
                               address_authenticated=addresses.authenticated)
    assert policy.state == "secure" and policy.tls_required
    assert [(r.usage, r.selector, r.mtype) for r in policy.usable] == [(3, 1, 1)]


@pytest.mark.parametrize(("mx_host", "kwargs", "state", "reason"), [
    ("mx.plain.test", {}, "none", "not DNSSEC-authenticated (insecure)"),
    ("ee311.dane.test", {"mx_authenticated": False}, "none", "MX answer not DNSSEC"),
    ("ee311.dane.test", {"address_authenticated": False}, "none", "address records not"),
    ("forged.dane.test", {}, "temperror", "SERVFAIL"),
    ("stripped.dane.test", {}, "temperror", "SERVFAIL"),
    ("notlsa.dane.test", {}, "none", "no TLSA records"),
    ("gone.dane.test", {}, "none", "NXDOMAIN"),
    ("alias.dane.test", {}, "secure", "1 usable of 1"),
    ("pkix.dane.test", {}, "secure", "no usable TLSA records"),
    ("mixed.dane.test", {}, "secure", "1 usable of 2"),
    ("ee311.dane.test", {"port": 587}, "none", "_587._tcp.ee311.dane.test"),
    ("notlsa.dane.test", {"expanded_host": "ee311.dane.test"}, "secure", "_25._tcp.ee311."),
    ("ee311.dane.test", {"expanded_host": "notlsa.dane.test"}, "secure", "_25._tcp.ee311."),
    ("ee311.dane.test", {"expanded_host": "mx.plain.test"}, "secure", "_25._tcp.ee311."),
], ids=["unsigned-zone", "mx-insecure", "address-insecure", "forged-tlsa", "stripped-rrsig",
        "signed-nodata",
        "signed-nxdomain", "tlsa-cname", "pkix-usages-only", "pkix-ignored", "other-port",
        "cname-expanded-first", "cname-expanded-none-then-original",
        "cname-expanded-insecure-then-original"])
@needs_unbound
async def test_tlsa_policy(resolver: Resolver, mx_host: str, kwargs: dict[str, object],
                           state: str, reason: str) -> None:
    arguments: dict[str, object] = {"mx_authenticated": True, **kwargs}
    policy = await tlsa_policy(resolver, mx_host, **arguments)  # type: ignore[arg-type]
    assert policy.state == state, policy
    assert reason in policy.reason, policy.reason
    if state != "secure":
        assert policy.usable == ()


@needs_unbound
async def test_forged_tlsa_is_served_but_refused_by_the_validator(
        signed_dns: SignedDns, resolver: Resolver) -> None:
    """The forged record really is on the wire with a signature; only validation stops it."""
    query = dns.message.make_query("_25._tcp.forged.dane.test", "TLSA", want_dnssec=True)
    direct = dns.query.udp(query, "127.0.0.1", port=signed_dns.server.port, timeout=2)
    types = {dns.rdatatype.to_text(rrset.rdtype) for rrset in direct.answer}
    assert types == {"TLSA", "RRSIG"}
    policy = await tlsa_policy(resolver, "forged.dane.test", mx_authenticated=True)
    assert policy.state == "temperror" and policy.records == ()
    assert "signature crypto failed" in signed_dns.unbound.log()


@needs_unbound
async def test_insecure_mx_disables_dane_even_with_secure_tlsa(resolver: Resolver) -> None:
    mx = await resolver.mx("mixed.test")  # unsigned zone naming a host in a signed one
    assert [r.host for r in mx] == ["ee311.dane.test"] and not mx.authenticated
    policy = await tlsa_policy(resolver, mx[0].host, mx_authenticated=mx.authenticated)
    assert policy.state == "none" and policy.records == ()
    # The very same host is DANE-secure when reached through a signed MX.
    secure = await tlsa_policy(resolver, mx[0].host, mx_authenticated=True)
    assert secure.state == "secure"


@needs_unbound
async def test_unsigned_zone_mx_is_not_authenticated(resolver: Resolver) -> None:
    mx = await resolver.mx("plain.test")
    assert not mx.authenticated
    policy = await tlsa_policy(resolver, mx[0].host, mx_authenticated=mx.authenticated)
    assert policy.state == "none"


# -- TLS: real handshakes, then the chain against the authenticated TLSA ----------------------


@pytest.mark.parametrize(("mx_host", "cert", "ok", "reason"), [
    ("ee311.dane.test", "ee", True, "DANE-EE(3) SPKI sha256 matched"),
    ("ee301.dane.test", "ee", True, "DANE-EE(3) Cert sha256 matched"),
    ("ee312.dane.test", "ee", True, "DANE-EE(3) SPKI sha512 matched"),
    ("ee300.dane.test", "ee", True, "DANE-EE(3) Cert full matched"),
    ("eebad.dane.test", "ee", False, "no TLSA record matched"),
    ("eeexp.dane.test", "expired", True, "DANE-EE(3) SPKI sha256 matched"),
    ("mixed.dane.test", "ee", True, "DANE-EE(3) SPKI sha256 matched"),
    ("taroot.dane.test", "ta", True, "DANE-TA(2) Cert sha256 matched"),
    ("taint.dane.test", "ta", True, "DANE-TA(2) SPKI sha256 matched"),
    ("tawild.dane.test", "ta", True, "DANE-TA(2) Cert sha256 matched"),
    ("taname.dane.test", "ta", False, "do not match taname.dane.test"),
    ("taexp.dane.test", "ta", False, "not valid at"),
    ("taroot.dane.test", "ee", False, "no presented CA matched"),
    ("forged.dane.test", "expired", False, "no usable TLSA records"),
], ids=["ee-311", "ee-301", "ee-312", "ee-300", "ee-mismatch", "ee-expired-leaf-ok",
        "ee-with-pkix-ignored", "ta-root-over-intermediate", "ta-intermediate-spki",
        "ta-wildcard-name", "ta-wrong-name", "ta-expired-leaf", "ta-self-signed-leaf",
        "forged-tlsa-no-auth"])
@needs_unbound
async def test_handshake_and_verify(resolver: Resolver, signed_dns: SignedDns,
                                    make_smtp_sink: Callable[..., SmtpSink], mx_host: str,
                                    cert: str, ok: bool, reason: str) -> None:
    pki = signed_dns.pki
    issued = {"ee": pki.ee, "expired": pki.expired}.get(cert) or pki.leaves[mx_host]
    policy = await tlsa_policy(resolver, mx_host, mx_authenticated=True)
    sink = make_smtp_sink(tls_context=issued.server_context())
    chain = await handshake(sink, mx_host)
    assert chain[0] == issued.der
    verdict = verify_chain(policy.usable, chain, mx_host=mx_host)
    assert verdict.ok is ok, verdict
    assert reason in verdict.reason, verdict.reason
    assert (verdict.matched is not None) is ok


async def test_peer_chain_is_the_presented_chain(
        make_smtp_sink: Callable[..., SmtpSink]) -> None:
    ca = CertAuthority.create(intermediate=True)
    leaf = ca.issue("mx.example.test", include_root=True)
    sink = make_smtp_sink(tls_context=leaf.server_context())
    chain = await handshake(sink, "mx.example.test")
    assert ca.intermediate is not None
    assert chain == [leaf.der, ca.intermediate.der, ca.root.der]


# -- pure checks -----------------------------------------------------------------------------


def test_trust_anchor_from_a_full_certificate_record_when_only_the_leaf_is_known() -> None:
    """The fallback `peer_chain_der` documents: with only the leaf, DANE-TA works for 2 0 0
    (the TA certificate comes from DNS) and fails safe otherwise."""
    ca = CertAuthority.create()
    leaf = ca.issue("mx.example.test")
    full = TlsaRecord(2, 0, 0, ca.root.der)
    digest = TlsaRecord(2, 0, 1, bytes.fromhex(sha256(ca.root.der)))
    assert verify_chain([full], [leaf.der], mx_host="mx.example.test").ok
    assert not verify_chain([digest], [leaf.der], mx_host="mx.example.test").ok
    stranger = CertAuthority.create("Other Root")
    assert not verify_chain([TlsaRecord(2, 0, 0, stranger.root.der)], [leaf.der],
                            mx_host="mx.example.test").ok


def test_dane_ta_checks_dates_at_now() -> None:
    ca = CertAuthority.create()
    leaf = ca.issue("mx.example.test", days=1)
    record = [TlsaRecord(2, 0, 0, ca.root.der)]
    later = datetime.now(UTC) + timedelta(days=3)
    assert verify_chain(record, [leaf.der], mx_host="mx.example.test").ok
    assert not verify_chain(record, [leaf.der], mx_host="mx.example.test", now=later).ok


def test_garbage_chain_is_refused() -> None:
    record = [TlsaRecord(3, 0, 0, b"\x30\x00")]
    verdict = verify_chain(record, [b"\x30\x00"], mx_host="mx.example.test")
    assert not verdict.ok and "does not parse" in verdict.reason
    assert not verify_chain(record, [], mx_host="mx.example.test").ok


@pytest.mark.parametrize(("pattern", "host", "expected"), [
    ("mx.example.com", "mx.example.com", True),
    ("MX.Example.COM.", "mx.example.com", True),
    ("*.example.com", "mx.example.com", True),
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", "example.com", False),
    ("*.com", "example.com", False),
    ("m*.example.com", "mx.example.com", False),
    ("mx.*.com", "mx.example.com", False),
    ("other.example.com", "mx.example.com", False),
], ids=["exact", "case-and-dot", "wildcard", "wildcard-one-label", "wildcard-not-apex",
        "wildcard-tld", "partial-wildcard", "inner-wildcard", "other-name"])
def test_name_matches(pattern: str, host: str, expected: bool) -> None:
    assert name_matches(pattern, host) is expected


@pytest.mark.parametrize(("record", "expected"), [
    (TlsaRecord(3, 1, 1, bytes(32)), True),
    (TlsaRecord(2, 0, 2, bytes(64)), True),
    (TlsaRecord(3, 0, 0, b"\x30\x00"), True),
    (TlsaRecord(0, 0, 1, bytes(32)), False),
    (TlsaRecord(1, 1, 1, bytes(32)), False),
    (TlsaRecord(3, 2, 1, bytes(32)), False),
    (TlsaRecord(3, 1, 3, bytes(32)), False),
    (TlsaRecord(3, 1, 1, bytes(31)), False),
    (TlsaRecord(3, 0, 0, b""), False),
], ids=["dane-ee", "dane-ta-sha512", "full", "pkix-ta", "pkix-ee", "bad-selector",
        "bad-matching", "short-digest", "empty-full"])
def test_is_usable(record: TlsaRecord, expected: bool) -> None:
    assert is_usable(record) is expected


def test_tls_context_for_dane() -> None:
    context = tls_context_for_dane()
    assert context.verify_mode.name == "CERT_NONE" and not context.check_hostname
    assert context.minimum_version.name == "TLSv1_2"


@pytest.mark.parametrize(("name", "rtype", "rcode"), [
    ("_25._tcp.notlsa.dane.test", "TLSA", "NXDOMAIN"),
    ("notlsa.dane.test", "TLSA", "NOERROR"),
    ("_tcp.ee311.dane.test", "A", "NOERROR"),
    ("dane.test", "TXT", "NOERROR"),
], ids=["nxdomain", "nodata", "empty-non-terminal", "apex-nodata"])
@needs_unbound
def test_denial_of_existence_validates(signed_dns: SignedDns, name: str, rtype: str,
                                       rcode: str) -> None:
    """unbound sets AD on negative answers only when our NSEC proofs check out (else it
    would answer SERVFAIL): "no TLSA" in a signed zone is itself authenticated."""
    query = dns.message.make_query(name, rtype, want_dnssec=True)
    query.flags |= dns.flags.AD
    response = dns.query.udp(query, "127.0.0.1", port=signed_dns.unbound.port, timeout=3)
    assert dns.rcode.to_text(response.rcode()) == rcode
    assert response.flags & dns.flags.AD and not response.answer
