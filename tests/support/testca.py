"""A test certificate authority: root, optional intermediate, leaf certs for a host name, and
self-signed leaves; PEM/DER out, files and server `ssl.SSLContext`s for real TLS peers.

EC P-256 keys (fast to make). Nothing is cached or written unless asked:

    ca = CertAuthority.create(intermediate=True)
    leaf = ca.issue("mx.dane.test")              # signed by the intermediate
    sink = SmtpSink(tls_context=leaf.server_context())   # presents leaf + intermediate
    self_signed("mx.dane.test", expired=True)    # a lone expired leaf
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DER = serialization.Encoding.DER
_PEM = serialization.Encoding.PEM


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    general: list[x509.GeneralName] = []
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(general)


@dataclass(frozen=True)
class Issued:
    """A certificate, its private key, and the CA certificates a server sends after it."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(_DER)

    @property
    def spki_der(self) -> bytes:
        """The SubjectPublicKeyInfo, DER (what TLSA selector 1 hashes, RFC 6698 §2.1.2)."""
        return self.cert.public_key().public_bytes(
            _DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(_PEM)

    @property
    def chain_pem(self) -> bytes:
        """This certificate then its chain, PEM: what a server's cert file holds."""
        return b"".join(c.public_bytes(_PEM) for c in (self.cert, *self.chain))

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def write(self, directory: Path, stem: str = "server") -> tuple[Path, Path]:
        """Write `<stem>.crt` (cert + chain) and `<stem>.key`; return their paths."""
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_path.write_bytes(self.chain_pem)
        key_path.write_bytes(self.key_pem)
        key_path.chmod(0o600)
        return cert_path, key_path

    def server_context(self) -> ssl.SSLContext:
        """A server TLS context presenting this certificate and its chain."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.TemporaryDirectory() as tmp:
            context.load_cert_chain(*self.write(Path(tmp)))
        return context


def _leaf(subject_key: ec.EllipticCurvePrivateKey, names: Sequence[str], *,
          issuer: x509.Name | None, signing_key: ec.EllipticCurvePrivateKey,
          not_before: datetime.datetime, not_after: datetime.datetime,
          common_name: str | None) -> x509.Certificate:
    subject = _name(common_name if common_name is not None else (names[0] if names else "leaf"))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    if names:
        builder = builder.add_extension(_san(names), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _validity(expired: bool, days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = _now()
    if expired:
        return now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)
    return now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)


def self_signed(hostname: str, *, names: Sequence[str] | None = None, expired: bool = False,
                days: int = 2) -> Issued:
    """A self-signed leaf (not a CA) for `hostname` (SAN = `names`, default [hostname])."""
    key = _key()
    not_before, not_after = _validity(expired, days)
    cert = _leaf(key, list(names) if names is not None else [hostname], issuer=None,
                 signing_key=key, not_before=not_before, not_after=not_after,
                 common_name=hostname)
    return Issued(cert, key)


@dataclass(frozen=True)
class CertAuthority:
    """A root CA and, optionally, an intermediate that signs the leaves."""

    __test__ = False  # not a pytest class

    root: Issued
    intermediate: Issued | None = None

    @classmethod
    def create(cls, name: str = "Inbox Test Root", *, intermediate: bool = False,
               days: int = 30) -> CertAuthority:
        not_before, not_after = _validity(False, days)
        root_key = _key()
        root_cert = cls._ca_cert(root_key, _name(name), _name(name), root_key,
                                 not_before, not_after, path_length=None)
        root = Issued(root_cert, root_key)
        if not intermediate:
            return cls(root)
        int_key = _key()
        int_cert = cls._ca_cert(int_key, _name(f"{name} Intermediate"), root_cert.subject,
                                root_key, not_before, not_after, path_length=0)
        return cls(root, Issued(int_cert, int_key, (root_cert,)))

    @staticmethod
    def _ca_cert(key: ec.EllipticCurvePrivateKey, subject: x509.Name, issuer: x509.Name,
                 signing_key: ec.EllipticCurvePrivateKey, not_before: datetime.datetime,
                 not_after: datetime.datetime, *, path_length: int | None) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length),
                           critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(signing_key, hashes.SHA256())
        )

    @property
    def issuer(self) -> Issued:
        """The CA that signs leaves: the intermediate if there is one, else the root."""
        return self.intermediate or self.root

    def issue(self, hostname: str, *, names: Sequence[str] | None = None,
              expired: bool = False, days: int = 2, include_root: bool = False) -> Issued:
        """A leaf for `hostname` (SAN = `names`, default [hostname]). Its chain is the
        intermediate (if any), then the root only when `include_root`."""
        key = _key()
        not_before, not_after = _validity(expired, days)
        cert = _leaf(key, list(names) if names is not None else [hostname],
                     issuer=self.issuer.cert.subject, signing_key=self.issuer.key,
                     not_before=not_before, not_after=not_after, common_name=hostname)
        chain: list[x509.Certificate] = []
        if self.intermediate is not None:
            chain.append(self.intermediate.cert)
        if include_root:
            chain.append(self.root.cert)
        return Issued(cert, key, tuple(chain))


__all__ = ["CertAuthority", "Issued", "self_signed"]
