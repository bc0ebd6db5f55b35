"""TLS server contexts for inbound SMTP: load a certificate and key from files, or make (once)
and reuse a self-signed development certificate kept in a directory. Does not speak SMTP.

Both functions do blocking file I/O (and, the first time, key generation): call them at start-up,
or through `asyncio.to_thread` from inside a running event loop.
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from inbox.errors import ConfigError

DEV_CERT_NAME = "smtp-dev-cert.pem"
DEV_KEY_NAME = "smtp-dev-key.pem"
DEV_CERT_DAYS = 825
# Make a new development certificate when the old one has less than this left.
DEV_CERT_RENEW_BEFORE = datetime.timedelta(days=30)


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def server_context(cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]
                   ) -> ssl.SSLContext:
    """A server-side context for STARTTLS (RFC 3207) with the certificate chain and key in
    PEM files. TLS 1.2 is the minimum (RFC 8996 retires 1.0/1.1); client certificates are not
    asked for (a sending MTA rarely has one). Raises ConfigError naming the bad file."""
    for path in (cert_file, key_file):
        if not Path(path).is_file():
            raise ConfigError(f"TLS file not found: {os.fspath(path)}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_NONE
    try:
        context.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"cannot load TLS certificate {os.fspath(cert_file)} with key "
                          f"{os.fspath(key_file)}: {exc}") from exc
    return context


def _usable(cert_path: Path, key_path: Path, hostname: str, now: datetime.datetime) -> bool:
    if not (cert_path.is_file() and key_path.is_file()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    if key.public_key().public_bytes(  # the key must belong to the certificate
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        return False
    if hostname.lower() not in [n.lower() for n in names.get_values_for_type(x509.DNSName)]:
        return False
    return cert.not_valid_after_utc - DEV_CERT_RENEW_BEFORE > now


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_dev_certificate(directory: str | os.PathLike[str], hostname: str, *,
                           clock: Callable[[], datetime.datetime] = _utc_now
                           ) -> tuple[Path, Path]:
    """Paths of a self-signed certificate and key for `hostname` in `directory`, made only
    when missing, unreadable, for another name or within 30 days of expiry; otherwise the
    existing pair is reused untouched. The key file is private (0600)."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / DEV_CERT_NAME, folder / DEV_KEY_NAME
    now = clock()
    if _usable(cert_path, key_path, hostname, now):
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=DEV_CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    # Key first: a reader never sees a new certificate next to an old key for long.
    _write_atomic(key_path, key_pem, 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def dev_server_context(directory: str | os.PathLike[str], hostname: str, *,
                       clock: Callable[[], datetime.datetime] = _utc_now) -> ssl.SSLContext:
    """A server context with the development certificate of `ensure_dev_certificate`. Clients
    that verify certificates will refuse it; SMTP clients between MTAs usually do not
    (RFC 7435 opportunistic TLS)."""
    cert_path, key_path = ensure_dev_certificate(directory, hostname, clock=clock)
    return server_context(cert_path, key_path)


def load_tls_context(cert_file: str | None, key_file: str | None,
                     dev_cert_dir: str | os.PathLike[str] | None, hostname: str
                     ) -> ssl.SSLContext | None:
    """The context the transfer server should use: the configured files when both are given,
    else a development certificate in `dev_cert_dir` when given, else None (no STARTTLS)."""
    if cert_file or key_file:
        if not (cert_file and key_file):
            raise ConfigError("TLS needs both a certificate file and a key file")
        return server_context(cert_file, key_file)
    if dev_cert_dir is not None:
        return dev_server_context(dev_cert_dir, hostname)
    return None
