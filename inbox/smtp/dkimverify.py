"""The public-key step of inbound DKIM and ARC verification: dkimpy's `DKIM` and `ARC` with RSA
done by `cryptography` and key records parsed once. Does not choose results (dkimcheck.py does).

dkimpy 1.1.8 verifies RSA in pure Python (bignum-to-bytes loops, its own ASN.1 parser for the key
and the DigestInfo), which was ~30% of the port-25 server's CPU. `FastDKIM` and `FastARC` override
only `verify_sig` (load the key through `parse_key_record`, cached by the record's bytes) and
`verify_sig_process` (the same steps as dkimpy's, in the same order, raising the same errors, but
with the RSASSA-PKCS1-v1_5 check done by OpenSSL). Parsing and relaxed canonicalisation are
inbox/dkimcanon.py's (dkimpy's rules, fewer passes); tag parsing, header selection and hashing
remain dkimpy's own functions. No dkimpy global is touched, so instances are safe to
use in concurrent worker threads. tests/test_dkimverify.py checks the verdicts equal dkimpy's.

Ed25519 (RFC 8463) stays with PyNaCl, as in dkimpy (already C); libsodium is stricter than OpenSSL
about non-canonical signatures and small-order keys, and results must not change.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from collections.abc import Callable
from typing import Any

import dkim
import nacl.exceptions
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.crypto import HASH_ALGORITHMS, DigestTooLargeError, RSASSA_PKCS1_v1_5_verify

from inbox import dkimcanon

KEY_CACHE_SIZE = 1024

# RFC 8017 §9.2 note 1: DER DigestInfo length (prefix + digest) per hash; EMSA-PKCS1-v1_5 needs
# 11 more octets (00 01, at least 8 FF, 00) within the modulus length.
_DIGEST_INFO_LEN = {"sha1": 15 + 20, "sha256": 19 + 32}
_PREHASHED = {"sha1": utils.Prehashed(hashes.SHA1()), "sha256": utils.Prehashed(hashes.SHA256())}
_PKCS1 = padding.PKCS1v15()
_WSP = re.compile(rb"\s+")
_RELAXED = b"relaxed"


class RsaPublicKey:
    """An RSA public key whose `verify` answers exactly as dkimpy's `RSASSA_PKCS1_v1_5_verify`.

    OpenSSL does the work when it accepts the key; the few keys it refuses but dkimpy takes
    (even or tiny exponents, moduli over 16384 bits, exponents over 64 bits with moduli over
    3072 bits) keep dkimpy's pure-Python arithmetic, so no verdict depends on which was used."""

    __slots__ = ("numbers", "modlen", "key")

    def __init__(self, numbers: dict[str, int]) -> None:
        self.numbers = numbers  # dkimpy's {'modulus': n, 'publicExponent': e}
        n, e = numbers["modulus"], numbers["publicExponent"]
        self.modlen = (n.bit_length() + 7) // 8
        self.key: rsa.RSAPublicKey | None = None
        if n.bit_length() <= 16384 and (n.bit_length() <= 3072 or e.bit_length() <= 64):
            try:
                self.key = rsa.RSAPublicNumbers(e, n).public_key()
            except ValueError:
                self.key = None

    def verify(self, hasher: Any, signature: bytes) -> bool:
        """True if `signature` signs `hasher`'s digest; DigestTooLargeError as dkimpy raises it."""
        if self.key is None:
            return bool(RSASSA_PKCS1_v1_5_verify(hasher, signature, self.numbers))
        name = hasher.name.lower()
        if _DIGEST_INFO_LEN[name] + 11 > self.modlen:
            raise DigestTooLargeError()
        # dkimpy reads b= as an integer of any length and reduces it mod n (pow(s, e, n));
        # OpenSSL wants exactly modlen octets below n, so hand it that same integer.
        s = int.from_bytes(signature, "big") % self.numbers["modulus"]
        try:
            self.key.verify(s.to_bytes(self.modlen, "big"), hasher.digest(), _PKCS1,
                            _PREHASHED[name])
        except InvalidSignature:
            return False
        return True


@functools.lru_cache(maxsize=KEY_CACHE_SIZE)
def _parse_record(record: bytes) -> tuple[Any, int | None, bytes | None, bool]:
    pk, keysize, ktag, tlsrpt = dkim.evaluate_pk(b"", record)  # the name only names an empty one
    if ktag == b"rsa":
        pk = RsaPublicKey(pk)
    return pk, keysize, ktag, tlsrpt


def parse_key_record(name: bytes, record: bytes | str | None) -> tuple[Any, int | None,
                                                                          bytes | None, bool]:
    """dkimpy's `evaluate_pk(name, record)`: (key, bits, k= tag, tlsrpt service), raising the
    same errors, with RSA keys as `RsaPublicKey`. Cached by the record's content, so a changed
    record is parsed afresh and a sender's unchanged key is parsed once (`KEY_CACHE_SIZE`)."""
    if not record:
        return dkim.evaluate_pk(name, record)  # raises KeyFormatError("missing public key")
    if isinstance(record, str):
        record = record.encode("ascii")  # as evaluate_pk does
    return _parse_record(record)


