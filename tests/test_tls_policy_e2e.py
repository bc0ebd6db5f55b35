"""Outbound TLS policy end to end (issue 4, proof): GraphQL sendEmail → queue → worker →
TlsPolicyPlanner → SmtpTransport → a real STARTTLS SMTP server, with every answer coming from
really signed DNS validated by a real `unbound`.

Peers, all on 127.0.0.1:
* `dane.test` is a signed zone (tests/support/dnssec.py), served with RRSIGs and NSEC proofs
  by our authoritative test server; `plain.test` is unsigned. The stack's resolver asks only
  unbound, so `authenticated` is unbound's AD bit (RFC 6698 §4.1).
* Every MX host has the address 127.0.0.1 and the transport connects to SMTP_OUTBOUND_PORT,
  where an aiosmtpd sink offers STARTTLS and presents a certificate chosen by SNI (= the MX
  host name): a self-signed DANE-EE leaf by default, test-CA leaves for the MTA-STS hosts.
* MTA-STS policies are served by a real HTTPS server on the test CA (MtaStsResolver given its
  port and the CA file; production uses 443 and the system store).

Assertions use only what a user sees (message status, recipients, events with their `tls`) and
what the sink received; TLS-RPT counters and the daily report are read back from the database
and from the delivered report mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import gzip
import hashlib
import json
import re
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy as email_policy
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSmtp

from inbox.app import running_workers
from inbox.delivery import tlsrpt
from inbox.delivery.mtasts import MtaStsResolver
from inbox.delivery.tlsrpt_report import TlsReportConfig, send_reports
from inbox.resolver import Resolver
from inbox.storage import Database
from tests.conftest import SEND, Stack, Tenant, make_settings, make_tenant, run_stack
from tests.support.dnssec import SignedDnsServer, Unbound, ZoneKey, sign_zone
from tests.support.fixtures_smtp import make_smtp_sink  # noqa: F401
from tests.support.https_server import HttpsServer
from tests.support.procs import free_port
from tests.support.smtpsink import SmtpSink
from tests.support.testca import CertAuthority, Issued, self_signed

pytestmark = pytest.mark.skipif(not Unbound.available(),
                                reason="unbound (Debian package) is not installed")

STS_PATH = "/.well-known/mta-sts.txt"
# MTA-STS policy domains (each gets mta-sts.<domain> on the HTTPS server's certificate).
STS_DOMAINS = ("stsok.plain.test", "stsmx.plain.test", "stscert.plain.test",
               "stscache.plain.test")

MESSAGE_TLS = """
query M($id: ID!) {
  message(id: $id) {
    id status
    recipients { address status attempts lastResponse }
    events { type recipient detail tls { mx used version cipher policy verified reason } }
  }
}
"""


SEND_REQUIRE_TLS = """
mutation Send($from: String!, $to: [String!], $subject: String!, $text: String,
              $requireTls: Boolean) {
  sendEmail(from: $from, to: $to, subject: $subject, textBody: $text, requireTls: $requireTls) {
    message { id status }
    errors { code field message }
  }
}
"""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- peers shared by the module: PKI, signed DNS + unbound, HTTPS ----------------------------


@dataclass(frozen=True)
class Pki:
    ee: Issued  # self-signed DANE-EE leaf: what the sink presents by default
    stranger: Issued  # a key no TLSA record or CA vouches for
    ca: CertAuthority  # the test CA behind SMTP_OUTBOUND_CA_FILE (PKIX, MTA-STS)
    ca_file: Path
    sts_leaves: dict[str, Issued]  # MX host -> a test-CA leaf valid for it


@dataclass
class Env:
    pki: Pki
    dns: SignedDnsServer
    unbound: Unbound
    https: HttpsServer


SIGNED_ZONE = """
@ 3600 IN SOA ns hostmaster 1 3600 600 86400 60
@ NS ns
ns A 127.0.0.1
; dane.test: DANE-EE 3 1 1 matching the sink's default certificate
@ MX 10 mx
mx A 127.0.0.1
_25._tcp.mx TLSA 3 1 1 {ee}
; mismatch.dane.test: the TLSA record names another key
mismatch MX 10 mx.mismatch
mx.mismatch A 127.0.0.1
_25._tcp.mx.mismatch TLSA 3 1 1 {stranger}
; notlsa.dane.test: signed, no TLSA (NODATA proven by NSEC)
notlsa MX 10 mx.notlsa
mx.notlsa A 127.0.0.1
; rpt.dane.test: DANE-EE, and asks for TLS reports
rpt MX 10 mx
_smtp._tls.rpt TXT "v=TLSRPTv1; rua=mailto:tlsrpt@reports.plain.test"
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    ca = CertAuthority.create()
    ca_file = tmp_path_factory.mktemp("ca") / "root.pem"
    ca_file.write_bytes(ca.root.cert_pem)
    pki = Pki(ee=self_signed("mx.dane.test"), stranger=self_signed("stranger.test"), ca=ca,
              ca_file=ca_file,
              sts_leaves={"mx.stsok.plain.test": ca.issue("mx.stsok.plain.test"),
                          "mx.stscache.plain.test": ca.issue("mx.stscache.plain.test")})
    key = ZoneKey.generate()
    zone = sign_zone("dane.test", SIGNED_ZONE.format(ee=sha256(pki.ee.spki_der),
                                                     stranger=sha256(pki.stranger.spki_der)),
                     key)
    server = SignedDnsServer()
    server.start()
    server.load_signed_zone(zone)
    server.load_zone_text("plain.test", """
        @ 3600 IN SOA ns hostmaster 1 3600 600 86400 0
    """)
    https = HttpsServer(ca, [f"mta-sts.{d}" for d in STS_DOMAINS]).start()
    unbound = Unbound(server, anchors=[key.trust_anchor("dane.test")],
                      stub_zones=["dane.test", "plain.test"],
                      workdir=tmp_path_factory.mktemp("unbound"))
    try:
        with unbound:
            yield Env(pki, server, unbound, https)
    finally:
        https.close()
        server.stop()
    assert not server.errors, "DNS server errors:\n" + "\n".join(server.errors)
    assert not https.errors, "HTTPS server errors:\n" + "\n".join(https.errors)


