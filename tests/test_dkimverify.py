"""The fast public-key step (inbox.smtp.dkimverify) gives exactly dkimpy's verdicts.

Every case is verified twice against keys served by the loopback DNS server: once by plain dkimpy
(`dkim.DKIM` / `dkim.ARC`, pure-Python RSA) and once by `FastDKIM` / `FastARC`; the outcomes
(True/False, or the exception type and text) must be identical. The plain outcome is also pinned,
so a case cannot silently stop testing what its name says. Keys with exponents OpenSSL refuses
(e=1, a 65-bit e with a 4096-bit modulus) exercise the pure-Python fallback.
"""

from __future__ import annotations

import base64
import hashlib
import random
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import gcd
from typing import Any

import dkim
import nacl.encoding
import nacl.signing
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from dkim.crypto import EMSA_PKCS1_v1_5_encode, RSASSA_PKCS1_v1_5_verify
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inbox.dkimcanon import parse
from inbox.smtp.dkimverify import (
    FastARC,
    FastDKIM,
    RsaPublicKey,
    parse_key_record,
)
from tests.support.dnsserver import DnsServer
from tests.support.fixtures_dns import dkim_dnsfunc, dns_server  # noqa: F401

DOMAIN = b"sender.test"
BODY = b"".join(b"Line %03d of a message that is about one kilobyte long.\r\n" % i
                for i in range(18))
MESSAGE = (b"From: Alice <alice@sender.test>\r\n"
           b"To: Bob <bob@receiver.test>\r\n"
           b"Subject: Quarterly figures\r\n"
           b"Date: Mon, 02 Jun 2025 10:00:00 +0000\r\n"
           b"Message-ID: <q1@sender.test>\r\n"
           b"\r\n" + BODY)
SIGNED = [b"from", b"to", b"subject", b"date", b"message-id"]


# -- keys -----------------------------------------------------------------------------------


def _der(tag: int, body: bytes) -> bytes:
    size = len(body)
    if size < 0x80:
        return bytes([tag, size]) + body
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + body


def _der_int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


@dataclass(frozen=True)
class RsaKey:
    """An RSA key from its primes, any exponent: PKCS#1 PEM for dkimpy's signer and the DNS
    record (RFC 6376 §3.6.1, p= is a SubjectPublicKeyInfo)."""

    p: int
    q: int
    e: int

    @property
    def n(self) -> int:
        return self.p * self.q

    @property
    def d(self) -> int:
        return pow(self.e, -1, (self.p - 1) * (self.q - 1))

    def pem(self) -> bytes:
        p, q, d = self.p, self.q, self.d
        der = _der(0x30, b"".join(_der_int(x) for x in (
            0, self.n, self.e, d, p, q, d % (p - 1), d % (q - 1), pow(q, -1, p))))
        b64 = base64.b64encode(der)
        lines = b"\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
        return b"-----BEGIN RSA PRIVATE KEY-----\n" + lines + b"\n-----END RSA PRIVATE KEY-----\n"

    def record(self) -> str:
        rsa_oid = bytes.fromhex("06092a864886f70d010101") + b"\x05\x00"  # rsaEncryption, NULL
        public = _der(0x30, _der_int(self.n) + _der_int(self.e))
        spki = _der(0x30, _der(0x30, rsa_oid) + _der(0x03, b"\x00" + public))
        return "v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode()


@dataclass(frozen=True)
class EdKey:
    seed: bytes

    def private(self) -> bytes:
        return base64.b64encode(self.seed)

    def record(self) -> str:
        public = nacl.signing.SigningKey(self.seed).verify_key.encode(nacl.encoding.Base64Encoder)
        return "v=DKIM1; k=ed25519; p=" + public.decode()


