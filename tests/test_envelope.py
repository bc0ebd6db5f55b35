"""E2EE envelope and local at-rest format: round trips, wrong keys, tampering, versions, and a
reader written only from the module docstring (what a tenant would implement elsewhere)."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from inbox.errors import Forbidden, InboxError, ValidationError
from inbox.storage.envelope import (
    WRAPPED_KEY_LEN,
    DecryptionFailed,
    SealedMessage,
    decrypt_at_rest,
    decrypt_message,
    decrypt_part,
    encrypt_at_rest,
    encrypt_part,
    generate_keypair,
    new_data_key,
    parse_public_key,
    unwrap_data_key,
    wrap_data_key,
)

RAW = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nsecret body\r\n"


@pytest.fixture(scope="module")
def keys() -> tuple[str, str]:
    return generate_keypair()


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def test_keypair_is_raw_32_byte_x25519(keys: tuple[str, str]) -> None:
    private_b64, public_b64 = keys
    private = X25519PrivateKey.from_private_bytes(base64.b64decode(private_b64))
    derived = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert base64.b64decode(public_b64) == derived
    assert parse_public_key(public_b64) == derived
    assert generate_keypair() != keys


def test_sealed_message_round_trip_with_attachments(keys: tuple[str, str]) -> None:
    private_b64, public_b64 = keys
    sealed = SealedMessage.seal(public_b64, RAW)
    attachment = sealed.seal_part(b"%PDF-1.7 attachment", aad=b"att/1")
    assert b"secret body" not in sealed.ciphertext
    assert "data_key" not in repr(sealed)
    assert decrypt_message(private_b64, sealed.wrapped_key, sealed.ciphertext) == RAW
    data_key = unwrap_data_key(private_b64, sealed.wrapped_key)
    assert data_key == sealed.data_key
    assert decrypt_part(data_key, attachment, aad=b"att/1") == b"%PDF-1.7 attachment"


def test_each_message_gets_a_fresh_data_key_and_wrap(keys: tuple[str, str]) -> None:
    one, two = (SealedMessage.seal(keys[1], RAW) for _ in range(2))
    assert one.data_key != two.data_key
    assert one.wrapped_key[12:44] != two.wrapped_key[12:44]  # fresh ephemeral key
    assert one.ciphertext != two.ciphertext


def test_wrong_private_key_fails_clearly(keys: tuple[str, str]) -> None:
    sealed = SealedMessage.seal(keys[1], RAW)
    other_private, _ = generate_keypair()
    with pytest.raises(DecryptionFailed, match="wrapped to another public key"):
        decrypt_message(other_private, sealed.wrapped_key, sealed.ciphertext)


def test_error_is_permanent_cryptographic_failure() -> None:
    err = DecryptionFailed("x")
    assert isinstance(err, Forbidden) and isinstance(err, InboxError)
    assert err.code == "DECRYPTION_FAILED" and not err.temporary
    assert err.smtp_reply() == "550 5.7.5 x"  # RFC 3463 X.7.5 cryptographic failure


def test_format_headers_and_sizes(keys: tuple[str, str]) -> None:
    data_key = new_data_key()
    wrapped = wrap_data_key(keys[1], data_key)
    part = encrypt_part(data_key, b"abc")
    assert wrapped[:4] == b"IXK\x01" and len(wrapped) == WRAPPED_KEY_LEN == 104
    assert wrapped[4:12] == hashlib.sha256(parse_public_key(keys[1])).digest()[:8]
    assert part[:4] == b"IXP\x01" and len(part) == 4 + 12 + 3 + 16
    blob = encrypt_at_rest(b"t" * 32, "msg/o/m/x.eml", b"abc")
    assert blob[:4] == b"IXB\x01" and len(blob) == 4 + 12 + 3 + 16


WRAPPED_TAMPER = [
    ("version", lambda w: w[:3] + b"\x02" + w[4:], "unsupported wrapped key format version 2"),
    ("magic", lambda w: b"XXX" + w[3:], "bad magic"),
    ("key id", lambda w: flip(w, 5), "another public key"),
    ("ephemeral key", lambda w: flip(w, 20), "does not open"),
    ("nonce", lambda w: flip(w, 50), "does not open"),
    ("wrapped key", lambda w: flip(w, 60), "does not open"),
    ("tag", lambda w: flip(w, len(w) - 1), "does not open"),
    ("truncated", lambda w: w[:-1], "truncated"),
    ("extended", lambda w: w + b"\x00", "must be 104 bytes"),
    ("empty", lambda w: b"", "bad magic"),
]


@pytest.mark.parametrize(("change", "match"), [(c, m) for _, c, m in WRAPPED_TAMPER],
                         ids=[i for i, _, _ in WRAPPED_TAMPER])
def test_tampered_wrapped_key_fails(keys: tuple[str, str], change, match: str) -> None:
    sealed = SealedMessage.seal(keys[1], RAW)
    with pytest.raises(DecryptionFailed, match=match):
        decrypt_message(keys[0], change(sealed.wrapped_key), sealed.ciphertext)


PART_TAMPER = [
    ("version", lambda c: c[:3] + b"\x07" + c[4:], b"", "unsupported encrypted part format"),
    ("magic", lambda c: b"IXB" + c[3:], b"", "bad magic"),
    ("nonce", lambda c: flip(c, 6), b"", "does not decrypt"),
    ("ciphertext", lambda c: flip(c, 20), b"", "does not decrypt"),
    ("tag", lambda c: flip(c, len(c) - 1), b"", "does not decrypt"),
    ("truncated", lambda c: c[:20], b"", "truncated"),
    ("other aad", lambda c: c, b"att/2", "does not decrypt"),
]


@pytest.mark.parametrize(("change", "aad", "match"), [row[1:] for row in PART_TAMPER],
                         ids=[row[0] for row in PART_TAMPER])
def test_tampered_part_fails(change, aad: bytes, match: str) -> None:
    data_key = new_data_key()
    ciphertext = encrypt_part(data_key, b"attachment bytes " * 4)
    with pytest.raises(DecryptionFailed, match=match):
        decrypt_part(data_key, change(ciphertext), aad=aad)


def test_part_with_another_data_key_fails() -> None:
    ciphertext = encrypt_part(new_data_key(), b"x")
    with pytest.raises(DecryptionFailed):
        decrypt_part(new_data_key(), ciphertext)


LOW_ORDER = base64.b64encode(bytes(32)).decode()  # the all-zero point (RFC 7748 §6.1)
BAD_PUBLIC = [
    ("empty", ""),
    ("not base64", "not base64!!"),
    ("31 bytes", base64.b64encode(b"k" * 31).decode()),
    ("33 bytes", base64.b64encode(b"k" * 33).decode()),
    ("urlsafe alphabet", base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode()),
    ("low-order point", LOW_ORDER),
    ("order-1 point", base64.b64encode(b"\x01" + bytes(31)).decode()),
    ("not a string", b"bytes"),
]


@pytest.mark.parametrize("value", [v for _, v in BAD_PUBLIC], ids=[i for i, _ in BAD_PUBLIC])
def test_parse_public_key_rejects(value) -> None:
    with pytest.raises(ValidationError):
        parse_public_key(value)


def test_parse_public_key_accepts_surrounding_whitespace(keys: tuple[str, str]) -> None:
    assert parse_public_key(f"  {keys[1][:20]}\n{keys[1][20:]} ") == parse_public_key(keys[1])


def test_bad_private_key_is_validation_error(keys: tuple[str, str]) -> None:
    wrapped = wrap_data_key(keys[1], new_data_key())
    with pytest.raises(ValidationError):
        unwrap_data_key("short", wrapped)


@pytest.mark.parametrize("data_key", [b"", b"k" * 16, b"k" * 33], ids=["0", "16", "33"])
def test_data_key_must_be_256_bits(keys: tuple[str, str], data_key: bytes) -> None:
    with pytest.raises(ValidationError):
        wrap_data_key(keys[1], data_key)
    with pytest.raises(ValidationError):
        encrypt_part(data_key, b"x")


def doc_reader(private_b64: str, wrapped: bytes, ciphertext: bytes) -> bytes:
    """Written only from envelope.py's docstring, with primitives, as a tenant would."""
    private = X25519PrivateKey.from_private_bytes(base64.b64decode(private_b64))
    my_pub = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    header, kid, eph_pub = wrapped[:4], wrapped[4:12], wrapped[12:44]
    nonce, body = wrapped[44:56], wrapped[56:]
    assert header == b"IXK\x01" and kid == hashlib.sha256(my_pub).digest()[:8]
    shared = private.exchange(X25519PublicKey.from_public_bytes(eph_pub))
    kek = HKDF(algorithm=hashes.SHA256(), length=32, salt=eph_pub + my_pub,
               info=b"inbox e2ee v1 key wrap").derive(shared)
    data_key = AESGCM(kek).decrypt(nonce, body, header + kid + eph_pub + my_pub)
    assert ciphertext[:4] == b"IXP\x01"
    return AESGCM(data_key).decrypt(ciphertext[4:16], ciphertext[16:], ciphertext[:4])


