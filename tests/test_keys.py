"""DKIM key generation, DNS record values and the master-key SecretBox."""

from __future__ import annotations

import base64

import dkim.crypto
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from inbox.errors import ConfigError, InboxError
from inbox.tenancy.keys import DkimKeys, SecretBox, dns_txt_value, generate_dkim_keys

KEY = bytes(range(32))


@pytest.fixture(scope="module")
def keys() -> DkimKeys:
    return generate_dkim_keys()


def test_rsa_key_is_2048_bits_and_dkimpy_reads_it(keys: DkimKeys) -> None:
    assert keys.rsa_private_pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    private = serialization.load_pem_private_key(keys.rsa_private_pem, password=None)
    assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 2048
    parsed = dkim.crypto.parse_pem_private_key(keys.rsa_private_pem)  # dkimpy's own parser
    assert parsed["modulus"] == private.private_numbers().public_numbers.n


def test_rsa_public_is_spki_der_of_the_private_key(keys: DkimKeys) -> None:
    der = base64.b64decode(keys.rsa_public_b64, validate=True)
    public = serialization.load_der_public_key(der)
    private = serialization.load_pem_private_key(keys.rsa_private_pem, password=None)
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.public_numbers() == private.public_key().public_numbers()
    assert dkim.crypto.parse_public_key(der)["modulus"] == public.public_numbers().n


def test_ed25519_keys_are_raw_32_bytes_and_match(keys: DkimKeys) -> None:
    seed = base64.b64decode(keys.ed25519_private_b64, validate=True)
    public = base64.b64decode(keys.ed25519_public_b64, validate=True)
    assert len(seed) == 32 and len(public) == 32
    derived = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert derived == public


def test_each_call_makes_new_keys(keys: DkimKeys) -> None:
    other = generate_dkim_keys()
    assert other.rsa_public_b64 != keys.rsa_public_b64
    assert other.ed25519_public_b64 != keys.ed25519_public_b64


def test_repr_hides_private_keys(keys: DkimKeys) -> None:
    text = repr(keys)
    assert keys.ed25519_private_b64 not in text
    assert "PRIVATE" not in text
    assert keys.rsa_public_b64 in text


def test_dns_txt_values(keys: DkimKeys) -> None:
    assert dns_txt_value("rsa", keys.rsa_public_b64) == f"v=DKIM1; k=rsa; p={keys.rsa_public_b64}"
    assert dns_txt_value("ed25519", keys.ed25519_public_b64) == (
        f"v=DKIM1; k=ed25519; p={keys.ed25519_public_b64}")
    # dkimpy parses what we publish
    record = dkim.util.parse_tag_value(dns_txt_value("rsa", keys.rsa_public_b64).encode())
    assert record[b"k"] == b"rsa" and record[b"p"] == keys.rsa_public_b64.encode()


@pytest.mark.parametrize(("kind", "public", "message"), [
    ("dsa", base64.b64encode(b"x" * 32).decode(), "kind"),
    ("rsa", "not base64!", "base64"),
    ("ed25519", base64.b64encode(b"x" * 31).decode(), "32 bytes"),
], ids=["unknown-kind", "bad-base64", "short-ed25519"])
def test_dns_txt_value_rejects(kind: str, public: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dns_txt_value(kind, public)  # type: ignore[arg-type]


# --- SecretBox ---------------------------------------------------------------------------------

def test_seal_open_round_trip_and_layout() -> None:
    box = SecretBox(KEY)
    blob = box.seal(b"secret", b"org:example.com")
    assert blob[0] == 1 and len(blob) == 1 + 12 + len(b"secret") + 16
    assert b"secret" not in blob
    assert box.open(blob, b"org:example.com") == b"secret"


def test_nonces_are_fresh() -> None:
    box = SecretBox(KEY)
    a, b = box.seal(b"same"), box.seal(b"same")
    assert a != b and a[1:13] != b[1:13]
    assert box.open(a) == box.open(b) == b"same"


def test_empty_plaintext() -> None:
    box = SecretBox(KEY)
    assert box.open(box.seal(b"")) == b""


def _flip(blob: bytes, index: int) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 1]) + blob[index + 1:]


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda blob: (SecretBox(bytes(32)), blob, b"aad"), "does not open"),
    (lambda blob: (SecretBox(KEY), blob, b"other aad"), "does not open"),
    (lambda blob: (SecretBox(KEY), _flip(blob, 20), b"aad"), "does not open"),
    (lambda blob: (SecretBox(KEY), _flip(blob, 5), b"aad"), "does not open"),  # nonce
    (lambda blob: (SecretBox(KEY), blob[:-1], b"aad"), "does not open"),
    (lambda blob: (SecretBox(KEY), blob[:20], b"aad"), "truncated"),
    (lambda blob: (SecretBox(KEY), b"\x02" + blob[1:], b"aad"), "version"),
], ids=["wrong-key", "wrong-aad", "ciphertext-bit", "nonce-bit", "cut-tag", "truncated",
        "unknown-version"])
def test_open_refuses(mutate, message: str) -> None:
    blob = SecretBox(KEY).seal(b"dkim private key", b"aad")
    box, damaged, aad = mutate(blob)
    with pytest.raises(ConfigError, match=message) as info:
        box.open(damaged, aad)
    assert isinstance(info.value, InboxError) and info.value.code == "CONFIG"


def test_from_b64_accepts_a_32_byte_key() -> None:
    text = base64.b64encode(KEY).decode()
    box = SecretBox.from_b64(f"  {text}\n")
    assert SecretBox(KEY).open(box.seal(b"x")) == b"x"
    assert text not in repr(box)


@pytest.mark.parametrize(("text", "message"), [
    ("", "32 bytes"),
    ("not base64 at all!", "base64"),
    (base64.b64encode(bytes(16)).decode(), "32 bytes, got 16"),
    (base64.b64encode(bytes(33)).decode(), "32 bytes, got 33"),
    (base64.urlsafe_b64encode(b"\xff" * 32).decode(), "base64"),
], ids=["empty", "garbage", "too-short", "too-long", "urlsafe-alphabet"])
def test_from_b64_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SecretBox.from_b64(text)


@pytest.mark.parametrize("key", [b"", bytes(31), bytes(64), "x" * 32],
                         ids=["empty", "31-bytes", "64-bytes", "str"])
def test_constructor_rejects_bad_keys(key) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SecretBox(key)
