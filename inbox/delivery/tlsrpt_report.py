"""Sending SMTP TLS reports (RFC 8460 §5): once per policy domain and day, to its rua URIs.

Owns the `tlsrpt_sent` claims (one row per domain and day, so several instances send once),
the report file copies, delivery by mail (through our own queue, `submit()`, so the normal
delivery path DKIM-signs it) and by HTTPS POST, and the daily schedule. Counting and the report
structure are in `inbox.delivery.tlsrpt`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import ipaddress
import json
import logging
import os
import random
import secrets
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from inbox.delivery.tlsrpt import (
    TXT_PREFIX,
    build_report,
    day_range,
    policy_domains,
    prune,
    select_record,
)
from inbox.errors import Conflict, DnsNotFound, DnsTemporary, InboxError
from inbox.message import EnvelopeRecipient, RawMessage
from inbox.submission import SubmitOptions, submit
from inbox.tenancy import Principal

log = logging.getLogger(__name__)

# RFC 8460 §5.3: the gzip'ed report's media type, for the attachment and the POST alike.
MEDIA_TYPE = "application/tlsrpt+gzip"
MAX_STATUS_LINE = 1024
PARALLEL_DOMAINS = 8
KEEP_DAYS = 7  # counters and claims older than this are pruned by run_daily


@dataclass(frozen=True)
class TlsReportConfig:
    """Where reports come from and where copies go. `from_settings` shows the settings."""

    report_dir: Path
    organization_name: str  # §4.4 organization-name
    contact_info: str  # §4.4 contact-info: an email address or URL
    from_address: str = ""  # From of mailed reports; a verified domain of `operator_org`
    operator_org: str = ""  # the organization whose domain signs the reports (DKIM)
    submitter: str = ""  # §5.3 TLS-Report-Submitter; the From domain when empty
    ca_file: str | None = None  # trust anchors for https rua (system store when None)
    https_timeout: float = 30.0

    @property
    def submitter_domain(self) -> str:
        if self.submitter:
            return self.submitter
        return self.from_address.rpartition("@")[2].strip(" >").lower()

    @classmethod
    def from_settings(cls, settings: Any) -> TlsReportConfig:
        """SMTP_TLS_REPORT_DIR (default <INBOX_DATA_DIR>/tlsrpt), SMTP_TLS_REPORT_FROM,
        SMTP_TLS_REPORT_ORG, SMTP_TLS_REPORT_ORGANIZATION_NAME (default SERVER_HOSTNAME),
        SMTP_TLS_REPORT_CONTACT (default the From address), SMTP_TLS_REPORT_CA_FILE,
        SMTP_TLS_REPORT_HTTPS_TIMEOUT_SECS. Missing settings take their defaults."""
        def get(name: str, default: Any = "") -> Any:
            value = getattr(settings, name, None)
            return default if value in (None, "") else value

        from_address = str(get("SMTP_TLS_REPORT_FROM"))
        return cls(
            report_dir=Path(get("SMTP_TLS_REPORT_DIR",
                                Path(get("INBOX_DATA_DIR", "./data")) / "tlsrpt")),
            organization_name=str(get("SMTP_TLS_REPORT_ORGANIZATION_NAME",
                                      get("SERVER_HOSTNAME", "localhost"))),
            contact_info=str(get("SMTP_TLS_REPORT_CONTACT", from_address)),
            from_address=from_address, operator_org=str(get("SMTP_TLS_REPORT_ORG")),
            ca_file=get("SMTP_TLS_REPORT_CA_FILE", None),
            https_timeout=float(get("SMTP_TLS_REPORT_HTTPS_TIMEOUT_SECS", 30.0)))


@dataclass(frozen=True)
class RuaDelivery:
    uri: str
    ok: bool
    detail: str  # "queued msg_…", "HTTP 200", or why it failed
    message_id: str | None = None  # the queued message, for mailto


@dataclass(frozen=True)
class ReportOutcome:
    """What happened to one (policy domain, day). `status`: sent | partial | failed |
    no-policy (no usable TLSRPT record: only the file copy) | already-claimed (another caller
    sends it) | deferred (DNS failed temporarily: nothing claimed, try again later)."""

    policy_domain: str
    day: date
    status: str
    report_id: str | None = None
    file: Path | None = None
    deliveries: tuple[RuaDelivery, ...] = ()
    detail: str = ""


def _report_id(day: date, domain: str, submitter: str) -> str:
    # §4.4 report-id: unique; §5.3 quotes it like a msg-id in the Subject, hence the "@".
    return f"{day:%Y%m%d}.{domain}.{secrets.token_hex(6)}@{submitter or 'localhost'}"


def attachment_name(submitter: str, domain: str, day: date, report_id: str) -> str:
    """RFC 8460 §5.3 filename: sender "!" policy-domain "!" begin "!" end "!" unique-id
    ".json.gz", the timestamps in seconds since the epoch."""
    start, end = day_range(day)
    unique = report_id.partition("@")[0].rsplit(".", 1)[-1]
    return (f"{submitter}!{domain}!{int(start.timestamp())}!{int(end.timestamp())}"
            f"!{unique}.json.gz")


def _write_copy(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


async def send_reports(services: Any, *, day: date, config: TlsReportConfig | None = None
                       ) -> list[ReportOutcome]:
    """Report `day` to every policy domain that has counters for it (RFC 8460 §5).

    `services` needs `db`, `resolver`, `settings` and `clock`; `tenant_cache` and `handoff`
    are used when present. Each (domain, day) is claimed in the database before anything is
    sent, so concurrent callers (other instances) send it once.
    """
    config = config or TlsReportConfig.from_settings(services.settings)
    gate = asyncio.Semaphore(PARALLEL_DOMAINS)

    async def one(domain: str) -> ReportOutcome:
        async with gate:
            try:
                return await _send_domain(services, config, domain, day)
            except InboxError as exc:
                log.exception("TLS report for %s (%s) failed", domain, day)
                return ReportOutcome(domain, day, "failed", detail=exc.message)

    domains = await policy_domains(services.db, day=day)
    return list(await asyncio.gather(*(one(d) for d in domains)))


async def _send_domain(services: Any, config: TlsReportConfig, domain: str, day: date
                       ) -> ReportOutcome:
    # RFC 8460 §3: the reporting policy is the TXT record at _smtp._tls.<policy domain>.
    try:
        ruas = select_record(list(await services.resolver.txt(TXT_PREFIX + domain)))
    except DnsNotFound:
        ruas = None
    except DnsTemporary as exc:
        return ReportOutcome(domain, day, "deferred", detail=exc.message)

    now = services.clock()
    submitter = config.submitter_domain
    report_id = _report_id(day, domain, submitter)
    try:
        await services.db.run(
            "CREATE type::thing('tlsrpt_sent', [$day, $domain]) CONTENT {day: $day,"
            " policy_domain: $domain, report_id: $rid, claimed_at: $now, status: 'claimed'}"
            " RETURN NONE;",
            {"day": day.isoformat(), "domain": domain, "rid": report_id, "now": now})
    except Conflict:
        return ReportOutcome(domain, day, "already-claimed")

    report = await build_report(services.db, policy_domain=domain, day=day,
                                organization_name=config.organization_name,
                                contact_info=config.contact_info, report_id=report_id)
    body = json.dumps(report, separators=(",", ":")).encode()
    gz = gzip.compress(body, mtime=0)
    path = config.report_dir / day.isoformat() / f"{domain}!{report_id}.json.gz"
    await asyncio.to_thread(_write_copy, path, gz)

    deliveries: list[RuaDelivery] = []
    for uri in ruas or []:
        if uri.lower().startswith("mailto:"):
            deliveries.append(await _mail(services, config, uri, domain, day, report_id, gz))
        else:
            deliveries.append(await _post(services.resolver, config, uri, gz))
    if ruas is None:
        status = "no-policy"
    elif deliveries and all(d.ok for d in deliveries):
        status = "sent"
    elif any(d.ok for d in deliveries):
        status = "partial"
    else:
        status = "failed"
    with contextlib.suppress(InboxError):  # the claim stands either way
        await services.db.run(
            "UPDATE type::thing('tlsrpt_sent', [$day, $domain]) SET status = $status,"
            " deliveries = $deliveries, file = $file, finished_at = $now RETURN NONE;",
            {"day": day.isoformat(), "domain": domain, "status": status,
             "deliveries": [{"uri": d.uri, "ok": d.ok, "detail": d.detail} for d in deliveries],
             "file": str(path), "now": services.clock()})
    for d in deliveries:
        if not d.ok:
            log.warning("TLS report %s to %s failed: %s", report_id, d.uri, d.detail)
    return ReportOutcome(domain, day, status, report_id, path, tuple(deliveries))


async def _mail(services: Any, config: TlsReportConfig, uri: str, domain: str, day: date,
                report_id: str, gz: bytes) -> RuaDelivery:
    """§5.3: a message with the gzip'ed report attached, queued like any tenant mail."""
    if not (config.from_address and config.operator_org):
        return RuaDelivery(uri, False, "SMTP_TLS_REPORT_FROM / SMTP_TLS_REPORT_ORG not set")
    address = unquote(urlsplit(uri).path)
    submitter = config.submitter_domain
    msg = RawMessage(
        data=_report_mime(config.from_address, address, domain, submitter, day, report_id, gz),
        mail_from=config.from_address, rcpt_to=[EnvelopeRecipient(address)])
    principal = Principal(org=config.operator_org, key_id="system:tlsrpt",
                          scopes=frozenset({"send"}))
    opts = SubmitOptions(idempotency_key=f"tlsrpt:{day.isoformat()}:{domain}:{address}"[:200],
                         tags=["tlsrpt"], source="tlsrpt")
    try:
        row = await submit(services.db, principal, msg, opts, settings=services.settings,
                           now=services.clock(), cache=getattr(services, "tenant_cache", None),
                           handoff=getattr(services, "handoff", None))
    except InboxError as exc:
        return RuaDelivery(uri, False, f"{exc.code}: {exc.message}")
    return RuaDelivery(uri, True, f"queued {row['id']}", row["id"])