def test_documented_format_is_enough_to_decrypt(keys: tuple[str, str]) -> None:
    sealed = SealedMessage.seal(keys[1], RAW)
    assert doc_reader(keys[0], sealed.wrapped_key, sealed.ciphertext) == RAW


@settings(max_examples=60, deadline=None)
@given(plaintext=st.binary(max_size=2048), aad=st.binary(max_size=64))
def test_part_round_trip_property(plaintext: bytes, aad: bytes) -> None:
    data_key = new_data_key()
    assert decrypt_part(data_key, encrypt_part(data_key, plaintext, aad=aad),
                        aad=aad) == plaintext


def test_at_rest_binds_key_and_object_key() -> None:
    tenant, other = b"t" * 32, b"u" * 32
    blob = encrypt_at_rest(tenant, "msg/o/m/x.eml", RAW)
    assert b"secret body" not in blob
    assert decrypt_at_rest(tenant, "msg/o/m/x.eml", blob) == RAW
    with pytest.raises(DecryptionFailed, match="wrong key, or it was altered or moved"):
        decrypt_at_rest(other, "msg/o/m/x.eml", blob)
    with pytest.raises(DecryptionFailed):
        decrypt_at_rest(tenant, "msg/o/m/y.eml", blob)
    with pytest.raises(ValidationError):
        encrypt_at_rest(b"short", "msg/o/m/x.eml", RAW)
