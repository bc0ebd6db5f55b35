"""SMTP TLS Reporting (RFC 8460) over real peers: the embedded database, the loopback DNS
server, our queue + worker delivering to an SMTP sink, and an HTTPS server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import email
import gzip
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from email import policy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dkim
import jsonschema
import pytest

from inbox.delivery.tlsrpt import (
    RESULT_TYPES,
    build_report,
    counters,
    parse_record,
    record,
    select_record,
)
from inbox.delivery.tlsrpt_report import (
    MEDIA_TYPE,
    TlsReportConfig,
    run_daily,
    send_reports,
)
from inbox.errors import ValidationError
from inbox.resolver import Resolver
from inbox.storage import Database
from tests.conftest import make_settings, make_tenant, route_to_sink, run_stack
from tests.support.dnsserver import DnsServer
from tests.support.fixtures_dns import dkim_dnsfunc
from tests.support.smtpsink import make_self_signed_cert, make_self_signed_context

SCHEMA = json.loads((Path(__file__).parent / "data" / "tlsrpt-schema.json").read_text())
DAY = date(2024, 5, 1)
STS = ["version: STSv1", "mode: enforce", "mx: mx1.dest.test", "mx: *.backup.dest.test",
       "max_age: 86400"]


def validate(report: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(
        SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER).validate(report)


@pytest.fixture
async def db() -> AsyncIterator[Database]:
    database = Database("mem://", namespace="t", database="t")
    await database.connect()
    try:
        yield database
    finally:
        await database.close()


@dataclass
class HttpsSink:
    """A real HTTPS server on 127.0.0.1 (its own certificate for `hostname` and 127.0.0.1)
    that records each request and answers `status`."""

    hostname: str
    ca_file: Path
    status: str = "200 OK"
    requests: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    server: Any = None

    async def start(self) -> HttpsSink:
        cert, key = make_self_signed_cert(self.hostname)
        self.ca_file.write_bytes(cert)
        context = make_self_signed_context(self.hostname, (cert, key))
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = (await reader.readline()).decode().strip()
            headers: dict[str, str] = {}
            while (line := (await reader.readline()).decode().strip()):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append({"line": request_line, "headers": headers, "body": body})
            writer.write(f"HTTP/1.1 {self.status}\r\nLocation: https://elsewhere.test/\r\n"
                         "Content-Length: 2\r\nConnection: close\r\n\r\nok".encode())
            await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def https_sink(tmp_path: Path) -> AsyncIterator[HttpsSink]:
    sink = await HttpsSink("reports.test", tmp_path / "https-ca.pem").start()
    try:
        yield sink
    finally:
        await sink.stop()


def light_services(db: Database, dns: DnsServer) -> Any:
    """What send_reports needs when no mail is queued: a database, a resolver and a clock."""
    return SimpleNamespace(db=db, resolver=Resolver([dns.address], timeout=2, cache=False),
                           settings=None, clock=lambda: datetime.now(UTC))


def config(tmp_path: Path, **kw: Any) -> TlsReportConfig:
    values: dict[str, Any] = {"report_dir": tmp_path / "reports",
                              "organization_name": "Inbox Test Operator",
                              "contact_info": "tlsrpt@operator.test",
                              "submitter": "operator.test", "https_timeout": 5.0}
    values.update(kw)
    return TlsReportConfig(**values)


async def some_traffic(db: Database, domain: str = "dest.test", day: date = DAY) -> None:
    await record(db, day=day, policy_domain=domain, policy_type="sts", policy_strings=STS,
                 mx_host="mx1.dest.test", success=True)
    await record(db, day=day, policy_domain=domain, policy_type="sts", policy_strings=STS,
                 mx_host="mx1.dest.test", success=False, result_type="certificate-expired",
                 sending_ip="192.0.2.1", receiving_ip="198.51.100.7",
                 receiving_mx_helo="mx1.dest.test", failure_reason="X509_V_ERR_CERT_HAS_EXPIRED")


# --- counting and the report -------------------------------------------------------------------

async def test_concurrent_record_calls_add_up(db: Database) -> None:
    calls = (
        [dict(policy_type="sts", policy_strings=STS, mx_host="mx1.dest.test", success=True)] * 120
        + [dict(policy_type="sts", policy_strings=STS, mx_host="MX1.dest.test.", success=False,
                result_type="certificate-expired", sending_ip="192.0.2.1",
                receiving_ip="198.51.100.7")] * 45
        + [dict(policy_type="sts", policy_strings=STS, mx_host="mx2.backup.dest.test",
                success=False, result_type="starttls-not-supported", sending_ip="192.0.2.1",
                receiving_ip="198.51.100.8")] * 25
        + [dict(policy_type="no-policy-found", policy_strings=[], mx_host="mx1.dest.test",
                success=True)] * 10
    )
    await asyncio.gather(*(record(db, day=DAY, policy_domain="Dest.Test", **c)  # type: ignore[arg-type]
                           for c in calls))
    report = await build_report(db, policy_domain="dest.test", day=DAY,
                                organization_name="Op", contact_info="a@op.test",
                                report_id="r1@op.test")
    validate(report)
    by_type = {p["policy"]["policy-type"]: p for p in report["policies"]}
    sts = by_type["sts"]
    assert sts["summary"] == {"total-successful-session-count": 120,
                              "total-failure-session-count": 70}
    assert {(d["result-type"], d["failed-session-count"]) for d in sts["failure-details"]} == {
        ("certificate-expired", 45), ("starttls-not-supported", 25)}
    assert by_type["no-policy-found"]["summary"] == {"total-successful-session-count": 10,
                                                     "total-failure-session-count": 0}
    assert "failure-details" not in by_type["no-policy-found"]
    assert len(await counters(db, day=DAY)) == 4  # one row per distinct outcome


async def test_report_validates_against_rfc8460_structure(db: Database) -> None:
    await some_traffic(db)
    for _ in range(3):
        await record(db, day=DAY, policy_domain="dest.test", policy_type="tlsa",
                     policy_strings=["3 1 1 0123abcd"], mx_host="mx1.dest.test", success=False,
                     result_type="tlsa-invalid", sending_ip="2001:db8::1",
                     receiving_ip="2001:db8::25")
    await record(db, day=DAY, policy_domain="dest.test", policy_type="no-policy-found",
                 policy_strings=[], mx_host="mx9.dest.test", success=False)  # → catch-all
    # Other days and other domains stay out of the report.
    await some_traffic(db, day=DAY + timedelta(days=1))
    await some_traffic(db, domain="other.test")

    report = await build_report(db, policy_domain="dest.test", day=DAY,
                                organization_name="Inbox Test Operator",
                                contact_info="tlsrpt@operator.test",
                                report_id="20240501.dest.test@operator.test")
    validate(report)
    assert report["date-range"] == {"start-datetime": "2024-05-01T00:00:00Z",
                                    "end-datetime": "2024-05-01T23:59:59Z"}
    assert report["organization-name"] == "Inbox Test Operator"
    assert report["report-id"] == "20240501.dest.test@operator.test"
    assert report["policies"] == [
        {"policy": {"policy-type": "no-policy-found", "policy-domain": "dest.test",
                    "mx-host": ["mx9.dest.test"]},
         "summary": {"total-successful-session-count": 0, "total-failure-session-count": 1},
         "failure-details": [{"result-type": "validation-failure",
                              "receiving-mx-hostname": "mx9.dest.test",
                              "failed-session-count": 1}]},
        {"policy": {"policy-type": "sts", "policy-string": STS, "policy-domain": "dest.test",
                    "mx-host": ["mx1.dest.test", "*.backup.dest.test"]},
         "summary": {"total-successful-session-count": 1, "total-failure-session-count": 1},
         "failure-details": [{"result-type": "certificate-expired", "sending-mta-ip": "192.0.2.1",
                              "receiving-mx-hostname": "mx1.dest.test",
                              "receiving-mx-helo": "mx1.dest.test",
                              "receiving-ip": "198.51.100.7", "failed-session-count": 1,
                              "failure-reason-code": "X509_V_ERR_CERT_HAS_EXPIRED"}]},
        {"policy": {"policy-type": "tlsa", "policy-string": ["3 1 1 0123abcd"],
                    "policy-domain": "dest.test", "mx-host": ["mx1.dest.test"]},
         "summary": {"total-successful-session-count": 0, "total-failure-session-count": 3},
         "failure-details": [{"result-type": "tlsa-invalid", "sending-mta-ip": "2001:db8::1",
                              "receiving-mx-hostname": "mx1.dest.test",
                              "receiving-ip": "2001:db8::25", "failed-session-count": 3}]},
    ]
    # The schema has teeth: a report missing its summary or with an unknown type fails it.
    broken = json.loads(json.dumps(report))
    del broken["policies"][0]["summary"]
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    broken = json.loads(json.dumps(report))
    broken["policies"][1]["failure-details"][0]["result-type"] = "certificate-sad"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


@pytest.mark.parametrize("kwargs", [
    {"policy_type": "mta-sts"},
    {"result_type": "certificate-sad", "success": False},
    {"result_type": "certificate-expired", "success": True},
    {"policy_domain": "not a domain"},
    {"policy_domain": ""},
], ids=["bad-policy-type", "unknown-result-type", "success-with-result", "bad-domain",
        "empty-domain"])
async def test_record_refuses_bad_input(db: Database, kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"day": DAY, "policy_domain": "dest.test", "policy_type": "sts",
                            "policy_strings": STS, "mx_host": "mx1.dest.test", "success": True}
    args.update(kwargs)
    with pytest.raises(ValidationError):
        await record(db, **args)
    assert await counters(db, day=DAY) == []


def test_result_types_are_rfc8460s() -> None:
    assert len(RESULT_TYPES) == len(set(RESULT_TYPES)) == 11


# --- the TXT record (RFC 8460 §3) --------------------------------------------------------------

@pytest.mark.parametrize("text,ruas", [
    ("v=TLSRPTv1; rua=mailto:tls@example.com", ["mailto:tls@example.com"]),
    ("v=TLSRPTv1;rua=mailto:a@x.test,https://r.x.test/tlsrpt;",
     ["mailto:a@x.test", "https://r.x.test/tlsrpt"]),
    ("v=TLSRPTv1 ;\trua=mailto:a@x.test , https://r.x.test/p",
     ["mailto:a@x.test", "https://r.x.test/p"]),
    ("v=TLSRPTv1; ext=1; rua=https://r.x.test/p", ["https://r.x.test/p"]),
    ("v=TLSRPTv1; rua=ftp://r.x.test/p,mailto:a@x.test", ["mailto:a@x.test"]),
    ("v=TLSRPTv1", ValueError),
    ("v=TLSRPTv1; ext=1", ValueError),
    ("v=TLSRPTv2; rua=mailto:a@x.test", ValueError),
    ("rua=mailto:a@x.test; v=TLSRPTv1", ValueError),
    ("v=TLSRPTv1; rua=mailto:a@x.test; rua=mailto:b@x.test", ValueError),
    ("v=TLSRPTv1;; rua=mailto:a@x.test", ValueError),
    ("v=TLSRPTv1; rua=mailto:a b@x.test", ValueError),
], ids=["simple", "two-uris-trailing-delim", "wsp-around-delims", "extension-ignored",
        "other-schemes-dropped", "no-rua", "only-extension", "wrong-version", "version-not-first",
        "two-rua", "empty-field", "space-in-uri"])
def test_parse_record(text: str, ruas: Any) -> None:
    if ruas is ValueError:
        with pytest.raises(ValueError):
            parse_record(text)
    else:
        assert parse_record(text) == ruas


@pytest.mark.parametrize("texts,ruas", [
    (["v=spf1 -all", "v=TLSRPTv1; rua=mailto:a@x.test"], ["mailto:a@x.test"]),
    (["v=TLSRPTv1; rua=mailto:a@x.test", "v=TLSRPTv1; rua=mailto:b@x.test"], None),
    (["v=TLSRPTv1; rua=mailto:a@x.test", "v=TLSRPTv10; rua=mailto:b@x.test"],
     ["mailto:a@x.test"]),
    (["v=TLSRPTv1; nothing=here"], None),
    ([], None),
], ids=["others-ignored", "two-records-means-none", "prefix-lookalike", "unparsable", "empty"])
def test_select_record(texts: list[str], ruas: list[str] | None) -> None:
    assert select_record(texts) == ruas


# --- delivery ----------------------------------------------------------------------------------


async def _wait_message_status(db: Database, message_id: str, status: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        row = await db.one("SELECT status FROM ONLY type::thing('message', $id)",
                           {"id": message_id})
        if row and row["status"] == status:
            return
        assert time.monotonic() < deadline, f"message stayed {row}"
        await asyncio.sleep(0.05)


async def test_mailto_and_https_reports_are_delivered(tmp_path: Path, dns_server: DnsServer,
                                                      smtp_sink: Any,
                                                      https_sink: HttpsSink) -> None:
    settings = make_settings(tmp_path, dns_server, SMTP_OUTBOUND_PORT=smtp_sink.port,
                             INBOX_DB_SYNC="false")
    async with run_stack(settings, dns_server) as stack:
        services = stack.services
        operator = await make_tenant(services, dns_server, "operator.test", name="Operator")
        route_to_sink(dns_server, "reports.test")
        dns_server.add("reports.test", "A", "127.0.0.1")
        dns_server.add_txt("_smtp._tls.dest.test",
                           "v=TLSRPTv1; rua=mailto:tls-reports@reports.test,"
                           f"https://reports.test:{https_sink.port}/v1/tlsrpt")
        await some_traffic(services.db)
        cfg = config(tmp_path, from_address="TLS Reports <tlsrpt@operator.test>",
                     operator_org=operator.org, ca_file=str(https_sink.ca_file))

        outcomes = await send_reports(services, day=DAY, config=cfg)

        assert len(outcomes) == 1
        out = outcomes[0]
        assert (out.policy_domain, out.status) == ("dest.test", "sent"), out
        assert [d.ok for d in out.deliveries] == [True, True]
        mail, post = out.deliveries
        assert mail.message_id and post.detail == "HTTP 200"
        # The copy on disk: report_dir/<day>/<domain>!<id>.json.gz
        day_dir = tmp_path / "reports" / "2024-05-01"
        assert out.file == day_dir / f"dest.test!{out.report_id}.json.gz"
        report = json.loads(gzip.decompress(out.file.read_bytes()))
        validate(report)
        assert report["report-id"] == out.report_id
        assert report["policies"][0]["summary"] == {"total-successful-session-count": 1,
                                                    "total-failure-session-count": 1}

        # https: POSTed with the §5.4 media type, the body gunzips to the same report.
        assert len(https_sink.requests) == 1
        req = https_sink.requests[0]
        assert req["line"] == "POST /v1/tlsrpt HTTP/1.1"
        assert req["headers"]["content-type"] == MEDIA_TYPE
        assert req["headers"]["host"] == f"reports.test:{https_sink.port}"
        assert json.loads(gzip.decompress(req["body"])) == report

        # mailto: queued through our own queue and DELIVERED to the rua's MX by the worker.
        await _wait_message_status(services.db, mail.message_id, "DELIVERED")
        received = (await smtp_sink.wait_for(1))[0]
        assert received.rcpt_tos == ["tls-reports@reports.test"]
        assert received.mail_from == "tlsrpt@operator.test"
        raw = received.data
        parsed = email.message_from_bytes(raw, policy=policy.default)
        assert parsed["TLS-Report-Domain"] == "dest.test"
        assert parsed["TLS-Report-Submitter"] == "operator.test"
        assert str(parsed["Subject"]) == (
            f"Report Domain: dest.test Submitter: operator.test Report-ID: <{out.report_id}>")
        assert parsed["TLS-Required"] == "No"
        assert parsed["Auto-Submitted"] == "auto-generated"
        # RFC 8460 §5.3 / RFC 6522: a multipart/report of report-type "tlsrpt".
        assert parsed.get_content_type() == "multipart/report"
        assert parsed.get_param("report-type") == "tlsrpt"
        attachments = [p for p in parsed.iter_attachments()
                       if p.get_content_type() == MEDIA_TYPE]
        assert len(attachments) == 1
        name = attachments[0].get_filename() or ""
        assert name.startswith("operator.test!dest.test!1714521600!1714608000!")
        assert name.endswith(".json.gz")
        assert json.loads(gzip.decompress(attachments[0].get_content())) == report
        # DKIM-signed by the normal delivery path, with the operator domain's keys.
        sigs = parsed.get_all("DKIM-Signature")
        assert sigs and all("d=operator.test" in s.replace(" ", "") for s in sigs)
        verifier = dkim.DKIM(raw)
        lookup = dkim_dnsfunc(dns_server)
        assert all(verifier.verify(idx=i, dnsfunc=lookup) for i in range(len(sigs)))

        # Sent once: a second run for the day finds the claim.
        again = await send_reports(services, day=DAY, config=cfg)
        assert [o.status for o in again] == ["already-claimed"]
        assert len(https_sink.requests) == 1


async def test_concurrent_senders_deliver_once(tmp_path: Path, dns_server: DnsServer,
                                               https_sink: HttpsSink) -> None:
    settings = make_settings(tmp_path, dns_server, INBOX_DB_SYNC="false")
    async with run_stack(settings, dns_server, workers=False) as stack:
        services = stack.services
        operator = await make_tenant(services, dns_server, "operator.test", name="Operator")
        dns_server.add("reports.test", "A", "127.0.0.1")
        dns_server.add_txt("_smtp._tls.dest.test",
                           "v=TLSRPTv1; rua=mailto:tls@reports.test,"
                           f"https://reports.test:{https_sink.port}/r")
        await some_traffic(services.db)
        await some_traffic(services.db, domain="second.test")  # no TXT: copy only
        cfg = config(tmp_path, from_address="tlsrpt@operator.test", operator_org=operator.org,
                     ca_file=str(https_sink.ca_file))

        first, second = await asyncio.gather(send_reports(services, day=DAY, config=cfg),
                                             send_reports(services, day=DAY, config=cfg))

        statuses = sorted(o.status for o in [*first, *second] if o.policy_domain == "dest.test")
        assert statuses == ["already-claimed", "sent"]
        assert sorted(o.status for o in [*first, *second]
                      if o.policy_domain == "second.test") == ["already-claimed", "no-policy"]
        assert len(https_sink.requests) == 1
        queued = await services.db.one("SELECT id FROM message WHERE source = 'tlsrpt'")
        assert len(queued) == 1
        day_dir = tmp_path / "reports" / "2024-05-01"
        files = sorted(p.name.split("!")[0] for p in day_dir.glob("*.json.gz"))
        assert files == ["dest.test", "second.test"]


async def test_no_txt_record_sends_nothing_but_keeps_a_copy(tmp_path: Path, db: Database,
                                                            dns_server: DnsServer,
                                                            https_sink: HttpsSink) -> None:
    await some_traffic(db)
    out, = await send_reports(light_services(db, dns_server), day=DAY, config=config(tmp_path))
    assert (out.status, out.deliveries) == ("no-policy", ())
    assert out.file is not None and out.file.exists()
    validate(json.loads(gzip.decompress(out.file.read_bytes())))
    assert https_sink.requests == []
    claim = await db.one(
        "SELECT * FROM ONLY type::thing('tlsrpt_sent', ['2024-05-01', 'dest.test'])")
    assert claim["status"] == "no-policy"


async def test_dns_failure_defers_without_claiming(tmp_path: Path, db: Database,
                                                   dns_server: DnsServer,
                                                   https_sink: HttpsSink) -> None:
    await some_traffic(db)
    dns_server.add("reports.test", "A", "127.0.0.1")
    dns_server.add_txt("_smtp._tls.dest.test",
                       f"v=TLSRPTv1; rua=https://reports.test:{https_sink.port}/r")
    dns_server.set_servfail("_smtp._tls.dest.test")
    services = light_services(db, dns_server)
    cfg = config(tmp_path, ca_file=str(https_sink.ca_file))
    out, = await send_reports(services, day=DAY, config=cfg)
    assert out.status == "deferred" and out.file is None
    assert not (tmp_path / "reports").exists()
    dns_server.set_servfail("_smtp._tls.dest.test", on=False)
    out, = await send_reports(services, day=DAY, config=cfg)
    assert out.status == "sent" and len(https_sink.requests) == 1


@pytest.mark.parametrize("status,trusted,ok,detail", [
    ("200 OK", True, True, "HTTP 200"),
    ("204 No Content", True, True, "HTTP 204"),
    ("302 Found", True, False, "HTTP 302"),  # redirects are not followed
    ("500 Internal Server Error", True, False, "HTTP 500"),
    ("200 OK", False, False, "CERTIFICATE_VERIFY_FAILED"),
], ids=["200", "204", "redirect-not-followed", "500", "untrusted-certificate"])
async def test_https_delivery_outcomes(tmp_path: Path, db: Database, dns_server: DnsServer,
                                       https_sink: HttpsSink, status: str, trusted: bool,
                                       ok: bool, detail: str) -> None:
    await some_traffic(db)
    https_sink.status = status
    dns_server.add("reports.test", "A", "127.0.0.1")
    dns_server.add_txt("_smtp._tls.dest.test",
                       f"v=TLSRPTv1; rua=https://reports.test:{https_sink.port}/r")
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(make_self_signed_cert("reports.test")[0])
    cfg = config(tmp_path, ca_file=str(https_sink.ca_file if trusted else other_ca))
    out, = await send_reports(light_services(db, dns_server), day=DAY, config=cfg)
    assert out.status == ("sent" if ok else "failed")
    assert out.deliveries[0].ok is ok
    assert detail in out.deliveries[0].detail
    assert len(https_sink.requests) == (1 if trusted else 0)


async def test_mailto_without_sender_settings_fails_cleanly(tmp_path: Path, db: Database,
                                                            dns_server: DnsServer) -> None:
    await some_traffic(db)
    dns_server.add_txt("_smtp._tls.dest.test", "v=TLSRPTv1; rua=mailto:tls@reports.test")
    out, = await send_reports(light_services(db, dns_server), day=DAY, config=config(tmp_path))
    assert out.status == "failed"
    assert "SMTP_TLS_REPORT_FROM" in out.deliveries[0].detail
    assert out.file is not None and out.file.exists()


async def test_run_daily_reports_yesterday_then_each_midnight(tmp_path: Path, db: Database,
                                                             dns_server: DnsServer) -> None:
    today = DAY + timedelta(days=1)
    await some_traffic(db, domain="yesterday.test", day=DAY)
    await some_traffic(db, domain="today.test", day=today)
    start = datetime(2024, 5, 2, 23, 59, 59, 600000, tzinfo=UTC)  # 0.4 s before midnight
    t0 = time.monotonic()

    def clock() -> datetime:
        return start + timedelta(seconds=time.monotonic() - t0)

    services = light_services(db, dns_server)
    services.clock = clock
    stop = asyncio.Event()
    task = asyncio.create_task(run_daily(services, stop, clock=clock, config=config(tmp_path),
                                         jitter=lambda: 0.1))
    try:
        first = tmp_path / "reports" / "2024-05-01"
        second = tmp_path / "reports" / "2024-05-02"
        deadline = time.monotonic() + 5
        while not (second.exists() and any(second.glob("*.json.gz"))):
            assert time.monotonic() < deadline, "the midnight run did not happen"
            await asyncio.sleep(0.02)
        assert [p.name.split("!")[0] for p in first.glob("*.json.gz")] == ["yesterday.test"]
        assert [p.name.split("!")[0] for p in second.glob("*.json.gz")] == ["today.test"]
        assert time.monotonic() - t0 >= 0.45  # not before 00:00 UTC + jitter
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


@pytest.mark.parametrize("settings,expected", [
    ({"INBOX_DATA_DIR": "/srv/inbox", "SERVER_HOSTNAME": "mx.op.test"},
     {"report_dir": Path("/srv/inbox/tlsrpt"), "organization_name": "mx.op.test",
      "contact_info": "", "from_address": "", "operator_org": "", "submitter_domain": "",
      "ca_file": None, "https_timeout": 30.0}),
    ({"INBOX_DATA_DIR": "/srv/inbox", "SMTP_TLS_REPORT_DIR": "/var/tlsrpt",
      "SMTP_TLS_REPORT_FROM": "TLS <tlsrpt@op.test>", "SMTP_TLS_REPORT_ORG": "org_1",
      "SMTP_TLS_REPORT_ORGANIZATION_NAME": "Op Inc", "SMTP_TLS_REPORT_CONTACT": "https://op.test/",
      "SMTP_TLS_REPORT_HTTPS_TIMEOUT_SECS": 5},
     {"report_dir": Path("/var/tlsrpt"), "organization_name": "Op Inc",
      "contact_info": "https://op.test/", "from_address": "TLS <tlsrpt@op.test>",
      "operator_org": "org_1", "submitter_domain": "op.test", "ca_file": None,
      "https_timeout": 5.0}),
], ids=["defaults", "all-set"])
def test_config_from_settings(settings: dict[str, Any], expected: dict[str, Any]) -> None:
    cfg = TlsReportConfig.from_settings(SimpleNamespace(**settings))
    assert {k: getattr(cfg, k) for k in expected} == expected