def plain(env: Env, name: str, rtype: str, value: str) -> None:
    """An unsigned record under plain.test, TTL 0 so unbound never answers from its cache."""
    env.dns.add(name, rtype, value, ttl=0)


def plain_mx(env: Env, domain: str, host: str | None = None) -> str:
    host = host or f"mx.{domain}"
    plain(env, domain, "MX", f"10 {host}.")
    plain(env, host, "A", "127.0.0.1")
    return host


def sts(env: Env, domain: str, policy_id: str, *, mode: str = "enforce",
        mx: tuple[str, ...] = ()) -> None:
    """Publish (or replace) the MTA-STS TXT record and policy of `domain` (RFC 8461 §3)."""
    env.dns.remove(f"_mta-sts.{domain}", "TXT")
    plain(env, f"_mta-sts.{domain}", "TXT", f"v=STSv1; id={policy_id};")
    env.dns.remove(f"mta-sts.{domain}", "A")
    plain(env, f"mta-sts.{domain}", "A", "127.0.0.1")
    body = f"version: STSv1\nmode: {mode}\n" + "".join(f"mx: {m}\n" for m in mx) + \
        "max_age: 86400\n"
    env.https.route(STS_PATH, body, host=f"mta-sts.{domain}")


def sni_context(default: Issued, by_name: dict[str, Issued]) -> ssl.SSLContext:
    """A server context presenting `default`, or the leaf for the SNI name when there is one."""
    contexts = {name: leaf.server_context() for name, leaf in by_name.items()}
    base = default.server_context()

    def pick(sock: Any, name: str | None, _context: ssl.SSLContext) -> None:
        if name in contexts:
            sock.context = contexts[name]

    base.sni_callback = pick
    return base


@pytest.fixture
def tls_sink(env: Env, make_smtp_sink: Callable[..., SmtpSink]  # noqa: F811
             ) -> SmtpSink:
    return make_smtp_sink(tls_context=sni_context(env.pki.ee, env.pki.sts_leaves))