def _report_mime(from_address: str, to: str, domain: str, submitter: str, day: date,
                 report_id: str, gz: bytes) -> bytes:
    """RFC 8460 §5.3: multipart/report (report-type "tlsrpt", RFC 6522) with a human-readable
    part and the gzip'ed JSON as application/tlsrpt+gzip."""
    boundary = f"tlsrpt-{secrets.token_hex(12)}"
    name = attachment_name(submitter, domain, day, report_id)
    encoded = base64.encodebytes(gz).decode("ascii").replace("\n", "\r\n")
    lines = [
        f"From: {from_address}",
        f"To: {to}",
        # §5.3: Subject: Report Domain: <domain> Submitter: <submitter> Report-ID: <id>
        f"Subject: Report Domain: {domain} Submitter: {submitter} Report-ID: <{report_id}>",
        f"TLS-Report-Domain: {domain}",  # §5.3: both fields MUST be present
        f"TLS-Report-Submitter: {submitter}",
        # RFC 8460 §5.3: reports go out despite TLS failures; RFC 8689 §5 tells our transport.
        "TLS-Required: No",
        "Auto-Submitted: auto-generated",  # RFC 3834 §5
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type="tlsrpt"; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"This is an aggregate TLS report from {submitter} for {domain} covering "
        f"{day.isoformat()} (UTC).",
        f"--{boundary}",
        f"Content-Type: {MEDIA_TYPE}",
        "Content-Transfer-Encoding: base64",
        f'Content-Disposition: attachment; filename="{name}"',
        "",
    ]
    return ("\r\n".join(lines) + "\r\n" + encoded + f"--{boundary}--\r\n").encode("ascii")