def _is_probable_prime(n: int, rng: random.Random) -> bool:
    if n % 2 == 0 or any(n % small == 0 for small in (3, 5, 7, 11, 13, 17, 19, 23, 29, 31)):
        return False
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(32):  # Miller-Rabin
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _small_key(bits: int, e: int, seed: int) -> RsaKey:
    """A `bits`-bit key from primes made here (cryptography will not make keys under 1024)."""
    rng = random.Random(seed)

    def prime() -> int:
        while True:
            c = rng.getrandbits(bits // 2) | (3 << (bits // 2 - 2)) | 1
            if gcd(e, c - 1) == 1 and _is_probable_prime(c, rng):
                return c

    p = prime()
    q = prime()
    while q == p:
        q = prime()
    return RsaKey(p, q, e)


def _generated(bits: int, e: int = 65537, *, with_e: int | None = None) -> RsaKey:
    numbers = rsa.generate_private_key(e, bits).private_numbers()
    key = RsaKey(numbers.p, numbers.q, e)
    if with_e is None:
        return key
    exponent = with_e
    while gcd(exponent, (key.p - 1) * (key.q - 1)) != 1:
        exponent += 2
    return RsaKey(key.p, key.q, exponent)


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "rsa1024": _generated(1024),
        "rsa2048": _generated(2048),
        "rsa2048b": _generated(2048),
        "rsa1024-e3": _generated(1024, 3),
        "rsa512": _small_key(512, 65537, seed=512),
        "rsa256": _small_key(256, 65537, seed=256),
        "rsa1024-e1": _small_key(1024, 1, seed=1),
        "rsa4096-e65bit": _generated(4096, with_e=(1 << 64) + 1),
        "ed25519": EdKey(bytes(range(32))),
        "ed25519b": EdKey(bytes(range(1, 33))),
    }


# -- DKIM: the same verdict as dkimpy --------------------------------------------------------


def _sign(keys: dict[str, Any], name: str, msg: bytes = MESSAGE, selector: bytes = b"sel",
          **kw: Any) -> bytes:
    key = keys[name]
    if isinstance(key, EdKey):
        kw.setdefault("signature_algorithm", b"ed25519-sha256")
        kw.setdefault("include_headers", SIGNED)
        return dkim.DKIM(msg).sign(selector, DOMAIN, key.private(), **kw) + msg
    kw.setdefault("include_headers", SIGNED)
    return dkim.DKIM(msg).sign(selector, DOMAIN, key.pem(), **kw) + msg


def _edit_b(signed: bytes, change: Callable[[bytes], bytes]) -> bytes:
    """Replace the b= signature of the (only) DKIM-Signature with change(signature)."""
    header = re.match(rb"DKIM-Signature:.*?\r\n(?![ \t])", signed, re.DOTALL)
    assert header is not None
    found = re.search(rb"([;\s]b=)([\sA-Za-z0-9+/=]+)\Z", header.group(0))
    assert found is not None
    old = base64.b64decode(re.sub(rb"\s+", b"", found.group(2)))
    new = base64.b64encode(change(old))
    return signed[: found.start(2)] + new + b"\r\n" + signed[header.end():]


def _plus_modulus(keys: dict[str, Any]) -> Callable[[bytes], bytes]:
    n = keys["rsa2048"].n
    return lambda sig: (int.from_bytes(sig, "big") + n).to_bytes(257, "big")


@dataclass(frozen=True)
class Case:
    signer: str  # key name, or "" for the default (rsa2048)
    record: str | Callable[[dict[str, Any]], str] = ""  # key name or a record; "" = signer's
    sign: dict[str, Any] | None = None
    edit: Callable[[bytes, dict[str, Any]], bytes] | None = None
    plain: str = "True"  # what plain dkimpy says (outcome text prefix)


# Two To fields, both signed (h= names "to" twice: the last one is hashed first), and a
# folded Subject with runs of spaces and tabs (relaxed canonicalization must unfold them).
DUPLICATES = MESSAGE.replace(b"To: Bob <bob@receiver.test>\r\n",
                             b"To: Bob <bob@receiver.test>\r\nTo: Carol <c@receiver.test>\r\n")
DUPLICATES_SIGNED = {"msg": DUPLICATES, "include_headers": [b"from", b"to", b"to", b"subject"]}
FOLDED = MESSAGE.replace(b"Subject: Quarterly figures\r\n",
                         b"Subject:  Quarterly \t figures,\r\n\t  part  two \r\n")
