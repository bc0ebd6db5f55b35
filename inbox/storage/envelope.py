"""Message encryption formats: the end-to-end (E2EE) envelope sealed to a tenant's X25519 key,
and the AES-GCM at-rest format of the local blob store. Does no I/O and keeps no keys.

All keys are raw bytes; in text (settings, GraphQL) they are standard base64 with padding.
Integers are single octets. `||` is concatenation. AES-256-GCM is NIST SP 800-38D with a 96-bit
nonce and a 128-bit tag appended to the ciphertext (the layout `cryptography`, WebCrypto, Go's
crypto/cipher and libsodium's aead_aes256gcm all use). X25519 is RFC 7748; HKDF is RFC 5869.

E2EE, as a tenant would implement the reading side elsewhere
-------------------------------------------------------------
The tenant registers an X25519 public key (32 raw bytes). For each message we draw a fresh
256-bit data key DK, encrypt the raw message and each attachment with it ("part" format), and
store DK only wrapped to the tenant's public key ("wrapped key" format).

Wrapped key, 104 octets::

    "IXK" || 0x01                      header: magic, format version 1
    key_id  (8)                        SHA-256(recipient public key)[0:8] (which key to use)
    eph_pub (32)                       our ephemeral X25519 public key, fresh per wrap
    nonce   (12)                       random
    wrapped (48)                       AES-256-GCM(KEK, nonce, DK, aad) = 32 ciphertext || 16 tag

    shared = X25519(eph_priv, recipient_pub)          (reject an all-zero result, RFC 7748 §6.1)
    KEK    = HKDF-SHA256(ikm=shared, salt=eph_pub || recipient_pub,
                         info="inbox e2ee v1 key wrap", L=32)
    aad    = header || key_id || eph_pub || recipient_pub

To unwrap: check header and key_id, compute shared = X25519(your_priv, eph_pub), derive KEK the
same way, AES-GCM-decrypt `wrapped`.

Part (the raw message, an attachment), 16 + 16 + len(plaintext) octets::

    "IXP" || 0x01                      header: magic, format version 1
    nonce (12)                         random
    ciphertext || tag (16)             AES-256-GCM(DK, nonce, plaintext, header || aad)

`aad` is empty for the raw message (what `decrypt_message` expects); a caller may bind an
attachment to a name with a non-empty `aad`, which the reader must then pass too.

Local at rest (not E2EE: the server holds the key), 16 + 16 + len(blob) octets::

    "IXB" || 0x01                      header: magic, format version 1
    nonce (12)                         random
    ciphertext || tag (16)             AES-256-GCM(tenant_key, nonce, blob, header || object key)

The object key (UTF-8, e.g. "msg/org/mailbox/id.eml") is associated data, so a file moved or
copied to another key fails to decrypt. Random nonces keep one key safe for 2^32 blobs
(SP 800-38D §8.3).

Every failure to open a sealed thing (wrong key, tampering, truncation, an unknown version)
raises `DecryptionFailed`; malformed public or private keys raise `ValidationError`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from inbox.errors import Forbidden, ValidationError

VERSION = 1
KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
HEADER_LEN = 4
KEY_ID_LEN = 8
WRAP_INFO = b"inbox e2ee v1 key wrap"

WRAPPED_KEY_MAGIC = b"IXK"
PART_MAGIC = b"IXP"
AT_REST_MAGIC = b"IXB"
WRAPPED_KEY_LEN = HEADER_LEN + KEY_ID_LEN + KEY_LEN + NONCE_LEN + KEY_LEN + TAG_LEN


class DecryptionFailed(Forbidden):
    """A sealed message, part or blob did not open: wrong key, tampered, truncated or an
    unknown format version. Permanent (RFC 3463 X.7.5: cryptographic failure)."""

    code = "DECRYPTION_FAILED"
    smtp_enhanced = "5.7.5"


# --- keys -----------------------------------------------------------------------------------


def _b64decode(text: str, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValidationError(f"{what} must be base64 text", field=[what])
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError(f"{what} is not valid base64", field=[what]) from None
    if len(raw) != KEY_LEN:
        raise ValidationError(f"{what} must be {KEY_LEN} raw bytes, got {len(raw)}",
                              field=[what])
    return raw


def generate_keypair() -> tuple[str, str]:
    """A new X25519 key pair as (private_b64, public_b64), each the raw 32-byte key."""
    private = X25519PrivateKey.generate()
    raw_private = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    raw_public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw_private).decode(), base64.b64encode(raw_public).decode()


def parse_public_key(b64: str) -> bytes:
    """The raw 32-byte X25519 public key in `b64`; ValidationError if it is not base64 of 32
    bytes or is a low-order point that would give an all-zero shared secret (RFC 7748 §6.1)."""
    raw = _b64decode(b64, "publicKey")
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        raise ValidationError("publicKey is not a usable X25519 key (low-order point)",
                              field=["publicKey"]) from None
    return raw


def _private_key(b64: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(_b64decode(b64, "privateKey"))


def key_id(public_key: bytes) -> bytes:
    """The 8-byte id of a raw public key carried in wrapped keys (SHA-256 prefix)."""
    return hashlib.sha256(public_key).digest()[:KEY_ID_LEN]


def _check_key(key: bytes, what: str) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_LEN:
        raise ValidationError(f"{what} must be {KEY_LEN} bytes")


def _check_header(blob: bytes, magic: bytes, what: str, min_len: int) -> bytes:
    header = bytes(blob[:HEADER_LEN])
    if len(blob) < HEADER_LEN or header[:3] != magic:
        raise DecryptionFailed(f"not an inbox {what} (bad magic)")
    if header[3] != VERSION:
        raise DecryptionFailed(f"unsupported {what} format version {header[3]} "
                               f"(this build reads version {VERSION})")
    if len(blob) < min_len:
        raise DecryptionFailed(f"{what} is truncated ({len(blob)} bytes)")
    return header


# --- AES-GCM with our header ----------------------------------------------------------------


def _seal(magic: bytes, key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    header = magic + bytes([VERSION])
    nonce = os.urandom(NONCE_LEN)
    return header + nonce + AESGCM(bytes(key)).encrypt(nonce, plaintext, header + aad)


def _open(magic: bytes, what: str, key: bytes, sealed: bytes, aad: bytes) -> bytes:
    header = _check_header(sealed, magic, what, HEADER_LEN + NONCE_LEN + TAG_LEN)
    nonce = bytes(sealed[HEADER_LEN:HEADER_LEN + NONCE_LEN])
    try:
        return AESGCM(bytes(key)).decrypt(nonce, bytes(sealed[HEADER_LEN + NONCE_LEN:]),
                                          header + aad)
    except InvalidTag:
        raise DecryptionFailed(f"{what} does not decrypt: wrong key, or it was altered "
                               "or moved") from None


# --- E2EE -----------------------------------------------------------------------------------


def new_data_key() -> bytes:
    """A fresh random 256-bit data key for one message."""
    return os.urandom(KEY_LEN)


def encrypt_part(data_key: bytes, plaintext: bytes, *, aad: bytes = b"") -> bytes:
    """The raw message or one attachment in the "part" format."""
    _check_key(data_key, "data key")
    return _seal(PART_MAGIC, data_key, plaintext, aad)


def decrypt_part(data_key: bytes, ciphertext: bytes, *, aad: bytes = b"") -> bytes:
    """Inverse of `encrypt_part`; DecryptionFailed on a wrong key, tampering or bad `aad`."""
    _check_key(data_key, "data key")
    return _open(PART_MAGIC, "encrypted part", data_key, ciphertext, aad)


def _kek(shared: bytes, eph_pub: bytes, recipient_pub: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=eph_pub + recipient_pub,
                info=WRAP_INFO)
    return hkdf.derive(shared)


def wrap_data_key(public_key_b64: str, data_key: bytes) -> bytes:
    """`data_key` wrapped to the tenant's X25519 public key (the "wrapped key" format)."""
    _check_key(data_key, "data key")
    recipient_pub = parse_public_key(public_key_b64)
    ephemeral = X25519PrivateKey.generate()
    eph_pub = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_pub))
    header = WRAPPED_KEY_MAGIC + bytes([VERSION])
    kid = key_id(recipient_pub)
    nonce = os.urandom(NONCE_LEN)
    aad = header + kid + eph_pub + recipient_pub
    wrapped = AESGCM(_kek(shared, eph_pub, recipient_pub)).encrypt(nonce, bytes(data_key), aad)
    return header + kid + eph_pub + nonce + wrapped


