"""Outcome of one outbound delivery attempt: a reply per recipient and the TLS that carried it.
Parses RFC 3463 enhanced status codes off SMTP replies; does no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# RFC 3463 §2: class "." subject "." detail; subject and detail are 1-3 digits.
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


@dataclass(frozen=True)
class RecipientResult:
    """The outcome for one recipient: the remote (or a synthetic) reply and what it means."""

    address: str
    code: int
    enhanced: str | None
    text: str
    temporary: bool
    delivered: bool

    @property
    def reply(self) -> str:
        """The reply as one line, e.g. "250 2.0.0 OK queued"."""
        return " ".join(part for part in (str(self.code), self.enhanced, self.text) if part)

    @property
    def permanent(self) -> bool:
        return not self.delivered and not self.temporary


@dataclass(frozen=True)
class TlsOutcome:
    """Whether the session that carried the transaction used TLS.

    `error` is set when STARTTLS was offered but not used (refused or handshake failed).
    """

    used: bool
    version: str | None = None
    cipher: str | None = None
    error: str | None = None
    policy: str = "opportunistic"  # none | opportunistic | required | mta-sts | dane
    verified: bool = False  # the peer was authenticated (DANE or PKIX)
    reason: str | None = None  # why not verified (or not used)

    def as_dict(self) -> dict[str, object]:
        return {"used": self.used, "version": self.version, "cipher": self.cipher,
                "policy": self.policy, "verified": self.verified,
                "reason": self.reason or self.error}


NO_TLS = TlsOutcome(used=False)


@dataclass(frozen=True)
class TlsReport:
    """One session's TLS outcome for TLS-RPT (RFC 8460 §4.4): the policy it was under and
    whether a TLS session was established as that policy required."""

    mx_host: str
    receiving_ip: str
    policy_type: str  # sts | tlsa | no-policy-found
    policy_strings: tuple[str, ...]
    success: bool
    result_type: str | None = None  # RFC 8460 §4.3 failure type
    reason: str = ""


@dataclass(frozen=True)
class AttemptResult:
    """One attempt. `host` is the host that ran the transaction, None when none could be used;
    then `connection_error` says what went wrong with each host tried, `mx` names the MX host
    tried last and `tls` says which policy it was under and why it failed."""

    recipients: list[RecipientResult]
    host: str | None
    tls: TlsOutcome
    connection_error: str | None
    tls_reports: tuple[TlsReport, ...] = ()
    mx: str | None = None



def split_enhanced(code: int, message: str) -> tuple[str | None, str]:
    """Split an RFC 3463 enhanced status code off a reply text: (enhanced or None, text).

    The code counts only if its class matches the reply's first digit (RFC 2034 §4). A
    multi-line reply repeating the code on each line (as Gmail does) becomes one line of text.
    """
    lines = [line.strip() for line in message.splitlines()]
    match = _ENHANCED.match(lines[0]) if lines else None
    if match is None or match.group(1) != str(code)[:1]:
        return None, " ".join(line for line in lines if line)
    enhanced = f"{match.group(1)}.{int(match.group(2))}.{int(match.group(3))}"
    raw_code = match.group(0)
    text = []
    for line in lines:
        if line.startswith(raw_code) and line[len(raw_code):len(raw_code) + 1] in ("", " ", "\t"):
            line = line[len(raw_code):].strip()
        if line:
            text.append(line)
    return enhanced, " ".join(text)


def from_reply(address: str, code: int, message: str, *, delivered: bool = False
               ) -> RecipientResult:
    """The result for a recipient the remote server answered with `code` `message`."""
    enhanced, text = split_enhanced(code, message)
    return RecipientResult(address, code, enhanced, text,
                           temporary=not delivered and not 500 <= code < 600, delivered=delivered)


def synthetic(address: str, code: int, enhanced: str, text: str) -> RecipientResult:
    """A result we made up (no usable reply): temporary for 4xx codes, never delivered."""
    return RecipientResult(address, code, enhanced, text, temporary=code < 500, delivered=False)


def failed_attempt(addresses: Sequence[str], code: int, enhanced: str, text: str
                   ) -> AttemptResult:
    """An attempt that never reached a server (our own error, DNS, a dead delivery process):
    the same made-up reply for every recipient."""
    return AttemptResult([synthetic(a, code, enhanced, text) for a in addresses], None, NO_TLS,
                         None)
