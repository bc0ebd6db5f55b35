"""DANE for outbound SMTP (RFC 7672, RFC 6698, RFC 7671): which TLSA records apply to an MX
host, and whether the certificate chain a server presented satisfies them. Does not connect.

DNSSEC is not validated here. `tlsa_policy` trusts `Answer.authenticated` (the AD bit of a
validating resolver on a trusted path, e.g. unbound on 127.0.0.1), as Postfix and mox do.

* `tlsa_policy(resolver, mx_host, mx_authenticated=...)` -> `DanePolicy`: "secure" (an
  authenticated TLSA RRset), "none" (DANE does not apply), "temperror" (the lookup failed:
  SERVFAIL, which is also what a validating resolver answers for a bogus RRset).
* `verify_chain(policy.usable, chain_der, mx_host=...)` -> `DaneVerdict`.
* `tls_context_for_dane()`: a client context that does no PKIX checks (DANE does them).
* `peer_chain_der(ssl_object)`: the chain the server sent, DER, leaf first.

What the transport does with a policy (RFC 7672 §2.2): "secure" with usable records means TLS
is mandatory and `verify_chain` must pass; "secure" without usable records means TLS is
mandatory but unauthenticated (§3.1.3); "temperror" means this MX host must not be used now
(defer; never fall back to plaintext, §2.2.1); "none" means ordinary opportunistic TLS.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from inbox.errors import DnsNotFound, DnsTemporary
from inbox.resolver import DnsLookup, TlsaRecord

# RFC 6698 §2.1.1 / RFC 7218 names.
PKIX_TA, PKIX_EE, DANE_TA, DANE_EE = 0, 1, 2, 3
SELECTOR_CERT, SELECTOR_SPKI = 0, 1
MATCH_EXACT, MATCH_SHA256, MATCH_SHA512 = 0, 1, 2

_USAGE_NAMES = {DANE_TA: "DANE-TA(2)", DANE_EE: "DANE-EE(3)"}
_SELECTOR_NAMES = {SELECTOR_CERT: "Cert", SELECTOR_SPKI: "SPKI"}
_MATCH_NAMES = {MATCH_EXACT: "full", MATCH_SHA256: "sha256", MATCH_SHA512: "sha512"}
_DIGEST_SIZES = {MATCH_SHA256: 32, MATCH_SHA512: 64}
MAX_CHAIN_DEPTH = 10


@dataclass(frozen=True)
class DanePolicy:
    """What DNS said about one MX host.

    `state`: "secure" (an authenticated TLSA RRset was found), "none" (no TLSA, or the MX or
    TLSA answer was not DNSSEC-authenticated: DANE does not apply), "temperror" (the lookup
    failed, including a bogus answer that the validating resolver turned into SERVFAIL), or
    "bogus" (reserved for a resolver that reports validation failure distinctly; treat as
    "temperror"). `usable` are the records RFC 7672 §3.1.3 lets SMTP use.
    """

    state: str
    records: tuple[TlsaRecord, ...] = ()
    usable: tuple[TlsaRecord, ...] = ()
    reason: str = ""

    @property
    def tls_required(self) -> bool:
        """RFC 7672 §2.2: any authenticated TLSA RRset makes STARTTLS mandatory."""
        return self.state == "secure"


@dataclass(frozen=True)
class DaneVerdict:
    """Whether the presented chain satisfied a usable TLSA record, and which one."""

    ok: bool
    matched: TlsaRecord | None
    reason: str


def describe(record: TlsaRecord) -> str:
    """E.g. "DANE-EE(3) SPKI sha256" (RFC 7218 mnemonics)."""
    usage = _USAGE_NAMES.get(record.usage, f"usage({record.usage})")
    selector = _SELECTOR_NAMES.get(record.selector, f"selector({record.selector})")
    mtype = _MATCH_NAMES.get(record.mtype, f"matching({record.mtype})")
    return f"{usage} {selector} {mtype}"


def is_usable(record: TlsaRecord) -> bool:
    """RFC 7672 §3.1.3: SMTP uses only DANE-TA(2) and DANE-EE(3) (PKIX-TA/EE are unusable:
    there is no agreed CA set for MX hosts), selectors 0/1 and matching types 0/1/2. A digest
    of the wrong length can never match, so it is unusable too (RFC 7671 §5: such records are
    ignored rather than failing the whole RRset)."""
    if record.usage not in (DANE_TA, DANE_EE) or record.selector not in (0, 1):
        return False
    if record.mtype not in (0, 1, 2):
        return False
    size = _DIGEST_SIZES.get(record.mtype)
    return (size is None and len(record.data) > 0) or len(record.data) == size


def _tlsa_name(port: int, host: str) -> str:
    # RFC 6698 §3 / RFC 7672 §2.2.2: "_<port>._tcp." prefixed to the TLSA base domain.
    return f"_{port}._tcp.{host.rstrip('.')}"


async def tlsa_policy(resolver: DnsLookup, mx_host: str, *, mx_authenticated: bool,
                      port: int = 25, address_authenticated: bool | None = None,
                      expanded_host: str | None = None) -> DanePolicy:
    """The DANE policy for `mx_host`, from its TLSA RRset at `_<port>._tcp.<mx_host>`.

    `mx_authenticated`: the MX answer (and any CNAME leading to it) was DNSSEC-secure. RFC 7672
    §2.2.1: an insecure MX RRset cannot be trusted to name the right host, so DANE does not
    apply and no TLSA lookup is made. `address_authenticated=False` (the MX host's A/AAAA
    answer was insecure) likewise skips DANE (§2.2.2); None means the caller did not check.

    `expanded_host`: the MX host name after CNAME expansion of its address records, when that
    expansion was secure. §2.2.2: the expanded name is tried first as TLSA base domain and the
    original `mx_host` when the expanded name has no TLSA records (or only insecure ones:
    those are ignored like absent ones). The caller supplies it: `DnsLookup` does not report
    CNAME targets today. A CNAME at the TLSA
    name itself is followed by the resolver; the AD bit then covers the whole chain.

    Never raises for DNS trouble: `DnsTemporary` becomes "temperror". A validating resolver
    answers SERVFAIL for a bogus TLSA RRset (a forged record, an expired signature), so bogus
    data ends up as "temperror" too, which RFC 7672 §2.2 requires: a TLSA lookup failure makes
    the host unusable (defer), it must never silently downgrade to unauthenticated TLS.
    """
    if not mx_authenticated:
        return DanePolicy("none", reason="MX answer not DNSSEC-authenticated: DANE does not "
                          "apply (RFC 7672 §2.2.1)")
    if address_authenticated is False:
        return DanePolicy("none", reason=f"{mx_host} address records not DNSSEC-authenticated:"
                          " DANE does not apply (RFC 7672 §2.2.2)")
    bases = [mx_host]
    if expanded_host and expanded_host.rstrip(".").lower() != mx_host.rstrip(".").lower():
        bases.insert(0, expanded_host)
    skipped: list[str] = []
    for base in bases:
        name = _tlsa_name(port, base)
        try:
            answer = await resolver.tlsa(name)
        except DnsNotFound as exc:
            skipped.append(f"no TLSA records at {name} ({exc.message})")
            continue
        except DnsTemporary as exc:
            return DanePolicy("temperror", reason=f"TLSA lookup failed for {name}: "
                              f"{exc.message} (RFC 7672 §2.2: do not use this host now)")
        if not answer.authenticated:
            # Insecure TLSA data could be anyone's: ignored, as if there were none.
            skipped.append(f"TLSA answer for {name} not DNSSEC-authenticated (insecure): "
                           "DANE does not apply")
            continue
        records = tuple(answer)
        usable = tuple(record for record in records if is_usable(record))
        if usable:
            reason = f"{len(usable)} usable of {len(records)} TLSA records at {name}"
        else:
            reason = (f"no usable TLSA records at {name}: TLS is still mandatory, without "
                      "authentication (RFC 7672 §3.1.3)")
        return DanePolicy("secure", records=records, usable=usable, reason=reason)
    return DanePolicy("none", reason="; ".join(skipped))


# -- certificates ------------------------------------------------------------------------------


def _selected(cert: x509.Certificate, der: bytes, selector: int) -> bytes:
    if selector == SELECTOR_CERT:
        return der
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def _matches(record: TlsaRecord, cert: x509.Certificate, der: bytes) -> bool:
    """RFC 6698 §2.1.2-§2.1.3: the selected part, exactly or by SHA-256/SHA-512 digest."""
    data = _selected(cert, der, record.selector)
    if record.mtype == MATCH_SHA256:
        data = hashlib.sha256(data).digest()
    elif record.mtype == MATCH_SHA512:
        data = hashlib.sha512(data).digest()
    return data == record.data


def _dns_names(cert: x509.Certificate) -> list[str]:
    """RFC 6125 §6.4.4: the SAN dNSNames; the CN only when there is no dNSName at all."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(name) for name in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if names:
        return names
    return [str(attr.value) for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def name_matches(pattern: str, host: str) -> bool:
    """RFC 6125 §6.4.3: case-insensitive; "*" only as the whole left-most label, matching
    exactly one label, and never directly under a top-level name ("*.test")."""
    pattern = pattern.rstrip(".").lower()
    host = host.rstrip(".").lower()
    if not pattern or not host:
        return False
    if not pattern.startswith("*."):
        return "*" not in pattern and pattern == host
    suffix = pattern[2:]
    if "*" in suffix or suffix.count(".") < 1:
        return False
    first, dot, rest = host.partition(".")
    return bool(first) and bool(dot) and rest == suffix


def _valid_at(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False  # RFC 5280 §4.2.1.9: without basicConstraints it is no CA


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _parse(chain_der: Sequence[bytes]) -> list[tuple[x509.Certificate, bytes]] | str:
    parsed = []
    for index, der in enumerate(chain_der):
        try:
            parsed.append((x509.load_der_x509_certificate(der), der))
        except ValueError as exc:
            return f"certificate {index} of the chain does not parse ({exc})"
    return parsed


def _trust_anchor_path(record: TlsaRecord, chain: list[tuple[x509.Certificate, bytes]]
                       ) -> tuple[list[x509.Certificate], x509.Certificate] | None:
    """The certificates from the leaf up to (not including) a TA matching `record`, and the
    TA, each signed by the next. The TA comes from the presented chain, or, for a full
    certificate record (2 0 0), from the record itself (RFC 7671 §5.2.2: then the server need
    not send it). Presented intermediates may come in any order."""
    pool = list(chain[1:])
    if record.selector == SELECTOR_CERT and record.mtype == MATCH_EXACT:
        try:
            pool.append((x509.load_der_x509_certificate(record.data), record.data))
        except ValueError:
            pass
    leaf, leaf_der = chain[0]
    path = [leaf]
    current, current_der = leaf, leaf_der
    for _ in range(MAX_CHAIN_DEPTH):
        if current is not leaf and _matches(record, current, current_der):
            return path[:-1], current
        issuer = next(((c, d) for c, d in pool if c is not current and _is_ca(c)
                       and _issued_by(current, c)), None)
        if issuer is None:
            return None
        current, current_der = issuer
        path.append(current)
    return None


def verify_chain(usable: Sequence[TlsaRecord], chain_der: Sequence[bytes], *, mx_host: str,
                 now: datetime | None = None, also_names: Sequence[str] = ()) -> DaneVerdict:
    """Check the server's chain (DER, leaf first) against usable TLSA records.

    DANE-EE(3): the leaf's certificate (selector 0) or SPKI (1) matches, exactly or by digest;
    its names and validity dates are ignored (RFC 7672 §3.1.1). DANE-TA(2): a CA certificate
    matching the record is reached from the leaf by valid signatures through the presented
    certificates, every certificate below it is within its validity period at `now`, and a
    leaf name matches `mx_host` or one of `also_names` (RFC 7672 §3.2.2-§3.2.3: the MX host
    name, its CNAME expansion; wildcards per RFC 6125). The TA's own dates are not checked: it
    is trusted because DNS names it (RFC 7671 §5.2.2 treats it as a trust anchor).
    """
    now = now or datetime.now(UTC)
    records = [record for record in usable if is_usable(record)]
    if not records:
        return DaneVerdict(False, None, "no usable TLSA records")
    if not chain_der:
        return DaneVerdict(False, None, "the server presented no certificate")
    parsed = _parse(chain_der)
    if isinstance(parsed, str):
        return DaneVerdict(False, None, parsed)
    leaf, leaf_der = parsed[0]
    for record in records:
        if record.usage == DANE_EE and _matches(record, leaf, leaf_der):
            return DaneVerdict(True, record, f"{describe(record)} matched")
    failures: list[str] = []
    wanted = [mx_host, *also_names]
    for record in records:
        if record.usage != DANE_TA:
            continue
        found = _trust_anchor_path(record, parsed)
        if found is None:
            failures.append(f"{describe(record)}: no presented CA matched and signed the chain")
            continue
        below, _anchor = found
        expired = [c for c in below if not _valid_at(c, now)]
        if expired:
            subject = expired[0].subject.rfc4514_string()
            failures.append(f"{describe(record)}: certificate {subject!r} not valid at {now:%c}")
            continue
        names = _dns_names(leaf)
        if not any(name_matches(pattern, host) for pattern in names for host in wanted):
            failures.append(f"{describe(record)}: leaf names {names} do not match "
                            f"{', '.join(wanted)}")
            continue
        return DaneVerdict(True, record, f"{describe(record)} matched; chain and name verified")
    if failures:
        return DaneVerdict(False, None, "; ".join(failures))
    return DaneVerdict(False, None, "no TLSA record matched")


# -- TLS -------------------------------------------------------------------------------------


def tls_context_for_dane() -> ssl.SSLContext:
    """A client context for DANE: TLS 1.2 or later, no PKIX verification (no CA store, no
    hostname check: `verify_chain` decides, RFC 7672 §3.1), and the server's whole chain kept
    for `peer_chain_der`. SNI is still sent: pass the MX host as server_hostname (§8.1)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def peer_chain_der(ssl_object: Any) -> list[bytes]:
    """The certificates the server presented, DER, leaf first; [] before a handshake.

    `ssl_object` is an `ssl.SSLObject` (asyncio: transport.get_extra_info("ssl_object")) or an
    `ssl.SSLSocket`. Python 3.13 has a public `get_unverified_chain()`; on 3.10-3.12 the same
    OpenSSL call (SSL_get_peer_cert_chain) exists on the private `_sslobj` as
    `get_unverified_chain()`, returning `_ssl.Certificate` objects. If neither exists only the
    leaf (`getpeercert(binary_form=True)`) is returned: DANE-EE still works, and DANE-TA then
    succeeds only when the leaf is directly signed by a TA published as a full certificate
    (2 0 0), which `verify_chain` takes from the record; anything else fails (safe).
    """
    raw = None
    public = getattr(ssl_object, "get_unverified_chain", None)
    if public is not None:
        raw = public()
    else:
        private = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
        if private is not None:
            raw = private()
    if raw:
        return [_to_der(cert) for cert in raw]
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def _to_der(cert: Any) -> bytes:
    if isinstance(cert, bytes):  # 3.13's public API returns DER bytes
        return cert
    return bytes(cert.public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore[attr-defined]


__all__ = [
    "DanePolicy",
    "DaneVerdict",
    "describe",
    "is_usable",
    "name_matches",
    "peer_chain_der",
    "tls_context_for_dane",
    "tlsa_policy",
    "verify_chain",
]