@contextlib.asynccontextmanager
async def tls_stack(env: Env, tmp_path: Path, port: int, *, workers: bool = True,
                    **overrides: Any) -> AsyncIterator[tuple[Stack, Tenant]]:
    """The app (with workers unless told), resolving through unbound, delivering to the SMTP
    server on `port`; yields the stack and a tenant (sending domain sender.test)."""
    settings = make_settings(
        tmp_path, None, INBOX_DNS_NAMESERVERS=env.unbound.address,
        SMTP_OUTBOUND_PORT=port, INBOX_DB_SYNC="false",
        SMTP_OUTBOUND_CA_FILE=str(env.pki.ca_file), SMTP_OUTBOUND_TIMEOUT_SECS=3,
        SMTP_OUTBOUND_RETRY_BASE_DELAY_SECS=30, SMTP_OUTBOUND_RETRY_MAX_DELAY_SECS=30,
        **overrides)
    resolver = Resolver([env.unbound.address], timeout=3, cache=False)
    db = Database(settings.database_url, namespace=settings.DATABASE_NAMESPACE,
                  database=settings.DATABASE_DATABASE, sync=False)
    await db.connect()
    # Two things production gets from its defaults: port 443 and the system trust store.
    mtasts = MtaStsResolver(db, resolver, clock=lambda: datetime.now(UTC),
                            https_port=env.https.port, ca_file=str(env.pki.ca_file), timeout=3)
    try:
        async with run_stack(settings, env.dns, workers=workers, db=db, resolver=resolver,
                             mtasts=mtasts) as stack:
            yield stack, await make_tenant(stack.services, env.dns)
    finally:
        await db.close()  # run_stack closes it too; closing twice is harmless


async def send(stack: Stack, tenant: Tenant, to: str, *, require_tls: bool = False) -> str:
    variables: dict[str, Any] = {"from": f"hello@{tenant.domain}", "to": [to], "subject": "TLS",
                                 "text": "policy test"}
    query = SEND
    if require_tls:
        query, variables["requireTls"] = SEND_REQUIRE_TLS, True
    result = await stack.api(query, variables, key=tenant.key)
    assert "errors" not in result, result
    payload = result["data"]["sendEmail"]
    assert payload["errors"] == [], payload
    stack.services.wakeup.set()
    return str(payload["message"]["id"])


