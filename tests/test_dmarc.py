"""DMARC evaluation (RFC 7489) with policy records served by a real DNS server on 127.0.0.1."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from publicsuffixlist import PublicSuffixList

from inbox.resolver import Resolver
from inbox.smtp.dkimcheck import DkimResult
from inbox.smtp.dmarc import (
    _SIMPLE_FROM,
    DmarcResult,
    check_dmarc,
    from_address_domain,
    organizational_domain,
)
from tests.support.dnsserver import DnsServer
from tests.support.fixtures_dns import dns_server, resolver  # noqa: F401


@pytest.fixture(scope="module")
def psl() -> PublicSuffixList:
    return PublicSuffixList()


def dkim_pass(domain: str, result: str = "pass") -> DkimResult:
    return DkimResult(result, domain, "sel", "rsa-sha256")


def message(from_value: str = "Joe <joe@example.com>", extra: str = "") -> bytes:
    return (f"{extra}From: {from_value}\r\nTo: x@rcpt.test\r\nSubject: hi\r\n\r\nbody\r\n"
            "From: not-a-header@body.test\r\n").encode()


@dataclass
class Case:
    records: dict[str, list[str]]
    expected: tuple[str, str, str]  # result, policy, disposition
    raw: bytes = field(default_factory=message)
    spf: tuple[str, str] = ("none", "")
    dkim: list[DkimResult] = field(default_factory=list)
    rng: float = 0.0
    org: str = "example.com"


REJECT = {"_dmarc.example.com": ["v=DMARC1; p=reject"]}
CASES = {
    # SPF alignment (RFC 7489 §3.1.2)
    "spf-aligned-relaxed": Case(REJECT, ("pass", "reject", "none"),
                                spf=("pass", "bounce.example.com")),
    "spf-aligned-exact": Case(REJECT, ("pass", "reject", "none"), spf=("pass", "example.com")),
    "spf-strict-subdomain": Case({"_dmarc.example.com": ["v=DMARC1; p=reject; aspf=s"]},
                                 ("fail", "reject", "reject"),
                                 spf=("pass", "bounce.example.com")),
    "spf-unaligned": Case(REJECT, ("fail", "reject", "reject"), spf=("pass", "other.test")),
    "spf-softfail-aligned": Case(REJECT, ("fail", "reject", "reject"),
                                 spf=("softfail", "example.com")),
    # DKIM alignment (RFC 7489 §3.1.1)
    "dkim-aligned-relaxed": Case(REJECT, ("pass", "reject", "none"),
                                 dkim=[dkim_pass("mail.example.com")]),
    "dkim-strict-subdomain": Case({"_dmarc.example.com": ["v=DMARC1; p=reject; adkim=s"]},
                                  ("fail", "reject", "reject"),
                                  dkim=[dkim_pass("mail.example.com")]),
    "dkim-strict-exact": Case({"_dmarc.example.com": ["v=DMARC1; p=reject; adkim=s"]},
                              ("pass", "reject", "none"), dkim=[dkim_pass("EXAMPLE.com")]),
    "dkim-aligned-but-failed": Case(REJECT, ("fail", "reject", "reject"),
                                    dkim=[dkim_pass("example.com", "fail")]),
    "dkim-aligned-policy-result": Case(REJECT, ("fail", "reject", "reject"),
                                       dkim=[dkim_pass("example.com", "policy")]),
    "dkim-pass-unaligned": Case(REJECT, ("fail", "reject", "reject"),
                                dkim=[dkim_pass("other.test")]),
    "dkim-second-signature-aligned": Case(REJECT, ("pass", "reject", "none"),
                                          dkim=[dkim_pass("other.test"),
                                                dkim_pass("example.com")]),
    # subdomains and the organizational domain (RFC 7489 §6.6.3, §6.3 sp=)
    "subdomain-uses-sp": Case({"_dmarc.example.com": ["v=DMARC1; p=reject; sp=quarantine"]},
                              ("fail", "quarantine", "quarantine"),
                              raw=message("joe@news.example.com")),
    "subdomain-without-sp-uses-p": Case(REJECT, ("fail", "reject", "reject"),
                                        raw=message("joe@news.example.com")),
    "subdomain-own-record-ignores-sp": Case(
        {"_dmarc.example.com": ["v=DMARC1; p=reject; sp=reject"],
         "_dmarc.news.example.com": ["v=DMARC1; p=none"]},
        ("fail", "none", "none"), raw=message("joe@news.example.com")),
    "org-domain-itself-ignores-sp": Case(
        {"_dmarc.example.com": ["v=DMARC1; p=quarantine; sp=none"]},
        ("fail", "quarantine", "quarantine")),
    "psl-co-uk-fallback": Case({"_dmarc.example.co.uk": ["v=DMARC1; p=reject"]},
                               ("fail", "reject", "reject"),
                               raw=message("joe@mail.example.co.uk"), org="example.co.uk"),
    "psl-co-uk-aligned-dkim": Case({"_dmarc.example.co.uk": ["v=DMARC1; p=reject"]},
                                   ("pass", "reject", "none"),
                                   raw=message("joe@mail.example.co.uk"),
                                   dkim=[dkim_pass("example.co.uk")], org="example.co.uk"),
    "psl-co-uk-sibling-not-aligned": Case({"_dmarc.example.co.uk": ["v=DMARC1; p=reject"]},
                                          ("fail", "reject", "reject"),
                                          raw=message("joe@mail.example.co.uk"),
                                          spf=("pass", "other.co.uk"), org="example.co.uk"),
    # pct sampling (RFC 7489 §6.6.4), deterministic rng
    "pct-0": Case({"_dmarc.example.com": ["v=DMARC1; p=reject; pct=0"]},
                  ("fail", "reject", "quarantine"), rng=0.0),
    "pct-100": Case({"_dmarc.example.com": ["v=DMARC1; p=reject; pct=100"]},
                    ("fail", "reject", "reject"), rng=0.999),
    "pct-50-sampled": Case({"_dmarc.example.com": ["v=DMARC1; p=reject; pct=50"]},
                           ("fail", "reject", "reject"), rng=0.49),
    "pct-50-not-sampled": Case({"_dmarc.example.com": ["v=DMARC1; p=reject; pct=50"]},
                               ("fail", "reject", "quarantine"), rng=0.5),
    "pct-0-quarantine": Case({"_dmarc.example.com": ["v=DMARC1; p=quarantine; pct=0"]},
                             ("fail", "quarantine", "none")),
    "pct-invalid-is-100": Case({"_dmarc.example.com": ["v=DMARC1; p=reject; pct=abc"]},
                               ("fail", "reject", "reject"), rng=0.999),
    # records (RFC 7489 §6.6.3)
    "no-record": Case({}, ("none", "none", "none")),
    "two-records": Case({"_dmarc.example.com": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]},
                        ("none", "none", "none")),
    "non-dmarc-txt-ignored": Case({"_dmarc.example.com": ["v=spf1 -all", "v=DMARC1; p=reject"]},
                                  ("fail", "reject", "reject")),
    "version-is-case-sensitive": Case({"_dmarc.example.com": ["v=dmarc1; p=reject"]},
                                      ("none", "none", "none")),
    "bad-p-without-rua": Case({"_dmarc.example.com": ["v=DMARC1; p=bogus"]},
                              ("none", "none", "none")),
    "bad-p-with-rua-is-none": Case(
        {"_dmarc.example.com": ["v=DMARC1; p=bogus; rua=mailto:d@example.com"]},
        ("fail", "none", "none")),
    "bad-adkim-defaults-relaxed": Case({"_dmarc.example.com": ["v=DMARC1;p=reject;adkim=x"]},
                                       ("pass", "reject", "none"),
                                       dkim=[dkim_pass("mail.example.com")]),
    # From (RFC 7489 §6.6.1)
    "two-from-fields": Case(REJECT, ("permerror", "none", "reject"),
                            raw=message(extra="From: eve@evil.test\r\n")),
    "two-from-addresses": Case(REJECT, ("permerror", "none", "reject"),
                               raw=message("a@example.com, b@example.com")),
    "no-from": Case(REJECT, ("permerror", "none", "reject"),
                    raw=b"To: x@rcpt.test\r\n\r\nFrom: joe@example.com\r\n"),
    "from-without-domain": Case(REJECT, ("permerror", "none", "reject"), raw=message("Joe")),
    "from-ambiguous": Case(REJECT, ("permerror", "none", "reject"),
                           raw=message("alice@example.com)<bob@evil.test>")),
    "from-folded-lf-only": Case(REJECT, ("pass", "reject", "none"),
                                raw=b"Subject: x\nFrom: Joe\n  <joe@Example.COM>\n\nbody\n",
                                spf=("pass", "example.com")),
    "headers-only": Case(REJECT, ("pass", "reject", "none"),
                         raw=b"From: joe@example.com\r\n", spf=("pass", "example.com")),
    # temporary errors
    "aligned-dkim-temperror": Case(REJECT, ("temperror", "reject", "none"),
                                   dkim=[dkim_pass("example.com", "temperror")]),
    "aligned-spf-temperror": Case(REJECT, ("temperror", "reject", "none"),
                                  spf=("temperror", "example.com")),
    "temperror-but-other-pass": Case(REJECT, ("pass", "reject", "none"),
                                     spf=("temperror", "example.com"),
                                     dkim=[dkim_pass("example.com")]),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_dmarc(case: Case, dns_server: DnsServer, resolver: Resolver,
                     psl: PublicSuffixList) -> None:
    for name, texts in case.records.items():
        for text in texts:
            dns_server.add_txt(name, text)
    result = await check_dmarc(case.raw, spf_result=case.spf[0], spf_domain=case.spf[1],
                               dkim=case.dkim, resolver=resolver, psl=psl,
                               rng=lambda: case.rng)
    assert (result.result, result.policy, result.disposition) == case.expected, result.reason
    if result.result != "permerror":
        assert result.org_domain == case.org
        assert result.from_domain.endswith(case.org)


async def test_dns_temporary_failure_is_temperror(dns_server: DnsServer, resolver: Resolver,
                                                  psl: PublicSuffixList) -> None:
    dns_server.set_servfail("_dmarc.example.com")
    result = await check_dmarc(message(), spf_result="pass", spf_domain="example.com", dkim=[],
                               resolver=resolver, psl=psl)
    assert (result.result, result.from_domain) == ("temperror", "example.com")


async def test_org_fallback_temporary_failure_is_temperror(dns_server: DnsServer,
                                                           resolver: Resolver,
                                                           psl: PublicSuffixList) -> None:
    dns_server.set_servfail("_dmarc.example.com")
    result = await check_dmarc(message("joe@a.b.example.com"), spf_result="none", spf_domain="",
                               dkim=[], resolver=resolver, psl=psl)
    assert result.result == "temperror"
    asked = [name for _, name, qtype in dns_server.queries if qtype == "TXT"]
    assert asked[0] == "_dmarc.a.b.example.com." and "_dmarc.example.com." in asked


async def test_pass_returns_full_result(dns_server: DnsServer, resolver: Resolver,
                                        psl: PublicSuffixList) -> None:
    dns_server.add_txt("_dmarc.example.com", "v=DMARC1; p=quarantine")
    result = await check_dmarc(message(), spf_result="pass", spf_domain="example.com", dkim=[],
                               resolver=resolver, psl=psl)
    assert result == DmarcResult("pass", "example.com", "quarantine", "none", "example.com",
                                 "SPF aligned")


@pytest.mark.parametrize(("domain", "org"), [
    ("mail.example.co.uk", "example.co.uk"), ("example.co.uk", "example.co.uk"),
    ("co.uk", "co.uk"), ("a.b.example.com", "example.com"),
], ids=["sub-co-uk", "co-uk", "public-suffix", "deep"])
def test_organizational_domain(psl: PublicSuffixList, domain: str, org: str) -> None:
    assert organizational_domain(domain, psl) == org


# The fast path for plain From shapes must give what the two-parser path gives.
_ATOM = st.text("abcXYZ019!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=6)
_LABEL = st.text("abcz09-", min_size=1, max_size=8)
_ADDR = st.builds(lambda local, labels: ".".join(local) + "@" + ".".join(labels),
                  st.lists(_ATOM, min_size=1, max_size=3), st.lists(_LABEL, min_size=2,
                                                                     max_size=4))
_WORDS = st.lists(st.text("abcXYZ019", min_size=1, max_size=6), min_size=1, max_size=3).map(
    " ".join)
_QUOTED = st.text("abc XY.'-\t", max_size=12).map(lambda t: f'"{t}"')
_SIMPLE = st.one_of(
    _ADDR,
    st.builds(lambda name, addr, sp: f"{name}{sp}<{addr}>",
              st.one_of(st.just(""), _WORDS, _QUOTED), _ADDR, st.sampled_from(["", " ", "\t"])),
).flatmap(lambda t: st.sampled_from([t, f" {t}", f"{t} ", f"\t{t}\t"]))


@given(_SIMPLE)
@settings(max_examples=400, deadline=None)
def test_from_fast_path_agrees_with_both_parsers(text: str) -> None:
    assert _SIMPLE_FROM.fullmatch(text), text  # the generator makes only fast-path shapes
    assert from_address_domain(text) == from_address_domain(text, fast=False)


@given(st.text("ab@<>\"., ()\\:;\t-xyz.é", max_size=30))
@settings(max_examples=400, deadline=None)
def test_from_fast_path_never_disagrees_on_junk(text: str) -> None:
    assert from_address_domain(text) == from_address_domain(text, fast=False)


@pytest.mark.parametrize("text", [
    '"a@b.com" <x@y.z>', "Bob <a@b.c>, c@d.e", "(c) a@b.com", "Ünï <a@b.com>",
    "a@b.com <c@d.com>", "<a@b.com> <c@d.com>", "Sender.Name <a@b.com>",
])
def test_from_fast_path_declines_the_tricky_shapes(text: str) -> None:
    assert not _SIMPLE_FROM.fullmatch(text)
