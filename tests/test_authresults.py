"""Authentication-Results (RFC 8601): the header we write, and stripping forged copies of it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import authres
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inbox.smtp.authresults import (
    authserv_id_of,
    build_authentication_results,
    prepend_authentication_results,
    stamp_authentication_results,
    strip_forged_results,
)
from inbox.smtp.dkimcheck import ArcResult, DkimResult
from inbox.smtp.dmarc import DmarcResult

OURS = "mx.inbox.test"


@dataclass
class Spf:
    result: str
    domain: str = ""


PASS_DKIM = DkimResult("pass", "example.com", "sel", "rsa-sha256", header_b="AbCdEfGh")
DMARC_PASS = DmarcResult("pass", "example.com", "reject", "none", "example.com", "SPF aligned")
ARC_NONE = ArcResult("none", 0)


def build(**kw: Any) -> str:
    args: dict[str, Any] = dict(spf=Spf("pass", "example.com"), dkim=[PASS_DKIM], dmarc=DMARC_PASS,
                arc=ARC_NONE, helo="mail.example.com", mail_from="bounce@example.com",
                client_ip="192.0.2.1")
    args.update(kw)
    return build_authentication_results(OURS, **args)


# -- building -------------------------------------------------------------------------------

BUILD_CASES = {
    "all-pass": (
        {},
        "Authentication-Results: mx.inbox.test;\r\n"
        "  spf=pass (client-ip=192.0.2.1) smtp.mailfrom=bounce@example.com;\r\n"
        "  dkim=pass header.d=example.com header.s=sel header.a=rsa-sha256\r\n"
        "    header.b=AbCdEfGh;\r\n"
        "  dmarc=pass (p=reject dis=none) header.from=example.com;\r\n"
        "  arc=none\r\n",
    ),
    "null-sender-no-signature-dmarc-fail": (
        dict(spf=Spf("softfail"), dkim=[], mail_from="", client_ip="2001:db8::1",
             dmarc=DmarcResult("fail", "example.com", "reject", "quarantine", "example.com",
                               "no aligned SPF or DKIM pass"),
             arc=ArcResult("pass", 2)),
        "Authentication-Results: mx.inbox.test;\r\n"
        "  spf=softfail (client-ip=2001:db8::1) smtp.helo=mail.example.com;\r\n"
        "  dkim=none;\r\n"
        "  dmarc=fail (p=reject dis=quarantine) header.from=example.com;\r\n"
        "  arc=pass (i=2)\r\n",
    ),
    "two-signatures-with-reason-and-quoting": (
        dict(dkim=[DkimResult("fail", "example.com", "s1", "ed25519-sha256",
                              "body hash did not verify", "/gCrinpc"), PASS_DKIM],
             dmarc=DmarcResult("permerror", "", "none", "reject", "", "2 From header fields"),
             arc=ArcResult("fail", 1, "ARC-Seal[1] did not validate"),
             mail_from='"odd local"@example.com'),
        "Authentication-Results: mx.inbox.test;\r\n"
        "  spf=pass (client-ip=192.0.2.1) smtp.mailfrom=\"\\\"odd local\\\"@example.com\";\r\n"
        "  dkim=fail reason=\"body hash did not verify\" header.d=example.com header.s=s1\r\n"
        "    header.a=ed25519-sha256 header.b=\"/gCrinpc\";\r\n"
        "  dkim=pass header.d=example.com header.s=sel header.a=rsa-sha256\r\n"
        "    header.b=AbCdEfGh;\r\n"
        "  dmarc=permerror reason=\"2 From header fields\";\r\n"
        "  arc=fail (i=1) reason=\"ARC-Seal[1] did not validate\"\r\n",
    ),
}


@pytest.mark.parametrize(("kw", "expected"), BUILD_CASES.values(), ids=BUILD_CASES.keys())
def test_build_exact(kw: dict, expected: str) -> None:
    header = build(**kw)
    assert header == expected
    assert all(len(line) <= 78 for line in header.split("\r\n"))


@dataclass(frozen=True)
class FrozenSpf:  # shaped like inbox.smtp.spf.SpfResult
    result: str
    domain: str
    identity: str


def test_helo_identity_is_reported_as_smtp_helo() -> None:
    header = build(spf=FrozenSpf("pass", "mail.example.com", "helo"))
    assert "  spf=pass (client-ip=192.0.2.1) smtp.helo=mail.example.com;\r\n" in header


@pytest.mark.parametrize("evil", [
    "x\r\nBcc: victim@example.com", "x; dkim=pass", "x\x00y", "caf\u00e9",
], ids=["crlf", "semicolon", "nul", "non-ascii"])
def test_network_values_cannot_inject(evil: str) -> None:
    header = build(helo=evil, mail_from="", dkim=[DkimResult("fail", evil, evil, "rsa-sha256",
                                                             evil, evil)])
    assert header.count("\r\n") == len(header.splitlines())  # no line break but ours
    unfolded = re.sub(r"\r\n[ \t]+", " ", header)
    assert unfolded.count("\r\n") == 1
    assert all(" " <= ch <= "~" for ch in unfolded[:-2])
    parsed = authres.AuthenticationResultsHeader.parse(unfolded.strip())
    assert [r.method for r in parsed.results] == ["spf", "dkim", "dmarc", "arc"]


def test_authres_library_reads_our_header() -> None:
    header = build()
    parsed = authres.AuthenticationResultsHeader.parse(re.sub(r"\r\n[ \t]+", " ", header).strip())
    assert parsed.authserv_id == OURS
    assert [(r.method, r.result) for r in parsed.results] == [
        ("spf", "pass"), ("dkim", "pass"), ("dmarc", "pass"), ("arc", "none")]


@pytest.mark.parametrize(("raw", "expected"), [
    (b"Subject: x\r\n\r\nbody\r\n", b"A\r\n  b\r\nSubject: x\r\n\r\nbody\r\n"),
    (b"Subject: x\n\nbody\n", b"A\n  b\nSubject: x\n\nbody\n"),
    (b"", b"A\r\n  b\r\n"),
], ids=["crlf", "lf", "empty"])
def test_prepend_matches_line_endings(raw: bytes, expected: bytes) -> None:
    assert prepend_authentication_results(raw, "A\r\n  b\r\n") == expected


# -- stripping ------------------------------------------------------------------------------

BODY = b"\r\nAuthentication-Results: mx.inbox.test; spf=pass\r\n"
STRIP_CASES = {
    "ours-removed": (b"Authentication-Results: mx.inbox.test; spf=pass\r\nTo: a@b\r\n",
                     b"To: a@b\r\n"),
    "case-insensitive-name-and-id": (
        b"authentication-RESULTS: MX.Inbox.Test; dkim=pass\r\nTo: a@b\r\n", b"To: a@b\r\n"),
    "other-admd-kept": (b"Authentication-Results: mx.other.test; spf=pass\r\nTo: a@b\r\n",
                        b"Authentication-Results: mx.other.test; spf=pass\r\nTo: a@b\r\n"),
    "longer-id-kept": (b"Authentication-Results: mx.inbox.test.evil; spf=pass\r\n",
                       b"Authentication-Results: mx.inbox.test.evil; spf=pass\r\n"),
    "parent-id-kept": (b"Authentication-Results: inbox.test; spf=pass\r\n",
                       b"Authentication-Results: inbox.test; spf=pass\r\n"),
    "folded-removed": (b"To: a@b\r\nAuthentication-Results:\r\n mx.inbox.test;\r\n\tspf=pass\r\n"
                       b" dkim=none\r\nSubject: s\r\n", b"To: a@b\r\nSubject: s\r\n"),
    "comment-and-version": (b"Authentication-Results: (forged (nested)) mx.inbox.test 1;"
                            b" spf=pass\r\n", b""),
    "quoted-id": (b'Authentication-Results: "mx.inbox.test"; spf=pass\r\n', b""),
    "trailing-dot": (b"Authentication-Results: mx.inbox.test.; spf=pass\r\n", b""),
    "space-before-colon": (b"Authentication-Results : mx.inbox.test; spf=pass\r\n", b""),
    "no-result-none": (b"Authentication-Results: mx.inbox.test; none\r\n", b""),
    "empty-value-kept": (b"Authentication-Results:\r\nTo: a@b\r\n",
                         b"Authentication-Results:\r\nTo: a@b\r\n"),
    "arc-aar-kept": (b"ARC-Authentication-Results: i=1; mx.inbox.test; spf=pass\r\n",
                     b"ARC-Authentication-Results: i=1; mx.inbox.test; spf=pass\r\n"),
    "lf-only": (b"Authentication-Results: mx.inbox.test;\n spf=pass\nTo: a@b\n",
                b"To: a@b\n"),
}


@pytest.mark.parametrize(("head", "expected"), STRIP_CASES.values(), ids=STRIP_CASES.keys())
def test_strip(head: bytes, expected: bytes) -> None:
    eol = b"\n" if head.endswith(b"\n") and not head.endswith(b"\r\n") else b"\r\n"
    body = BODY.replace(b"\r\n", eol)
    assert strip_forged_results(head + body, OURS) == expected + body
    # A message that is only a header section (no blank line, no body).
    assert strip_forged_results(head, OURS) == expected


def test_strip_last_line_without_newline() -> None:
    raw = b"To: a@b\r\nAuthentication-Results: mx.inbox.test; spf=pass"
    assert strip_forged_results(raw, OURS) == b"To: a@b\r\n"


def test_stamp_replaces_forged_with_ours() -> None:
    raw = b"Authentication-Results: mx.inbox.test; dkim=pass\r\nTo: a@b\r\n\r\nhi\r\n"
    out = stamp_authentication_results(raw, OURS, build())
    assert out == build().encode() + b"To: a@b\r\n\r\nhi\r\n"


@pytest.mark.parametrize(("value", "ident"), [
    (b" mx.inbox.test; spf=pass", "mx.inbox.test"),
    (b" (c) \"Mx.Inbox.Test\" 1; none", "mx.inbox.test"),
    (b"\r\n\t(a (b) \\) c) x.test;", "x.test"),
    (b"", ""),
    (b" ;", ""),
], ids=["plain", "quoted-version", "folded-comments", "empty", "missing"])
def test_authserv_id_of(value: bytes, ident: str) -> None:
    assert authserv_id_of(value) == ident


# -- property tests -------------------------------------------------------------------------

_id_variants = st.sampled_from([
    "mx.inbox.test", "MX.INBOX.TEST", "Mx.Inbox.Test.", '"mx.inbox.test"',
    "(forged) mx.inbox.test", "mx.inbox.test 1"])
_other_ids = st.sampled_from([
    "mx.inbox.test.evil", "inbox.test", "mx.inbox.tester", "other.example",
    '"mx.inbox.test x"', "xmx.inbox.test", "(mx.inbox.test) other.example"])
_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":"),
                min_size=1, max_size=12)
_fold = st.sampled_from([" ", "{eol} ", "{eol}\t"])


@st.composite
def _field(draw: st.DrawFn, eol: str) -> tuple[bytes, bool]:
    kind = draw(st.sampled_from(["ours", "other-ar", "other"]))
    if kind == "ours":
        name = draw(st.sampled_from(["Authentication-Results", "authentication-results",
                                     "AUTHENTICATION-RESULTS", "Authentication-Results "]))
        words = [draw(_id_variants) + ";"]
    elif kind == "other-ar":
        name = "Authentication-Results"
        words = [draw(_other_ids) + ";"]
    else:
        name = draw(st.sampled_from(["Subject", "To", "Received", "X-AR",
                                     "ARC-Authentication-Results", "Authentication-Results-X"]))
        words = [draw(st.sampled_from(["mx.inbox.test;", "i=1; mx.inbox.test;"]))]
    words += draw(st.lists(_text, max_size=4))
    value = words[0]
    for word in words[1:]:
        value += draw(_fold).format(eol=eol) + word
    lead = draw(st.sampled_from([" ", "", "{eol} "])).format(eol=eol)
    return f"{name}:{lead}{value}{eol}".encode(), kind == "ours"


@st.composite
def _message(draw: st.DrawFn) -> tuple[bytes, bytes, bytes]:
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    fields = draw(st.lists(_field(eol), max_size=8))
    body = draw(st.one_of(
        st.none(),
        st.binary(max_size=60),
        st.just(f"Authentication-Results: mx.inbox.test; spf=pass{eol}".encode()),
    ))
    head = b"".join(data for data, _ in fields)
    kept = b"".join(data for data, ours in fields if not ours)
    if body is None:
        return head, kept, b""
    tail = eol.encode() + body
    return head + tail, kept + tail, body


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_message())
def test_strip_removes_exactly_our_fields(case: tuple[bytes, bytes, bytes]) -> None:
    raw, expected, body = case
    out = strip_forged_results(raw, OURS)
    assert out == expected
    assert out.endswith(body)
    # No field with our authserv-id is left (checked by unfolding and re-reading the fields).
    head = re.split(rb"(?:\A|\n)\r?\n", out, maxsplit=1)[0]
    for field in re.split(rb"\r?\n(?![ \t])", head):
        name, _, value = field.partition(b":")
        if name.strip().lower() == b"authentication-results":
            ident = re.sub(rb"\([^()]*\)", b"", re.sub(rb"\r?\n", b"", value)).strip()
            assert not re.match(rb'("mx\.inbox\.test\.?"|mx\.inbox\.test\.?(?=[\s;]|$))',
                                ident, re.I), field


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_strip_never_touches_the_body(raw: bytes) -> None:
    out = strip_forged_results(raw, OURS)
    blank = re.search(rb"(?:\A|\n)\r?\n", raw)
    if blank is not None:
        assert out.endswith(raw[blank.end():])
    assert strip_forged_results(out, OURS) == out  # idempotent: nothing of ours left
    assert len(out) <= len(raw)
