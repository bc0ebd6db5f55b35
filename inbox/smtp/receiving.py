"""The inbound policy behind port 25: rate limits, recipient resolution (never an open relay),
authentication verdicts, and handing the message to the mail store. The SMTP protocol itself
lives in `transfer.py`; this module answers its four questions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from inbox.errors import RelayDenied, TemporaryFailure
from inbox.pubsub import PubSub
from inbox.smtp.authresults import strip_forged_results
from inbox.smtp.checks import authenticate, decide
from inbox.smtp.transfer import InboundEnvelope
from inbox.storage.mailstore import Delivery, InboundMeta, MailStore
from inbox.storage.mimeparse import check_structure, parse_inbound
from inbox.storage.ratelimits import RateLimiter, enforce
from inbox.tenancy.mailboxes import (
    InboundRecipient,
    hosted_domain,
    resolve_recipient,
    split_address,
)
from inbox.tenancy.orgkeys import e2ee_public_key

log = logging.getLogger(__name__)

PARSE_INLINE_BYTES = 256 * 1024  # bigger messages are parsed off the event loop


@dataclass(frozen=True)
class InboundLimits:
    connections_per_minute: int
    messages_per_minute: int
    fail_open: bool
    require_spf: bool
    require_dkim: bool
    require_dmarc: bool
    keep_parts: bool
    cache_secs: float = 5.0  # INBOX_CACHE_SECS: how long a hosted domain's settings are reused


def inbound_topic(org: str, mailbox: str) -> str:
    return f"inbound:{org}:{mailbox}"


class InboundService:
    """Implements `transfer.InboundPolicy` on top of the database, DNS and the mail store."""

    def __init__(self, *, db: Any, resolver: Any, mailstore: MailStore, limiter: RateLimiter,
                 pubsub: PubSub, psl: Any, hostname: str, limits: InboundLimits,
                 clock: Callable[[], datetime]) -> None:
        self.db = db
        self.resolver = resolver
        self.mailstore = mailstore
        self.limiter = limiter
        self.pubsub = pubsub
        self.psl = psl
        self.hostname = hostname
        self.limits = limits
        self.clock = clock
        self._domains: dict[str, tuple[float, dict[str, Any]]] = {}
        self._recipients: dict[str, tuple[float, InboundRecipient]] = {}

    async def _rate(self, scope: str, key: str, limit: int, what: str) -> None:
        await enforce(self.limiter, scope, key, limit, what, fail_open=self.limits.fail_open)

    async def on_connect(self, peer_ip: str) -> None:
        await self._rate("smtp-conn", peer_ip, self.limits.connections_per_minute,
                         "connections")

    async def on_mail(self, peer_ip: str, mail_from: str) -> None:
        await self._rate("smtp-msg", peer_ip, self.limits.messages_per_minute, "messages")

    async def on_recipient(self, peer_ip: str, address: str) -> InboundRecipient:
        """Resolve RCPT TO. Hosted domains and found mailboxes are reused for
        INBOX_CACHE_SECS; misses are never cached, so a new mailbox works at once and a domain
        receives as soon as verifyDomain succeeds (which does not reach this cache)."""
        local, domain = split_address(address)
        now = time.monotonic()
        known = self._recipients.get(f"{local}@{domain}")
        if known is not None and known[0] > now:
            return replace(known[1], address=address)
        hit = self._domains.get(domain)
        if hit is None or hit[0] <= now:
            row = await hosted_domain(self.db, domain)
            if row is None:  # unknown, unverified or not receiving
                self._domains.pop(domain, None)
                raise RelayDenied(f"relay access denied: {domain} is not hosted here")
            if len(self._domains) > 10000:
                self._domains.clear()
            hit = (now + self.limits.cache_secs, row)
            self._domains[domain] = hit
        found = await resolve_recipient(self.db, address, hit[1])
        if self.limits.cache_secs > 0:
            if len(self._recipients) > 100000:
                self._recipients.clear()
            self._recipients[f"{local}@{domain}"] = (now + self.limits.cache_secs, found)
        return found

    async def on_message(self, envelope: InboundEnvelope) -> str:
        # RFC 8601 §5: results claiming to be ours were not written by us.
        raw = strip_forged_results(envelope.data, self.hostname)
        big = len(raw) > PARSE_INLINE_BYTES
        # 550 5.6.0 before spending DNS lookups on junk; the parse is kept for the index.
        checked = await asyncio.to_thread(check_structure, raw) if big else check_structure(raw)
        recipients: list[InboundRecipient] = list(envelope.recipients)
        outcome = await authenticate(raw, resolver=self.resolver, psl=self.psl,
                                     client_ip=envelope.peer_ip, helo=envelope.helo,
                                     mail_from=envelope.mail_from, authserv_id=self.hostname)
        decision = decide(outcome, **self._requirements(recipients))
        keep = self.limits.keep_parts
        if big:
            parsed = await asyncio.to_thread(parse_inbound, raw, keep_parts=keep,
                                             checked=checked)
        else:
            parsed = parse_inbound(raw, keep_parts=keep, checked=checked)
        name, _, value = outcome.header.rstrip("\r\n").partition(":")
        parsed.headers.insert(0, (name, value.strip()))
        raw = outcome.header.encode("utf-8") + raw
        deliveries = await self._deliveries(recipients, decision.folder)
        meta = InboundMeta(peer_ip=envelope.peer_ip, helo=envelope.helo,
                           mail_from=envelope.mail_from, tls=envelope.tls,
                           auth=outcome.summary(),
                           spam={"verdict": "spam" if decision.spam_reasons else "ham",
                                 "reasons": list(decision.spam_reasons)})
        rows = await self.mailstore.store(raw, parsed, deliveries, meta, self.clock())
        for row in rows:
            self.pubsub.publish(inbound_topic(row["org"], row["mailbox"]), row)
        return ",".join(row["id"] for row in rows)

    def _requirements(self, recipients: list[InboundRecipient]) -> dict[str, bool]:
        """The strictest requirement among the recipients' domains (a domain's own setting,
        when it has one, wins over the global default)."""
        out = {}
        for name, default in (("spf", self.limits.require_spf),
                              ("dkim", self.limits.require_dkim),
                              ("dmarc", self.limits.require_dmarc)):
            values = [r.settings.get(f"require_{name}_pass") for r in recipients]
            out[f"require_{name}"] = any(default if v is None else bool(v) for v in values)
        return out

    async def _deliveries(self, recipients: list[InboundRecipient], folder: str
                          ) -> list[Delivery]:
        by_mailbox: dict[tuple[str, str], Delivery] = {}
        for r in recipients:
            key = (r.org, r.mailbox)
            if key in by_mailbox:
                by_mailbox[key].rcpt_to.append(r.address)
                continue
            enc = r.settings.get("enc_mode") or "standard"
            public = await e2ee_public_key(self.db, r.org) if enc == "e2ee" else None
            if enc == "e2ee" and not public:
                raise TemporaryFailure("e2ee is on but no public key is registered")
            by_mailbox[key] = Delivery(org=r.org, mailbox=r.mailbox, rcpt_to=[r.address],
                                       folder=folder, enc_mode=enc, e2ee_public_key=public)
        return list(by_mailbox.values())


__all__ = ["InboundLimits", "InboundService", "hosted_domain", "inbound_topic"]
