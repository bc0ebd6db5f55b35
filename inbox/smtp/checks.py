"""Authenticating what arrives, and what to do about it: runs SPF, DKIM, ARC and DMARC on one
message, builds our Authentication-Results header, and turns verdicts plus the recipients'
policy into accept / spam / reject / try-later. Does not talk SMTP or store anything.

Defaults (documented in the README): SMTP_REQUIRE_SPF_PASS, _DKIM_PASS and _DMARC_PASS are all
off, because forwarding breaks SPF and mailing lists break DKIM; the sender's own DMARC policy
is always honoured (`p=reject` → 550 5.7.1, `p=quarantine` → Spam). A domain may turn a
requirement on or off for itself on `has_domain`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from inbox.errors import InboxError, PolicyRejected
from inbox.smtp.authresults import build_authentication_results
from inbox.smtp.dkimcheck import ArcResult, DkimResult, verify_arc, verify_dkim
from inbox.smtp.dmarc import DmarcResult, check_dmarc
from inbox.smtp.spf import SpfResult, check_spf


class AuthTemporary(InboxError):
    """A DNS failure kept us from deciding; the sender should retry (RFC 7372 X.7.x)."""

    code = "AUTH_TEMPORARY"
    temporary = True
    smtp_enhanced = "4.7.0"


class SpfRequired(PolicyRejected):
    smtp_enhanced = "5.7.23"  # RFC 7372 §3.2: SPF validation failed


class DkimRequired(PolicyRejected):
    smtp_enhanced = "5.7.20"  # RFC 7372 §3.1: no passing DKIM signature found


@dataclass(frozen=True)
class AuthOutcome:
    spf: SpfResult
    dkim: list[DkimResult]
    arc: ArcResult
    dmarc: DmarcResult
    header: str  # "Authentication-Results: …\r\n"

    @property
    def dkim_pass(self) -> bool:
        return any(d.result == "pass" for d in self.dkim)

    def summary(self) -> dict[str, Any]:
        return {
            "spf": self.spf.result, "spf_domain": self.spf.domain,
            "dkim": [{"result": d.result, "domain": d.domain, "selector": d.selector,
                      "algorithm": d.algorithm, "reason": d.reason} for d in self.dkim],
            "dmarc": self.dmarc.result, "dmarc_policy": self.dmarc.policy,
            "dmarc_disposition": self.dmarc.disposition,
            "header_from_domain": self.dmarc.from_domain,
            "arc": self.arc.result, "header": self.header.rstrip("\r\n"),
        }


async def authenticate(raw: bytes, *, resolver: Any, psl: Any, client_ip: str, helo: str,
                       mail_from: str, authserv_id: str) -> AuthOutcome:
    spf_task = asyncio.ensure_future(
        check_spf(resolver, client_ip, mail_from, helo, receiver=authserv_id))
    dkim, arc = await asyncio.gather(verify_dkim(raw, resolver), verify_arc(raw, resolver))
    spf = await spf_task
    # RFC 7489 §3.1.2: SPF aligns through the MAIL FROM domain (HELO when MAIL FROM is null).
    dmarc = await check_dmarc(raw, spf_result=spf.result, spf_domain=spf.domain, dkim=dkim,
                              resolver=resolver, psl=psl)
    header = build_authentication_results(authserv_id, spf=spf, dkim=dkim, dmarc=dmarc, arc=arc,
                                          helo=helo, mail_from=mail_from, client_ip=client_ip)
    return AuthOutcome(spf, dkim, arc, dmarc, header)


@dataclass(frozen=True)
class Decision:
    folder: str  # INBOX or SPAM
    spam_reasons: tuple[str, ...]


def decide(outcome: AuthOutcome, *, require_spf: bool, require_dkim: bool,
           require_dmarc: bool) -> Decision:
    """Raise PolicyRejected (550 5.7.x) or AuthTemporary (451 4.7.x), or say where it goes."""
    spf, dmarc = outcome.spf.result, outcome.dmarc
    dkim_temp = any(d.result == "temperror" for d in outcome.dkim)
    if dmarc.result == "temperror":
        raise AuthTemporary("DNS failure while checking DMARC; try again later")
    if dmarc.result == "permerror" and dmarc.disposition == "reject":
        # RFC 7489 §6.6.1: without exactly one author domain DMARC cannot protect anyone.
        raise PolicyRejected(f"message must have exactly one From address ({dmarc.reason})")
    if dmarc.result == "fail" and dmarc.disposition in ("reject", "quarantine") and (
            spf == "temperror" or dkim_temp):
        # A temporary DNS failure may be what made DMARC fail: do not act on it yet.
        raise AuthTemporary("DNS failure while checking SPF/DKIM; try again later")
    if dmarc.result == "fail" and dmarc.disposition == "reject":
        raise PolicyRejected(
            f"message rejected by the DMARC policy of {dmarc.from_domain} (RFC 7489 §6.3)")
    if require_spf and spf != "pass":
        if spf == "temperror":
            raise AuthTemporary("DNS failure while checking SPF; try again later")
        raise SpfRequired(f"SPF check did not pass ({spf}); this domain requires it")
    if require_dkim and not outcome.dkim_pass:
        if dkim_temp:
            raise AuthTemporary("DNS failure while checking DKIM; try again later")
        raise DkimRequired("no valid DKIM signature; this domain requires one")
    if require_dmarc and dmarc.result != "pass":
        raise PolicyRejected(f"DMARC check did not pass ({dmarc.result}); this domain"
                             " requires it")
    reasons = []
    if dmarc.result == "fail" and dmarc.disposition == "quarantine":
        reasons.append("dmarc-quarantine")
    if spf == "fail" and not outcome.dkim_pass and dmarc.result != "pass":
        reasons.append("spf-fail-unsigned")
    return Decision("SPAM" if reasons else "INBOX", tuple(reasons))
