"""Our own failures never suppress anyone (issue 2: "Our own errors (quota, config, TLS policy)
never suppress anyone"), over the real stack: GraphQL sendEmail, the embedded engine, the
worker, the loopback DNS server and aiosmtpd peers.

Each case fails every attempt for a reason of ours (a TLS policy the MX cannot meet, an MX we
cannot connect to, a DKIM key the master key does not open, REQUIRETLS with nothing to verify
the MX against) until the recipient EXPIRES or BOUNCES. Afterwards no suppression exists for
the address or its domain, and the next message to the same address goes out as usual.
(tests/test_sending_rules.py covers the remote side: a 550 5.7.1 policy rejection.)
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import (
    SEND,
    Stack,
    Tenant,
    make_settings,
    make_tenant,
    route_to_sink,
    run_stack,
    wait_status,
)
from tests.support.dnsserver import DnsServer
from tests.support.fixtures_smtp import make_smtp_sink, refused_port  # noqa: F401
from tests.support.smtpsink import SmtpSink, make_self_signed_context

# ruff: noqa: F811 - pytest injects the imported fixtures by parameter name.

RCPT = "alice@dest.test"

SEND_REQUIRE_TLS = """
mutation Send($from: String!, $to: [String!], $subject: String!, $text: String,
              $requireTls: Boolean) {
  sendEmail(from: $from, to: $to, subject: $subject, textBody: $text, requireTls: $requireTls) {
    message { id status recipients { address status } }
    errors { code field message }
  }
}
"""
SUPPS = "{ suppressions(first: 50) { edges { node { scope value source reason } } } }"


@dataclass(frozen=True)
class Case:
    settings: dict[str, Any]  # beyond the test defaults; SMTP_OUTBOUND_PORT is the sink's
    status: str  # the recipient's final status
    reply: str  # what its last response starts with
    reason: str  # ... and contains
    sink: str = "plain"  # plain | tls (STARTTLS with a self-signed certificate) | refused
    require_tls: bool = False
    unreadable_dkim_key: bool = False


CASES = {
    # SMTP_OUTBOUND_TLS_MODE=required, the MX offers no STARTTLS: deferred until the last try.
    "tls-required-not-offered": Case(
        {"SMTP_OUTBOUND_TLS_MODE": "required", "SMTP_OUTBOUND_MAX_ATTEMPTS": 3},
        "EXPIRED", "451 4.4.1", "does not offer STARTTLS"),
    # Required TLS with certificate checks; the MX's certificate is self-signed.
    "tls-required-untrusted-certificate": Case(
        {"SMTP_OUTBOUND_TLS_MODE": "required", "SMTP_OUTBOUND_ALLOW_INVALID_CERTS": "false",
         "SMTP_OUTBOUND_MAX_ATTEMPTS": 3},
        "EXPIRED", "451 4.4.1", "TLS handshake failed", sink="tls"),
    # Nothing listens at the MX: connection refused on every attempt, until the attempts ...
    "connection-refused-max-attempts": Case(
        {"SMTP_OUTBOUND_MAX_ATTEMPTS": 3}, "EXPIRED", "451 4.4.1", "refused", sink="refused"),
    # ... or the time to live run out (3 s: time for a second attempt on a slow machine).
    "connection-refused-ttl": Case(
        {"SMTP_OUTBOUND_TTL_SECS": 3}, "EXPIRED", "451 4.4.1", "refused", sink="refused"),
    # A configuration error: the master key does not open the domain's DKIM key.
    "dkim-key-unreadable": Case(
        {"SMTP_OUTBOUND_MAX_ATTEMPTS": 2}, "EXPIRED", "451 4.3.0", "DKIM signing failed",
        unreadable_dkim_key=True),
    # REQUIRETLS (RFC 8689) with no DNSSEC, DANE or MTA-STS to check the MX against: a
    # permanent failure of our policy (5.7.30), so a bounce, and still no suppression.
    "requiretls-unverifiable-mx": Case(
        {}, "BOUNCED", "550 5.7.30", "REQUIRETLS", require_tls=True),
}


@contextlib.asynccontextmanager
async def failing_stack(tmp_path: Any, dns: DnsServer, port: int, case: Case
                        ) -> AsyncIterator[tuple[Stack, Tenant]]:
    settings = make_settings(tmp_path, dns, INBOX_DB_SYNC="false", SMTP_OUTBOUND_PORT=port,
                             **case.settings)
    async with run_stack(settings, dns) as stack:
        tenant = await make_tenant(stack.services, dns)
        route_to_sink(dns, "dest.test")
        if case.unreadable_dkim_key:
            # Sealed with another associated data: SecretBox.open fails as it does when the
            # master key is not the one the key was sealed with.
            junk = stack.services.box.seal(b"not this domain's key", b"another.test")
            await stack.services.db.run(
                "UPDATE has_domain SET dkim_rsa_private = $junk WHERE domain = $d",
                {"junk": junk, "d": tenant.domain})
        yield stack, tenant


async def _send(stack: Stack, tenant: Tenant, *, require_tls: bool = False) -> dict[str, Any]:
    variables = {"from": f"hello@{tenant.domain}", "to": [RCPT], "subject": "s", "text": "t"}
    if require_tls:
        data = await stack.api(SEND_REQUIRE_TLS, {**variables, "requireTls": True},
                               key=tenant.key)
    else:
        data = await stack.api(SEND, variables, key=tenant.key)
    payload = data["data"]["sendEmail"]
    assert payload["errors"] == [], payload
    return payload["message"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
async def test_our_own_failures_never_suppress(
        tmp_path: Any, dns_server: DnsServer, make_smtp_sink: Callable[..., SmtpSink],
        refused_port: int, case: Case) -> None:
    sink: SmtpSink | None = None
    if case.sink == "plain":
        sink = make_smtp_sink()
    elif case.sink == "tls":
        sink = make_smtp_sink(tls_context=make_self_signed_context("mx.dest.test"))
    port = sink.port if sink is not None else refused_port
    async with failing_stack(tmp_path, dns_server, port, case) as (stack, tenant):
        sent = await _send(stack, tenant, require_tls=case.require_tls)
        msg = await wait_status(stack.api, tenant.key, sent["id"], {"FAILED"}, timeout=30)
        [rcpt] = msg["recipients"]
        assert rcpt["status"] == case.status, rcpt
        assert rcpt["lastResponse"].startswith(case.reply), rcpt
        assert case.reason in rcpt["lastResponse"], rcpt
        if "SMTP_OUTBOUND_MAX_ATTEMPTS" in case.settings:
            assert rcpt["attempts"] == case.settings["SMTP_OUTBOUND_MAX_ATTEMPTS"]
        elif case.status == "EXPIRED":
            assert rcpt["attempts"] >= 2

        # No suppression of the address or its domain, by any source ...
        rows = await stack.services.db.one(
            "SELECT scope, target, source FROM suppression WHERE org = $org", {"org": tenant.org})
        assert rows == []
        listing = await stack.api(SUPPS, key=tenant.key)
        assert listing["data"]["suppressions"]["edges"] == []
        # ... so the next message to the same address is queued for delivery, not skipped.
        again = await _send(stack, tenant, require_tls=case.require_tls)
        assert again["status"] == "QUEUED"
        assert again["recipients"] == [{"address": RCPT, "status": "QUEUED"}]
    if sink is not None:
        assert sink.messages == []
