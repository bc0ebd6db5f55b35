"""DMARC (RFC 7489) evaluation of inbound mail: From domain, policy discovery, identifier
alignment, pct sampling. Does not run SPF or DKIM (it takes their results) nor act on the result.

The caller supplies the SPF result as plain values, the DKIM results from `dkimcheck`, a
resolver and a `publicsuffixlist.PublicSuffixList` (slow to build: make one and share it).

Results (RFC 7489 §11.2, RFC 8601 §2.7): pass, fail, none (no usable policy record), temperror,
permerror. Decisions worth knowing:

* RFC5322.From must be exactly one header field holding exactly one address with a domain; else
  permerror with disposition "reject" (RFC 7489 §6.6.1 notes such messages are typically
  rejected; RFC 5322 §3.6 requires exactly one From). `policy` is then "none" (no record read).
* Several DMARC records, or none at the From domain and none at the organizational domain:
  result "none" (RFC 7489 §6.6.3 steps 3-4). A record without a valid p= counts as p=none if it
  has a rua= mailto URI, else as no record (§6.6.3 step 6); other bad tags take their defaults
  (§6.3).
* A temporary DNS failure looking up the record: temperror. When nothing aligned passed but an
  aligned DKIM signature or the aligned SPF check ended in temperror, the result is temperror
  too (the identifier might have passed); `policy` still says what the record asks, so the
  caller can decide whether to defer (451) or to accept.
* `disposition` is the policy after pct sampling (§6.6.4): when `rng() * 100 >= pct` the next
  lower policy applies (reject -> quarantine -> none).
"""

from __future__ import annotations

import email.policy
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Any

import idna

from inbox.errors import DnsNotFound, DnsTemporary
from inbox.smtp.dkimcheck import DkimResult

_POLICIES = ("none", "quarantine", "reject")
_LOWER = {"reject": "quarantine", "quarantine": "none", "none": "none"}
# RFC 7489 §6.4: dmarc-version = "v" *WSP "=" *WSP %x44 %x4d %x41 %x52 %x43 %x31 (case-sensitive)
_VERSION = re.compile(r"^v[ \t]*=[ \t]*DMARC1[ \t]*(;|$)")
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*"
                     r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# The common From shapes that no parser can read two ways: `local@domain`, `<local@domain>`,
# `Plain Words <local@domain>` or `"Quoted words" <local@domain>`, ASCII, dot-atom local part,
# no comments, no specials in the name. For these the two-parser check below is skipped (its
# strict parser costs ~0.25 ms); tests/test_dmarc.py checks both paths agree on them.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_ADDR = rf"({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)"
_SIMPLE_FROM = re.compile(
    rf"[ \t]*(?:{_SIMPLE_ADDR}|(?:[A-Za-z0-9]+(?:[ \t]+[A-Za-z0-9]+)*[ \t]*"
    rf'|"[A-Za-z0-9 \t.\'-]*"[ \t]*)?<{_SIMPLE_ADDR}>)[ \t]*')
_HEADER_END = re.compile(rb"(?:^|\n)\r?\n")


@dataclass(frozen=True)
class DmarcResult:
    result: str  # pass|fail|none|temperror|permerror
    from_domain: str  # RFC5322.From domain ("" if none/unparseable)
    policy: str  # none|quarantine|reject: the applicable p= or sp=
    disposition: str  # none|quarantine|reject after pct sampling (none when pass)
    org_domain: str = ""
    reason: str = ""


@dataclass(frozen=True)
class _Record:
    p: str
    sp: str
    adkim: str
    aspf: str
    pct: int


def normalize_domain(domain: str) -> str:
    """Lowercase A-label form without the trailing dot; "" if it is not a domain name."""
    text = domain.strip().rstrip(".").lower()
    if not text.isascii():
        try:
            text = idna.encode(text, uts46=True).decode("ascii")
        except idna.IDNAError:
            return ""
    return text if _DOMAIN.match(text) else ""


def organizational_domain(domain: str, psl: Any) -> str:
    """RFC 7489 §3.2: the public suffix plus one label; a public suffix is its own."""
    return psl.privatesuffix(domain) or domain


def _from_domain(raw: bytes) -> tuple[str, str]:
    """(domain, problem) of the single RFC5322.From address (RFC 7489 §6.6.1)."""
    fields: list[list[str]] = []  # each From field's lines
    current: list[str] | None = None
    end = _HEADER_END.search(raw)  # the first empty line ends the header section
    for line in re.split(rb"\r?\n", raw[:end.start()] if end else raw):
        if line[:1] in (b" ", b"\t"):  # RFC 5322 §2.2.3: a folded continuation
            if current is not None:
                current.append(line.decode("utf-8", "replace"))
            continue
        name, colon, value = line.partition(b":")
        current = None
        if colon and name.strip().lower() == b"from":
            current = [value.decode("utf-8", "replace")]
            fields.append(current)
    if not fields:
        return "", "no From header field"
    if len(fields) > 1:
        return "", f"{len(fields)} From header fields"
    return from_address_domain(" ".join(part.strip() for part in fields[0]))