CASES = {
    "rsa1024": Case("rsa1024"),
    "rsa2048": Case("rsa2048"),
    "rsa2048-simple": Case("rsa2048", sign={"canonicalize": (b"simple", b"simple")}),
    "rsa2048-sha1": Case("rsa2048", sign={"signature_algorithm": b"rsa-sha1"}),
    "rsa2048-l=-appended": Case("rsa2048", sign={"length": True},
                                edit=lambda m, k: m + b"Appended below the signed part.\r\n"),
    "ed25519": Case("ed25519"),
    "rsa-body-tampered": Case("rsa2048", edit=lambda m, k: m.replace(b"Line 007", b"Line 700"),
                              plain="ValidationError: body hash mismatch"),
    "rsa-header-tampered": Case("rsa2048", plain="False",
                                edit=lambda m, k: m.replace(b"Quarterly", b"Monthly")),
    "ed25519-header-tampered": Case("ed25519", plain="False",
                                    edit=lambda m, k: m.replace(b"Quarterly", b"Monthly")),
    "second-From-added": Case("rsa2048", plain="False",  # dkimpy counts an extra From
                              edit=lambda m, k: b"From: Mallory <m@evil.test>\r\n" + m),
    "duplicate-fields-signed": Case("rsa2048", sign=DUPLICATES_SIGNED),
    "duplicate-fields-swapped": Case("rsa2048", sign=DUPLICATES_SIGNED, plain="False", edit=(
        lambda m, k: m.replace(b"To: Bob <bob@receiver.test>\r\nTo: Carol <c@receiver.test>",
                               b"To: Carol <c@receiver.test>\r\nTo: Bob <bob@receiver.test>"))),
    "ed25519-duplicate-fields-signed": Case("ed25519", sign=DUPLICATES_SIGNED),
    "folded-spaced-subject": Case("rsa2048", sign={"msg": FOLDED}),
    "folded-subject-refolded": Case("rsa2048", sign={"msg": FOLDED}, edit=(
        lambda m, k: m.replace(b"figures,\r\n\t  part", b"figures, part"))),
    "rsa-wrong-key": Case("rsa2048", "rsa2048b", plain="False"),
    "ed25519-wrong-key": Case("ed25519", "ed25519b", plain="False"),
    "rsa512-valid": Case("rsa512", plain="KeyFormatError: public key too small: 512"),
    "rsa512-tampered": Case("rsa512", plain="False",
                            edit=lambda m, k: m.replace(b"Quarterly", b"Monthly")),
    "rsa256-digest-too-large": Case("rsa2048", "rsa256",
                                    plain="KeyFormatError: digest too large for modulus"),
    "rsa-exponent-3": Case("rsa1024-e3"),
    "rsa-exponent-1-fallback": Case("rsa1024-e1"),
    "rsa4096-65-bit-exponent-fallback": Case("rsa4096-e65bit"),
    "b=-with-leading-zero": Case("rsa2048",
                                 edit=lambda m, k: _edit_b(m, lambda s: b"\x00" + s)),
    "b=-plus-modulus": Case("rsa2048", edit=lambda m, k: _edit_b(m, _plus_modulus(k))),
    "b=-three-zero-octets": Case("rsa2048", plain="False",
                                 edit=lambda m, k: _edit_b(m, lambda s: b"\x00\x00\x00")),
    "b=-one-bit-flipped": Case("rsa2048", plain="False",
                               edit=lambda m, k: _edit_b(m, lambda s: s[:-1] + bytes([s[-1] ^ 1]))),
    "ed25519-signed-rsa-key": Case("ed25519", "rsa2048", plain="False"),
    "rsa-signed-ed25519-key": Case("rsa2048", "ed25519", plain="ValueError"),
    "revoked-key": Case("rsa2048", "v=DKIM1; p=", plain="False"),
    "garbage-key": Case("rsa2048", "v=DKIM1; p=bm90IGEga2V5", plain="False"),
    "tlsrpt-only-key": Case("rsa2048", lambda k: k["rsa2048"].record() + "; s=tlsrpt",
                            plain="ValidationError: Message is not tlsrpt"),
    "unknown-service-key": Case("rsa2048", lambda k: k["rsa2048"].record() + "; s=other",
                                plain="UnknownKeyTypeError"),
}


def _build(case: Case, keys: dict[str, Any], selector: bytes = b"sel") -> tuple[bytes, str]:
    signed = _sign(keys, case.signer, selector=selector, **(case.sign or {}))
    if case.edit is not None:
        signed = case.edit(signed, keys)
    if callable(case.record):
        record = case.record(keys)
    elif case.record in keys or not case.record:
        record = keys[case.record or case.signer].record()
    else:
        record = case.record
    return signed, record


def _outcome(verify: Callable[[], Any]) -> str:
    try:
        return repr(verify())
    except Exception as exc:  # noqa: BLE001 - the exception is part of the verdict compared
        return f"{type(exc).__name__}: {exc}"