async def wait_message(stack: Stack, tenant: Tenant, message_id: str, statuses: set[str],
                       timeout: float = 15.0) -> dict[str, Any]:
    """Poll until every recipient is in one of `statuses` and an attempt left an event."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        data = await stack.api(MESSAGE_TLS, {"id": message_id}, key=tenant.key)
        assert "errors" not in data, data
        msg = data["data"]["message"]
        if msg and attempt_event(msg) is not None and (
                {r["status"] for r in msg["recipients"]} <= statuses):
            return msg
        if loop.time() > deadline:
            raise AssertionError(f"message stayed {msg and msg['status']}: {msg}")
        await asyncio.sleep(0.05)


def attempt_event(msg: dict[str, Any]) -> dict[str, Any] | None:
    events = [e for e in msg["events"] if e["type"] in ("DELIVERED", "DEFERRED", "BOUNCED")]
    return events[-1] if events else None


async def supports_require_tls(stack: Stack) -> bool:
    data = await stack.api('{ __type(name: "Mutation") { fields { name args { name } } } }')
    fields = {f["name"]: {a["name"] for a in f["args"]} for f in data["data"]["__type"]["fields"]}
    return "requireTls" in fields.get("sendEmail", set())


# -- 1-4: DANE (RFC 7672) -------------------------------------------------------------------


async def test_dane_ee_match_delivers_over_verified_tls(env: Env, tmp_path: Path,
                                                        tls_sink: SmtpSink) -> None:
    async with tls_stack(env, tmp_path, tls_sink.port) as (stack, tenant):
        msg_id = await send(stack, tenant, "alice@dane.test")
        msg = await wait_message(stack, tenant, msg_id, {"DELIVERED"})
    tls = attempt_event(msg)["tls"]  # type: ignore[index]
    assert tls["mx"] == "mx.dane.test" and tls["used"] is True
    assert tls["policy"] == "dane" and tls["verified"] is True
    assert tls["version"] in ("TLSv1.2", "TLSv1.3") and tls["cipher"]
    assert tls["reason"] and tls["reason"].endswith("matched")  # the DANE-EE record
    received = tls_sink.messages
    assert len(received) == 1 and received[0].tls and received[0].rcpt_tos == ["alice@dane.test"]


@pytest.mark.parametrize(("rcpt", "settings", "reason"), [
    ("bob@mismatch.dane.test", {}, "DANE"),
    ("carol@notlsa.dane.test", {"SMTP_OUTBOUND_DANE_MODE": "require"}, "DANE required"),
], ids=["tlsa-mismatch", "dane-required-no-tlsa"])
async def test_dane_failure_defers_without_plaintext(env: Env, tmp_path: Path,
                                                     tls_sink: SmtpSink, rcpt: str,
                                                     settings: dict[str, Any],
                                                     reason: str) -> None:
    async with tls_stack(env, tmp_path, tls_sink.port, **settings) as (stack, tenant):
        msg_id = await send(stack, tenant, rcpt)
        msg = await wait_message(stack, tenant, msg_id, {"DEFERRED"})
        await asyncio.sleep(0.2)  # nothing else happens meanwhile (no plaintext retry)
    [recipient] = msg["recipients"]
    assert recipient["status"] == "DEFERRED" and recipient["lastResponse"].startswith("451")
    assert reason in recipient["lastResponse"]
    tls = attempt_event(msg)["tls"]  # type: ignore[index]
    assert tls["used"] is False and tls["policy"] == "dane" and reason in (tls["reason"] or "")
    assert tls_sink.messages == []


async def test_tls_required_no_header_ignores_the_recipients_policy(
        env: Env, tmp_path: Path, tls_sink: SmtpSink) -> None:
    """RFC 8689 §5: a message carrying "TLS-Required: No" (as TLS-RPT reports do, RFC 8460
    §5.3) is delivered even where DANE would defer it; the same message without it is not."""
    async with tls_stack(env, tmp_path, tls_sink.port) as (stack, tenant):
        variables: dict[str, Any] = {
            "from": f"hello@{tenant.domain}", "to": ["bob@mismatch.dane.test"],
            "subject": "report", "text": "policy test",
            "headers": [{"name": "TLS-Required", "value": "No"}]}
        result = await stack.api(SEND, variables, key=tenant.key)
        payload = result["data"]["sendEmail"]
        assert payload["errors"] == [], payload
        stack.services.wakeup.set()
        msg = await wait_message(stack, tenant, payload["message"]["id"], {"DELIVERED"})
    tls = attempt_event(msg)["tls"]  # type: ignore[index]
    assert tls["policy"] == "opportunistic" and tls["verified"] is False
    assert len(tls_sink.messages) == 1


async def test_tlsa_in_unsigned_zone_is_ignored(env: Env, tmp_path: Path,
                                                tls_sink: SmtpSink) -> None:
    """RFC 7672 §2.2: TLSA records in an insecure zone do not count. This one names a key the
    sink does not have, so honouring it would fail the delivery."""
    host = plain_mx(env, "insecure.plain.test")
    plain(env, f"_25._tcp.{host}", "TLSA", f"3 1 1 {sha256(env.pki.stranger.spki_der)}")
    async with tls_stack(env, tmp_path, tls_sink.port) as (stack, tenant):
        msg_id = await send(stack, tenant, "dave@insecure.plain.test")
        msg = await wait_message(stack, tenant, msg_id, {"DELIVERED"})
    tls = attempt_event(msg)["tls"]  # type: ignore[index]
    assert tls["used"] is True and tls["policy"] == "opportunistic" and tls["verified"] is False
    assert len(tls_sink.messages) == 1 and tls_sink.messages[0].tls


# -- 5, 7: MTA-STS (RFC 8461) ---------------------------------------------------------------


@pytest.mark.parametrize(("domain", "policy_mx", "status", "reason"), [
    ("stsok.plain.test", "mx.stsok.plain.test", "DELIVERED", None),
    ("stsmx.plain.test", "mail.elsewhere.test", "DEFERRED", "not an MX host listed"),
    # The sink presents a self-signed certificate for this MX name: PKIX fails.
    ("stscert.plain.test", "*.stscert.plain.test", "DEFERRED", "certificate verify failed"),
], ids=["matching-mx-valid-cert", "mx-not-in-policy", "cert-not-trusted"])
async def test_mta_sts_enforce(env: Env, tmp_path: Path, tls_sink: SmtpSink, domain: str,
                               policy_mx: str, status: str, reason: str | None) -> None:
    plain_mx(env, domain)
    sts(env, domain, "20260101", mx=(policy_mx,))
    async with tls_stack(env, tmp_path, tls_sink.port) as (stack, tenant):
        msg_id = await send(stack, tenant, f"erin@{domain}")
        msg = await wait_message(stack, tenant, msg_id, {status})
    tls = attempt_event(msg)["tls"]  # type: ignore[index]
    assert tls["policy"] == "mta-sts" and tls["mx"] == f"mx.{domain}"
    if reason is None:
        assert tls["used"] is True and tls["verified"] is True and tls["version"]
        assert len(tls_sink.messages) == 1 and tls_sink.messages[0].tls
    else:
        assert tls["used"] is False and tls["verified"] is False and reason in tls["reason"]
        assert reason in msg["recipients"][0]["lastResponse"]
        assert tls_sink.messages == []


async def test_mta_sts_cache_is_shared_and_refreshed_by_id(env: Env, tmp_path: Path,
                                                          tls_sink: SmtpSink) -> None:
    """RFC 8461 §5.1: the policy fetched for one delivery is cached in the database, where
    another instance's resolver finds it; a new TXT id makes the next delivery fetch again."""
    domain = "stscache.plain.test"
    host = f"mta-sts.{domain}"
    plain_mx(env, domain)
    sts(env, domain, "one", mx=(f"mx.{domain}",))
    async with tls_stack(env, tmp_path, tls_sink.port) as (stack, tenant):
        other = MtaStsResolver(stack.services.db, stack.services.resolver,
                               clock=lambda: datetime.now(UTC), https_port=env.https.port,
                               ca_file=str(env.pki.ca_file), timeout=3)
        first = await send(stack, tenant, f"fay@{domain}")
        await wait_message(stack, tenant, first, {"DELIVERED"})
        assert env.https.count(STS_PATH, host) == 1
        cached = await other.policy(domain)  # the second instance: from the shared cache
        assert cached is not None and cached.id == "one" and cached.mode == "enforce"
        second = await send(stack, tenant, f"gus@{domain}")
        await wait_message(stack, tenant, second, {"DELIVERED"})
        assert env.https.count(STS_PATH, host) == 1  # same id: nobody fetched again

        sts(env, domain, "two", mx=("mx.moved.plain.test",))
        third = await send(stack, tenant, f"hal@{domain}")
        msg = await wait_message(stack, tenant, third, {"DEFERRED"})
        assert env.https.count(STS_PATH, host) == 2
        assert "not an MX host listed" in msg["recipients"][0]["lastResponse"]
        refreshed = await other.policy(domain)
        assert refreshed is not None and refreshed.id == "two"
        assert refreshed.mx == ("mx.moved.plain.test",)
        assert env.https.count(STS_PATH, host) == 2  # the other instance read the new row
    assert len(tls_sink.messages) == 2


