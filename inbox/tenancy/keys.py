"""DKIM key material: generation, DNS record values, encryption at rest.

RSA keys are RFC 8301 sized (2048 bits); Ed25519 keys follow RFC 8463 (the DNS `p=` is the
raw 32-byte public key, base64). Private keys are stored sealed by `SecretBox` under the
master key. Does no I/O.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from inbox.errors import ConfigError

RSA_KEY_BITS = 2048  # RFC 8301 §3.2: signers MUST use >= 1024 and SHOULD use >= 2048 bits


@dataclass(frozen=True)
class DkimKeys:
    """A fresh RSA + Ed25519 key pair set. Private parts are left out of repr()."""

    rsa_private_pem: bytes = field(repr=False)  # PKCS#1 ("BEGIN RSA PRIVATE KEY") PEM
    rsa_public_b64: str  # SubjectPublicKeyInfo DER, base64: the DNS p= value
    ed25519_private_b64: str = field(repr=False)  # raw 32-byte seed, base64 (dkimpy's format)
    ed25519_public_b64: str  # raw 32-byte public key, base64: the DNS p= value


def generate_dkim_keys() -> DkimKeys:
    """New RSA-2048 and Ed25519 keys (CPU-bound, ~0.1 s: call it via asyncio.to_thread)."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    rsa_pem = rsa_key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    rsa_spki = rsa_key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ed_raw = ed_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                  serialization.NoEncryption())
    ed_pub = ed_key.public_key().public_bytes(serialization.Encoding.Raw,
                                              serialization.PublicFormat.Raw)
    return DkimKeys(
        rsa_private_pem=rsa_pem,
        rsa_public_b64=base64.b64encode(rsa_spki).decode("ascii"),
        ed25519_private_b64=base64.b64encode(ed_raw).decode("ascii"),
        ed25519_public_b64=base64.b64encode(ed_pub).decode("ascii"),
    )


def dns_txt_value(kind: Literal["rsa", "ed25519"], public_b64: str) -> str:
    """The TXT record value for `<selector>._domainkey.<domain>` (RFC 6376 §3.6.1).

    An RSA-2048 value is longer than 255 octets: whoever publishes it must split it into
    several character-strings of one TXT record (RFC 7208 §3.3 style); verifiers join them.
    """
    if kind not in ("rsa", "ed25519"):
        raise ValueError(f"DKIM key kind must be 'rsa' or 'ed25519', not {kind!r}")
    try:
        raw = base64.b64decode(public_b64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("DKIM public key is not valid base64") from None
    if kind == "ed25519" and len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")  # RFC 8463 §4.2
    return f"v=DKIM1; k={kind}; p={public_b64}"


_BOX_VERSION = b"\x01"
_NONCE_BYTES = 12  # NIST SP 800-38D §8.2: 96-bit random nonces
_TAG_BYTES = 16


class SecretBox:
    """AES-256-GCM under a 32-byte master key.

    A sealed secret is `version (1 byte) || nonce (12 bytes) || ciphertext+tag`. `aad` binds the
    secret to its context (e.g. the organization and domain): opening with another aad fails.
    """

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) != 32:
            raise ValueError("the master key must be exactly 32 bytes (AES-256)")
        self._aead = AESGCM(bytes(key))

    @classmethod
    def from_b64(cls, text: str) -> SecretBox:
        """A box from a base64 master key (e.g. INBOX_MASTER_KEY); ValueError when malformed."""
        try:
            key = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the master key is not valid base64 "
                             "(generate one with: openssl rand -base64 32)") from None
        if len(key) != 32:
            raise ValueError(f"the master key must decode to 32 bytes, got {len(key)} "
                             "(generate one with: openssl rand -base64 32)")
        return cls(key)

    def __repr__(self) -> str:
        return "SecretBox(<key hidden>)"

    def seal(self, plaintext: bytes, aad: bytes = b"") -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _BOX_VERSION + nonce + self._aead.encrypt(nonce, bytes(plaintext), aad)

    def open(self, blob: bytes, aad: bytes = b"") -> bytes:
        """The plaintext; ConfigError when the blob is damaged, or key or aad do not match."""
        blob = bytes(blob)
        if len(blob) < 1 + _NONCE_BYTES + _TAG_BYTES:
            raise ConfigError("sealed secret is truncated")
        if blob[:1] != _BOX_VERSION:
            raise ConfigError(f"sealed secret has unknown format version {blob[0]}")
        nonce = blob[1:1 + _NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, blob[1 + _NONCE_BYTES:], aad)
        except InvalidTag:
            raise ConfigError("master key does not open this secret") from None
