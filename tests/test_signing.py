"""DKIM signing: dkimpy verifies it, it equals dkimpy's own output, and OpenDKIM agrees."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inbox.delivery.signing import DEFAULT_DKIM_HEADERS, DkimSigner
from inbox.errors import ConfigError
from inbox.message import OutboundMessage, build_mime, validate
from inbox.tenancy.keys import DkimKeys, dns_txt_value, generate_dkim_keys
from tests.support.opendkim import opendkim_verify

DOMAIN = "example.com"
NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
RAW = (b"From: Alice <alice@example.com>\r\n"
       b"To: bob@example.org\r\n"
       b"Subject: Hello  there\r\n"
       b"Date: Mon, 06 May 2024 07:08:09 +0000\r\n"
       b"Message-ID: <abc@example.com>\r\n"
       b"MIME-Version: 1.0\r\n"
       b"X-Mailer: not signed\r\n"
       b"Content-Type: text/plain; charset=\"utf-8\"\r\n"
       b"\r\n"
       b"Hello Bob,  \r\nsee you.\r\n\r\n\r\n")


@pytest.fixture(scope="module")
def keys() -> DkimKeys:
    return generate_dkim_keys()


def records(keys: DkimKeys, domain: str = DOMAIN) -> dict[str, str]:
    return {f"rsa1._domainkey.{domain}.": dns_txt_value("rsa", keys.rsa_public_b64),
            f"ed1._domainkey.{domain}.": dns_txt_value("ed25519", keys.ed25519_public_b64)}


def dnsfunc_for(keys: DkimKeys, domain: str = DOMAIN):
    table = {k.encode(): v.encode() for k, v in records(keys, domain).items()}
    return lambda name, timeout=5: table.get(name)


def dual(keys: DkimKeys, domain: str = DOMAIN, **kw) -> DkimSigner:
    return DkimSigner(domain, "rsa1", keys.rsa_private_pem, "ed1", keys.ed25519_private_b64, **kw)


def verify_all(signed: bytes, keys: DkimKeys, domain: str = DOMAIN) -> list[bool]:
    d = dkim.DKIM(signed)
    count = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
    results = []
    for i in range(count):
        try:
            results.append(d.verify(idx=i, dnsfunc=dnsfunc_for(keys, domain)))
        except dkim.DKIMException:  # e.g. "body hash mismatch" is raised, not returned
            results.append(False)
    return results


def tags(signed: bytes, idx: int = 0) -> dict[bytes, bytes]:
    d = dkim.DKIM(signed)
    sigs = [v for name, v in d.headers if name.lower() == b"dkim-signature"]
    return dkim.util.parse_tag_value(sigs[idx])


def test_dual_signature_both_verify(keys: DkimKeys) -> None:
    signed = dual(keys).sign(RAW)
    assert signed.endswith(RAW)
    assert verify_all(signed, keys) == [True, True]
    assert dkim.verify(signed, dnsfunc=dnsfunc_for(keys))  # the topmost one, unmodified dkimpy
    assert [tags(signed, i)[b"a"] for i in (0, 1)] == [b"rsa-sha256", b"ed25519-sha256"]
    for i in (0, 1):
        t = tags(signed, i)
        assert t[b"c"] == b"relaxed/relaxed" and t[b"d"] == b"example.com"
    assert tags(signed, 0)[b"s"] == b"rsa1" and tags(signed, 1)[b"s"] == b"ed1"


@pytest.mark.parametrize(("signer_args", "algorithm"), [
    (("rsa1", "RSA", None, None), b"rsa-sha256"),
    ((None, None, "ed1", "ED"), b"ed25519-sha256"),
], ids=["rsa-only", "ed25519-only"])
def test_single_key_signers(keys: DkimKeys, signer_args, algorithm: bytes) -> None:
    sel_rsa, pem, sel_ed, seed = signer_args
    signer = DkimSigner(DOMAIN, sel_rsa, keys.rsa_private_pem if pem else None, sel_ed,
                        keys.ed25519_private_b64 if seed else None)
    signed = signer.sign(RAW)
    assert verify_all(signed, keys) == [True]
    assert tags(signed)[b"a"] == algorithm


def test_h_lists_present_configured_headers_and_from_twice(keys: DkimKeys) -> None:
    signed = dual(keys).sign(RAW)
    for i in (0, 1):
        h = [x.strip() for x in tags(signed, i)[b"h"].split(b":")]
        assert h.count(b"from") == 2
        assert h == [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
                     b"content-type", b"from"]  # no cc / reply-to (absent), no x-mailer


def test_configured_headers_are_respected(keys: DkimKeys) -> None:
    signer = dual(keys, headers=("From", "Subject", "X-Mailer"))
    signed = signer.sign(RAW)
    assert re.sub(rb"\s+", b" ", tags(signed)[b"h"]) == b"from : subject : x-mailer : from"
    assert verify_all(signed, keys) == [True, True]


@pytest.mark.parametrize("tamper", [
    lambda m: m.replace(b"see you.", b"see you!"),
    lambda m: m + b"appended line\r\n",
    lambda m: m.replace(b"Subject: Hello  there", b"Subject: Hello there!"),
    lambda m: m.replace(b"To: bob@example.org", b"To: eve@example.org"),
], ids=["body-changed", "body-appended", "subject-changed", "to-changed"])
def test_tampering_breaks_both_signatures(keys: DkimKeys, tamper) -> None:
    assert verify_all(tamper(dual(keys).sign(RAW)), keys) == [False, False]


@pytest.mark.parametrize("where", ["top", "after-signatures", "bottom"])
def test_a_second_from_breaks_the_signatures(keys: DkimKeys, where: str) -> None:
    signed = dual(keys).sign(RAW)
    extra = b"From: Mallory <mallory@evil.example>\r\n"
    head, sep, body = signed.partition(b"\r\n\r\n")
    if where == "top":
        forged = extra + signed
    elif where == "bottom":
        forged = head + b"\r\n" + extra.rstrip(b"\r\n") + sep + body
    else:
        forged = signed.replace(b"From: Alice", extra + b"From: Alice", 1)
    assert verify_all(forged, keys) == [False, False]


def test_relaxed_canonicalization_survives_refolding(keys: DkimKeys) -> None:
    signed = dual(keys).sign(RAW)
    refolded = signed.replace(b"Subject: Hello  there", b"Subject:   Hello\r\n\tthere")
    refolded = refolded.replace(b"see you.\r\n", b"see you.   \r\n")
    assert verify_all(refolded, keys) == [True, True]


def test_non_ascii_subject_and_names_from_build_mime(keys: DkimKeys) -> None:
    msg = OutboundMessage(from_="Jörg Größe <jorg@example.com>", to=["Zoë <zoe@example.org>"],
                          subject="Grüße aus Köln — 東京 🎉", text_body="Hallo Zoë!\n" * 20,
                          html_body="<p>Hallo Zoë!</p>")
    raw, _ = build_mime(validate(msg), DOMAIN, NOW)
    signed = dual(keys).sign(raw)
    assert verify_all(signed, keys) == [True, True]


def test_idna_domain_goes_in_d_as_a_label(keys: DkimKeys) -> None:
    signer = dual(keys, domain="Bücher.Example")
    assert signer.domain == "xn--bcher-kva.example"
    signed = signer.sign(RAW)
    assert tags(signed)[b"d"] == b"xn--bcher-kva.example"
    assert tags(signed)[b"i"] == b"@xn--bcher-kva.example"
    assert verify_all(signed, keys, "xn--bcher-kva.example") == [True, True]


def test_t_comes_from_the_clock(keys: DkimKeys) -> None:
    signed = dual(keys, clock=lambda: 1714979289.7).sign(RAW)
    assert tags(signed, 0)[b"t"] == tags(signed, 1)[b"t"] == b"1714979289"


def dkimpy_dual(raw: bytes, keys: DkimKeys, include: list[bytes]) -> bytes:
    """`raw` signed by dkimpy itself, RSA then Ed25519, relaxed/relaxed, at t=1714979289."""
    with mock.patch.object(dkim, "time", types.SimpleNamespace(time=lambda: 1714979289)):
        return b"".join(
            dkim.sign(raw, selector, b"example.com", key, canonicalize=(b"relaxed", b"relaxed"),
                      include_headers=include, signature_algorithm=algorithm)
            for selector, key, algorithm in (
                (b"rsa1", keys.rsa_private_pem, b"rsa-sha256"),
                (b"ed1", keys.ed25519_private_b64.encode(), b"ed25519-sha256"))) + raw


def test_output_is_byte_identical_to_dkimpy(keys: DkimKeys) -> None:
    """The fast path only replaces dkimpy's RSA arithmetic: same header, same signature."""
    include = [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
               b"content-type", b"from"]
    assert dual(keys, clock=lambda: 1714979289).sign(RAW) == dkimpy_dual(RAW, keys, include)