def unwrap_data_key(private_key_b64: str, wrapped: bytes) -> bytes:
    """The data key inside `wrapped`; DecryptionFailed if it was wrapped to another key,
    altered, truncated or is of an unknown version."""
    private = _private_key(private_key_b64)
    header = _check_header(wrapped, WRAPPED_KEY_MAGIC, "wrapped key", WRAPPED_KEY_LEN)
    if len(wrapped) != WRAPPED_KEY_LEN:
        raise DecryptionFailed(f"wrapped key must be {WRAPPED_KEY_LEN} bytes, "
                               f"got {len(wrapped)}")
    recipient_pub = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    pos = HEADER_LEN
    kid = bytes(wrapped[pos:pos + KEY_ID_LEN])
    pos += KEY_ID_LEN
    if kid != key_id(recipient_pub):
        raise DecryptionFailed(f"the data key was wrapped to another public key (key id "
                               f"{kid.hex()}, this private key is {key_id(recipient_pub).hex()})")
    eph_pub = bytes(wrapped[pos:pos + KEY_LEN])
    pos += KEY_LEN
    nonce = bytes(wrapped[pos:pos + NONCE_LEN])
    pos += NONCE_LEN
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(eph_pub))
        kek = _kek(shared, eph_pub, recipient_pub)
        return AESGCM(kek).decrypt(nonce, bytes(wrapped[pos:]),
                                   header + kid + eph_pub + recipient_pub)
    except (InvalidTag, ValueError):
        raise DecryptionFailed("wrapped key does not open with this private key "
                               "(altered, or not ours)") from None


