"""Classifying remote replies: which failures suppress an address or a domain (RFC 3463).

Only permanent failures suppress anything. The enhanced status code decides (RFC 3463 §3);
a reply without one falls back to its text, conservatively. Policy, content and size
rejections (X.7.x, X.6.x, X.3.4) and "mailbox full" (X.2.2, persistent-transient in
practice) never suppress: the address is fine, the message or the sender was not.
"""

from __future__ import annotations

import re
from typing import Literal

from inbox.delivery.transport import RecipientResult

Scope = Literal["ADDRESS", "DOMAIN"]

# Subject.detail of a permanent (5.x.x) enhanced status code -> what it condemns.
SUPPRESSING_CODES: dict[str, Scope] = {
    "1.1": "ADDRESS",  # RFC 3463 §3.2 X.1.1 Bad destination mailbox address
    "1.6": "ADDRESS",  # RFC 3463 §3.2 X.1.6 Destination mailbox has moved, no forwarding address
    "2.1": "ADDRESS",  # RFC 3463 §3.3 X.2.1 Mailbox disabled, not accepting messages
    "1.2": "DOMAIN",  # RFC 3463 §3.2 X.1.2 Bad destination system address
    "1.10": "DOMAIN",  # RFC 7505 §4.3 X.1.10 Recipient address has null MX (but see below)
    "4.4": "DOMAIN",  # RFC 3463 §3.5 X.4.4 Unable to route
}

# Generic codes that say nothing specific: their text is consulted like a bare reply's.
_GENERIC = {"5.0.0", "5.1.0"}

# Microsoft Exchange answers a non-existent recipient with "550 5.1.10
# RESOLVER.ADR.RecipientNotFound": a mailbox problem, not a null MX. A real null MX is
# detected by our own resolver (inbox.delivery.mx.NullMx) or reported by a relay in words.
_NULL_MX_TEXT = re.compile(r"null[ -]?mx", re.IGNORECASE)

# Bare 550 texts meaning "no such mailbox" (RFC 5321 §4.2.3 wording and common MTAs).
_UNKNOWN_USER_TEXT = re.compile(
    r"user unknown|unknown user|no such (user|mailbox|recipient)|mailbox unavailable"
    r"|mailbox (not found|does not exist)|recipient (not found|unknown)|unknown recipient"
    r"|(address|account|user|mailbox) does not exist|invalid (recipient|mailbox)",
    re.IGNORECASE,
)
# ...unless the text says the refusal is about us or the message (RFC 5321's generic
# "mailbox unavailable" is also used for blocks).
_POLICY_TEXT = re.compile(
    r"spam|block|policy|reputation|blacklist|denied|relay|virus|authenticat"
    r"|\b(rate|spf|dkim|dmarc)\b",
    re.IGNORECASE,
)


def suppression_scope(result: RecipientResult) -> Scope | None:
    """"ADDRESS" or "DOMAIN" if this permanent failure should stop future sends, else None."""
    if result.delivered or result.temporary or not 500 <= result.code < 600:
        return None
    enhanced = result.enhanced
    if enhanced is not None and enhanced not in _GENERIC:
        klass, _, subject_detail = enhanced.partition(".")
        if klass != "5":
            return None
        scope = SUPPRESSING_CODES.get(subject_detail)
        if subject_detail == "1.10" and not _NULL_MX_TEXT.search(result.text):
            return "ADDRESS"
        return scope
    if result.code == 550 and _UNKNOWN_USER_TEXT.search(result.text) \
            and not _POLICY_TEXT.search(result.text):
        return "ADDRESS"
    return None