_NAMES = st.sampled_from([b"From", b"from", b"To", b"Cc", b"Subject", b"SUBJECT", b"Date",
                          b"Message-ID", b"MIME-Version", b"Content-Type", b"X-Other",
                          b"Reply-To"])
_TEXT = st.binary(max_size=30).map(lambda b: bytes(c for c in b if c not in b"\r\n"))
_WSP_TEXT = st.lists(st.sampled_from([b"a", b"B c", b" ", b"\t", b"  ", b"x\t y", b";",
                                      b"\xc3\xa9"]), max_size=8).map(b"".join)
_VALUE = st.tuples(_WSP_TEXT, st.lists(st.sampled_from([b" ", b"\t", b" \t "]).flatmap(
    lambda lead: _WSP_TEXT.map(lambda t: lead + t)), max_size=2))
_HEADER = st.tuples(_NAMES, _VALUE).map(
    lambda nv: nv[0] + b":" + nv[1][0] + b"".join(b"\r\n" + c for c in nv[1][1]) + b"\r\n")
_BODY_LINE = st.one_of(_WSP_TEXT, _TEXT, st.just(b""))
_MESSAGE = st.tuples(st.lists(_HEADER, min_size=1, max_size=8),
                     st.lists(_BODY_LINE, max_size=8), st.sampled_from([b"\r\n", b"\n"]),
                     st.integers(0, 3)).map(
    lambda m: b"".join(m[0]) + b"\r\n" + m[2].join(m[1]) + b"\r\n" * m[3])


