"""Outbound settings over the real stack: per-domain TLS settings over GraphQL and the delivery
worker reading them; SMTP_OUTBOUND_RELAY (a smarthost) as a setting, through build_services and
the worker."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import dkim
import pytest

from tests.conftest import (
    SEND,
    Stack,
    make_settings,
    make_tenant,
    route_to_sink,
    run_stack,
    wait_status,
)
from tests.support.dnsserver import DnsServer
from tests.support.fixtures_dns import dkim_dnsfunc
from tests.support.fixtures_smtp import make_smtp_sink  # noqa: F401
from tests.support.smtpsink import SmtpSink, make_self_signed_context
from tests.support.testca import CertAuthority

# ruff: noqa: F811 - pytest injects the imported fixtures by parameter name.

SET = """
mutation S($d: String!, $v: Boolean) {
  setDomainOutboundTls(domain: $d, dnssecValidate: $v) {
    domain dnssecValidate errors { code field message }
  }
}"""


@pytest.mark.parametrize(("default", "override", "expected"), [
    ("true", None, True), ("true", False, False), ("false", True, True), ("false", None, False),
], ids=["default-on", "off-for-domain", "on-for-domain", "default-off"])
async def test_dnssec_override_reaches_the_worker(tmp_path: Any, dns_server: Any, default: str,
                                                  override: bool | None,
                                                  expected: bool) -> None:
    from tests.conftest import make_settings, run_stack

    settings = make_settings(tmp_path, dns_server, INBOX_DB_SYNC="false",
                             SMTP_OUTBOUND_DNSSEC_VALIDATE=default)
    async with run_stack(settings, dns_server, workers=False) as stack:
        tenant = await make_tenant(stack.services, dns_server)
        data = await stack.api(SET, {"d": tenant.domain, "v": override}, key=tenant.key)
        payload = data["data"]["setDomainOutboundTls"]
        assert payload["errors"] == [] and payload["dnssecValidate"] is override
        worker = stack.services.worker()
        job = {"org": tenant.org, "sending_domain": tenant.domain}
        assert await worker._dnssec(job) is expected


async def test_only_admins_of_the_owning_org(stack: Stack) -> None:
    a = await make_tenant(stack.services, stack.dns, "a.test", name="A")
    b = await make_tenant(stack.services, stack.dns, "b.test", name="B")
    reader = await make_tenant(stack.services, stack.dns, "c.test", name="C",
                               scopes=("send", "read"))
    crossed = await stack.api(SET, {"d": "a.test", "v": False}, key=b.key)
    assert [e["code"] for e in crossed["data"]["setDomainOutboundTls"]["errors"]] == ["NOT_FOUND"]
    denied = await stack.api(SET, {"d": "c.test", "v": False}, key=reader.key)
    assert denied["data"]["setDomainOutboundTls"]["errors"][0]["code"] == "FORBIDDEN"
    row = await stack.services.db.one("SELECT outbound_dnssec_validate FROM has_domain WHERE"
                                      " domain = 'a.test'")
    assert row[0].get("outbound_dnssec_validate") is None
    assert a.org != b.org


# -- SMTP_OUTBOUND_RELAY: everything through a smarthost -------------------------------------

RELAY_USER, RELAY_PASSWORD = "relayuser", "pa:ss@w0rd"  # ":" and "@" in the password parse


def _relay_sink(make_smtp_sink: Callable[..., SmtpSink], tmp_path: Path, *, tls: str
                ) -> tuple[SmtpSink, Path]:
    """A smarthost asking for AUTH, and a CA file for SMTP_OUTBOUND_CA_FILE. `tls`: "trusted"
    (STARTTLS with a test-CA certificate for 127.0.0.1, the relay's name in the setting),
    "self-signed" (a certificate nobody vouches for) or "none" (no STARTTLS)."""
    ca = CertAuthority.create()
    ca_file = tmp_path / "relay-ca.pem"
    ca_file.write_bytes(ca.root.cert_pem)
    context = None
    if tls == "trusted":
        context = ca.issue("relay.test", names=["127.0.0.1"]).server_context()
    elif tls == "self-signed":
        context = make_self_signed_context("127.0.0.1")
    sink = make_smtp_sink(tls_context=context, auth_users={RELAY_USER: RELAY_PASSWORD},
                          hostname="relay.test")
    return sink, ca_file


def _relay_settings(tmp_path: Path, dns: DnsServer, relay: SmtpSink, mx: SmtpSink,
                    ca_file: Path, **extra: Any) -> Any:
    return make_settings(
        tmp_path, dns, INBOX_DB_SYNC="false",
        SMTP_OUTBOUND_RELAY=f"{RELAY_USER}:{RELAY_PASSWORD}@127.0.0.1:{relay.port}",
        SMTP_OUTBOUND_CA_FILE=str(ca_file),
        SMTP_OUTBOUND_PORT=mx.port,  # where the MX hosts would be reached: unused
        **extra)


@pytest.mark.parametrize("process", ["off", "on"], ids=["in-process", "delivery-process"])
async def test_relay_setting_sends_everything_through_the_smarthost(
        tmp_path: Path, dns_server: DnsServer, make_smtp_sink: Callable[..., SmtpSink],
        process: str) -> None:
    relay, ca_file = _relay_sink(make_smtp_sink, tmp_path, tls="trusted")
    mx = make_smtp_sink()  # dest.test's real MX: must see nothing
    settings = _relay_settings(tmp_path, dns_server, relay, mx, ca_file,
                               SMTP_OUTBOUND_PROCESS=process)
    async with run_stack(settings, dns_server) as stack:
        tenant = await make_tenant(stack.services, dns_server)
        route_to_sink(dns_server, "dest.test")  # an MX that points elsewhere ...
        dns_server.add("nullmx.test", "MX", "0 .")  # ... one that accepts no mail (RFC 7505)
        # ... and nowhere.test, which has no DNS records at all.
        rcpts = ["a@dest.test", "b@nowhere.test", "c@nullmx.test"]
        data = await stack.api(SEND, {"from": f"hello@{tenant.domain}", "to": rcpts,
                                      "subject": "via the smarthost", "text": "t"},
                               key=tenant.key)
        payload = data["data"]["sendEmail"]
        assert payload["errors"] == [], payload
        msg = await wait_status(stack.api, tenant.key, payload["message"]["id"],
                                {"DELIVERED", "FAILED", "PARTIALLY_DELIVERED"}, timeout=30)
        assert {r["address"]: r["status"] for r in msg["recipients"]} == dict.fromkeys(
            rcpts, "DELIVERED"), msg
        received = await relay.wait_for(3)  # one job per recipient domain
    assert mx.messages == []
    assert sorted(r for m in received for r in m.rcpt_tos) == sorted(rcpts)
    dnsfunc = dkim_dnsfunc(dns_server)
    for message in received:
        assert message.auth_user == RELAY_USER  # AUTH with the setting's credentials ...
        assert message.tls is True  # ... only after STARTTLS
        assert message.mail_from == f"hello@{tenant.domain}"
        assert b"Subject: via the smarthost" in message.data
        verifier = dkim.DKIM(message.data)  # signed before it went to the smarthost
        assert verifier.verify(idx=0, dnsfunc=dnsfunc)
        assert verifier.verify(idx=1, dnsfunc=dnsfunc)


@pytest.mark.parametrize(("tls", "reason"), [
    ("none", "does not offer STARTTLS"),
    ("self-signed", "TLS handshake failed"),
], ids=["no-starttls", "untrusted-certificate"])
async def test_relay_credentials_never_go_in_the_clear_or_to_an_unverified_relay(
        tmp_path: Path, dns_server: DnsServer, make_smtp_sink: Callable[..., SmtpSink],
        tls: str, reason: str) -> None:
    # The relay's STARTTLS is mandatory and its certificate checked by default
    # (SMTP_OUTBOUND_RELAY_STARTTLS=true): a relay that cannot be verified is not used at all,
    # the message waits, and no MX is tried instead.
    relay, ca_file = _relay_sink(make_smtp_sink, tmp_path, tls=tls)
    mx = make_smtp_sink()
    settings = _relay_settings(tmp_path, dns_server, relay, mx, ca_file,
                               SMTP_OUTBOUND_PROCESS="off")
    async with run_stack(settings, dns_server) as stack:
        tenant = await make_tenant(stack.services, dns_server)
        route_to_sink(dns_server, "dest.test")
        data = await stack.api(SEND, {"from": f"hello@{tenant.domain}", "to": ["a@dest.test"],
                                      "subject": "s", "text": "t"}, key=tenant.key)
        msg = await wait_status(stack.api, tenant.key, data["data"]["sendEmail"]["message"]["id"],
                                {"DEFERRED"})
    [rcpt] = msg["recipients"]
    assert rcpt["lastResponse"].startswith("451 4.4.1") and reason in rcpt["lastResponse"], rcpt
    assert RELAY_PASSWORD not in rcpt["lastResponse"]
    assert relay.messages == [] and mx.messages == []


async def test_plaintext_relay_on_loopback(tmp_path: Path, dns_server: DnsServer,
                                           make_smtp_sink: Callable[..., SmtpSink]) -> None:
    """SMTP_OUTBOUND_RELAY_STARTTLS=false: a local MTA without TLS is a usable smarthost, with
    AUTH on loopback (nothing crosses a network)."""
    relay, ca_file = _relay_sink(make_smtp_sink, tmp_path, tls="none")
    mx = make_smtp_sink()
    settings = _relay_settings(tmp_path, dns_server, relay, mx, ca_file,
                               SMTP_OUTBOUND_PROCESS="off", SMTP_OUTBOUND_RELAY_STARTTLS="false")
    async with run_stack(settings, dns_server) as stack:
        tenant = await make_tenant(stack.services, dns_server)
        route_to_sink(dns_server, "dest.test")
        data = await stack.api(SEND, {"from": f"hello@{tenant.domain}", "to": ["a@dest.test"],
                                      "subject": "plain relay", "text": "t"}, key=tenant.key)
        msg = await wait_status(stack.api, tenant.key, data["data"]["sendEmail"]["message"]["id"],
                                {"DELIVERED", "FAILED"}, timeout=30)
        assert msg["recipients"][0]["status"] == "DELIVERED", msg
        [received] = await relay.wait_for(1)
    assert received.tls is False and received.auth_user == RELAY_USER
    assert received.rcpt_tos == ["a@dest.test"] and mx.messages == []


@pytest.mark.parametrize(("relay", "ok"), [
    ("user:pw@127.0.0.1:25", True), ("user:pw@[::1]:25", True), ("user:pw@localhost:25", True),
    ("mail.example.com:25", True),  # no credentials: nothing secret goes in the clear
    ("user:pw@mail.example.com:587", False), ("user:pw@192.0.2.7:25", False),
], ids=["v4-loopback", "v6-loopback", "localhost", "no-credentials", "remote-name",
        "remote-address"])
def test_plaintext_relay_never_carries_a_password_off_the_machine(relay: str, ok: bool) -> None:
    from inbox.config import load_settings
    from inbox.errors import ConfigError

    values = {"SMTP_OUTBOUND_RELAY": relay, "SMTP_OUTBOUND_RELAY_STARTTLS": "false"}
    if ok:
        assert load_settings(env={}, **values).SMTP_OUTBOUND_RELAY_STARTTLS is False
        return
    with pytest.raises(ConfigError) as caught:
        load_settings(env={}, **values)
    text = str(caught.value)
    assert text.startswith("SMTP_OUTBOUND_RELAY_STARTTLS:") and "in the clear" in text
    assert "pw" not in text.split(":", 1)[1]