def decrypt_message(private_key_b64: str, wrapped_key: bytes, ciphertext: bytes, *,
                    aad: bytes = b"") -> bytes:
    """The tenant-side one call: unwrap the data key, then decrypt the raw message (`aad` as
    it was sealed with)."""
    return decrypt_part(unwrap_data_key(private_key_b64, wrapped_key), ciphertext, aad=aad)


@dataclass(frozen=True, slots=True)
class SealedMessage:
    """One message sealed to a tenant.

    Store `wrapped_key` and `ciphertext`. `data_key` stays in memory only, to seal this
    message's attachments and parts with `seal_part`; it is never stored or logged.
    """

    wrapped_key: bytes
    ciphertext: bytes
    data_key: bytes = field(repr=False)

    @classmethod
    def seal(cls, public_key_b64: str, raw: bytes) -> SealedMessage:
        """A fresh data key wrapped to `public_key_b64`, and `raw` encrypted with it."""
        data_key = new_data_key()
        return cls(wrapped_key=wrap_data_key(public_key_b64, data_key),
                   ciphertext=encrypt_part(data_key, raw), data_key=data_key)

    def seal_part(self, plaintext: bytes, *, aad: bytes = b"") -> bytes:
        """An attachment or MIME part of this message, encrypted with its data key."""
        return encrypt_part(self.data_key, plaintext, aad=aad)


# --- local at rest --------------------------------------------------------------------------


def encrypt_at_rest(tenant_key: bytes, object_key: str, data: bytes) -> bytes:
    """`data` for the blob `object_key` in the at-rest format, under the tenant's key."""
    _check_key(tenant_key, "tenant key")
    return _seal(AT_REST_MAGIC, tenant_key, data, object_key.encode())


def decrypt_at_rest(tenant_key: bytes, object_key: str, sealed: bytes) -> bytes:
    """Inverse of `encrypt_at_rest`; DecryptionFailed if the key, the object key or a byte
    differs."""
    _check_key(tenant_key, "tenant key")
    return _open(AT_REST_MAGIC, f"blob {object_key}", tenant_key, sealed, object_key.encode())
