"""Outbound TLS policy for each MX host of one delivery: DANE (RFC 7672) over MTA-STS (RFC 8461)
over our own settings, plus REQUIRETLS (RFC 8689). Decides only; the transport enforces.

Per host, in order of precedence (RFC 8461 §2: DANE wins when both apply):

1. DANE (`SMTP_OUTBOUND_DANE_MODE` prefer|require, DNSSEC trusted): an authenticated TLSA
   RRset makes TLS mandatory and the chain must match a usable record; a TLSA lookup that
   fails (SERVFAIL, bogus) makes the host unusable for now, never plaintext. `require` defers
   hosts without an authenticated TLSA RRset.
2. MTA-STS: in `enforce` mode (and `SMTP_OUTBOUND_MTA_STS_ENFORCE`), an MX not matching the
   policy is not used, and the others need TLS with a certificate valid for the MX name.
   `testing` policies change nothing; their outcomes are only reported (TLS-RPT).
3. Our settings: `SMTP_OUTBOUND_TLS_MODE=required` or `_REQUIRE_STARTTLS` make TLS mandatory
   (certificates checked unless `_ALLOW_INVALID_CERTS`); otherwise opportunistic STARTTLS, with
   a plaintext retry after a failed handshake when `_ALLOW_PLAINTEXT_FALLBACK`.

A message with REQUIRETLS needs validated TLS on the hop: DANE, MTA-STS enforce, or PKIX
checks on an MX name that came from a DNSSEC-validated answer (RFC 8689 §4.2.1); the next hop
must advertise REQUIRETLS. Hosts that cannot satisfy it fail permanently with 5.7.30.
A policy failure defers (or bounces when final); it never suppresses the recipient.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from inbox.delivery import dane

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostPolicy:
    """What the transport must do with one MX host."""

    policy: str = "opportunistic"  # none | opportunistic | required | mta-sts | dane
    require_tls: bool = False
    verify: str = "none"  # none | pkix | dane
    tlsa: tuple[Any, ...] = ()
    allow_plaintext_fallback: bool = True
    requiretls: bool = False  # send REQUIRETLS on MAIL FROM; the host must advertise it
    skip: str | None = None  # do not use this host (why)
    skip_enhanced: str = "4.7.5"  # RFC 3463 code for a skipped host
    # TLS-RPT (RFC 8460 §4.4): how this attempt is filed.
    report_type: str = "no-policy-found"  # sts | tlsa | no-policy-found
    report_strings: tuple[str, ...] = ()
    report_result: str | None = None  # a failure known before connecting

    @property
    def pool_tag(self) -> str:
        """Sessions are pooled per policy: a session set up under a weaker policy must never
        carry a message that needs a stronger one."""
        return f"{self.verify}:{int(self.require_tls)}:{int(self.requiretls)}"


OPPORTUNISTIC = HostPolicy()


def _tlsa_text(record: Any) -> str:
    return f"{record.usage} {record.selector} {record.mtype} {record.data.hex()}"


class TlsPolicyPlanner:
    """Builds a `HostPolicy` per MX host from DNS (TLSA), MTA-STS and settings."""

    def __init__(self, resolver: Any, settings: Any, mtasts: Any | None = None) -> None:
        self.resolver = resolver
        self.settings = settings
        self.mtasts = mtasts

    def _own(self) -> HostPolicy:
        s = self.settings
        if s.SMTP_OUTBOUND_TLS_MODE == "required" or s.SMTP_OUTBOUND_REQUIRE_STARTTLS:
            verify = "none" if s.SMTP_OUTBOUND_ALLOW_INVALID_CERTS else "pkix"
            return HostPolicy(policy="required", require_tls=True, verify=verify,
                              allow_plaintext_fallback=False)
        return HostPolicy(allow_plaintext_fallback=s.SMTP_OUTBOUND_ALLOW_PLAINTEXT_FALLBACK)

    async def plan(self, domain: str, hosts: Sequence[Any], *, dnssec: bool,
                   require_tls: bool = False) -> dict[str, HostPolicy]:
        """`hosts` are MX hosts (`.host`, `.authenticated`); returns a policy per host name."""
        sts = None
        if self.mtasts is not None:
            try:
                sts = await self.mtasts.policy(domain)
            except Exception:  # noqa: BLE001 - MTA-STS trouble never blocks delivery by itself
                log.warning("MTA-STS lookup for %s failed", domain, exc_info=True)
        out: dict[str, HostPolicy] = {}
        for mx in hosts:
            name = mx.host.rstrip(".").lower()
            policy = await self._host(name, bool(getattr(mx, "authenticated", False)) and dnssec,
                                      sts, dnssec)
            if require_tls:
                policy = self._requiretls(policy, bool(getattr(mx, "authenticated", False))
                                          and dnssec)
            out[name] = policy
        return out

    async def _host(self, name: str, mx_authenticated: bool, sts: Any, dnssec: bool
                    ) -> HostPolicy:
        s = self.settings
        mode = s.SMTP_OUTBOUND_DANE_MODE
        if mode != "off" and dnssec:
            found = await dane.tlsa_policy(self.resolver, name, mx_authenticated=mx_authenticated)
            strings = tuple(_tlsa_text(r) for r in found.records)
            if found.state == "secure":
                if found.usable:
                    return HostPolicy(policy="dane", require_tls=True, verify="dane",
                                      tlsa=tuple(found.usable), allow_plaintext_fallback=False,
                                      report_type="tlsa", report_strings=strings)
                # RFC 7672 §2.2: TLSA records exist but none is usable: TLS, unauthenticated.
                return HostPolicy(policy="dane", require_tls=True, verify="none",
                                  allow_plaintext_fallback=False, report_type="tlsa",
                                  report_strings=strings)
            if found.state in ("temperror", "bogus"):
                return HostPolicy(policy="dane", skip=f"DANE: TLSA lookup for {name} failed"
                                  f" ({found.reason}); not delivering without it",
                                  report_type="tlsa", report_result="dnssec-invalid")
            if mode == "require":
                return HostPolicy(policy="dane", skip=f"DANE required, but {name} has no"
                                  " DNSSEC-authenticated TLSA record", report_type="tlsa",
                                  report_result="dane-required")
        if sts is not None and sts.mode in ("enforce", "testing"):
            strings = ("version: STSv1", f"mode: {sts.mode}",
                       *(f"mx: {m}" for m in sts.mx), f"max_age: {sts.max_age}")
            if sts.mode == "enforce" and s.SMTP_OUTBOUND_MTA_STS_ENFORCE:
                if not sts.mx_matches(name):
                    return HostPolicy(policy="mta-sts", skip=f"MTA-STS: {name} is not an MX"
                                      " host listed in the domain's policy",
                                      report_type="sts", report_strings=strings,
                                      report_result="validation-failure")
                return HostPolicy(policy="mta-sts", require_tls=True, verify="pkix",
                                  allow_plaintext_fallback=False, report_type="sts",
                                  report_strings=strings)
            return replace(self._own(), report_type="sts", report_strings=strings)
        return self._own()

    @staticmethod
    def _requiretls(policy: HostPolicy, mx_authenticated: bool) -> HostPolicy:
        """RFC 8689 §4.2.1: validated TLS to a host that speaks REQUIRETLS, or nothing."""
        if policy.skip:
            return policy
        if policy.verify in ("dane", "pkix"):
            return replace(policy, require_tls=True, requiretls=True,
                           allow_plaintext_fallback=False)
        if mx_authenticated:  # the MX name is trustworthy: check the certificate against it
            return replace(policy, require_tls=True, verify="pkix", requiretls=True,
                           allow_plaintext_fallback=False)
        return replace(policy, skip="REQUIRETLS: no DNSSEC-validated MX, DANE or MTA-STS"
                       " policy to validate this host's certificate against",
                       skip_enhanced="5.7.30")