@settings(max_examples=300, deadline=None)
@given(raw=st.one_of(_MESSAGE, _MESSAGE.map(lambda m: m.replace(b"\r\n", b"\n")),
                     st.binary(max_size=80), st.binary(max_size=40).map(
                         lambda b: b"A: x\r\n" + b + b"\r\n\r\nbody")))
def test_parse_and_canonicalization_equal_dkimpys(raw: bytes) -> None:
    """dkimcanon's parse and relaxed canonicalization give what dkimpy's give (or raise)."""
    from dkim.canonicalization import CanonicalizationPolicy

    from inbox.dkimcanon import parse as _parse
    from inbox.dkimcanon import relaxed_body as _relaxed_body
    from inbox.dkimcanon import relaxed_headers as _relaxed_headers

    try:
        expected = dkim.rfc822_parse(raw)
    except Exception as exc:  # noqa: BLE001 - whatever dkimpy raises, we raise too
        with pytest.raises(type(exc)):
            _parse(raw)
        return
    assert _parse(raw) == expected
    headers, body = expected
    relaxed = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    assert _relaxed_body(body) == relaxed.canonicalize_body(body)
    assert _relaxed_headers(headers) == relaxed.canonicalize_headers(headers)


@settings(max_examples=60, deadline=None)
@given(raw=_MESSAGE)
def test_signatures_equal_dkimpys_for_generated_messages(keys: DkimKeys, raw: bytes) -> None:
    present = [name.lower() for name, _ in dkim.rfc822_parse(raw)[0]]
    include = [h.lower().encode() for h in DEFAULT_DKIM_HEADERS
               for _ in range(present.count(h.lower().encode()))] + [b"from"]
    assert dual(keys, clock=lambda: 1714979289).sign(raw) == dkimpy_dual(raw, keys, include)


def test_lf_only_input_is_signed_consistently(keys: DkimKeys) -> None:
    signed = dual(keys).sign(RAW.replace(b"\r\n", b"\n"))
    assert verify_all(signed, keys) == [True, True]