class _FastVerify(dkim.DomainSigner):
    """`verify_sig` and `verify_sig_process` of dkimpy 1.1.8, with the changes described above."""

    pk: Any
    keysize: int | None
    ktag: bytes | None
    seqtlsrpt: bool
    headers: list[list[bytes]]
    body: bytes

    def set_message(self, message: bytes | None) -> None:
        super().set_message(None)  # resets the per-verification state
        if message:
            self.headers, self.body = dkimcanon.parse(message)

    def verify_sig(self, sig: dict[bytes, bytes], include_headers: list[bytes],
                   sig_header: tuple[bytes, bytes], dnsfunc: Callable[..., Any]) -> bool:
        name = sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."
        try:
            record = dnsfunc(name, timeout=self.timeout)
            self.pk, self.keysize, self.ktag, self.seqtlsrpt = parse_key_record(name, record)
        except (dkim.KeyFormatError, binascii.Error, dkim.DnsTimeoutError) as exc:
            self.logger.error("%s", exc)
            return False
        return self.verify_sig_process(sig, include_headers, sig_header, dnsfunc)

    def verify_sig_process(self, sig: dict[bytes, bytes], include_headers: list[bytes],
                           sig_header: tuple[bytes, bytes], dnsfunc: Callable[..., Any]) -> bool:
        # RFC 8460 §3: a tlsrpt-only key (s=tlsrpt) is not for ordinary mail, and vice versa.
        if self.tlsrpt == "strict" and not self.seqtlsrpt:
            raise dkim.ValidationError("Message is tlsrpt and Service Type is not tlsrpt")
        if not self.tlsrpt and self.seqtlsrpt:
            raise dkim.ValidationError("Message is not tlsrpt and Service Type is tlsrpt")
        try:
            canon = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        except InvalidCanonicalizationPolicyError as exc:
            raise dkim.MessageFormatError(f"invalid c= value: {exc.args[0]}") from None
        hasher = HASH_ALGORITHMS[sig[b"a"]]
        if b"bh" in sig:  # RFC 6376 §3.7: the body hash first
            body = (dkimcanon.relaxed_body(self.body)
                    if canon.body_algorithm.name == _RELAXED
                    else canon.canonicalize_body(self.body))
            if b"l" in sig and not self.tlsrpt:
                body = body[: int(sig[b"l"])]
            bodyhash = hasher(body).digest()
            if bodyhash != base64.b64decode(_WSP.sub(b"", sig[b"bh"])):
                raise dkim.ValidationError(f"body hash mismatch (got {base64.b64encode(bodyhash)!r}"
                                           f", expected {sig[b'bh']!r})")
        if b"from" in include_headers:  # dkimpy counts an extra From (its bug #644046)
            include_headers.append(b"from")
        h = hasher()
        if canon.header_algorithm.name == _RELAXED:
            # dkim.hash_headers, canonicalizing only the fields it selects: selection compares
            # lowercased names, which is all relaxed canonicalization does to a parsed name.
            self.signed_headers = dkimcanon.relaxed_headers(dkim.select_headers(
                [(name.lower(), value) for name, value in self.headers], include_headers))
            [(name, value)] = dkimcanon.relaxed_headers(
                [(sig_header[0], dkim.RE_BTAG.sub(b"\\1", sig_header[1]))])
            for x, y in [*self.signed_headers, (name, value.rstrip())]:
                h.update(x)
                h.update(b":")
                h.update(y)
        else:
            self.signed_headers = dkim.hash_headers(
                h, canon, canon.canonicalize_headers(self.headers), include_headers, sig_header,
                sig)
        signature = base64.b64decode(_WSP.sub(b"", sig[b"b"]))
        if self.ktag == b"rsa":
            try:
                ok = self.pk.verify(h, signature)
            except (TypeError, DigestTooLargeError) as exc:
                raise dkim.KeyFormatError(f"digest too large for modulus: {exc}") from None
            if ok and self.keysize is not None and self.keysize < self.minkey:
                raise dkim.KeyFormatError(f"public key too small: {self.keysize}")
            return ok
        if self.ktag == b"ed25519":
            try:
                self.pk.verify(h.digest(), signature)  # RFC 8463 §3: over the SHA-256 digest
            except nacl.exceptions.BadSignatureError:
                return False
            return True
        raise dkim.UnknownKeyTypeError(self.ktag)


class FastDKIM(_FastVerify, dkim.DKIM):
    """`dkim.DKIM` with the fast public-key step; use like it (`verify(idx=..., dnsfunc=...)`)."""


class FastARC(_FastVerify, dkim.ARC):
    """`dkim.ARC` with the fast public-key step; use like it (`verify(dnsfunc=...)`)."""