# -- 6, 8: TLS-RPT (RFC 8460) -----------------------------------------------------------------


@pytest.mark.parametrize("settings", [
    {"SMTP_OUTBOUND_TLS_MODE": "required"},
    {"SMTP_OUTBOUND_REQUIRE_STARTTLS": "true"},
], ids=["tls-mode-required", "require-starttls"])
async def test_starttls_not_offered_defers_and_is_reported(
        env: Env, tmp_path: Path, make_smtp_sink: Callable[..., SmtpSink],  # noqa: F811
        settings: dict[str, Any]) -> None:
    domain = "rpt6.plain.test"
    host = plain_mx(env, domain)
    env.dns.remove(f"_smtp._tls.{domain}", "TXT")
    plain(env, f"_smtp._tls.{domain}", "TXT", "v=TLSRPTv1; rua=mailto:rpt@reports.plain.test")
    sink = make_smtp_sink()  # no STARTTLS
    async with tls_stack(env, tmp_path, sink.port, **settings) as (stack, tenant):
        msg_id = await send(stack, tenant, f"ida@{domain}")
        msg = await wait_message(stack, tenant, msg_id, {"DEFERRED"})
        rows = await tlsrpt.counters(stack.services.db, day=stack.services.clock().date(),
                                     policy_domain=domain)
    tls = attempt_event(msg)["tls"]  # type: ignore[index]
    assert tls["used"] is False and tls["policy"] == "required"
    assert "does not offer STARTTLS" in tls["reason"]
    assert sink.messages == []
    assert [(r["policy_type"], r["mx_host"], r["success"], r["result_type"], r["n"])
            for r in rows] == [("no-policy-found", host, False, "starttls-not-supported", 1)]
    assert rows[0]["receiving_ip"] == "127.0.0.1"