def test_signer_is_safe_to_share_between_threads(keys: DkimKeys) -> None:
    signer = dual(keys)
    messages = [RAW.replace(b"see you.", f"see you {i}.".encode()) for i in range(40)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        signed = list(pool.map(signer.sign, messages))
    for original, result in zip(messages, signed, strict=True):
        assert result.endswith(original)
        assert verify_all(result, keys) == [True, True]


def test_default_headers() -> None:
    assert DEFAULT_DKIM_HEADERS == ("From", "To", "Cc", "Subject", "Date", "Message-ID",
                                    "Reply-To", "MIME-Version", "Content-Type")


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"selector_rsa": None, "rsa_private_pem": None}, ValueError, "needs an RSA or an Ed25519"),
    ({"selector_rsa": "bad selector"}, ValueError, "selector"),
    ({"selector_rsa": None}, ValueError, "selector"),
    ({"headers": ("To", "Subject")}, ValueError, "must sign From"),
    ({"headers": ("From", "Received")}, ValueError, "must not sign received"),
    ({"rsa_private_pem": b"-----BEGIN RSA PRIVATE KEY-----\nnope\n"}, ConfigError, "RSA"),
    ({"selector_ed25519": "ed1", "ed25519_private_b64": "c2hvcnQ="}, ConfigError, "Ed25519"),
    ({"domain": "bad domain..example"}, ValueError, "domain"),
], ids=["no-keys", "selector-with-space", "missing-selector", "from-not-signed",
        "received-signed", "bad-pem", "short-ed25519", "bad-domain"])
def test_constructor_rejects(keys: DkimKeys, kwargs, error, message: str) -> None:
    args = {"domain": DOMAIN, "selector_rsa": "rsa1", "rsa_private_pem": keys.rsa_private_pem}
    args.update(kwargs)
    with pytest.raises(error, match=message):
        DkimSigner(**args)


# --- OpenDKIM as an independent verifier -------------------------------------------------------
# opendkim-testmsg verifies through libopendkim, which asks the system resolver
# (/etc/resolv.conf, port 53) for keys and has no option to read them from a file. So the check
# runs in a private user+mount+network namespace: loopback up, a resolv.conf pointing at
# 127.0.0.1 bind-mounted over /etc/resolv.conf, and a tiny DNS server serving our TXT records.
# Nothing outside the namespace is touched.

def test_opendkim_verifies_our_signatures(keys: DkimKeys, tmp_path: Path) -> None:
    msg = OutboundMessage(from_="Jörg <jorg@example.com>", to=["bob@example.org"],
                          cc=["Zoë <zoe@example.net>"], subject="Grüße — 東京 receipt #42",
                          text_body="Thanks!\n" + "x" * 3000, html_body="<p>Thanks!</p>")
    raw, _ = build_mime(validate(msg), DOMAIN, NOW)
    rsa_only = DkimSigner(DOMAIN, "rsa1", keys.rsa_private_pem)
    ed_only = DkimSigner(DOMAIN, None, None, "ed1", keys.ed25519_private_b64)
    other = generate_dkim_keys()
    cases = {
        "dual": (dual(keys).sign(raw), True),
        "rsa": (rsa_only.sign(raw), True),
        "ed25519": (ed_only.sign(raw), True),
        "rsa-body-tampered": (rsa_only.sign(raw).replace(b"Thanks!", b"Thanks?", 1), False),
        "ed25519-body-tampered": (ed_only.sign(raw).replace(b"Thanks!", b"Thanks?", 1), False),
        "rsa-second-from": (b"From: mallory@evil.example\r\n" + rsa_only.sign(raw), False),
        "ed25519-wrong-key": (DkimSigner(DOMAIN, None, None, "ed1", other.ed25519_private_b64)
                              .sign(raw), False),
    }
    outcomes = opendkim_verify(tmp_path, records(keys), [d for d, _ in cases.values()])
    results = dict(zip(cases, outcomes, strict=True))
    for name, (_, should_pass) in cases.items():
        outcome = results[name]
        if should_pass:
            assert outcome["rc"] == 0 and not outcome["stderr"], (name, outcome)
        else:  # a signature failure, not a DNS problem; libopendkim refuses two From
            assert outcome["rc"] != 0, (name, outcome)  # fields as a syntax error outright
            expected = "Syntax error" if name == "rsa-second-from" else "Bad signature"
            assert expected in outcome["stderr"], (name, outcome)