async def _post(resolver: Any, config: TlsReportConfig, uri: str, gz: bytes) -> RuaDelivery:
    """§5.4: POST the gzip'ed report; any 2xx is delivered; redirects are not followed."""
    try:
        async with asyncio.timeout(config.https_timeout):
            status = await _https_post(resolver, uri, gz, config.ca_file)
    except TimeoutError:
        return RuaDelivery(uri, False, f"timed out after {config.https_timeout:g} s")
    except (OSError, ssl.SSLError, ValueError, InboxError) as exc:
        return RuaDelivery(uri, False, str(getattr(exc, "message", exc)) or type(exc).__name__)
    return RuaDelivery(uri, 200 <= status < 300, f"HTTP {status}")


async def _https_post(resolver: Any, uri: str, body: bytes, ca_file: str | None) -> int:
    """A minimal HTTP/1.1 POST (Connection: close) over TLS; returns the status code.

    The host is resolved through our resolver and the certificate is checked against the
    URI's host name (SNI too), like any HTTPS client; the response body is not read.
    """
    parts = urlsplit(uri)
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise ValueError(f"not an https URI: {uri}")
    host = parts.hostname
    port = parts.port or 443
    try:
        ips = [str(ipaddress.ip_address(host))]
    except ValueError:
        ips = list(await resolver.ips(host))
    context = ssl.create_default_context(cafile=ca_file)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = host if port == 443 else f"{host}:{port}"
    if ":" in host and not host.startswith("["):
        host_header = f"[{host}]" if port == 443 else f"[{host}]:{port}"
    head = (f"POST {target} HTTP/1.1\r\nHost: {host_header}\r\nContent-Type: {MEDIA_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\nUser-Agent: inbox-tlsrpt\r\n"
            "Connection: close\r\n\r\n").encode("ascii")
    error: Exception | None = None
    for ip in ips:
        try:
            reader, writer = await asyncio.open_connection(
                ip, port, ssl=context, server_hostname=host, limit=MAX_STATUS_LINE * 4)
        except (OSError, ssl.SSLError) as exc:
            error = exc
            continue
        try:
            writer.write(head + body)
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)
        fields = line.decode("latin-1").split(None, 2)
        if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not fields[1].isdigit():
            raise ValueError(f"not an HTTP response: {line[:80]!r}")
        return int(fields[1])
    raise error or OSError(f"no address for {host}")