def from_address_domain(text: str, *, fast: bool = True) -> tuple[str, str]:
    """(domain, problem) of the one address in a From field's unfolded value. `fast=False`
    always takes the two-parser path (tests compare the two)."""
    simple = _SIMPLE_FROM.fullmatch(text) if fast else None
    if simple:
        addresses = [simple.group(1) or simple.group(2)]
    else:
        addresses = [addr for _, addr in getaddresses([text]) if addr]
        if len(addresses) != 1:
            return "", f"From holds {len(addresses)} addresses"
        # Two parsers must agree: a From that parsers read differently is how a message shows
        # one domain to the reader and gets DMARC checked against another.
        try:
            strict = [a.addr_spec
                      for a in email.policy.default.header_factory("From", text).addresses]
        except Exception:  # noqa: BLE001 - the stdlib parser fails with assorted errors on junk
            strict = []
        if strict != addresses:
            return "", "From cannot be parsed unambiguously"
    _, at, domain = addresses[0].rpartition("@")
    domain = normalize_domain(domain) if at else ""
    if not domain:
        return "", "From address has no valid domain"
    return domain, ""


def _parse_record(text: str) -> _Record | None:
    """The tags that matter here; None if the record is unusable (RFC 7489 §6.6.3 step 6)."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if eq and key and key not in tags:
            tags[key] = value.strip()
    p = tags.get("p", "").lower()
    if p not in _POLICIES:
        if not any(u.strip().lower().startswith("mailto:") for u in tags.get("rua", "").split(",")):
            return None
        p = "none"  # §6.6.3: act as if p=none was published, for the sake of the reports
    sp = tags.get("sp", "").lower()
    pct_text = tags.get("pct", "100")
    pct = int(pct_text) if pct_text.isdigit() and int(pct_text) <= 100 else 100
    return _Record(
        p=p,
        sp=sp if sp in _POLICIES else p,  # §6.3: sp defaults to p
        adkim="s" if tags.get("adkim", "r").lower() == "s" else "r",
        aspf="s" if tags.get("aspf", "r").lower() == "s" else "r",
        pct=pct,
    )


async def _records_at(domain: str, resolver: Any) -> list[str]:
    """DMARC records at _dmarc.<domain> (§6.6.3 step 2: TXT records not starting with
    v=DMARC1 are ignored). Raises DnsTemporary."""
    try:
        answers = await resolver.txt(f"_dmarc.{domain}")
    except DnsNotFound:
        return []
    return [text for text in answers if _VERSION.match(text)]


async def _discover(from_domain: str, org: str,
                    resolver: Any) -> tuple[_Record | None, bool, str]:
    """(record, found at the org domain instead of the From domain, problem) per §6.6.3."""
    for domain, at_org in ((from_domain, False), (org, True)):
        if at_org and org == from_domain:
            break
        records = await _records_at(domain, resolver)
        if len(records) > 1:
            return None, at_org, f"{len(records)} DMARC records at _dmarc.{domain}"
        if records:
            record = _parse_record(records[0])
            if record is None:
                return None, at_org, f"DMARC record at _dmarc.{domain} has no valid p="
            return record, at_org, ""
    return None, False, "no DMARC record"


def _aligned(identifier: str, from_domain: str, mode: str, org: str, psl: Any) -> bool:
    """RFC 7489 §3.1: strict means equal; relaxed means equal organizational domains."""
    identifier = normalize_domain(identifier)
    if not identifier:
        return False
    if mode == "s":
        return identifier == from_domain
    return organizational_domain(identifier, psl) == org


async def check_dmarc(raw_headers_or_message: bytes, *, spf_result: str, spf_domain: str,
                      dkim: list[DkimResult], resolver: Any, psl: Any,
                      rng: Callable[[], float] = random.random) -> DmarcResult:
    """Evaluate DMARC for a message (its header section is enough).

    `spf_result`/`spf_domain`: the SPF result (RFC 7208 §2.6 names) and the domain it was
    checked for (the RFC5321.MailFrom domain, or the HELO name for a null reverse-path).
    `rng` returns a float in [0, 1) for pct sampling."""
    from_domain, problem = _from_domain(raw_headers_or_message)
    if problem:
        return DmarcResult("permerror", "", "none", "reject", reason=problem)
    org = organizational_domain(from_domain, psl)
    try:
        record, at_org, problem = await _discover(from_domain, org, resolver)
    except DnsTemporary as exc:
        return DmarcResult("temperror", from_domain, "none", "none", org, exc.message)
    if record is None:
        return DmarcResult("none", from_domain, "none", "none", org, problem)
    # §6.3: sp= applies to subdomains when the record was found at the organizational domain.
    policy = record.sp if at_org else record.p
    dkim_ok = [r for r in dkim if _aligned(r.domain, from_domain, record.adkim, org, psl)]
    spf_ok = _aligned(spf_domain, from_domain, record.aspf, org, psl)
    if spf_ok and spf_result.lower() == "pass":
        return DmarcResult("pass", from_domain, policy, "none", org, "SPF aligned")
    if passed := [r for r in dkim_ok if r.result == "pass"]:
        return DmarcResult("pass", from_domain, policy, "none", org,
                           f"DKIM aligned (d={passed[0].domain})")
    if (spf_ok and spf_result.lower() == "temperror") or any(
        r.result == "temperror" for r in dkim_ok
    ):
        return DmarcResult("temperror", from_domain, policy, "none", org,
                           "an aligned identifier could not be checked (temporary error)")
    # §6.6.4: apply the policy to pct percent of failing messages, the next lower to the rest.
    disposition = policy if rng() * 100 < record.pct else _LOWER[policy]
    return DmarcResult("fail", from_domain, policy, disposition, org,
                       "no aligned SPF or DKIM pass")