def _both(msg: bytes, dnsfunc: Callable[..., Any]) -> tuple[str, str]:
    plain = _outcome(lambda: dkim.DKIM(msg, minkey=1024).verify(dnsfunc=dnsfunc))
    fast = _outcome(lambda: FastDKIM(msg, minkey=1024).verify(dnsfunc=dnsfunc))
    return plain, fast


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_dkim_verdict_equals_dkimpy(dns_server: DnsServer, keys: dict[str, Any],
                                    case: Case) -> None:
    msg, record = _build(case, keys)
    dns_server.add_txt(f"sel._domainkey.{DOMAIN.decode()}", record)
    plain, fast = _both(msg, dkim_dnsfunc(dns_server))
    assert plain.startswith(case.plain), plain
    assert fast == plain


def test_fallback_is_used_only_for_keys_openssl_refuses(keys: dict[str, Any]) -> None:
    def fast_key(name: str) -> Any:
        return parse_key_record(b"x.", keys[name].record().encode())[0].key

    assert fast_key("rsa2048") is not None and fast_key("rsa512") is not None
    assert fast_key("rsa1024-e3") is not None
    assert fast_key("rsa1024-e1") is None and fast_key("rsa4096-e65bit") is None
    assert RsaPublicKey({"modulus": keys["rsa1024"].n, "publicExponent": 65536}).key is None


def test_concurrent_verification_in_threads_gives_serial_verdicts(dns_server: DnsServer,
                                                                  keys: dict[str, Any]) -> None:
    picked = ["rsa2048", "ed25519", "rsa-body-tampered", "rsa-header-tampered",
              "rsa-wrong-key", "rsa512-valid", "b=-plus-modulus", "rsa-exponent-1-fallback"]
    messages = []
    for index, name in enumerate(picked):
        msg, record = _build(CASES[name], keys, selector=b"t%d" % index)
        dns_server.add_txt(f"t{index}._domainkey.{DOMAIN.decode()}", record)
        messages.append(msg)
    dnsfunc = dkim_dnsfunc(dns_server)
    serial = [_both(m, dnsfunc)[0] for m in messages]
    assert serial[0] == serial[1] == "True" and serial[3] == "False"
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(
            lambda m: _outcome(lambda: FastDKIM(m).verify(dnsfunc=dnsfunc)), messages * 6))
    assert results == serial * 6


# -- the key cache ---------------------------------------------------------------------------


def test_a_key_record_is_parsed_once(keys: dict[str, Any]) -> None:
    record = keys["rsa2048"].record().encode()
    first = parse_key_record(b"a._domainkey.sender.test.", record)
    again = parse_key_record(b"b._domainkey.other.test.", bytes(record))  # by content
    assert first[0] is again[0] and first[1:] == (2048, b"rsa", False)


def test_a_changed_record_is_not_answered_from_the_cache(dns_server: DnsServer,
                                                         keys: dict[str, Any]) -> None:
    name = f"sel._domainkey.{DOMAIN.decode()}"
    msg = _sign(keys, "rsa2048")
    dnsfunc = dkim_dnsfunc(dns_server)
    dns_server.add_txt(name, keys["rsa2048"].record())
    assert FastDKIM(msg).verify(dnsfunc=dnsfunc) is True
    dns_server.remove(name)
    dns_server.add_txt(name, keys["rsa2048b"].record())  # key rotated under the same name
    assert FastDKIM(msg).verify(dnsfunc=dnsfunc) is False
    dns_server.remove(name)
    dns_server.add_txt(name, "v=DKIM1; p=")  # revoked
    assert FastDKIM(msg).verify(dnsfunc=dnsfunc) is False
    dns_server.remove(name)
    assert _outcome(lambda: FastDKIM(msg).verify(dnsfunc=dnsfunc)) == "False"  # gone