async def run_daily(services: Any, stop: asyncio.Event, *, clock: Callable[[], datetime],
                    config: TlsReportConfig | None = None,
                    jitter: Callable[[], float] = lambda: random.uniform(60, 600),
                    retry_secs: float = 1800.0) -> None:
    """Send the previous UTC day's reports once a day, a jittered moment after 00:00 UTC.

    At start it also sends yesterday's (claims make that safe after a restart). Domains whose
    TXT lookup failed temporarily are tried again every `retry_secs` until the next day's run.
    Errors are logged; the loop only ends when `stop` is set.
    """
    config = config or TlsReportConfig.from_settings(services.settings)
    day = (clock().astimezone(UTC) - timedelta(days=1)).date()
    while not stop.is_set():
        deferred = False
        try:
            outcomes = await send_reports(services, day=day, config=config)
            deferred = any(o.status == "deferred" for o in outcomes)
            sent = [o for o in outcomes if o.status not in ("already-claimed", "deferred")]
            if sent:
                log.info("TLS reports for %s: %d domain(s)", day, len(sent))
            await prune(services.db, before=day - timedelta(days=KEEP_DAYS))
        except Exception:  # noqa: BLE001 - scheduler edge: log and keep the schedule
            log.exception("sending TLS reports for %s failed", day)
        now = clock().astimezone(UTC)
        next_run = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(),
                                    tzinfo=UTC) + timedelta(seconds=jitter())
        wait = (next_run - now).total_seconds()
        retry = deferred and retry_secs < wait
        if retry:
            wait = retry_secs
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=max(wait, 0))
        if not retry:
            day = (next_run - timedelta(days=1)).date()


__all__ = ["MEDIA_TYPE", "ReportOutcome", "RuaDelivery", "TlsReportConfig", "attachment_name",
           "run_daily", "send_reports"]