async def test_daily_report_is_mailed_through_our_queue(env: Env, tmp_path: Path,
                                                       tls_sink: SmtpSink) -> None:
    """A day's traffic to rpt.dane.test (DANE; `_smtp._tls` names a mailto: rua): one session
    whose certificate does not match the TLSA record, one that does. The day's report is
    queued as mail from the operator's domain, delivered, and counts both sessions."""
    plain_mx(env, "reports.plain.test")
    good = tls_sink.tls_context
    async with tls_stack(env, tmp_path, tls_sink.port) as (stack, tenant):
        tls_sink.tls_context = env.pki.stranger.server_context()
        failed = await send(stack, tenant, "jo@rpt.dane.test")
        await wait_message(stack, tenant, failed, {"DEFERRED"})
        tls_sink.tls_context = good
        ok = await send(stack, tenant, "kim@rpt.dane.test")
        await wait_message(stack, tenant, ok, {"DELIVERED"})
        day = stack.services.clock().date()
        config = TlsReportConfig(report_dir=tmp_path / "tlsrpt", organization_name="Inbox Test",
                                 contact_info=f"tlsrpt@{tenant.domain}",
                                 from_address=f"tlsrpt@{tenant.domain}", operator_org=tenant.org)
        outcomes = await send_reports(stack.services, day=day, config=config)
        assert [(o.policy_domain, o.status) for o in outcomes] == [("rpt.dane.test", "sent")]
        [delivery] = outcomes[0].deliveries
        assert delivery.ok and delivery.message_id
        report_msg = await wait_message(stack, tenant, delivery.message_id, {"DELIVERED"})
    assert attempt_event(report_msg)["tls"]["mx"] == "mx.reports.plain.test"  # type: ignore[index]
    mails = [m for m in tls_sink.messages if m.rcpt_tos == ["tlsrpt@reports.plain.test"]]
    assert len(mails) == 1
    parsed = email.message_from_bytes(mails[0].data, policy=email_policy.default)
    assert parsed["TLS-Report-Domain"] == "rpt.dane.test"
    assert parsed["DKIM-Signature"] is not None  # it went through the normal delivery path
    [part] = [p for p in parsed.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    report = json.loads(gzip.decompress(part.get_content()))
    assert report["report-id"] == outcomes[0].report_id
    [policy] = report["policies"]
    assert policy["policy"]["policy-type"] == "tlsa"
    assert policy["policy"]["policy-domain"] == "rpt.dane.test"
    assert policy["policy"]["mx-host"] == ["mx.dane.test"]
    assert policy["summary"] == {"total-successful-session-count": 1,
                                 "total-failure-session-count": 1}
    [detail] = policy["failure-details"]
    assert detail["result-type"] == "validation-failure"
    assert detail["receiving-mx-hostname"] == "mx.dane.test"
    assert detail["failed-session-count"] == 1


# -- 9: REQUIRETLS (RFC 8689) -----------------------------------------------------------------


class _RequireTlsSmtp(AioSmtp):
    """aiosmtpd plus the REQUIRETLS MAIL parameter (RFC 8689 §3), which it would refuse."""

    requiretls = False

    async def smtp_MAIL(self, arg: str | None) -> None:
        self.requiretls = bool(arg and _REQUIRETLS.search(arg))
        await super().smtp_MAIL(_REQUIRETLS.sub("", arg) if arg else arg)


_REQUIRETLS = re.compile(r"\s+REQUIRETLS(?=\s|$)", re.IGNORECASE)


class RequireTlsServer:
    """A STARTTLS SMTP server that advertises REQUIRETLS once TLS is on (RFC 8689 §3) and
    records (mail options, REQUIRETLS given, TLS used, recipients) per accepted message."""

    def __init__(self, tls_context: ssl.SSLContext) -> None:
        self.tls_context = tls_context
        self.received: list[tuple[bool, bool, list[str]]] = []
        self.port = free_port()
        server = self

        class Ctl(Controller):
            def factory(self) -> AioSmtp:
                return _RequireTlsSmtp(self.handler, hostname="requiretls.test",
                                       tls_context=server.tls_context)

        self.controller = Ctl(self, hostname="127.0.0.1", port=self.port, ready_timeout=5)

    async def handle_EHLO(self, server: AioSmtp, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        if session.ssl is not None:
            responses.insert(-1, "250-REQUIRETLS")
        return responses

    async def handle_DATA(self, server: AioSmtp, session: Any, envelope: Any) -> str:
        assert isinstance(server, _RequireTlsSmtp)
        self.received.append((server.requiretls, session.ssl is not None,
                              list(envelope.rcpt_tos)))
        return "250 2.0.0 OK"


@pytest.fixture
def requiretls_server(env: Env) -> Iterator[RequireTlsServer]:
    server = RequireTlsServer(sni_context(env.pki.ee, {}))
    server.controller.start()
    try:
        yield server
    finally:
        server.controller.stop()


async def _send_require_tls(stack: Stack, tenant: Tenant, to: str) -> str:
    """sendEmail(requireTls: true), or, on a schema without it, the flag set on the stored
    message before any worker runs (the worker reads it from the message row)."""
    if await supports_require_tls(stack):
        return await send(stack, tenant, to, require_tls=True)
    msg_id = await send(stack, tenant, to)
    await stack.services.db.run("UPDATE type::thing('message', $m) SET require_tls = true;",
                                {"m": msg_id})
    return msg_id


@pytest.mark.parametrize(("rcpt", "peer", "status", "reason"), [
    ("lee@dane.test", "sink", "BOUNCED", "does not support REQUIRETLS"),
    ("max@rtls.plain.test", "sink", "BOUNCED", "REQUIRETLS: no DNSSEC-validated MX"),
    ("ned@dane.test", "requiretls", "DELIVERED", None),
], ids=["dane-host-without-requiretls", "unauthenticated-mx-no-policy",
        "dane-host-with-requiretls"])
async def test_requiretls(env: Env, tmp_path: Path, tls_sink: SmtpSink,
                          requiretls_server: RequireTlsServer, rcpt: str, peer: str,
                          status: str, reason: str | None) -> None:
    plain_mx(env, "rtls.plain.test")
    port = tls_sink.port if peer == "sink" else requiretls_server.port
    async with tls_stack(env, tmp_path, port, workers=False) as (stack, tenant):
        msg_id = await _send_require_tls(stack, tenant, rcpt)
        async with running_workers(stack.services):
            msg = await wait_message(stack, tenant, msg_id, {status})
    [recipient] = msg["recipients"]
    tls = attempt_event(msg)["tls"]  # type: ignore[index]
    if reason is None:
        assert requiretls_server.received == [(True, True, [rcpt])]
        assert tls["policy"] == "dane" and tls["verified"] is True
        return
    # RFC 8689 §4.2.1: no plaintext, no unverified TLS, no next hop that drops the demand.
    assert recipient["lastResponse"].startswith("550 5.7.30")
    assert reason in recipient["lastResponse"] and reason in tls["reason"]
    assert tls_sink.messages == [] and requiretls_server.received == []