# -- RsaPublicKey.verify against dkimpy's RSASSA_PKCS1_v1_5_verify ----------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_rsa_verify_equals_dkimpy_for_mangled_signatures(keys: dict[str, Any],
                                                         data: st.DataObject) -> None:
    key = keys[data.draw(st.sampled_from(["rsa1024", "rsa1024-e3", "rsa512", "rsa1024-e1"]))]
    hasher = hashlib.new(data.draw(st.sampled_from(["sha1", "sha256"])),
                         data.draw(st.binary(max_size=64)))
    modlen = (key.n.bit_length() + 7) // 8
    valid = pow(int.from_bytes(EMSA_PKCS1_v1_5_encode(hasher, modlen), "big"), key.d, key.n)
    how = data.draw(st.sampled_from(["valid", "plus-kn", "zeros", "flip", "truncate", "random"]))
    if how == "random":
        signature = data.draw(st.binary(max_size=modlen + 2))
    else:
        value = valid + key.n * data.draw(st.integers(1, 3)) if how == "plus-kn" else valid
        signature = value.to_bytes((value.bit_length() + 7) // 8, "big")
        if how == "zeros":
            signature = b"\x00" * data.draw(st.integers(1, 3)) + signature
        elif how == "flip":
            bit = data.draw(st.integers(0, len(signature) * 8 - 1))
            flipped = int.from_bytes(signature, "big") ^ (1 << bit)
            signature = flipped.to_bytes(len(signature), "big")
        elif how == "truncate":
            signature = signature[1:]
    numbers = {"modulus": key.n, "publicExponent": key.e}
    expected = RSASSA_PKCS1_v1_5_verify(hasher, signature, numbers)
    assert RsaPublicKey(numbers).verify(hasher, signature) == expected
    if how in ("valid", "plus-kn", "zeros"):
        assert expected is True


# -- ARC: the same chain status as dkimpy ----------------------------------------------------


def _seal(msg: bytes, keys: dict[str, Any], key: str, hop: bytes, cv: str | None) -> bytes:
    ar = b"Authentication-Results: " + hop + b"; dkim=pass header.d=sender.test"
    msg = ar + (b"; arc=" + cv.encode() if cv else b"") + b"\r\n" + msg
    return b"".join(dkim.arc_sign(msg, b"arc", hop, keys[key].pem(), hop,
                                  include_headers=[b"from", b"to", b"subject"])) + msg


ARC_CASES = {
    "one-hop": ("rsa2048", "rsa2048", None, "pass"),
    "two-hops": ("rsa1024", "rsa1024", "two", "pass"),
    "body-changed": ("rsa2048", "rsa2048", "tamper", "fail"),
    "wrong-key": ("rsa2048", "rsa2048b", None, "fail"),
    "512-bit-sealer": ("rsa512", "rsa512", None, "fail"),
    "exponent-1-sealer": ("rsa1024-e1", "rsa1024-e1", None, "pass"),
}


@pytest.mark.parametrize(("sealer", "published", "variant", "cv"), ARC_CASES.values(),
                         ids=ARC_CASES.keys())
def test_arc_status_equals_dkimpy(dns_server: DnsServer, keys: dict[str, Any], sealer: str,
                                  published: str, variant: str | None, cv: str) -> None:
    for hop in ("hop1.test", "hop2.test"):
        dns_server.add_txt(f"arc._domainkey.{hop}", keys[published].record())
    sealed = _seal(MESSAGE, keys, sealer, b"hop1.test", None)
    if variant == "two":
        sealed = _seal(sealed, keys, sealer, b"hop2.test", "pass")
    elif variant == "tamper":
        sealed = sealed.replace(b"Line 007", b"Line 700")
    dnsfunc = dkim_dnsfunc(dns_server)
    plain = dkim.ARC(sealed, minkey=1024).verify(dnsfunc=dnsfunc)
    fast = FastARC(sealed, minkey=1024).verify(dnsfunc=dnsfunc)
    assert plain[0] == cv.encode(), plain[2]
    assert fast == plain


_PIECES = [b"\r\n", b"\n", b"\r", b"\r\r\n", b" ", b"\t", b"X-A: 1", b"From: a@b.c", b"Subject:",
           b"body", b"From x", b":", b"\x00", b"\xff", b"  folded"]


@given(st.lists(st.sampled_from(_PIECES), max_size=40))
@settings(max_examples=500, deadline=None)
def test_parse_equals_dkimpy(pieces: list[bytes]) -> None:
    message = b"".join(pieces)
    try:
        expected: Any = dkim.rfc822_parse(message)
    except Exception as exc:  # noqa: BLE001 - the same error must come out of ours
        expected = type(exc)
    try:
        got: Any = parse(message)
    except Exception as exc:  # noqa: BLE001
        got = type(exc)
    assert got == expected
